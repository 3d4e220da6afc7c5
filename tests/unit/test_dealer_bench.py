"""`bench dealer`'s spec, summary and plot (the generations themselves run in the benchmark, not here)."""

import json

import pytest

from splitveil.core.errors import ConfigError
from splitveil.experiments.dealer_cost import DealerBenchSpec, _summarise, cpu_target, plot_dealer_bench


def _report(cpu: float, weights: int, tokens=(1, 2, 3)) -> dict:
    return {"token_ids": list(tokens), "cpu_seconds_per_decode_token": cpu, "weight_bytes_resident": weights,
            "peak_rss_bytes": 2 * weights, "round_trips_per_decode_step": 121.0, "dealer_wait_seconds_per_decode_step": 0.0}


def test_the_spec_refuses_nonsense():
    with pytest.raises(ConfigError, match="pairs"):
        DealerBenchSpec(pairs=0)
    with pytest.raises(ConfigError, match="configuration"):
        DealerBenchSpec(cases=())


def test_ratios_are_to_the_unsplit_run_of_the_same_pair_and_the_plot_is_drawn(tmp_path):
    runs = {"unsplit": [_report(0.06, 500), _report(0.05, 500)],
            "dealer": [_report(0.03, 100), _report(0.03, 100, tokens=(1, 2, 4))]}
    summary = _summarise(runs)["dealer"]
    assert summary["cpu_per_decode_token_ratios"] == pytest.approx([0.5, 0.6])
    assert summary["cpu_per_decode_token_ratio"] == pytest.approx(0.55)
    assert summary["weight_bytes_ratio"] == pytest.approx(0.2)
    assert summary["same_tokens"] is False  # one pair differs: reported, not hidden
    runs["unfused"] = [_report(0.045, 100), _report(0.04, 100)]
    both = _summarise(runs)
    assert both["unfused"]["cpu_per_decode_token_ratios"] == pytest.approx([0.75, 0.8])
    record = {"rows": [{"label": "m --split 0,30 (head masked)", "case": {"model": "smollm2-135m"}, "summary": both},
                       {"label": "llama-1b --split 0,16", "case": {"model": "llama-1b"}, "summary": both}]}
    path = plot_dealer_bench(json.loads(json.dumps(record)), tmp_path / "plot.png")
    assert path.is_file() and path.stat().st_size > 1000


def test_each_model_is_drawn_against_its_own_cpu_target():
    assert cpu_target("smollm2-135m") == 0.25
    assert cpu_target("llama-1b") == 0.10 and cpu_target("llama-8b") == 0.10
