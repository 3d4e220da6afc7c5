"""SLIP evaluation helpers that need no model: plots from records."""

import json
from pathlib import Path

from splitveil.experiments.slip_eval import plot_prompt, plot_weights

RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"


def weights_record():
    return {"residual_perplexity": {"model": "m", "vocab_size": 100, "points": [
                {"rank": 0, "perplexity": 20.0}, {"rank": 1, "perplexity": 1e6}, {"rank": 4, "perplexity": 1e5}]},
            "cnn": {"model": "lenet", "victim_accuracy": 0.8, "attack_rank": 4,
                    "residual_curve": [{"rank": 0, "accuracy": 0.8}, {"rank": 2, "accuracy": 0.2}],
                    "extraction": [{"stolen": 100, "finetuned_from_residual": 0.4, "from_scratch": 0.3}]}}


def prompt_record():
    uniform = {"chi2_pvalue": 0.5, "ks_pvalue": 0.4}
    return {"view_attack": {"token_recovery_masked": 0.01, "token_recovery_clear": 1.0, "chance": 1 / 64, "layers": [2, 28],
                            "mode": "fixed", "per_prompt": [{"masked": {"uniformity": uniform}}] * 3},
            "run": {"trusted_flops": 2, "untrusted_flops": 8, "unprotected_flops": 10, "decode_tokens_per_second": 2.0},
            "unprotected": {"decode_tokens_per_second": 19.0}}


def test_plots_are_drawn_from_records(tmp_path):
    assert plot_weights(weights_record(), tmp_path / "w.png").stat().st_size > 1000
    assert plot_prompt(prompt_record(), tmp_path / "p.png").stat().st_size > 1000


def test_committed_records_have_the_issue_figures():
    weights, prompt = RESULTS / "slip_weights.json", RESULTS / "slip_prompt.json"
    if not weights.is_file() or not prompt.is_file():
        return
    w, p = json.loads(weights.read_text()), json.loads(prompt.read_text())
    assert w["runs"]["float"]["secure_flops_share"] <= 0.05
    assert w["runs"]["float"]["token_ids"] == w["unprotected"]["token_ids"]
    assert p["view_attack"]["token_recovery_masked"] <= 3 * p["view_attack"]["chance"]
    assert p["view_attack"]["mask_reuse_pairs"] == 0
