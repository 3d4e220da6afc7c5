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


def test_lanes_decode_steps_run_batched_and_each_lane_gets_its_own_tokens():
    """Four forks of a tiny split generating at once: their head and tail steps run as batched steps (batches of
    more than one lane happen), and every lane's tokens equal that prompt generated alone."""
    from splitveil.edge.generate import SplitCausalLM
    from splitveil.models.tiny import tiny_causal_lm
    from splitveil.plan.plan import SplitPlan

    lm = SplitCausalLM(tiny_causal_lm("llama"), SplitPlan.from_cuts((1, 3)))
    lanes = [lm, *(lm.fork() for _ in range(3))]
    for batcher in lm.lane_steps:
        batcher.window = 0.1  # long enough that the lanes' steps meet on this loaded machine
    prompts = [[5, 6, 7, i, 9 + i][: 3 + i % 3] for i in range(4)]
    results = {}

    def run(index):
        results[index] = lanes[index].generate(prompts[index], max_new_tokens=10).token_ids

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    head_steps, tail_steps = lm.lane_steps
    assert head_steps.rows > head_steps.batches and tail_steps.rows > tail_steps.batches  # some batches held 2+ lanes
    for index, prompt in enumerate(prompts):
        assert results[index] == SplitCausalLM(lm.splittable, lm.plan).generate(prompt, max_new_tokens=10).token_ids
