"""What the harnesses share: a process's memory over time, and frames with any header values."""

from __future__ import annotations

import struct
import threading
import time

import numpy as np

from splitveil.wire.frame import MAGIC, NO_SESSION, WIRE_VERSION, FrameKind

HEADER = struct.Struct("<2sBBBBBB16sI")  # the documented frame header (wire/frame.py), packed with any field value


def raw_frame(*, kind: int = FrameKind.FORWARD, session: bytes = NO_SESSION, seq: int = 0, part: int = 1,
              codec: int = 1, shape: tuple[int, ...] = (), payload: bytes = b"", magic: bytes = MAGIC,
              version: int = WIRE_VERSION, flags: int = 0, ndim: int | None = None) -> bytes:
    """A frame with any header values (the encoder refuses invalid ones; a hostile peer does not)."""
    ndim = len(shape) if ndim is None else ndim
    return (HEADER.pack(magic, version, kind, codec, ndim, part, flags, session, seq)
            + struct.pack(f"<{len(shape)}I", *shape) + payload)


def float_payload(values: np.ndarray, codec: str) -> bytes:
    """Float32 values as the raw bytes of `codec` (bf16: the top 16 bits of each float32)."""
    values = np.asarray(values, dtype=np.float32)
    if codec == "fp32":
        return values.astype("<f4").tobytes()
    if codec == "fp16":
        with np.errstate(over="ignore"):
            return values.astype("<f2").tobytes()
    return (values.astype("<f4").view("<u4") >> 16).astype("<u2").tobytes()


def rss_kib(pid: int) -> int | None:
    """VmRSS of process `pid` in KiB (None once it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


class RssSampler:
    """Samples a process's RSS every `period` seconds in a daemon thread; `pid` may change (a restarted server)."""

    def __init__(self, pid: int, period: float = 0.5):
        self.pid, self.period = pid, period
        self.samples: list[tuple[float, float]] = []  # (seconds since start, MiB)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="rss-sampler")
        self.started = time.monotonic()

    def start(self) -> "RssSampler":
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            kib = rss_kib(self.pid)
            if kib is not None:
                self.samples.append((time.monotonic() - self.started, kib / 1024))
            self._stop.wait(self.period)

    def stop(self) -> list[tuple[float, float]]:
        self._stop.set()
        self._thread.join(5)
        return self.samples


def rss_summary(samples: list[tuple[float, float]], *, allowed_growth_mib: float = 100.0) -> dict:
    """Start, peak and end RSS; `bounded` when the last quarter's peak exceeds the first quarter's by less than the allowance."""
    if not samples:
        return {"samples": 0, "bounded": None}
    values = [mib for _, mib in samples]
    quarter = max(1, len(values) // 4)
    growth = max(values[-quarter:]) - max(values[:quarter])
    return {"samples": len(values), "start_mib": values[0], "peak_mib": max(values), "end_mib": values[-1],
            "growth_last_vs_first_quarter_mib": growth, "allowed_growth_mib": allowed_growth_mib,
            "bounded": growth < allowed_growth_mib}
