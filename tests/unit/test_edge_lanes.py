"""The OpenAI edge's lanes: concurrent requests generate at once on forks of the split (each its own session), up to
`concurrency`; later ones wait for a free lane; forks share weights and equal the original."""

import asyncio
import threading
import time

import pytest

from splitveil.core.errors import ConfigError
from splitveil.edge.generate import SplitCausalLM
from splitveil.edge.openai.app import EdgeEngine, EdgeSettings
from splitveil.models.tiny import tiny_causal_lm
from splitveil.plan.plan import SplitPlan


class SlowLM:
    """Stands in for a split: each generation takes 0.3 s; forks are counted."""

    tokenizer = object()

    class splittable:  # noqa: N801 - what the engine reads of a split
        config = type("Config", (), {"max_position_embeddings": 64})()

    def __init__(self, counter):
        self.counter = counter
        self.running = 0
        self.most = counter.setdefault("most", 0)

    def fork(self):
        self.counter["forks"] = self.counter.get("forks", 0) + 1
        return SlowLM(self.counter)

    def generate(self, prompt_ids, config, on_token=None):
        with self.counter.setdefault("lock", threading.Lock()):
            self.counter["running"] = self.counter.get("running", 0) + 1
            self.counter["most"] = max(self.counter.get("most", 0), self.counter["running"])
        time.sleep(0.3)
        with self.counter["lock"]:
            self.counter["running"] -= 1
        return list(prompt_ids)

    def close(self):
        pass


def run_requests(concurrency: int, requests: int) -> tuple[float, dict]:
    counter: dict = {}
    engine = EdgeEngine(SlowLM(counter), EdgeSettings(model_name="m", concurrency=concurrency))

    async def main():
        started = time.perf_counter()
        await asyncio.gather(*(engine.generate([i], None) for i in range(requests)))
        return time.perf_counter() - started

    try:
        return asyncio.run(main()), counter
    finally:
        engine.close()


def test_requests_generate_at_once_up_to_the_concurrency():
    seconds, counter = run_requests(concurrency=4, requests=4)
    assert counter["most"] == 4 and counter["forks"] == 3
    assert seconds < 0.3 * 4 * 0.6


def test_requests_beyond_the_lanes_wait_for_one():
    seconds, counter = run_requests(concurrency=2, requests=4)
    assert counter["most"] == 2 and counter["forks"] == 1
    assert seconds >= 0.6


def test_one_lane_serializes():
    seconds, counter = run_requests(concurrency=1, requests=3)
    assert counter["most"] == 1 and "forks" not in counter
    assert seconds >= 0.9


def test_a_fork_shares_weights_and_generates_what_the_original_does():
    model = tiny_causal_lm("llama")
    lm = SplitCausalLM(model, SplitPlan.from_cuts((1, 3)))
    fork = lm.fork()
    assert fork.splittable is lm.splittable and fork.service is lm.service
    results = {}

    def run(name, runner, prompt):
        results[name] = runner.generate(prompt, max_new_tokens=12).token_ids

    threads = [threading.Thread(target=run, args=(name, runner, [5, 6, 7, i])) for i, (name, runner)
               in enumerate([("lm", lm), ("fork", fork)])]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert results["lm"] == lm.generate([5, 6, 7, 0], max_new_tokens=12).token_ids
    assert results["fork"] == lm.generate([5, 6, 7, 1], max_new_tokens=12).token_ids


def test_a_defended_split_cannot_be_forked():
    from splitveil.protect.cut import GaussianNoise

    model = tiny_causal_lm("llama")
    lm = SplitCausalLM(model, SplitPlan.from_cuts((1, 3)), defence=GaussianNoise(0.1))
    with pytest.raises(ConfigError, match="one generation at a time"):
        lm.fork()
