"""The two processes of a partitioned inference, and the run that drives them.

- the **accelerator** (the `accelerator` worker, `tee.worker`): the standard `SplitServer` + `PartService` serving the
  layers [p, end) of the model (copies of those segments only), over TLS;
- the **trusted executor** (the `enclave` worker, `tee.worker`): `EnclaveService` on the standard `SplitServer`, holding
  copies of the segments [0, p) only, the SIMULATED attestation key, and a TLS client to the accelerator.

`run_partitioned` (what `splitveil partition run` does) starts both on 127.0.0.1 with fresh certificates and tokens,
attests the executor, classifies images through it, compares with the unpartitioned model in this process, and shows
that a tampered and a replayed sealed message are refused.
"""

from __future__ import annotations

import copy
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from splitveil.serve.process import ChildServer

IMAGENET_MODEL = "mobilenet_v2"  # the ImageNet MobileNetV2 with real weights (latency on a real network)


@dataclass(frozen=True)
class ModelChoice:
    """Which network a partitioned run uses: one of our Fashion-MNIST-style CNNs (trained, cached) or the ImageNet
    MobileNetV2."""

    model: str = "vgg"
    dataset: str = "fashion-mnist"
    quick: bool = True  # the victim of `partition --quick` (trained with `attack image --quick` sizes)
    seed: int = 0

    def spec(self) -> dict:
        """The fields of a `tee.worker` spec that name this choice."""
        return {"model": self.model, "dataset": self.dataset, "quick": self.quick, "seed": self.seed}


def load_model(choice: ModelChoice):
    """(the whole model in eval mode, example inputs [N, C, H, W], their labels or None)."""
    if choice.model == IMAGENET_MODEL:
        from splitveil.models.mobilenet import load_mobilenet_v2_imagenet

        return load_mobilenet_v2_imagenet(), imagenet_photos(), None
    from splitveil.train.victims import VictimSpec, splits_and_victim

    spec = VictimSpec.quick if choice.quick else VictimSpec
    splits, victim, _ = splits_and_victim(spec(dataset=choice.dataset, model=choice.model, seed=choice.seed))
    return victim.eval(), splits.test.images, splits.test.labels


def imagenet_photos() -> torch.Tensor:
    """scikit-image's colour photos, 224x224, ImageNet-normalised [N, 3, 224, 224]."""
    import torch.nn.functional as F
    from skimage import data

    photos = [data.chelsea(), data.astronaut(), data.coffee(), data.rocket()]
    mean = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
    std = torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    batch = [F.interpolate(torch.tensor(p).permute(2, 0, 1)[None].float() / 255, size=(224, 224), mode="bilinear",
                           antialias=True)[0] for p in photos]
    return (torch.stack(batch) - mean) / std


def segment_copy(model, start: int, end: int, name: str):
    """A part running segments [start, end) of `model` on deep copies of those segments only."""
    from splitveil.models.sequential import SequentialSplittable

    segments = [copy.deepcopy(module) for module in model.segments[start:end]]
    owner = SequentialSplittable(blocks=segments, name=name).eval()
    return owner.make_part(0, len(segments)), owner


def check_cut(model, cut: int) -> None:
    from splitveil.plan.plan import check_block_cut

    check_block_cut(cut, model.num_blocks, flag="--cut")


def executor_part(model, cut: int, label: str):
    """(the executor's part, its measurement): copies of segments [0, prologue + cut), measured with the code this
    process has loaded once the executor's serving code is imported (`tee.measure`)."""
    from splitveil.tee.measure import measure
    from splitveil.tee.measure import import_executor_code

    part, owner = segment_copy(model, 0, model.num_prologue + cut, label)
    import_executor_code()
    return part, measure(owner.state_dict(), label=label)


def expected_executor_measurement(choice: ModelChoice, cut: int) -> bytes:
    """The measurement a client expects from the trusted executor (`tee.worker.enclave`) for this model and cut,
    computed from this machine's code and weights (a measure-only run of the executor's start-up), never read from the
    executor."""
    from splitveil.tee.measure import expected_measurement

    return expected_measurement("enclave", {**choice.spec(), "cut": cut})


def executor_label(choice: ModelChoice, cut: int) -> str:
    return f"{choice.model} {choice.dataset if choice.model != IMAGENET_MODEL else 'imagenet'} blocks [0, {cut})"


class AcceleratorProcess(ChildServer):
    prefix = "splitveil-accel-"
    log_name = "accelerator.log"
    what = "the accelerator"

    def __init__(self, choice: ModelChoice, cut: int, *, startup_timeout: float = 300.0):
        self.choice, self.cut, self.startup_timeout = choice, cut, startup_timeout

    def _worker_spec(self):
        return "accelerator", {**self.choice.spec(), "cut": self.cut}


