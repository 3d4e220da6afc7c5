"""LogitsBatcher: concurrent lanes' LM-head rows computed in one product, each lane getting its own rows."""

import threading
import time

import pytest
import torch

from splitveil.edge.head_batch import LogitsBatcher


def head(rows):
    head.calls.append(rows.shape[0])
    return rows @ WEIGHT.T


head.calls = []
WEIGHT = torch.randn(50, 8, generator=torch.Generator().manual_seed(0))


def test_concurrent_lanes_share_one_product_and_get_their_own_rows():
    head.calls.clear()
    batcher = LogitsBatcher(head, window=2.0)
    lanes = 6
    inputs = [torch.randn(1 + i % 2, 8, generator=torch.Generator().manual_seed(i)) for i in range(lanes)]
    results = {}
    for _ in range(lanes):
        batcher.enter()

    def lane(i):
        results[i] = batcher(inputs[i])

    threads = [threading.Thread(target=lane, args=(i,)) for i in range(lanes)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    for i in range(lanes):
        torch.testing.assert_close(results[i], inputs[i] @ WEIGHT.T)
    assert head.calls == [sum(x.shape[0] for x in inputs)]  # every lane generating arrived: one product


def test_a_lone_lane_does_not_wait():
    batcher = LogitsBatcher(head, window=5.0)
    batcher.enter()
    started = time.perf_counter()
    batcher(torch.ones(1, 8))
    assert time.perf_counter() - started < 1.0
    batcher.leave()


def test_a_lane_that_leaves_releases_the_leader():
    batcher = LogitsBatcher(head, window=5.0)
    batcher.enter()
    batcher.enter()  # a second lane that will not send a row
    threading.Timer(0.2, batcher.leave).start()
    started = time.perf_counter()
    batcher(torch.ones(1, 8))
    assert time.perf_counter() - started < 2.0


def test_a_failed_product_reaches_every_caller():
    def broken(rows):
        raise RuntimeError("boom")

    batcher = LogitsBatcher(broken)
    with pytest.raises(RuntimeError, match="boom"):
        batcher(torch.ones(1, 8))
