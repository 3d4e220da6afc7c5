"""`splitveil bench link` on a small condition set: SmolLM2 split against a real `splitveil serve` child process
behind the in-process link emulator; the record has every field the plot and the targets read, and speculation over
the emulated link gives the tokens of sequential decoding."""

import json

import pytest

from splitveil.experiments.link_bench import LinkBenchSpec, run_link_bench, save_link_bench

pytestmark = [pytest.mark.network, pytest.mark.model]


def test_link_bench_writes_a_record_with_identical_tokens(tmp_path):
    spec = LinkBenchSpec(deployments=("split",), rtts=(20.0,), bandwidths=(1000.0,), max_new_tokens=10,
                         prompts=("rewrite",))
    record = run_link_bench(spec)
    (row,) = record["rows"]
    assert row["deployment"] == "split" and row["rtt_ms"] == 20.0 and row["prompt"] == "rewrite"
    assert row["same_tokens"], "speculative decoding changed the greedy tokens"
    sequential, speculative = row["runs"][0]["sequential"], row["runs"][0]["speculative"]
    assert sequential["round_trips"] >= sequential["tokens"]  # one per decode step, plus the prefill
    assert speculative["speculation"]["draft_policy"] == "adaptive"
    assert row["speedup"] > 0 and record["targets"] == {}  # no 80 ms condition: no target judged
    json_path, png_path = save_link_bench(record, tmp_path)
    assert json.loads(json_path.read_text())["spec"]["draft_policy"] == "adaptive"
    assert png_path.stat().st_size > 0


def test_link_bench_slip_rows_run_the_fused_deployment_with_identical_tokens():
    """The masked rows: the bench's own executor and dealer serve the bundle the device's default (fused groups) needs."""
    spec = LinkBenchSpec(deployments=("slip",), slip_rtts=(0.0,), slip_bandwidths=(1000.0,), slip_max_new_tokens=4,
                         prompts=("rewrite",))
    (row,) = run_link_bench(spec)["rows"]
    assert row["deployment"] == "slip" and row["same_tokens"]
    sequential = row["runs"][0]["sequential"]
    passes = sequential["tokens"]  # the prefill and a pass per decode step after the first token
    assert sequential["round_trips"] == 54 * passes  # 2 per offloaded layer, layer 2's q/k/v, the masked head


def test_link_bench_refuses_bad_settings():
    from splitveil.core.errors import ConfigError

    with pytest.raises(ConfigError, match="bad deployments"):
        LinkBenchSpec(deployments=("carrier-pigeon",))
    with pytest.raises(ConfigError, match="RTTs"):
        LinkBenchSpec(rtts=(-1.0,))
