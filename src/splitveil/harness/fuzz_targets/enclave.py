"""`bench fuzz --target enclave`: hostile frames through the operator's relay of `splitveil serve --enclave` to the
trusted executor (`SealedFrameService` around the Λ-split trunk), while an attested client generates through it.

The outer protocol is the executor's: OPEN, then FORWARD frames of 1-D uint8 bytes, part 0 the hello (nonce |
X25519 key, answered by the signed quote), part 1 a sealed message (counter | AES-GCM ciphertext | tag) holding one
whole frame of the trunk's protocol. A hostile connection opens a session and, in about half of the cases, attests
the executor and agrees keys as an honest client does (and sometimes opens an inner trunk session), so that the
mutations reach every stage: garbage hellos, sealed messages before the hello or with a bad tag, replayed and
reordered counters, second hellos, unknown parts, and the serve target's hostile frames sealed properly, which the
trunk must refuse inside with an ERROR that comes back sealed. Every sealed answer is opened and judged as the serve
target's answers are.

What the judge cannot see today: the executor's own log is a file of the operator's (`serve --enclave`), not
something this harness reads; the operator's log is watched.
"""

from __future__ import annotations

import random
from dataclasses import asdict, replace

from splitveil.core.errors import SplitveilError
from splitveil.harness.fuzz_service import CATEGORIES as SERVE_CATEGORIES
from splitveil.harness.fuzz_service import (
    REPLY_CAP,
    FrameKind,
    FuzzClient,
    Target,
    _accepts,
    category_names,
    forward,
    log_watcher,
    quiet_client_library,
    raw_frame,
    register_category,
)
from splitveil.harness.fuzz_targets.common import frame_categories, session_forward
from splitveil.wire.frame import NO_SESSION, decode_frame

UINT8, HELLO_PART, SEALED_PART = 5, 0, 1
HELLO_BYTES = 64  # nonce | X25519 public key
CATEGORIES = frame_categories("enclave")
NEEDS: dict[str, str] = {}  # category -> "hello": before any key | "channel": keys agreed | "inner": and an inner session
INNER_CATEGORIES = ("absurd_shape", "bad_header", "bit_flip", "nonfinite", "huge_values", "truncation", "random_bytes",
                    "second_open", "close_then_use", "foreign_session")


def _category(name: str, needs: str):
    NEEDS[name] = needs
    return register_category(CATEGORIES, name, "yes")


def outer(t: Target, payload: bytes, *, part: int | None = None, seq: int | None = None, codec: int = UINT8) -> bytes:
    """A FORWARD of the executor's protocol carrying `payload` as 1-D bytes."""
    return raw_frame(session=t.session, seq=t.seq if seq is None else seq, part=t.part if part is None else part,
                     codec=codec, shape=(len(payload),), payload=payload)


def seal(t: Target, inner: bytes) -> bytes:
    """`inner` sealed on the connection's channel; remembered as honest (a RESULT to it is right, once)."""
    sealed = t.extra["channel"].seal(inner)
    t.extra["honest"][sealed] = inner
    return sealed


def hello(t: Target) -> bytes:
    from splitveil.tee.channel import ClientHandshake

    handshake = ClientHandshake(t.session, attestation=t.extra["attestation"], expected_measurement=t.extra["measurement"])
    t.extra["handshake"] = handshake
    return handshake.hello().to_bytes()


def inner_forward(rng: random.Random, t: Target) -> bytes:
    """A valid inner frame: the inner OPEN when there is no inner session, else a valid FORWARD of the trunk."""
    inner = t.extra["inner"]
    if inner.session == NO_SESSION:
        return raw_frame(kind=FrameKind.OPEN, part=0)
    return forward(rng, inner, codec="fp32", positions=1)


def make_forward(rng: random.Random, t: Target) -> bytes:
    """The connection's next valid message: a hello before the keys, then a sealed valid inner frame."""
    if t.extra.get("channel") is None:
        return outer(replace(t, part=HELLO_PART), hello(t), part=HELLO_PART)
    return outer(t, seal(t, inner_forward(rng, t)), part=SEALED_PART)


@_category("hello_garbage", "hello")
def hello_garbage(rng, t):
    """Hellos of the wrong length or codec, or 64 random bytes (a valid form: RESULT or ERROR are both right)."""
    size = rng.choice([0, 1, HELLO_BYTES - 1, HELLO_BYTES + 1, rng.randint(2, 4096), HELLO_BYTES])
    codec = rng.choice([UINT8] * 4 + [1, 4])
    return [outer(t, rng.randbytes(size if codec == UINT8 else size - size % 8), part=HELLO_PART, codec=codec)]


@_category("sealed_before_hello", "hello")
def sealed_before_hello(rng, t):
    return [outer(t, rng.randbytes(rng.randint(0, 200)), part=SEALED_PART)]


