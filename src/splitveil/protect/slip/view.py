"""What the untrusted side of SLIP's prompt deployment saw: the executor's view.

`masked_view(frames)` turns the raw frames an executor received (recorded through the observation hooks:
`Transport.observe` on the trusted side, `SessionService.observers` on the executor) into entries (session, sequence
number, linear group, masked rows [P, n]). `states_for_group` gives the rows of one group in arrival order, decoded
as if no mask were there: the *unmasking-free view*, in the shape the text attacks take (positions x width);
`uplink_downlink` puts the view in the shape of a split's cut traffic. The attacks on the view (an attacker who
knows SLIP) are in `attack/text/slip_view.py`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from splitveil.protect.slip.executor import HEADER_ELEMENTS
from splitveil.protect.slip.fixedpoint import FixedPoint, wire_to_float64
from splitveil.wire.frame import FrameKind, decode_frame


@dataclass(frozen=True)
class ViewEntry:
    session: bytes
    seq: int
    group_id: int
    values: torch.Tensor  # [P, n] int64: ring elements, or float64 bit patterns in the float variant


def masked_view(frames: list[bytes]) -> list[ViewEntry]:
    """The FORWARD frames among `frames` (raw bytes, arrival order) as view entries; anything else is skipped."""
    entries = []
    for data in frames:
        try:
            frame = decode_frame(data, max_bytes=1 << 30, finite=False)
        except Exception:  # the executor refused it too
            continue
        tensor = frame.tensor
        if frame.kind != FrameKind.FORWARD or tensor is None or frame.codec != "int64" or tensor.dim() != 1 \
                or tensor.numel() <= HEADER_ELEMENTS:
            continue
        group_id, positions = int(tensor[0]), int(tensor[1])
        values = tensor[HEADER_ELEMENTS:]
        if positions < 1 or values.numel() % positions:
            continue
        entries.append(ViewEntry(frame.session, frame.seq, group_id, values.reshape(positions, -1)))
    return entries


def rows_for_group(view: list[ViewEntry], group_id: int) -> torch.Tensor:
    """Every row the executor received for `group_id`, in arrival order: [rows, n] int64."""
    rows = [entry.values for entry in view if entry.group_id == group_id]
    return torch.cat(rows) if rows else torch.zeros(0, 0, dtype=torch.int64)


def states_for_group(view: list[ViewEntry], group_id: int, *, mode: str, fixed_point: FixedPoint = FixedPoint()) -> torch.Tensor:
    """The unmasking-free view of `group_id`: its rows read as activations (fixed point decoded at 2^-fx, or the
    float64 values), [rows, n] float64 -- what an attacker that ignores the masks would invert."""
    rows = rows_for_group(view, group_id)
    if mode == "float":
        return wire_to_float64(rows)
    return rows.to(torch.float64) * 2.0**-fixed_point.frac_bits_x


# -- distinguishing tests ----------------------------------------------------------------------------------------


class _Captured(Exception):
    """Stops a forward once the wanted input is seen (the layers after it are not needed)."""


def layer_inputs(model, token_ids: torch.Tensor, module) -> torch.Tensor:
    """The input `module` (a linear layer of `model`) receives for `token_ids` [B, T]: [B, T, n], in the clear.
    The forward stops there."""
    captured = {}

    def capture(_module, args):
        captured["x"] = args[0].detach()
        raise _Captured

    handle = module.register_forward_pre_hook(capture)
    try:
        with torch.inference_mode():
            model(input_ids=token_ids)
    except _Captured:
        pass
    finally:
        handle.remove()
    return captured["x"]


def uplink_downlink(view: list[ViewEntry], groups, *, hidden_size: int, mode: str,
                    fixed_point: FixedPoint = FixedPoint()) -> tuple[torch.Tensor, torch.Tensor]:
    """The executor's view in the shape of a split's cut traffic, for the text attacks (`attack text --defence slip`):
    uplink = the rows of the first offloaded group (the first protected layer's q/k/v input), downlink = the rows
    of the last group whose input is hidden-sized (the last protected layer's o_proj input), both [positions,
    hidden] float64, unmasking-free (masks not removed: the executor never learns them). `groups` is the protected
    model's `LinearGroup` list."""
    sized = [g for g in groups if g.in_features == hidden_size]
    if not sized:
        raise ValueError("no offloaded group reads a hidden-sized input")
    first, last = sized[0].group_id, sized[-1].group_id
    return (states_for_group(view, first, mode=mode, fixed_point=fixed_point),
            states_for_group(view, last, mode=mode, fixed_point=fixed_point))
