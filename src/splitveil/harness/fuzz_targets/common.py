"""What the frame-speaking targets (enclave, slip, accelerator) share beyond `fuzz_service`: the serve target's
protocol-level categories plus replay and reordering, an adapter that lets `load_service.Bystander` drive any
honest client, and the process ids of a server's children."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

from splitveil.core.registry import Registry
from splitveil.harness.fuzz_service import CATEGORIES as SERVE_CATEGORIES
from splitveil.harness.fuzz_service import Category, Target, forward, register_category

#: the serve target's categories that say nothing about what a FORWARD carries (its header, size, order, session)
PROTOCOL_CATEGORIES = ("random_bytes", "bit_flip", "truncation", "bad_header", "foreign_session", "text_message",
                       "second_open", "no_session", "close_then_use", "oversize", "http")


def session_forward(message, t: Target, *, codec: str):
    """`message` decoded when it is a 1-D `codec` FORWARD of the connection's session with the expected sequence
    number (what any frame target's RESULT may answer); None otherwise."""
    from splitveil.core.errors import WireError
    from splitveil.wire.frame import NO_SESSION, FrameKind, decode_frame

    try:
        frame = decode_frame(message, max_bytes=t.max_frame_bytes) if isinstance(message, bytes) else None
    except WireError:
        return None
    if (frame is None or frame.kind != FrameKind.FORWARD or frame.session != t.session or t.session == NO_SESSION
            or frame.seq != t.seq or frame.codec != codec or len(frame.shape) != 1):
        return None
    return frame


def frame_categories(kind: str, names: tuple[str, ...] = PROTOCOL_CATEGORIES) -> Registry[Category]:
    """A target's registry, starting with the serve target's `names` and `replay` and `reorder` (the target adds its own)."""
    registry: Registry[Category] = Registry(f"{kind} fuzz category")
    for name in names:
        registry.register(name, SERVE_CATEGORIES.get(name))
    register_category(registry, "replay", "yes")(replay)
    register_category(registry, "reorder", "yes")(reorder)
    return registry


def replay(rng: random.Random, t: Target) -> list:
    """A valid FORWARD, then the very same bytes again (its sequence number is spent): RESULT, then ERROR."""
    frame = forward(rng, t, codec="fp32", positions=1)
    return [frame, frame]


def reorder(rng: random.Random, t: Target) -> list:
    """The FORWARD after next before the next one (a sequence number from the future)."""
    ahead = forward(rng, replace(t, seq=t.seq + rng.randint(1, 3)), codec="fp32", positions=1)
    return [ahead, forward(rng, t, codec="fp32", positions=1)]


def weighted(names: list[str], weights: dict[str, int], default: int = 1) -> list[str]:
    """`names` repeated by weight, interleaved (cases take `names[i % len]`): rare categories for costly ones."""
    rounds = max([default, *weights.values()])
    return [n for r in range(rounds) for n in names if r < weights.get(n, default)]


class CallAsLM:
    """Duck-types `SplitCausalLM.generate` for `load_service.Bystander`: `output(prompt)` is what is compared.

    Args:
        output: prompt -> a list (tokens, labels ...) that must equal the expected one.
        session: the honest client's live session on the server under test (what hostile peers try to use).
    """

    def __init__(self, output: Callable[[object], list], *, session: Callable[[], bytes | None] = lambda: None,
                 close: Callable[[], None] = lambda: None):
        self.output, self._session, self.close = output, session, close

    @property
    def stages(self) -> list:
        return [SimpleNamespace(session=self._session())]

    def generate(self, prompt, **_) -> SimpleNamespace:
        return SimpleNamespace(token_ids=self.output(prompt))


def children(pid: int) -> list[int]:
    """The process ids of `pid`'s children (Linux; empty elsewhere)."""
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found += [int(p) for p in (task / "children").read_text().split()]
        except OSError:
            pass
    return found
