"""RemoteStage: the device's stand-in for a part that runs on a server.

It sends its input as FORWARD frames (in chunks of positions, so that no frame exceeds the server's limit) and
returns the reply's tensor. It remembers every input the remote part has processed in this session, so that when
the session is lost (server restart, eviction, dropped connection) it opens a new session, replays that history
and carries on. The rebuilt remote KV cache comes from one prefill instead of step-by-step decoding, so it equals
the lost one to float tolerance (greedy tokens are checked identical in the tests), not bit for bit.
"""

from __future__ import annotations

import json
import logging
import time

import torch

from splitveil.core.errors import ConfigError, TransportError
from splitveil.transport.base import Transport
from splitveil.transport.session import (  # noqa: F401  (result_bytes, SessionLost: the names of old)
    ClientSession, SessionLost, result_bytes)
from splitveil.wire.codecs import get_codec
from splitveil.wire.frame import HEADER_FIXED_BYTES, MAX_FRAME_BYTES, NO_SESSION, Frame, FrameKind

log = logging.getLogger(__name__)


def _connection_lost() -> tuple[type[BaseException], ...]:
    from splitveil.transport.network import ConnectionLost

    return (ConnectionLost, SessionLost)


class RemoteStage(ClientSession):
    """Runs part `part_index` on the far side of `transport` (a `ClientSession` that replays after a lost session).

    Every reply is checked before its tensor is used: its size is bounded by what the request can produce (the
    transport refuses a larger one while it arrives), and a RESULT must carry this request's session, sequence
    number, part and codec, a finite tensor, and the expected shape: [B, T, hidden] from a part that ends before the
    LM head, [B, 1, vocabulary] (the last position's logits) from a part that holds it.

    Args:
        transport: how frames reach the server.
        part_index: the part's index in the plan (the server must run it).
        codec: wire codec of the tensors sent (the server replies in the same codec).
        expect: facts the server's OPEN reply must confirm (e.g. {"cuts": [2, 28], "hidden_size": 576}).
        recover_seconds: how long to keep trying to reach the server again after losing it (0 = never).
        output_size: the last dimension of the part's output: the vocabulary size when it holds the LM head, else
            the hidden size (None: the hidden size the server announces).
        ends_model: the part holds the LM head and returns the last position's logits.
    """

    def __init__(self, transport: Transport, part_index: int, codec: str, *, expect: dict | None = None,
                 recover_seconds: float = 30.0, output_size: int | None = None, ends_model: bool = False):
        super().__init__(transport, expect=expect)
        self.part_index = part_index
        self.codec = codec
        self.recover_seconds = recover_seconds
        self.output_size = output_size
        self.ends_model = ends_model
        self.history: list[torch.Tensor] = []  # inputs the remote part has processed, in order
        self.keep_replies = False  # keep what the remote part returned too (to show what the server could read)
        self.replies: list[torch.Tensor] = []
        self.recoveries = 0
        self.pending_truncate: int | None = None  # a rollback the next forward sends first (pipelined with it)

    echoes_part = True

    @property
    def what(self) -> str:
        return f"the server (part {self.part_index})"

    def expected_output_shape(self, hidden_shape: tuple[int, ...]) -> tuple[int, ...]:
        """The RESULT shape a FORWARD of `hidden_shape` [B, T, H] must get back."""
        batch, positions = hidden_shape[0], hidden_shape[1]
        width = self.output_size or int(self.info.get("hidden_size") or self.expect.get("hidden_size") or hidden_shape[-1])
        return (batch, 1, width) if self.ends_model else (batch, positions, width)

    def parse_info(self, message: str) -> dict:
        return _parse_info(message)

    def check_info(self, info: dict) -> None:
        if self.part_index not in info.get("parts", [self.part_index]):
            raise ConfigError(f"the server does not run part {self.part_index} of this plan")
        super().check_info(info)

    def open(self) -> dict:
        info = super().open()
        self.history, self.replies = [], []
        self.pending_truncate = None
        return info

    @property
    def positions(self) -> int:
        """Positions the remote part holds in this session (what a replay would send)."""
        return sum(h.shape[1] for h in self.history)

    def truncate(self, length: int) -> None:
        """Rolls the remote part back to its first `length` positions (speculative decoding's rejected positions).

        Lazy: the TRUNCATE frame goes out with the next forward, posted just before it on the same connection, so a
        rollback costs no round trip of its own. The history (what a replay sends) is cut at once."""
        held = self.positions
        if not 0 <= length <= held:
            raise ConfigError(f"cannot keep {length} positions of a remote part that holds {held}")
        if length == held:
            return
        self.history = [torch.cat(self.history, dim=1)[:, :length]] if length else []
        if self.keep_replies and self.replies and not self.ends_model:  # what the server returned, for those positions
            self.replies = [torch.cat(self.replies, dim=1)[:, :length]] if length else []
        self.pending_truncate = length

    @property
    def max_positions(self) -> int:
        """Positions per frame that keep a frame within the server's limit."""
        limit = int(self.info.get("max_frame_bytes", MAX_FRAME_BYTES))
        width = int(self.info.get("hidden_size", 0)) or 1
        per_position = width * get_codec(self.codec).bytes_per_element
        return max(1, (limit - HEADER_FIXED_BYTES - 4 * 3) // per_position)

    def _forward(self, hidden: torch.Tensor) -> torch.Tensor:
        outputs = []
        chunks = list(torch.split(hidden, self.max_positions, dim=1))
        if self.pending_truncate is not None:
            length, self.pending_truncate = self.pending_truncate, None
            keep = torch.tensor([length], dtype=torch.int64)
            if self.transport.can_pipeline:  # TRUNCATE and the first chunk leave together: one round trip for both
                truncate = self.post(keep, codec="int64", kind=FrameKind.TRUNCATE, part=self.part_index)
                chunk = chunks.pop(0)
                first = self.post(chunk, codec=self.codec, part=self.part_index)
                self.collect(truncate, expected_shape=None, overlapped=True)
                outputs.append(self.collect(first, expected_shape=self.expected_output_shape(tuple(chunk.shape))).tensor)
            else:
                self._call(Frame(FrameKind.TRUNCATE, keep, codec="int64", session=self.session, seq=self.seq,
                                 part=self.part_index))
                self.seq += 1
        for chunk in chunks:
            outputs.append(self.request(chunk, codec=self.codec, part=self.part_index,
                                        expected_shape=self.expected_output_shape(tuple(chunk.shape))).tensor)
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=1)

    # -- the stage -------------------------------------------------------------------------------------------

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        try:
            output = self._forward(hidden)
        except _connection_lost() as error:
            if self.recover_seconds <= 0:
                raise
            output = self._recover(hidden, error)
        self.history.append(hidden)
        if self.keep_replies:
            self.replies.append(output)
        return output

    def _recover(self, hidden: torch.Tensor, error: BaseException) -> torch.Tensor:
        """Opens a new session, replays the history, then runs `hidden`; retries until `recover_seconds`."""
        history, replies = list(self.history), list(self.replies)
        deadline = time.monotonic() + self.recover_seconds
        delay = 0.1
        log.warning("lost the remote session (%s); replaying %d inputs into a new one", error, len(history))
        while True:
            try:
                self.transport.close()  # a lost session's connection is of no further use
                self.session = NO_SESSION
                self.open()
                if history:
                    self._forward(torch.cat(history, dim=1))  # rebuilds the remote KV cache; outputs already used
                self.history = history
                self.replies = replies
                output = self._forward(hidden)
                self.recoveries += 1
                return output
            except _connection_lost() as again:
                if time.monotonic() > deadline:
                    raise TransportError(f"lost the server and could not recover within {self.recover_seconds:g} s: {again}") from None
                time.sleep(delay)
                delay = min(delay * 2, 1.0)


def _parse_info(message: str) -> dict:
    """The server's OPEN info (JSON), with the numbers the client computes with checked."""
    try:
        info = json.loads(message) if message else {}
    except json.JSONDecodeError:
        info = {}
    if not isinstance(info, dict):
        info = {}
    if info.get("sealed_channel") or info.get("tee"):
        raise ConfigError("this server is a trusted executor that expects a sealed channel: a plain client would hand "
                          "its hidden states to whoever relays them, so nothing was sent; connect with --attest "
                          "(and --attest-key FILE)")
    for key in ("hidden_size", "max_frame_bytes", "max_tokens"):
        value = info.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise TransportError(f"the server announced a bad {key} ({str(value)[:40]!r})")
    if not isinstance(info.get("parts", []), list):
        raise TransportError("the server announced a bad list of parts")
    return info


def probe_server(transport: Transport) -> dict:
    """Opens and closes a session to read what the server runs (model, cuts, hidden size, limits)."""
    stage = RemoteStage(transport, 0, "fp32", recover_seconds=0)
    reply = stage._call(Frame(FrameKind.OPEN))
    stage.session = reply.session
    stage.close()
    return _parse_info(reply.message)  # without the part check: this only asks what the server runs
