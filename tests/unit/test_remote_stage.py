"""RemoteStage and whole-sequence logits: every plan shape gives the unsplit logits; wrong replies are refused.

In-process (the loopback transport and the same PartService the server runs); the network versions are in
tests/network/test_remote_plans.py and tests/network/test_client_security.py.
"""

import json

import pytest
import torch

from splitveil.core.errors import TransportError
from splitveil.edge.generate import SplitCausalLM
from splitveil.edge.remote import RemoteStage
from splitveil.models.tiny import tiny_causal_lm
from splitveil.plan.plan import Placement, SplitPlan
from splitveil.transport.loopback import LoopbackTransport
from splitveil.wire.frame import Frame, FrameKind, decode_frame, encode_frame, text_frame

torch.set_num_threads(1)

LAYERS = 4
VOCAB = 101
EDGE, CLOUD = Placement.EDGE, Placement.CLOUD


def every_plan_shape() -> list[SplitPlan]:
    plans = [SplitPlan.unsplit()]
    plans += [SplitPlan.two_way(cut) for cut in range(LAYERS + 1)]
    plans += [SplitPlan.lambda_split(a, b) for a in range(LAYERS + 1) for b in range(a + 1, LAYERS + 1)]
    plans += [SplitPlan((1, 3), (EDGE, CLOUD, CLOUD)), SplitPlan((0, 2), (EDGE, CLOUD, CLOUD))]
    return plans


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def model(request):
    return tiny_causal_lm(request.param)


def ids(seed: int = 0, length: int = 9) -> torch.Tensor:
    return torch.randint(3, VOCAB, (1, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("plan", every_plan_shape(), ids=lambda p: f"{p.describe()}")
def test_forward_logits_and_score_equal_unsplit_for_every_plan_shape(model, plan):
    prompt = ids()
    with torch.inference_mode():
        unsplit = model(prompt).logits  # [1, T, V]
    lm = SplitCausalLM(model, plan)
    logits = lm.forward_logits(prompt)
    assert logits.shape == unsplit.shape
    torch.testing.assert_close(logits, unsplit, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(lm.score(prompt[0].tolist()), unsplit[0], rtol=1e-4, atol=1e-5)
    if lm.service is not None:
        assert lm.service.sessions == {}  # the scoring sessions were closed
    # generation still works after scoring (the parts' last-logits setting was restored)
    assert lm.generate(prompt, max_new_tokens=4, eos_token_ids=()).token_ids == \
        SplitCausalLM(model).generate(prompt, max_new_tokens=4, eos_token_ids=()).token_ids


def test_two_way_plan_used_to_fail():
    """Regression: score() on edge|cloud raised AttributeError; forward_logits gave only the last position."""
    model = tiny_causal_lm("llama")
    lm = SplitCausalLM(model, SplitPlan.two_way(2))
    assert lm.forward_logits(ids()).shape == (1, 9, VOCAB)
    assert lm.score(ids()[0].tolist()).shape == (9, VOCAB)


# ---------------------------------------------------------------------------------------------- reply checks


def tampered(lm: SplitCausalLM, change) -> None:
    """Routes the in-process service's replies through `change(request_frame, reply_bytes) -> bytes`."""
    handle = lm.service.handle

    def handler(data: bytes) -> bytes:
        return change(decode_frame(data), handle(data))

    lm.transport.handler = handler


def on_forward(make):
    def change(request: Frame, reply: bytes) -> bytes:
        return make(request, decode_frame(reply, finite=False)) if request.kind == FrameKind.FORWARD else reply
    return change


def with_tensor(reply: Frame, tensor: torch.Tensor, **changes) -> bytes:
    fields = {"codec": reply.codec, "session": reply.session, "seq": reply.seq, "part": reply.part, **changes}
    return encode_frame(Frame(FrameKind.RESULT, tensor, **fields))


@pytest.mark.parametrize("make, expected", [
    (lambda q, r: with_tensor(r, torch.zeros(1, 1, VOCAB + 1)), "shape [1, 1, 102] where [1, 1, 101]"),
    (lambda q, r: with_tensor(r, torch.zeros(1, q.tensor.shape[1], VOCAB)), "shape [1, 9, 101] where [1, 1, 101]"),
    (lambda q, r: with_tensor(r, torch.zeros(1, 1, 32)), "shape [1, 1, 32] where [1, 1, 101]"),
    (lambda q, r: with_tensor(r, r.tensor.to(torch.bfloat16), codec="bf16"), "a bf16 tensor where fp32"),
    (lambda q, r: with_tensor(r, torch.full((1, 1, VOCAB), float("inf"))), "NaN or Inf"),
    (lambda q, r: encode_frame(text_frame(FrameKind.OK, "{}", session=r.session, seq=r.seq)), "a OK frame where RESULT"),
])
def test_a_wrong_logits_reply_of_a_two_way_plan_is_refused(make, expected):
    model = tiny_causal_lm("llama")
    lm = SplitCausalLM(model, SplitPlan.two_way(2))
    tampered(lm, on_forward(make))
    with pytest.raises(TransportError) as caught:
        lm.generate(ids(), max_new_tokens=2, eos_token_ids=())
    assert expected in str(caught.value) and "\n" not in str(caught.value), str(caught.value)


def test_replies_are_bounded_by_what_the_request_can_produce():
    model = tiny_causal_lm("llama")
    lm = SplitCausalLM(model, SplitPlan.lambda_split(1, 3))
    stage = lm.stages[1]
    assert isinstance(stage, RemoteStage)
    seen = []
    handle = lm.service.handle

    def handler(data: bytes) -> bytes:
        seen.append(lm.transport.max_reply_bytes)
        return handle(data)

    lm.transport.handler = handler
    lm.generate(ids(length=40), max_new_tokens=2, eos_token_ids=())
    # OPEN: room for the JSON info; the prefill: a [1, 40, 32] fp32 result; the decode step and CLOSE: an error's room
    assert seen == [28 + 4 + 65536, 28 + 12 + 40 * 32 * 4, 28 + 4 + 4096, 28 + 4 + 4096]
    assert lm.transport.max_reply_bytes is None  # restored after each request

    # a reply over the bound is refused by the transport itself (the network transport refuses it while it arrives)
    lm.transport.handler = lambda data: handle(data) if decode_frame(data).kind != FrameKind.FORWARD else b"\0" * 10**6
    with pytest.raises(TransportError, match="exceeds the 4128 bytes this request can produce"):
        lm.generate(ids(length=5), max_new_tokens=2, eos_token_ids=())


@pytest.mark.parametrize("info, expected", [
    ({"hidden_size": "32"}, "bad hidden_size"),
    ({"max_frame_bytes": -1}, "bad max_frame_bytes"),
    ({"max_tokens": 1.5}, "bad max_tokens"),
    ({"parts": "1"}, "bad list of parts"),
])
def test_a_bad_open_reply_is_refused(info, expected):
    def server(data: bytes) -> bytes:
        return encode_frame(text_frame(FrameKind.OK, json.dumps(info), session=bytes(range(16))))

    stage = RemoteStage(LoopbackTransport(server), 1, "fp32", recover_seconds=0)
    with pytest.raises(TransportError, match=expected):
        stage.open()


def test_an_open_reply_without_a_session_is_refused():
    stage = RemoteStage(LoopbackTransport(lambda data: encode_frame(Frame(FrameKind.OK))), 1, "fp32", recover_seconds=0)
    with pytest.raises(TransportError, match="without a session id"):
        stage.open()
