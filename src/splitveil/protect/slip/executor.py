"""The untrusted executor: multiplies masked inputs by W_residual, and sees nothing else.

`SlipExecutorService` is a `serve.service.SessionService`, as `PartService` is (the same admission, sessions and
eviction; `run` and `release` of its own), so `serve.server.SplitServer` serves it unchanged:
TLS, bearer token checked at the upgrade, one session per connection, one compute thread, idle eviction.

Frames (see `wire/frame.py`). OPEN, CLOSE, ERROR and OK as for every service. A FORWARD frame carries one int64
tensor, 1-D, that starts with a two-element header:

    [group_id, positions, x_0 ... x_{positions * n - 1}]

`group_id` addresses a linear group (0 .. number of groups - 1: no limit of the part byte, which stays 0);
`positions` is how many rows follow; n is that group's input width. In the fixed-point mode the values are ring
elements (x + r mod 2^64); in the float mode they are float64 bit patterns (the wire has no float64 codec). The
RESULT frame carries int64 [positions, m]: W_residual (x + r), in the same representation. Everything is checked
before any compute: kind, codec, rank, header, group, position count, payload length, finiteness of floats,
sequence number, session and owner. A bad frame gets an ERROR frame and changes no session.

Every frame the service receives can be recorded through the server side's observation hook
(`SessionService.observers`), raw, in arrival order: the untrusted side's whole view, for the attacks of
`protect.slip.view`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from splitveil.core.errors import ConfigError, WireError
from splitveil.protect.slip.decompose import LinearGroup
from splitveil.protect.slip.fixedpoint import FixedPoint, RingWeight, float64_to_wire, wire_to_float64
from splitveil.serve.service import SessionService, SessionState
from splitveil.wire.frame import MAX_FRAME_BYTES, Frame, FrameKind, encode_frame, text_frame

log = logging.getLogger(__name__)
HEADER_ELEMENTS = 2  # group id, positions
MODES = ("fixed", "float")


def positions_per_frame(max_frame_bytes: int, n: int, m: int) -> int:
    """Rows of one group that fit a frame both ways: request 8 (2 + P n) bytes, reply 8 P m bytes, plus headers."""
    return max(1, (max_frame_bytes - 96) // (8 * max(n, m, 1)))


@dataclass
class ExecutorSession(SessionState):
    rows: int = 0  # rows multiplied so far


@dataclass
class ExecutorWork:
    """One admitted FORWARD frame: group `group_id` applied to `values` [positions, n]."""

    session_id: bytes
    session: ExecutorSession
    frame: Frame
    group_id: int
    values: torch.Tensor  # [P, n] int64 (ring) or float64
    released: bool = False

    @property
    def is_step(self) -> bool:
        return self.values.shape[0] == 1


# -- the residual weights an executor is provisioned with ------------------------------------------------------


@dataclass(frozen=True)
class ResidualBundle:
    """What the untrusted side receives: W_residual per group and a manifest. Nothing of W_secure."""

    groups: tuple[LinearGroup, ...]
    fixed_point: FixedPoint
    model: str
    sha256: str  # digest of the residual tensors (checked by the trusted side at OPEN)

    def to_dict(self) -> dict:
        return {"format": "splitveil-slip-residual/1", "model": self.model, "sha256": self.sha256,
                "fixed_point": self.fixed_point.to_dict(), "groups": [g.to_dict() for g in self.groups]}


def residual_digest(weights: dict[int, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for group_id in sorted(weights):
        tensor = weights[group_id].contiguous()
        digest.update(struct.pack("<III", group_id, *tensor.shape))
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()


def save_residual(folder: Path, groups: list[LinearGroup], weights: dict[int, torch.Tensor], *, model: str,
                  fixed_point: FixedPoint) -> ResidualBundle:
    """Writes `residual.safetensors` (float32 [m, n] per group) and `manifest.json` into `folder`."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    bundle = ResidualBundle(tuple(groups), fixed_point, model, residual_digest(weights))
    save_file({f"group.{gid}": w.contiguous() for gid, w in weights.items()}, str(folder / "residual.safetensors"))
    (folder / "manifest.json").write_text(json.dumps(bundle.to_dict(), indent=1))
    return bundle


