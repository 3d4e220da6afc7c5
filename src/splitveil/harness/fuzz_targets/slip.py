"""`bench fuzz --target slip`: hostile frames against `splitveil slip serve` (the untrusted SLIP executor) while an
honest trusted side generates through it.

The executor is started on a residual-only bundle this run exports itself (`save_residual` into a fresh folder:
`manifest.json` and `residual.safetensors`, what `slip serve --bundle` is meant to be given), in the fixed-point
mode, for the weights deployment of `spec.model` at its default secure rank. A valid FORWARD is
`int64 [group, positions, x...]` for one of its groups; the categories add malformed headers of that payload
(unknown groups, position counts out of range or not matching the values, other codecs and ranks, the wrong part).
The bystander's reference is the same protected model computed in this process with no executor and no masks
(`SlipModel.reference()`: the ring arithmetic is exact, so every masked run through the executor must give the same
tokens); the record also says whether an undisturbed run through the executor, before any hostile byte, gave them.
"""

from __future__ import annotations

import random
import tempfile
from dataclasses import asdict
from pathlib import Path

import numpy as np

from splitveil.harness.fuzz_service import (
    FrameKind,
    FuzzClient,
    Target,
    _accepts,
    category_names,
    log_watcher,
    quiet_client_library,
    raw_frame,
    register_category,
)
from splitveil.harness.fuzz_targets.common import frame_categories, session_forward
from splitveil.wire.frame import decode_frame

INT64, FLOAT32 = 4, 1  # wire codec ids
CATEGORIES = frame_categories("slip")
_category = lambda name, session="yes": register_category(CATEGORIES, name, session)  # noqa: E731


def slip_forward(rng: random.Random, t: Target, *, group: int | None = None, positions: int | None = None,
                 values: list[int] | None = None, count: int | None = None, codec: int = INT64, part: int = 0,
                 shape: tuple[int, ...] | None = None) -> bytes:
    """A FORWARD of the SLIP protocol, valid unless told otherwise: [group, positions, positions x n ring elements]."""
    groups = t.extra["groups"]  # group id -> (m, n)
    group = rng.choice(sorted(groups)) if group is None else group
    positions = rng.randint(1, 2) if positions is None else positions
    n = groups.get(group, (0, 8))[1]
    count = max(positions, 0) * n if count is None else count
    body = values if values is not None else [rng.getrandbits(64) - 2**63 for _ in range(count)]
    payload = np.array([group, positions, *body], dtype=np.int64)
    data = payload.tobytes() if codec == INT64 else payload.astype("<f4").tobytes()
    return raw_frame(session=t.session, seq=t.seq, part=part, codec=codec, shape=shape or (len(payload),), payload=data)


def make_forward(rng: random.Random, t: Target) -> bytes:
    return slip_forward(rng, t)


@_category("slip_header")
def slip_header(rng, t):
    """Headers of the int64 payload that no group takes: unknown or negative group, positions 0, negative, huge or
    not matching the values that follow."""
    groups = t.extra["groups"]
    group = rng.choice(sorted(groups))
    n = groups[group][1]
    style = rng.randrange(5)
    if style == 0:
        return [slip_forward(rng, t, group=rng.choice([len(groups), len(groups) + rng.randint(1, 1000), -1, -2**63, 2**63 - 1]))]
    if style == 1:
        return [slip_forward(rng, t, group=group, positions=rng.choice([0, -1, -2**63, 2**31, 2**63 - 1]), count=n)]
    if style == 2:  # one value too few or too many
        return [slip_forward(rng, t, group=group, positions=1, count=n + rng.choice([-1, 1, n]))]
    if style == 3:  # header only, or half a header
        return [slip_forward(rng, t, group=group, positions=1, count=0)]
    return [raw_frame(session=t.session, seq=t.seq, part=0, codec=INT64, shape=(1,), payload=np.int64([group]).tobytes())]


@_category("slip_form")
def slip_form(rng, t):
    """A valid payload in the wrong form: another codec, rank 2, the wrong part, an empty tensor."""
    style = rng.randrange(4)
    if style == 0:
        return [slip_forward(rng, t, codec=rng.choice([FLOAT32, 5]), positions=1)]
    if style == 1:
        good = slip_forward(rng, t, positions=1)
        frame = decode_frame(good, max_bytes=t.max_frame_bytes)
        size = frame.shape[0]
        return [raw_frame(session=t.session, seq=t.seq, part=0, codec=INT64, shape=(1, size), payload=good[-8 * size:])]
    if style == 2:
        return [slip_forward(rng, t, part=rng.randint(1, 255))]
    return [raw_frame(session=t.session, seq=t.seq, part=0, codec=INT64, shape=(0,))]


def slip_accepts(message, t: Target, reply_kind: int) -> bool:
    """A RESULT is right only for a FORWARD the executor's checks pass: int64, 1-D, part 0, a known group, 1 ..
    `positions_per_frame` positions and exactly that many rows of the group's width."""
    from splitveil.protect.slip.executor import positions_per_frame

    if reply_kind != FrameKind.RESULT:
        return _accepts(message, t, reply_kind)
    frame = session_forward(message, t, codec="int64")
    if frame is None or frame.part != 0 or frame.shape[0] < 3:
        return False
    group, positions = int(frame.tensor[0]), int(frame.tensor[1])
    if group not in t.extra["groups"]:
        return False
    m, n = t.extra["groups"][group]
    return 1 <= positions <= positions_per_frame(t.max_frame_bytes, n, m) and frame.shape[0] == 2 + positions * n


