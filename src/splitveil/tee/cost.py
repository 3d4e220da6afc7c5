"""The cost model of a TEE | accelerator partition, and the measurements it is fed with.

Pure part (`partition_costs`): each segment's measured compute time on this machine, the enclave's slow-down factor,
the accelerator's speed-up over this machine, and the measured sealing costs give, for every cut p,

    trusted(p)   = slowdown x sum(segment times [0, p)) + seal_in + seal_out     (in the enclave)
    untrusted(p) = sum(segment times [p, end)) / accelerator_speedup + release(p) (outside it)
    speed-up(p)  = total(all in the TEE) / total(p),   total = trusted + untrusted

where seal_in is sealing + opening the input, seal_out the same for the result (both paid whatever the cut), and
release(p) the time to encode the feature map at p for the accelerator. The default slow-down is a cited
measurement (`DEFAULT_ENCLAVE_SLOWDOWN`); every factor is configurable and saved with the results.

Measuring (`segment_times`, `sealing_seconds`, `release_seconds`): medians of repeated runs on one thread.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass

#: Enclave slow-down of DNN inference against the same CPU outside it. 2.0 is the upper end of the 1.09x-2x that
#: memory-aware execution measured inside SGX ("Memory-Efficient Deep Learning Inference in Trusted
#: Execution Environments", arXiv 2104.15109), whose unmodified baseline reached up to 26x under EPC paging; CPU TEEs
#: of the VM kind (TDX, SEV-SNP) cost under 10% (Chrapek et al., IISWC 2025, arXiv 2509.18886): use 1.1 for those.
DEFAULT_ENCLAVE_SLOWDOWN = 2.0


@dataclass(frozen=True)
class CostModel:
    enclave_slowdown: float = DEFAULT_ENCLAVE_SLOWDOWN  # x: enclave time / the same compute on this CPU
    accelerator_speedup: float = 1.0  # x: this CPU's time / the accelerator's (1 = the untrusted side is this CPU)

    def to_dict(self) -> dict:
        return asdict(self)


def partition_costs(segment_seconds: list[float], cuts: list[int], *, model: CostModel, seal_seconds: float,
                    release_seconds: dict[int, float] | None = None, prologue: int = 0) -> dict[int, dict]:
    """Per cut p (blocks in the enclave): trusted and untrusted seconds, the total, and the speed-up over all-in-TEE.

    Args:
        segment_seconds: measured seconds of each segment (prologue, blocks, epilogue) on this machine.
        cuts: block cuts; cut p runs segments [0, prologue + p) in the enclave.
        seal_seconds: sealing and opening the input and the result (paid at every cut, all-in-TEE included).
        release_seconds: cut -> encoding the feature map at that cut for the accelerator (0 when missing).
    """
    if model.enclave_slowdown <= 0 or model.accelerator_speedup <= 0:
        raise ValueError("the enclave slow-down and the accelerator speed-up must be positive")
    release_seconds = release_seconds or {}
    everything = model.enclave_slowdown * sum(segment_seconds) + seal_seconds
    costs = {}
    for cut in cuts:
        inside = prologue + cut
        trusted = model.enclave_slowdown * sum(segment_seconds[:inside]) + seal_seconds
        untrusted = sum(segment_seconds[inside:]) / model.accelerator_speedup + release_seconds.get(cut, 0.0)
        total = trusted + untrusted
        costs[cut] = {"trusted_s": trusted, "untrusted_s": untrusted, "total_s": total, "all_tee_s": everything,
                      "speedup_vs_all_tee": everything / total if total > 0 else float("inf")}
    return costs


def _median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        fn()
        times.append(time.perf_counter() - began)
    return statistics.median(times)


def segment_times(splittable, example, *, repeats: int = 7) -> list[float]:
    """Median seconds of each segment of a `SequentialSplittable` on `example` (a batch), run in order, no grad."""
    import torch

    times = []
    with torch.no_grad():
        x = example
        splittable.run(x, 0, len(splittable.segments))  # warm-up
        for index in range(len(splittable.segments)):
            times.append(_median_seconds(lambda: splittable.run(x, index, index + 1), repeats))
            x = splittable.run(x, index, index + 1)
    return times


def sealing_seconds(input_bytes: int, output_bytes: int, *, repeats: int = 7) -> float:
    """Median seconds to seal and open `input_bytes` and `output_bytes` with AES-256-GCM (both directions)."""
    import os

    from splitveil.tee.channel import TO_EXECUTOR, SealedChannel

    key = os.urandom(32)
    sender = SealedChannel(b"\0" * 16, send_key=key, receive_key=key, send_direction=TO_EXECUTOR,
                           receive_direction=TO_EXECUTOR)
    blobs = (os.urandom(input_bytes), os.urandom(output_bytes))

    def round_trip():
        for blob in blobs:
            sender.open(sender.seal(blob))

    round_trip()
    return _median_seconds(round_trip, repeats)


def release_seconds(features, *, repeats: int = 7) -> float:
    """Median seconds to frame a feature map for the accelerator (what leaving the enclave costs here)."""
    from splitveil.wire.frame import Frame, FrameKind, encode_frame

    return _median_seconds(lambda: encode_frame(Frame(FrameKind.FORWARD, features.contiguous())), repeats)