@_category("second_hello", "channel")
def second_hello(rng, t):
    return [outer(t, rng.randbytes(HELLO_BYTES), part=HELLO_PART)]


@_category("bad_tag", "channel")
def bad_tag(rng, t):
    """A properly sealed valid frame with bits flipped in its counter, ciphertext or tag, or cut short."""
    sealed = bytearray(seal(t, inner_forward(rng, t)))
    if rng.random() < 0.2:
        return [outer(t, bytes(sealed[: rng.randrange(len(sealed))]), part=SEALED_PART)]
    for _ in range(rng.randint(1, 4)):
        at = rng.choice([rng.randrange(8), len(sealed) - 1 - rng.randrange(16), rng.randrange(len(sealed))])
        sealed[at] ^= 1 << rng.randrange(8)
    return [outer(t, bytes(sealed), part=SEALED_PART)]


@_category("replayed_counter", "channel")
def replayed_counter(rng, t):
    """A sealed message (RESULT), then the same ciphertext in the next frame: refused as replayed."""
    sealed = seal(t, inner_forward(rng, t))
    return [outer(t, sealed, part=SEALED_PART), outer(t, sealed, part=SEALED_PART, seq=t.seq + 1)]


@_category("reordered_seal", "channel")
def reordered_seal(rng, t):
    """Two sealed messages sent in the opposite order: the later counter is accepted, the earlier one then refused."""
    first = seal(t, inner_forward(rng, t))
    second = seal(t, raw_frame(kind=FrameKind.OPEN, part=0))
    return [outer(t, second, part=SEALED_PART), outer(t, first, part=SEALED_PART, seq=t.seq + 1)]


@_category("wrong_part", "channel")
def wrong_part(rng, t):
    return [outer(t, seal(t, inner_forward(rng, t)), part=rng.randint(2, 255))]


@_category("inner_hostile", "inner")
def inner_hostile(rng, t):
    """The serve target's hostile frames, sealed properly: the trunk refuses them inside; the ERROR comes back sealed."""
    inner = t.extra["inner"]
    messages = SERVE_CATEGORIES.get(rng.choice(INNER_CATEGORIES)).generate(rng, inner)
    return [outer(t, seal(t, m if isinstance(m, bytes) else m.encode()), part=SEALED_PART, seq=t.seq + i)
            for i, m in enumerate(messages)]


class EnclaveFuzzClient(FuzzClient):
    """`FuzzClient` for the executor's protocol: attests before its hostile messages when the category needs keys, and
    opens every sealed answer to judge the inner one."""

    def _setup(self, ws, spec, rng, t, outcome) -> bool:
        name = next(n for n in self.categories.names() if self.categories.get(n) is spec)
        needs = NEEDS.get(name) or rng.choice(["hello", "channel", "channel", "inner"])
        t.extra.update(channel=None, honest={}, inner=Target(hidden=t.extra["inner_hidden"], part=1,
                                                             max_frame_bytes=t.extra["inner_max_frame_bytes"]))
        if spec.session == "no" or (spec.session == "any" and rng.random() < 0.5):
            return True
        if not self._exchange(ws, raw_frame(kind=FrameKind.OPEN, part=0), t, outcome, "open"):
            return False
        if needs == "hello":
            return True
        t.part = HELLO_PART
        if not self._exchange(ws, outer(t, hello(t), part=HELLO_PART), t, outcome, "hello"):
            return False
        if needs == "inner":
            return self._exchange(ws, make_forward(rng, t), t, outcome, "inner OPEN")
        return True

    def _exchange(self, ws, message: bytes, t: Target, outcome, what: str) -> bool:
        """One honest message before the hostile ones: it must be answered as an honest client expects."""
        ws.send(message)
        before = len(outcome.answers)
        if not self._judge(ws.recv(timeout=self.timeout), message, t, outcome) or outcome.answers[before:] in (["error"], []):
            outcome.failure = outcome.failure or "bad_reply"
            outcome.detail = f"the honest {what} was refused: {outcome.detail}"
            return False
        del outcome.answers[before:]
        return True

    def accepts(self, message, t: Target, reply_kind: int) -> bool:
        if reply_kind != FrameKind.RESULT:
            return _accepts(message, t, reply_kind)
        frame = session_forward(message, t, codec="uint8")
        if frame is None:
            return False
        payload = frame.tensor.numpy().tobytes()
        if frame.part == HELLO_PART:
            return t.extra["channel"] is None and len(payload) == HELLO_BYTES
        return frame.part == SEALED_PART and t.extra["channel"] is not None and payload in t.extra["honest"]

    def _judge(self, reply, message, t: Target, outcome) -> bool:
        from splitveil.tee.channel import Quote

        if not super()._judge(reply, message, t, outcome):
            return False
        if outcome.answers[-1] != "result":
            if outcome.answers[-1] == "ok" and t.session == NO_SESSION:  # its session is closed: start again
                t.extra["channel"], t.part = None, HELLO_PART
            return True
        sent = decode_frame(message, max_bytes=REPLY_CAP)  # valid: `accepts` said so
        answer = decode_frame(reply, max_bytes=REPLY_CAP, finite=False).tensor.numpy().tobytes()
        payload = sent.tensor.numpy().tobytes()
        try:
            if sent.part == HELLO_PART:
                handshake = t.extra.get("handshake")
                if handshake is not None and handshake.hello().to_bytes() == payload:  # our hello: the quote must verify
                    t.extra["channel"], t.part = handshake.finish(Quote.from_bytes(answer)), SEALED_PART
                else:  # another hello of the right form was accepted: its keys are not ours, nothing more to send
                    t.extra["channel"] = None
                return True
            inner_message = t.extra["honest"].pop(payload)
            inner_reply = t.extra["channel"].open(answer)
        except SplitveilError as error:
            outcome.failure, outcome.detail = "bad_reply", f"sealed answer refused by the client: {error.message}"
            return False
        return self._judge_inner(inner_reply, inner_message, t.extra["inner"], outcome)

    def _judge_inner(self, reply: bytes, message: bytes, inner: Target, outcome) -> bool:
        """The trunk's answer inside the sealed one, judged as the serve target's answers are."""
        outcome.answers.pop()  # the outer RESULT becomes what the inner answer was
        before = len(outcome.answers)
        if not FuzzClient._judge(self, reply, message, inner, outcome, accepts=_accepts):
            outcome.detail = f"inside the sealed channel: {outcome.detail}"
            return False
        kind = outcome.answers[before]
        outcome.answers[before] = f"inner_{kind}"
        if kind == "ok" and inner.session == NO_SESSION:
            inner.seq = 0
        if kind == "error":  # a refusal ends the inner session (as it ends a plain connection's); the sealed one goes on
            inner.session, inner.seq = NO_SESSION, 0
        return True


