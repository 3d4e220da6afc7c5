"""The Ray ingress's routing rules, against a stand-in for the deployment handle (no Ray instance is started):
frames that reach a replica without their session are sent again, a full replica makes an OPEN be placed again
under a new id, a failed replica and a session no replica holds become the errors the client replays after."""

import asyncio

import pytest

from splitveil.wire.frame import NO_SESSION, Frame, FrameKind, decode_frame, encode_frame

ray_serve = pytest.importorskip("splitveil.serve.ray_serve")


class FakeHandle:
    """Answers `frame` calls from a script: (status, reply), a function of the multiplexed id giving one, or an
    exception to raise; records the multiplexed ids used."""

    def __init__(self, script):
        self.script, self.routes = list(script), []

    def options(self, *, multiplexed_model_id):
        outer = self

        class Method:
            def remote(self, data, owner, opening):
                outer.routes.append(multiplexed_model_id)
                step = outer.script.pop(0)

                async def answer():
                    if isinstance(step, Exception):
                        raise step
                    return step(multiplexed_model_id) if callable(step) else step

                return answer()

        class Target:
            frame = Method()

        return Target()


def ok_frame(session: bytes) -> bytes:
    return encode_frame(Frame(FrameKind.OK, session=session))


def run(coroutine):
    return asyncio.run(coroutine)


def test_admit_opens_under_a_fresh_id_and_binds_later_frames_to_the_connection():
    relay = ray_serve.RelayService(FakeHandle([]), max_frame_bytes=4096)
    work, reply = relay.admit(encode_frame(Frame(FrameKind.OPEN)), owner=b"o", bound_session=NO_SESSION)
    assert reply is None and work.opening and work.session_id != NO_SESSION
    other, _ = relay.admit(encode_frame(Frame(FrameKind.OPEN)), owner=b"o", bound_session=NO_SESSION)
    assert other.session_id != work.session_id
    forward = encode_frame(Frame(FrameKind.CLOSE, session=b"x" * 16))
    work, reply = relay.admit(forward, owner=b"o", bound_session=b"s" * 16)
    assert reply is None and work.session_id == b"s" * 16 and not work.opening
    for data, bound in ((forward, NO_SESSION), (b"junk", NO_SESSION),
                        (encode_frame(Frame(FrameKind.OPEN)), b"s" * 16)):
        work, reply = relay.admit(data, owner=b"o", bound_session=bound)
        assert work is None and decode_frame(reply).kind == FrameKind.ERROR


def test_a_frame_that_reaches_the_wrong_replica_is_sent_again_to_the_same_session():
    session = b"s" * 16
    handle = FakeHandle([(ray_serve.NOT_HERE, b""), (ray_serve.NOT_HERE, b""), (ray_serve.HERE, b"reply")])
    relay = ray_serve.RelayService(handle, max_frame_bytes=4096)
    assert run(relay.forward(ray_serve.RelayWork(session, b"frame", b"o"))) == b"reply"
    assert handle.routes == [session.hex()] * 3 and relay.reroutes == 2


def test_an_open_refused_by_a_full_replica_is_placed_again_under_a_new_id():
    first = b"a" * 16
    handle = FakeHandle([(ray_serve.FULL, b"full"), lambda route: (ray_serve.HERE, ok_frame(bytes.fromhex(route)))])
    relay = ray_serve.RelayService(handle, max_frame_bytes=4096)
    reply = run(relay.forward(ray_serve.RelayWork(first, encode_frame(Frame(FrameKind.OPEN)), b"o", opening=True)))
    assert len(handle.routes) == 2 and handle.routes[0] == first.hex() and handle.routes[1] != first.hex()
    assert decode_frame(reply).kind == FrameKind.OK and decode_frame(reply).session.hex() == handle.routes[1]
    assert list(relay.sessions) == [bytes.fromhex(handle.routes[1])]


def test_a_failed_replica_and_a_session_held_nowhere_make_the_client_replay():
    session = b"s" * 16
    relay = ray_serve.RelayService(FakeHandle([RuntimeError("actor died")]), max_frame_bytes=4096)
    lost = decode_frame(run(relay.forward(ray_serve.RelayWork(session, b"frame", b"o"))))
    assert lost.kind == FrameKind.ERROR and lost.message.startswith("session evicted") and relay.failures == 1
    relay = ray_serve.RelayService(FakeHandle([(ray_serve.NOT_HERE, b"")] * 100), max_frame_bytes=4096,
                                   affinity_wait=0.05)
    gone = decode_frame(run(relay.forward(ray_serve.RelayWork(session, b"frame", b"o"))))
    assert gone.kind == FrameKind.ERROR and gone.message == "unknown session"
