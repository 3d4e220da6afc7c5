"""Process set-up: one torch thread unless told otherwise, seeds for every generator we use."""

from __future__ import annotations

import os
import random


def set_threads(num_threads: int | None = None) -> int:
    """Sets the torch intra-op thread count (default: $SPLITVEIL_THREADS or 1) and returns it.

    One thread is the default on purpose: on a 2-core machine a second busy process makes multi-threaded torch
    run 100x slower (see docs/architecture.md).
    """
    import torch

    if num_threads is None:
        num_threads = int(os.environ.get("SPLITVEIL_THREADS", "1"))
    num_threads = max(1, int(num_threads))
    torch.set_num_threads(num_threads)
    return num_threads


def seed_everything(seed: int) -> None:
    """Seeds Python's, NumPy's and torch's global generators."""
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def exit_with_parent(interval: float = 1.0) -> None:
    """Ends this process once the process that started it is gone (checked every `interval` seconds on a daemon
    thread). A worker or helper process whose parent was killed would otherwise run on: a pool worker finishes its
    long task first, and a process reading a pipe waits forever while a forked sibling still holds its other end."""
    import threading
    import time

    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(interval)
        os._exit(0)

    threading.Thread(target=watch, name="splitveil-parent-watch", daemon=True).start()


def init_worker(num_threads: int = 1) -> None:
    """A worker process's initializer: its torch threads, and an exit when its parent is gone."""
    set_threads(num_threads)
    exit_with_parent()
