"""The TEE processes as library workers (`serve.worker` roles): the TEE partition's untrusted `accelerator` and
trusted `enclave` (a CNN's first blocks), and the `enclave-lm` executor of `serve --enclave` (an LM trunk).

Each role takes its spec (a dict of JSON values, the fields below) and `ready`, the callback that reports on the
parent's pipe. The executor roles take `measure_only` to report the measurement they would serve with and exit. The
attestation is SIMULATED: `attestation_key` names a file whose Ed25519 key stands in for the CPU vendor's.

Common fields: `host` (default 127.0.0.1), `port` (0: any free one), `token_file`, `tls_cert`/`tls_key` (absent:
the default certificate of `serve.build.tls_for_server`), `threads` (1).
"""

from __future__ import annotations

import logging
from pathlib import Path

from splitveil.core.errors import ConfigError


def _choice(spec: dict):
    from splitveil.data.images import DATASETS
    from splitveil.models.vision_zoo import VISION_MODELS
    from splitveil.tee.process import IMAGENET_MODEL, ModelChoice

    choice = ModelChoice(model=spec.get("model", "vgg"), dataset=spec.get("dataset", "fashion-mnist"),
                         quick=bool(spec.get("quick", True)), seed=int(spec.get("seed", 0)))
    if choice.model != IMAGENET_MODEL:
        VISION_MODELS.get(choice.model)
        DATASETS.get(choice.dataset)
    return choice


def _path(spec: dict, key: str) -> Path | None:
    return Path(spec[key]) if spec.get(key) else None


def _serve(service, role: str, spec: dict, ready, *, plaintext: bool = False, report: dict | None = None,
           notes: tuple[str, ...] = ()) -> None:
    """Serves `service` with the standard `SplitServer` (the token file's token; TLS unless `plaintext`) until
    SIGINT/SIGTERM; once it listens, logs `notes` and its address and reports `{"ready": true, "url", "port",
    **report}` to the parent."""
    from splitveil.serve.build import tls_for_server, token_for_server
    from splitveil.serve.server import SplitServer, serve_until_stopped

    host, port = spec.get("host", "127.0.0.1"), int(spec.get("port", 0))
    token, _ = token_for_server(_path(spec, "token_file"))
    ssl_context = None if plaintext else tls_for_server(_path(spec, "tls_cert"), _path(spec, "tls_key"))[0]
    server = SplitServer(service, token=token, ssl_context=ssl_context, host=host, port=port)

    def listening(srv) -> None:
        for note in notes:
            print(f"splitveil {role}: {note}", flush=True)
        print(f"splitveil {role}: listening on {srv.url}", flush=True)
        ready({"ready": True, "url": srv.url, "port": srv.port, **(report or {})})

    serve_until_stopped(server, listening, host=host, port=port)


def _attestation_key(spec: dict):
    """The SIMULATED attestation key (private half) the executor signs with, or None for a measure-only run."""
    from splitveil.tee.channel import read_attestation_key

    if spec.get("measure_only"):
        return None
    if not spec.get("attestation_key"):
        raise ConfigError("the trusted executor needs attestation_key (or measure_only)")
    return read_attestation_key(Path(spec["attestation_key"]), private=True)


