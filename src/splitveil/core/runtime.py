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
