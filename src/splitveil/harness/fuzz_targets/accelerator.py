"""`bench fuzz --target accelerator`: hostile frames against the accelerator process of `splitveil partition run`
(the `accelerator` worker of `tee.worker`: the standard `SplitServer` + `PartService` serving a CNN's blocks [p, end) over TLS) while
its honest client classifies through it: the trusted executor's own link to the accelerator (`tee.executor.
AcceleratorLink`, what the `enclave` worker runs), fed the feature map of blocks [0, p) computed in this process;
its labels must be the whole model's and its logits within 1e-4 of them.

A valid FORWARD is float `[batch, *feature_shape]` for part 1 (the feature map the executor hands over), batch 1 ..
64. The accelerator accepts frames of up to 64 MiB, so the `oversize` category (each case sends 64-128 MiB) is
weighted down to one case in 64. The accelerator logs through Python's last-resort handler (no timestamps or
levels), so a line is an unhandled path when it is a traceback or says the server failed internally.
"""

from __future__ import annotations

from dataclasses import asdict

from splitveil.harness.fuzz_service import CATEGORIES as SERVE_CATEGORIES
from splitveil.harness.fuzz_service import FuzzClient, category_names, log_watcher, quiet_client_library
from splitveil.harness.fuzz_targets.common import PROTOCOL_CATEGORIES, frame_categories, weighted

CATEGORIES = frame_categories("accelerator")
for _name in ("absurd_shape", "nonfinite", "huge_values"):  # float inputs: the serve target's, in the CNN's shape
    CATEGORIES.register(_name, SERVE_CATEGORIES.get(_name))
MAX_FRAME_BYTES = 64 * 2**20  # what the accelerator worker accepts
WEIGHTS = {"oversize": 1}  # and every other category 64 times as often
MAX_BATCH = 64


def is_unhandled(line: str) -> bool:
    """A traceback, or one of the service's internal-failure lines (printed without a level by the last-resort handler)."""
    return "Traceback (most recent call last)" in line or "internal error" in line or " failed: " in line


def run(spec, *, progress=None) -> dict:
    """`bench fuzz --target accelerator`: see the module's docstring."""
    import math

    import torch

    from splitveil.harness.fuzz_core import Subject, fuzz_subject, locked
    from splitveil.harness.fuzz_targets.common import CallAsLM
    from splitveil.harness.load_service import Bystander
    from splitveil.core.records import environment
    from splitveil.plan.plan import SplitPlan, apply
    from splitveil.tee.executor import AcceleratorLink
    from splitveil.tee.process import AcceleratorProcess, ModelChoice, check_cut, load_model
    from splitveil.transport.network import WebSocketTransport

    names = category_names(CATEGORIES, spec.categories)
    plan = weighted(names, WEIGHTS, default=64)
    quiet_client_library()
    if len(spec.cuts) != 1:
        raise ValueError("the accelerator target takes one cut: --split P")
    cut = spec.cuts[0]
    choice = ModelChoice(model=spec.model, dataset=spec.dataset or "fashion-mnist", quick=True, seed=0)
    model, inputs, _ = load_model(choice)
    check_cut(model, cut)
    images = inputs[:8]
    edge, _ = apply(model, SplitPlan.two_way(cut))
    with torch.no_grad():
        feature_shape = tuple(edge(images[:1]).shape[1:])
        expected_logits = model(images)
    expected = expected_logits.argmax(-1).tolist() + [True]
    record = {"benchmark": "fuzz", "target": "accelerator", "spec": asdict(spec), "environment": environment(),
              "categories": names, "accelerator": {"model": choice.model, "dataset": choice.dataset, "cut": cut,
                                                   "feature_shape": list(feature_shape), "case_weights": WEIGHTS}}
    with AcceleratorProcess(choice, cut) as server:
        unhandled = locked(log_watcher(server.log_path, is_unhandled))

        def link() -> AcceleratorLink:
            return AcceleratorLink(WebSocketTransport(server.url, token=server.token, pin_sha256=server.fingerprint,
                                                      timeout=spec.timeout_seconds), classes=expected_logits.shape[-1])

        def honest_output(honest: AcceleratorLink) -> list:
            with torch.no_grad():
                logits = honest(edge(images))
            return logits.argmax(-1).tolist() + [float((logits - expected_logits).abs().max()) <= 1e-4]

        bystander_link = link()
        lm = CallAsLM(lambda _prompt: honest_output(bystander_link), session=lambda: bystander_link.session)
        bystander = Bystander(lm, [None], [expected], 0)

        def make_client(settle: float = 0.0) -> FuzzClient:
            client = FuzzClient(server.url, token=server.token, ca_file=server.cert, hidden=math.prod(feature_shape),
                                max_frame_bytes=MAX_FRAME_BYTES, timeout=spec.timeout_seconds, unhandled=unhandled,
                                settle=settle, categories=CATEGORIES,
                                target={"row_shape": feature_shape, "extra": {"max_batch": MAX_BATCH}})
            client.foreign = lambda: bystander_link.session
            return client

        def after() -> bool:
            bystander_link.transport.close()
            fresh = link()
            try:
                return honest_output(fresh) == expected
            finally:
                fresh.transport.close()

        subject = Subject(server.process.pid, server.log_path, lambda: server.process.poll() is None, unhandled)
        return fuzz_subject(spec, subject, make_client, bystander, after, names=plan, record=record, progress=progress)


__all__ = ["CATEGORIES", "PROTOCOL_CATEGORIES", "run"]