def _redact_service_logs() -> None:
    """Inside a trusted executor, the services' refusal lines (their reasons could describe sealed content) are
    replaced by a fixed line before they reach the log the operator reads."""

    class Redact(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            record.msg, record.args, record.exc_info, record.exc_text = (
                "a frame inside the executor was refused or failed (details stay inside)", (), None, None)
            return True

    for name in ("splitveil.serve.service", "splitveil.models", "splitveil.tee.executor"):
        logging.getLogger(name).addFilter(Redact())


def accelerator(spec: dict, ready) -> None:
    """The untrusted accelerator: blocks [cut, end) and the head (copies of those segments only) over TLS.
    Fields: model, dataset, quick, seed, cut."""
    from splitveil.core.runtime import set_threads
    from splitveil.serve.build import build_classifier_service
    from splitveil.tee.process import check_cut, load_model

    choice, cut = _choice(spec), int(spec["cut"])
    set_threads(int(spec.get("threads", 1)))
    whole, inputs, _ = load_model(choice)
    check_cut(whole, cut)
    service = build_classifier_service(whole, cut, example=inputs[:1], info={"role": "tee-accelerator"}, max_batch=64,
                                       max_frame_bytes=64 * 2**20)
    del whole
    _serve(service, "accelerator", spec, ready)


def enclave(spec: dict, ready) -> None:
    """The trusted executor of a CNN: holds blocks [0, cut) only, opens sealed input, releases the feature map at the
    cut (to the accelerator at `accelerator_url`, pinned, with the token in `accelerator_token_file`, when given).
    Fields: model, dataset, quick, seed, cut, attestation_key, measure_only, accelerator_url, accelerator_pin,
    accelerator_token_file."""
    import gc

    import torch

    from splitveil.core.runtime import set_threads
    from splitveil.tee.channel import SIMULATED
    from splitveil.tee.executor import EnclaveService
    from splitveil.tee.process import check_cut, executor_label, executor_part, load_model

    choice, cut = _choice(spec), int(spec["cut"])
    set_threads(int(spec.get("threads", 1)))
    key = _attestation_key(spec)
    whole, inputs, _ = load_model(choice)
    check_cut(whole, cut)
    part, measurement = executor_part(whole, cut, executor_label(choice, cut))
    if spec.get("measure_only"):
        return ready({"measurement": measurement.hex()})
    input_shape = tuple(inputs.shape[1:])
    with torch.no_grad():
        classes = int(whole(inputs[:1]).shape[-1])  # what the accelerator's logits must have
    del whole, inputs
    gc.collect()  # the executor keeps copies of its own segments and nothing else of the model
    _redact_service_logs()
    release = None
    if spec.get("accelerator_url"):
        from splitveil.serve.auth import read_token
        from splitveil.tee.executor import AcceleratorLink
        from splitveil.transport.network import WebSocketTransport

        if not spec.get("accelerator_token_file"):
            raise ConfigError("accelerator_url needs accelerator_token_file")
        transport = WebSocketTransport(spec["accelerator_url"], token=read_token(Path(spec["accelerator_token_file"])),
                                       pin_sha256=spec.get("accelerator_pin"), timeout=120)
        release = AcceleratorLink(transport, classes=classes)
    service = EnclaveService(part, attestation=key, measurement=measurement, input_shape=input_shape, release=release,
                             info={"model": choice.model, "cut": cut}, max_frame_bytes=64 * 2**20)
    _serve(service, "enclave", spec, ready, report={"measurement": measurement.hex()},
           notes=(f"{SIMULATED}; measurement {measurement.hex()}",))


def enclave_lm(spec: dict, ready) -> None:
    """The trusted executor of `serve --enclave`: the LM trunk behind the sealed channel, plain ws on 127.0.0.1.
    Fields: model, cuts, attestation_key, measure_only, max_sessions (16), max_tokens."""
    from splitveil.core.runtime import set_threads
    from splitveil.tee.channel import SIMULATED
    from splitveil.tee.enclave_lm import build_enclave_lm_service, measured_trunk

    model, cuts = spec.get("model", "smollm2-135m"), tuple(int(c) for c in spec["cuts"])
    limits = {"max_sessions": int(spec.get("max_sessions") or 16), "max_tokens": spec.get("max_tokens")}
    key = _attestation_key(spec)
    set_threads(int(spec.get("threads", 1)))
    if spec.get("measure_only"):
        return ready({"measurement": measured_trunk(model, cuts, **limits)[1].hex()})
    service, measurement = build_enclave_lm_service(model, cuts, attestation=key, **limits)
    _redact_service_logs()
    _serve(service, "enclave-lm", {**spec, "host": "127.0.0.1"}, ready, plaintext=True,
           report={"measurement": measurement.hex()}, notes=(f"{SIMULATED}; measurement {measurement.hex()}",))