class EnclaveProcess(ChildServer):
    prefix = "splitveil-enclave-"
    log_name = "enclave.log"
    what = "the trusted executor"

    def __init__(self, choice: ModelChoice, cut: int, *, accelerator: ChildServer | None, attestation_file: Path,
                 startup_timeout: float = 300.0, extra: dict | None = None):
        self.choice, self.cut, self.accelerator = choice, cut, accelerator
        self.attestation_file, self.startup_timeout = attestation_file, startup_timeout
        self.extra = extra or {}

    def _worker_spec(self):
        spec = {**self.choice.spec(), "cut": self.cut, "attestation_key": str(self.attestation_file), **self.extra}
        if self.accelerator is not None:
            spec |= {"accelerator_url": self.accelerator.url, "accelerator_pin": self.accelerator.fingerprint,
                     "accelerator_token_file": str(self.accelerator.token_file)}
        return "enclave", spec


@dataclass
class PartitionedRun:
    """What `partition run` measured (JSON-ready via `to_dict`)."""

    choice: ModelChoice
    cut: int
    images: int
    max_abs_logit_diff: float
    same_labels: bool
    accuracy: float | None
    measurement: str
    seconds_partitioned: float
    seconds_unpartitioned: float
    refusals: dict = field(default_factory=dict)
    startup_seconds: float = 0.0

    def to_dict(self) -> dict:
        from dataclasses import asdict

        from splitveil.tee.channel import SIMULATED

        return {"kind": "tee-partition-run", **asdict(self), "attestation": SIMULATED}


def client_for(enclave: ChildServer, *, attestation, measurement: bytes):
    from splitveil.tee.executor import EnclaveClient
    from splitveil.transport.network import WebSocketTransport

    transport = WebSocketTransport(enclave.url, token=enclave.token, pin_sha256=enclave.fingerprint, timeout=120)
    return EnclaveClient(transport, attestation=attestation, expected_measurement=measurement).connect()


def refusal_checks(enclave: ChildServer, *, attestation, measurement: bytes, images: torch.Tensor) -> dict:
    """A tampered and a replayed sealed message, each on its own connection: the one-line refusals."""
    from splitveil.tee.channel import SealError

    refusals = {}
    client = client_for(enclave, attestation=attestation, measurement=measurement)
    sealed = bytearray(client.seal_images(images[:1]))
    sealed[-1] ^= 1  # one bit of the tag
    try:
        client.send_sealed(bytes(sealed))
        refusals["tampered"] = "ACCEPTED (bug)"
    except SealError as error:
        refusals["tampered"] = error.message
    client.close()
    client = client_for(enclave, attestation=attestation, measurement=measurement)
    first = client.seal_images(images[:1])
    client.send_sealed(first)
    try:
        client.send_sealed(first)  # the host relays the same ciphertext again, in a fresh frame
        refusals["replayed"] = "ACCEPTED (bug)"
    except SealError as error:
        refusals["replayed"] = error.message
    client.close()
    return refusals


def run_partitioned(choice: ModelChoice, cut: int, *, images: int = 64, check_refusals: bool = True,
                    progress=None) -> PartitionedRun:
    """Both processes, one attested session, `images` classified through them and compared with the whole model."""
    from splitveil.tee.channel import AttestationKey

    say = progress or (lambda message: None)
    model, inputs, labels = load_model(choice)  # trains and caches the victim before the children load it
    check_cut(model, cut)
    inputs = inputs[:images]
    measurement = expected_executor_measurement(choice, cut)  # what the client expects, computed here
    key = AttestationKey.generate()  # SIMULATED: stands in for the CPU vendor's key
    with tempfile.TemporaryDirectory(prefix="splitveil-tee-") as folder:
        key_file = key.write_private(Path(folder) / "attestation.key")
        public = AttestationKey.from_public_bytes(key.public_bytes())
        began = time.perf_counter()
        say("starting the accelerator and the trusted executor ...")
        with AcceleratorProcess(choice, cut) as accelerator, \
                EnclaveProcess(choice, cut, accelerator=accelerator, attestation_file=key_file) as enclave:
            startup = time.perf_counter() - began
            say("attesting the executor and classifying through it ...")
            client = client_for(enclave, attestation=public, measurement=measurement)
            client.logits(inputs[:1])  # warm-up
            t0 = time.perf_counter()
            partitioned = client.logits(inputs)
            seconds = time.perf_counter() - t0
            client.close()
            refusals = refusal_checks(enclave, attestation=public, measurement=measurement, images=inputs) \
                if check_refusals else {}
    with torch.no_grad():
        t0 = time.perf_counter()
        whole = model(inputs)
        unpartitioned_seconds = time.perf_counter() - t0
    accuracy = float((partitioned.argmax(-1) == labels[:len(inputs)]).float().mean()) if labels is not None else None
    return PartitionedRun(choice, cut, len(inputs), float((partitioned - whole).abs().max()),
                          bool(torch.equal(partitioned.argmax(-1), whole.argmax(-1))), accuracy, measurement.hex(),
                          seconds, unpartitioned_seconds, refusals, startup)