class SlipFuzzClient(FuzzClient):
    def accepts(self, message, t: Target, reply_kind: int) -> bool:
        return slip_accepts(message, t, reply_kind)


def run(spec, *, progress=None) -> dict:
    """`bench fuzz --target slip`: see the module's docstring."""
    from splitveil.edge.generate import SplitCausalLM
    from splitveil.harness.fuzz_core import Subject, fuzz_subject, locked
    from splitveil.harness.fuzz_targets.common import CallAsLM
    from splitveil.harness.load_service import Bystander
    from splitveil.core.records import environment
    from splitveil.protect.slip.executor import save_residual
    from splitveil.protect.slip.runtime import ExecutorProcess, connect_client, protect_registered
    from splitveil.protect.slip.trusted import SlipConfig

    from splitveil.protect.slip.cost import default_rank
    from splitveil.wire.frame import MAX_FRAME_BYTES

    names = category_names(CATEGORIES, spec.categories)
    quiet_client_library()
    from transformers import AutoConfig

    from splitveil.models.loading import resolve_model_dir

    model_config = AutoConfig.from_pretrained(resolve_model_dir(spec.model))
    repetitions = SlipConfig().repetitions  # the default Freivalds repetitions
    config = SlipConfig(mode="fixed", rank=default_rank(model_config, repetitions=repetitions),
                        layers=(0, model_config.num_hidden_layers), include_head=True, repetitions=repetitions)
    from splitveil.harness.fuzz_service import has_tokenizer

    slip, tokenizer, _, _ = protect_registered(spec.model, config, with_tokenizer=has_tokenizer(spec.model))
    groups = {g.group_id: (g.total_out, g.in_features) for g in slip.groups}
    from splitveil.harness.fuzz_service import bystander_prompts

    with tempfile.TemporaryDirectory(prefix="splitveil-fuzz-slip-") as folder:
        bundle = save_residual(Path(folder) / "bundle", slip.groups, slip.residual_weights(), model=spec.model,
                               fixed_point=config.fixed_point)
        with slip.reference():  # the protected model's arithmetic in the clear, no executor
            prompts, expected = bystander_prompts(slip.model, tokenizer, spec.bystander_tokens)
        record = {"benchmark": "fuzz", "target": "slip", "spec": asdict(spec), "environment": environment(),
                  "categories": names, "slip": {"mode": "fixed", "rank": config.rank, "groups": len(groups),
                                                "bundle_files": sorted(p.name for p in (Path(folder) / "bundle").iterdir())}}
        with ExecutorProcess(Path(folder) / "bundle", "fixed", extra_args=["--max-sessions", str(spec.workers + 16)]) as server:
            unhandled = locked(log_watcher(server.log_path))

            def honest():
                client, transport = connect_client(server.url, token=server.token, mode="fixed", residual_sha256=bundle.sha256,
                                                   groups=len(groups), ca_file=server.cert)
                slip.attach(client)
                return client, transport

            def generate_all(client, transport) -> list[list[int]]:
                runner = SplitCausalLM(slip.model, None, tokenizer=tokenizer, transport=transport)
                return [runner.generate(p, max_new_tokens=spec.bystander_tokens, eos_token_ids=()).token_ids for p in prompts]

            client, transport = honest()
            slip.fill_pools(min(len(max(prompts, key=len)) + spec.bystander_tokens, 512))
            record["slip"]["undisturbed_run_equals_reference"] = generate_all(client, transport) == expected
            runner = SplitCausalLM(slip.model, None, tokenizer=tokenizer, transport=transport)
            lm = CallAsLM(lambda p: runner.generate(p, max_new_tokens=spec.bystander_tokens, eos_token_ids=()).token_ids,
                          session=lambda: client.session)
            bystander = Bystander(lm, prompts, expected, spec.bystander_tokens)

            def make_client(settle: float = 0.0) -> FuzzClient:
                fuzz = SlipFuzzClient(server.url, token=server.token, ca_file=server.cert, hidden=max(n for _, n in groups.values()),
                                      part=0, max_frame_bytes=MAX_FRAME_BYTES, timeout=spec.timeout_seconds,
                                      unhandled=unhandled, settle=settle, categories=CATEGORIES,
                                      target={"make_forward": make_forward, "extra": {"groups": groups}})
                fuzz.foreign = lambda: client.session
                return fuzz

            def after() -> bool:
                client.close()
                transport.close()
                fresh, fresh_transport = honest()
                try:
                    return generate_all(fresh, fresh_transport) == expected
                finally:
                    fresh.close()
                    fresh_transport.close()

            subject = Subject(server.process.pid, server.log_path, lambda: server.process.poll() is None, unhandled)
            return fuzz_subject(spec, subject, make_client, bystander, after, names=names, record=record, progress=progress)
