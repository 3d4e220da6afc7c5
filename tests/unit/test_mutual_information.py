"""Mutual-information estimators on correlated Gaussians, whose MI is known: I = -d/2 log(1 - rho^2) for d independent
coordinates each with correlation rho. MINE, InfoNCE and KSG land near it and order two problems correctly; the
ordering helper refuses to order estimates whose seed ranges overlap or that only one estimator separates."""

from __future__ import annotations

import math

import pytest
import torch

from splitveil.metrics.bound_training import MIBudget
from splitveil.metrics.infonce import infonce, infonce_bound
from splitveil.metrics.knn_mi import knn_mutual_information, ksg, pca
from splitveil.metrics.mi_compare import MISettings, estimate_mutual_information, information_order
from splitveil.metrics.mine import derangement, mine

BUDGET = MIBudget(max_steps=1500, eval_every=25, patience=6, batch_size=256, lr=1e-3)


def gaussians(n: int, d: int, rho: float, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=generator)
    z = rho * x + math.sqrt(1 - rho ** 2) * torch.randn(n, d, generator=generator)
    return x, z, -d / 2 * math.log(1 - rho ** 2)


@pytest.fixture(scope="module")
def two_problems():
    """Two problems (0.45 and 1.66 nats), every estimator, two seeds each."""
    settings = MISettings(seeds=2, budget=BUDGET, knn_dims=2)
    out = {}
    for rho in (0.6, 0.9):
        x, z, truth = gaussians(2000, 2, rho)
        out[rho] = (truth, estimate_mutual_information(x, z, settings))
    return out


@pytest.mark.parametrize("estimator", ["mine", "infonce", "knn"])
def test_estimators_close_to_the_analytic_mi(two_problems, estimator):
    for rho, (truth, estimate) in two_problems.items():
        summary = estimate[estimator]
        assert len(summary["runs"]) == 2
        assert summary["mean"] == pytest.approx(truth, rel=0.25), (rho, summary)


def test_neural_bounds_stop_on_a_plateau_and_record_it(two_problems):
    for _, estimate in two_problems.values():
        for name in ("mine", "infonce"):
            assert estimate[name]["converged"] is True
            assert all(0 < steps < BUDGET.max_steps for steps in estimate[name]["steps"])
        assert estimate["infonce"]["cap"] == pytest.approx(math.log(500), abs=0.01)  # 500 test pairs, one batch
    assert two_problems[0.6][1]["settings"]["budget"]["max_steps"] == BUDGET.max_steps


def test_ordering_of_two_problems_is_supported_by_both_estimators(two_problems):
    low, high = two_problems[0.6][1], two_problems[0.9][1]
    verdict = information_order(low, high)
    assert verdict.relation == "<" and verdict.by_estimator == {"mine": "<", "infonce": "<", "knn": "<"}
    assert information_order(high, low).relation == ">"


def summary(*runs: float) -> dict:
    return {"runs": list(runs), "low": min(runs), "high": max(runs), "mean": sum(runs) / len(runs)}


def test_ordering_refused_when_seed_ranges_overlap():
    a = {"mine": summary(1.48, 2.44), "knn": summary(0.9, 1.0)}
    b = {"mine": summary(2.2, 2.6), "knn": summary(1.3, 1.4)}  # knn separates them, MINE's ranges overlap
    verdict = information_order(a, b)
    assert verdict.relation is None and not verdict.supported
    assert verdict.by_estimator == {"mine": "overlap", "knn": "<"} and "not every estimator" in verdict.reason


def test_ordering_refused_when_estimators_disagree_or_stand_alone():
    a = {"mine": summary(1.0, 1.1), "knn": summary(2.0, 2.1)}
    b = {"mine": summary(1.5, 1.6), "knn": summary(1.5, 1.6)}
    assert information_order(a, b).relation is None and "disagree" in information_order(a, b).reason
    alone = information_order({"mine": summary(1.0, 1.1)}, {"mine": summary(3.0, 3.1)})
    assert alone.relation is None and "needs 2 estimators" in alone.reason
    single_seed = information_order({"mine": summary(1.0), "knn": summary(1.0)},
                                    {"mine": summary(3.0), "knn": summary(3.0)})
    assert single_seed.relation is None and "seeds" in single_seed.reason


def test_infonce_is_capped_by_log_batch():
    perfect = torch.eye(64) * 1e4  # every x picks its own z with certainty
    assert float(infonce_bound(perfect)) == pytest.approx(math.log(64), abs=1e-6)
    x = torch.randn(400, 2)
    estimate = infonce(x, x.clone(), budget=MIBudget(max_steps=200, eval_every=50, batch_size=64), eval_batch=32)
    assert estimate.cap == pytest.approx(math.log(34))  # 100 test pairs in batches of 34, 33, 33
    assert estimate.nats <= estimate.cap + 1e-6


def test_independent_pairs_give_about_zero():
    x, z = torch.randn(1000, 2), torch.randn(1000, 2)
    assert abs(ksg(pca(x, 2), pca(z, 2))) < 0.05
    assert mine(x, z, budget=MIBudget(max_steps=300, eval_every=25, patience=4)).nats < 0.1


def test_derangement_has_no_fixed_point():
    generator = torch.Generator().manual_seed(0)
    for n in (2, 3, 10, 257):
        perm = derangement(n, generator)
        assert sorted(perm.tolist()) == list(range(n)) and not (perm == torch.arange(n)).any()


def test_knn_on_reduced_images_is_finite_and_positive():
    images = torch.rand(300, 1, 8, 8)
    features = torch.nn.functional.avg_pool2d(images, 2).repeat(1, 4, 1, 1)  # [300, 4, 4, 4], a function of the image
    estimate = knn_mutual_information(images, features, dims=3, samples=250)
    assert estimate.pairs == 250 and 0.2 < estimate.nats < 10


def test_image_record_carries_every_estimator_with_its_spread():
    from splitveil.experiments.image_privacy import ImageAttackSpec, run_image_attack

    spec = ImageAttackSpec.quick(dataset="digits", model="lenet", split=2, attack="rmle", samples=8, rmle_steps=2,
                                 mine_steps=60, mine_repeats=2)
    record = run_image_attack(spec)
    information = record["mutual_information"]
    assert set(information) == {"mine", "infonce", "knn", "pairs", "settings"}
    assert information["pairs"] == 989  # digits: 271 test images, then 718 auxiliary ones
    assert information["settings"]["budget"]["max_steps"] == 60 and information["settings"]["seeds"] == 2
    for name in ("mine", "infonce", "knn"):
        assert len(information[name]["runs"]) == 2
        assert information[name]["low"] <= information[name]["mean"] <= information[name]["high"]
    assert record["mine"] == information["mine"]["mean"] and record["mine_runs"] == information["mine"]["runs"]
    assert information["infonce"]["cap"] > 0