def run(spec, *, progress=None) -> dict:
    """`bench fuzz --target enclave`: see the module's docstring."""
    from splitveil.harness.fuzz_core import Subject, fuzz_subject, locked
    from splitveil.harness.fuzz_service import bystander_prompts, exact_after, load_lm, split_lm
    from splitveil.harness.fuzz_targets.common import children
    from splitveil.harness.load_service import Bystander
    from splitveil.core.records import environment
    from splitveil.tee.enclave_lm import EnclaveOperator
    from splitveil.wire.frame import MAX_FRAME_BYTES

    names = category_names(CATEGORIES, spec.categories)
    quiet_client_library()
    model, tokenizer = load_lm(spec.model)
    prompts, expected = bystander_prompts(model, tokenizer, spec.bystander_tokens)
    record = {"benchmark": "fuzz", "target": "enclave", "spec": asdict(spec), "environment": environment(), "categories": names}
    with EnclaveOperator(spec.model, spec.cuts) as operator:
        watchers = [log_watcher(path) for path in (operator.log_path, operator.executor_log) if path is not None]
        unhandled = locked(lambda: [line for watch in watchers for line in watch()])
        executor = (children(operator.process.pid) or [operator.process.pid])[0]
        transport = operator.transport()
        lm = split_lm(model, tokenizer, spec.cuts, transport)
        bystander = Bystander(lm, prompts, expected, spec.bystander_tokens)

        def make_client(settle: float = 0.0) -> FuzzClient:
            client = EnclaveFuzzClient(
                operator.url, token=operator.token, ca_file=None, hidden=HELLO_BYTES, part=HELLO_PART,
                max_frame_bytes=MAX_FRAME_BYTES + 64, timeout=spec.timeout_seconds, unhandled=unhandled, settle=settle,
                categories=CATEGORIES, target={"make_forward": make_forward, "extra": {
                    "attestation": operator.attestation, "measurement": operator.measurement,
                    "inner_hidden": model.config.hidden_size, "inner_max_frame_bytes": MAX_FRAME_BYTES}})
            client.foreign = lambda: transport.client.session if transport.client.session != NO_SESSION else None
            return client

        def alive() -> bool:
            import os

            return operator.process.poll() is None and os.path.exists(f"/proc/{executor}")

        subject = Subject(executor, operator.log_path, alive, unhandled)
        after = exact_after(lambda: split_lm(model, tokenizer, spec.cuts, operator.transport()), prompts, expected,
                            spec.bystander_tokens)
        try:
            return fuzz_subject(spec, subject, make_client, bystander, after, names=names, record=record, progress=progress)
        finally:
            lm.close()


__all__ = ["CATEGORIES", "run"]
