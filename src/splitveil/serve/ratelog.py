"""Refusal logging that a flood cannot turn into a denial of service: at most `burst` lines per `period` seconds per
logger, then one line counting what was left out.

A server logs each refused connection or frame (one line, never the payload). Without a bound, 5,000 token-less
upgrade attempts write 5,000 lines: into a pipe nobody drains that blocks the server for good, into a file it fills
the disk. `RateLimitedLog` wraps a `logging.Logger` with the same `warning`/`error`/`info`/`debug` calls.
"""

from __future__ import annotations

import logging
import threading
import time


class RateLimitedLog:
    """A logger that writes at most `burst` records per `period` seconds, then says how many it left out.

    Args:
        logger: where the records go.
        burst: records written per period.
        period: seconds.
        redact: when set, every record's text is replaced by this fixed line (for loggers whose messages could carry
            what the reader of the log must not see, e.g. refusals of sealed frames inside a trusted executor).
    """

    def __init__(self, logger: logging.Logger, *, burst: int = 20, period: float = 10.0, redact: str | None = None):
        self.logger, self.burst, self.period, self.redact = logger, burst, period, redact
        self._window_start = time.monotonic()
        self._written = 0
        self.suppressed = 0  # left out in the current window
        self.total_suppressed = 0
        self._lock = threading.Lock()

    def _allow(self) -> tuple[bool, int]:
        """(write this record?, records left out in the window that just ended, to report first)."""
        with self._lock:
            now = time.monotonic()
            dropped = 0
            if now - self._window_start >= self.period:
                dropped, self.suppressed = self.suppressed, 0
                self._window_start, self._written = now, 0
            if self._written < self.burst:
                self._written += 1
                return True, dropped
            self.suppressed += 1
            self.total_suppressed += 1
            return False, dropped

    def log(self, level: int, message: str, *args, **kwargs) -> None:
        if not self.logger.isEnabledFor(level):
            return
        allowed, dropped = self._allow()
        if dropped:
            self.logger.warning("... and %d more such lines in %g s (left out)", dropped, self.period)
        if allowed:
            if self.redact is not None:
                self.logger.log(level, self.redact)
            else:
                self.logger.log(level, message, *args, **kwargs)

    def debug(self, message: str, *args, **kwargs) -> None:
        if self.redact is None:  # debug records may carry tracebacks; never under redaction
            self.log(logging.DEBUG, message, *args, **kwargs)

    def info(self, message: str, *args, **kwargs) -> None:
        self.log(logging.INFO, message, *args, **kwargs)

    def warning(self, message: str, *args, **kwargs) -> None:
        self.log(logging.WARNING, message, *args, **kwargs)

    def error(self, message: str, *args, **kwargs) -> None:
        self.log(logging.ERROR, message, *args, **kwargs)

    def exception(self, message: str, *args, **kwargs) -> None:
        if self.redact is not None:
            self.log(logging.ERROR, message)
        else:
            self.log(logging.ERROR, message, *args, exc_info=True, **kwargs)