def load_residual(folder: Path) -> tuple[ResidualBundle, dict[int, torch.Tensor]]:
    from safetensors.torch import load_file

    folder = Path(folder)
    manifest_file, weights_file = folder / "manifest.json", folder / "residual.safetensors"
    if not (manifest_file.is_file() and weights_file.is_file()):
        raise ConfigError(f"{folder} holds no SLIP residual (manifest.json and residual.safetensors)")
    manifest = json.loads(manifest_file.read_text())
    if manifest.get("format") != "splitveil-slip-residual/1":
        raise ConfigError(f"{manifest_file} is not a SLIP residual manifest")
    groups = tuple(LinearGroup.from_dict(g) for g in manifest["groups"])
    tensors = load_file(str(weights_file))
    weights = {g.group_id: tensors[f"group.{g.group_id}"].to(torch.float32) for g in groups}
    for group in groups:
        if tuple(weights[group.group_id].shape) != (group.total_out, group.in_features):
            raise ConfigError(f"{weights_file}: group {group.group_id} has the wrong shape")
    fp = manifest["fixed_point"]
    bundle = ResidualBundle(groups, FixedPoint(fp["frac_bits_x"], fp["frac_bits_w"]), manifest["model"], manifest["sha256"])
    if residual_digest(weights) != bundle.sha256:
        raise ConfigError(f"{weights_file} does not match its manifest's digest")
    return bundle, weights


COMPACT_BYTES = 4 * 2**30  # float64 ring weights beyond this are kept compact (float32, `RingWeight`)


def executor_weights(weights: dict[int, torch.Tensor], mode: str, fixed_point: FixedPoint, *, device: str = "cpu") -> dict:
    """The matrices the executor multiplies with: ring weights (fixed; compact when the model is large) or float64
    (float), held on `device` (cpu, cuda, cuda:N, auto). Consumes `weights`: each float32 matrix is dropped once
    encoded, so that a 1B-parameter model's encoding never holds two copies of it."""
    from splitveil.models.precision import torch_device

    if mode not in MODES:
        raise ConfigError(f"unknown SLIP mode {mode!r}; use fixed or float")
    target = torch_device(device)
    if mode == "float":
        return {gid: weights.pop(gid).to(target, torch.float64) for gid in sorted(weights)}
    compact = 8 * sum(w.numel() for w in weights.values()) > COMPACT_BYTES
    if compact and target.type == "cpu":  # the bundle's pages, encoded per block: no copy (`RingWeight.mapped`)
        return {gid: RingWeight.mapped(weights.pop(gid), fixed_point.frac_bits_w) for gid in sorted(weights)}
    return {gid: RingWeight(fixed_point.encode_w(weights.pop(gid)), compact=compact, device=target)
            for gid in sorted(weights)}


# -- the service -----------------------------------------------------------------------------------------------


class SlipExecutorService(SessionService):
    """Serves masked products y = x W_residual^T per linear group.

    Args:
        weights: group id -> W_residual as the executor computes with it ([m, n] int64 ring elements or float64).
        mode: "fixed" (ring) or "float".
        info: extra facts OPEN replies carry (the residual's digest, the model).
        tamper: test hook, (group id, correct reply) -> reply sent: a misbehaving executor.
    """

    _log_source = log  # refusals are logged as this executor's, at a bounded rate

    def __init__(self, weights: dict[int, torch.Tensor], *, mode: str, info: dict | None = None,
                 max_frame_bytes: int = MAX_FRAME_BYTES, max_sessions: int = 16, max_rows: int = 1 << 24,
                 tamper: Callable[[int, torch.Tensor], torch.Tensor] | None = None):
        if mode not in MODES:
            raise ConfigError(f"unknown SLIP mode {mode!r}; use fixed or float")
        expected = torch.int64 if mode == "fixed" else torch.float64
        if any(not isinstance(w, RingWeight) and (w.dtype != expected or w.dim() != 2) for w in weights.values()) \
                or (mode == "float" and any(isinstance(w, RingWeight) for w in weights.values())):
            raise ConfigError(f"the {mode} executor multiplies with {expected} matrices")
        self.shapes = {gid: tuple(w.shape) for gid, w in weights.items()}  # group id -> (m, n)
        self.mode = mode
        # fixed point: exact ring products through float64 limbs (see RingWeight); float: float64 products
        self._products = {gid: (w if isinstance(w, RingWeight) else RingWeight(w)).matmul if mode == "fixed"
                          else (lambda x, w=w: (x.to(w.device) @ w.t()).cpu()) for gid, w in weights.items()}
        self.max_frame_bytes = max_frame_bytes
        self.max_sessions = max_sessions
        self.max_rows = max_rows
        self.tamper = tamper
        self.info = {**(info or {}), "slip": True, "mode": mode, "groups": len(self.shapes),
                     "max_frame_bytes": max_frame_bytes, "device": str(_device_of(weights))}
        self.sessions: dict[bytes, ExecutorSession] = {}
        self.rows_computed = 0
        self.macs = 0  # multiply-accumulates done (the untrusted side's work)
        self._lock = threading.Lock()

    # -- admission -------------------------------------------------------------------------------------------

    def _admit_forward(self, session: ExecutorSession, frame: Frame) -> ExecutorWork:
        group_id, values = self._check_forward(session, frame)
        session.rows += values.shape[0]
        return ExecutorWork(frame.session, session, frame, group_id, values)

    def _open(self, owner: bytes, frame: Frame | None = None) -> Frame:
        if len(self.sessions) >= self.max_sessions:
            raise WireError(f"the executor is full ({self.max_sessions} sessions)")
        session_id = secrets.token_bytes(16)
        self.sessions[session_id] = ExecutorSession(owner=owner)
        return text_frame(FrameKind.OK, json.dumps(self.info), session=session_id)

    def _check_forward(self, session: ExecutorSession, frame: Frame) -> tuple[int, torch.Tensor]:
        if frame.seq != session.next_seq:
            raise WireError(f"frame out of order: expected sequence number {session.next_seq}, got {frame.seq}")
        if frame.part != 0:
            raise WireError(f"the SLIP executor serves part 0 only, not {frame.part}")
        tensor = frame.tensor
        if tensor is None or frame.codec != "int64" or tensor.dim() != 1:
            raise WireError("a SLIP forward frame carries a 1-D int64 tensor: [group, positions, values...]")
        if tensor.numel() < HEADER_ELEMENTS + 1:
            raise WireError("a SLIP forward frame carries a header and at least one value")
        group_id, positions = int(tensor[0]), int(tensor[1])
        shape = self.shapes.get(group_id)
        if shape is None:
            raise WireError(f"no linear group {group_id} (this executor has {len(self.shapes)})")
        most = positions_per_frame(self.max_frame_bytes, shape[1], shape[0])
        if not 1 <= positions <= most:
            raise WireError(f"{positions} positions in one frame for group {group_id}; send 1 .. {most}")
        n = shape[1]
        if tensor.numel() != HEADER_ELEMENTS + positions * n:
            raise WireError(f"group {group_id} takes {positions} x {n} values, the frame carries {tensor.numel() - HEADER_ELEMENTS}")
        if session.rows + positions > self.max_rows:
            raise WireError(f"the session would exceed its limit of {self.max_rows} rows")
        values = tensor[HEADER_ELEMENTS:].reshape(positions, n)
        if self.mode == "float":
            values = wire_to_float64(values)
            if not bool(torch.isfinite(values).all()):
                raise WireError("masked input holds NaN or Inf")
        return group_id, values

    # -- compute (`SessionService.run` calls `_run_one` per frame) -------------------------------------------

    def _run_one(self, work: ExecutorWork) -> bytes:
        output = self._products[work.group_id](work.values)  # [P, m]: ring (mod 2^64) or float64
        self.rows_computed += work.values.shape[0]
        self.macs += work.values.shape[0] * self.shapes[work.group_id][0] * self.shapes[work.group_id][1]
        if self.tamper is not None:
            output = self.tamper(work.group_id, output)
        if self.mode == "float":
            output = float64_to_wire(output)
        return encode_frame(Frame(FrameKind.RESULT, output.contiguous(), codec="int64", session=work.session_id, seq=work.frame.seq))


def _device_of(weights: dict) -> torch.device:
    """Where the products of an executor's or dealer's matrices run (the first matrix's device)."""
    first = next(iter(weights.values()), None)
    return first.device if first is not None else torch.device("cpu")


def build_executor_service(folder: Path, *, mode: str, device: str = "cpu", **limits) -> SlipExecutorService:
    """The executor for the residual bundle in `folder` (what `splitveil slip serve` runs). A folder that holds
    anything besides the residual bundle (the owner's cache, with the decomposition) is refused."""
    from splitveil.protect.slip.bundle import check_residual_only

    check_residual_only(folder)
    bundle, weights = load_residual(folder)
    return SlipExecutorService(executor_weights(weights, mode, bundle.fixed_point, device=device), mode=mode,
                               info={"model": bundle.model, "residual_sha256": bundle.sha256}, **limits)
