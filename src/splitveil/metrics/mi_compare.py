"""Mutual information as evidence: several estimators over several seeds, and orderings claimed only where they agree.

One MINE run is a loose, seed-dependent lower bound, so a record carries, per estimator (MINE, InfoNCE, k-NN), the
mean and the min-max spread over seeds (`estimate_mutual_information`), and `information_order` says whether one
problem (a cut, a defence) carries less information than another: **only when every estimator puts it lower, each
beyond its spread** (the other's whole seed range above its own). Anything else is "no ordering supported", with the
reason. These are lower bounds, so even an agreed ordering compares what the estimators can find, not the true values.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from splitveil.core.errors import ConfigError
from splitveil.metrics.bound_training import MIBudget, MIEstimate

ESTIMATORS = ("mine", "infonce", "knn")


def summarise(estimates: list[MIEstimate]) -> dict:
    """Seeds of one estimator -> {mean, low, high, runs, ...} (JSON-ready). Neural bounds add their steps, whether each
    run stopped on a plateau, and the estimator's cap."""
    runs = [e.nats for e in estimates]
    summary = {"mean": sum(runs) / len(runs), "low": min(runs), "high": max(runs), "runs": runs,
               "pairs": estimates[0].pairs}
    if estimates[0].estimator in ("mine", "infonce"):
        summary.update(steps=[e.steps for e in estimates], converged=all(e.converged for e in estimates))
    if estimates[0].estimator == "infonce":
        summary["cap"] = max(e.cap for e in estimates)  # log of the test batch: the bound cannot exceed it
        summary["saturated"] = summary["high"] >= summary["cap"] - 0.25  # within a quarter nat of its cap
    return summary


@dataclass(frozen=True)
class MISettings:
    """What `estimate_mutual_information` runs. Recorded with its results."""

    seeds: int = 3  # runs per estimator (seeds seed, seed+1, ...)
    budget: MIBudget = MIBudget()  # neural bounds: step cap, early stopping, batch, learning rate, held-out fractions
    estimators: tuple[str, ...] = ESTIMATORS
    infonce_eval_batch: int = 1024  # test pairs per InfoNCE batch (about): the bound's cap is log of it
    knn_dims: int = 4  # principal components of x and of z kept for KSG
    knn_k: int = 5
    knn_fraction: float = 0.8  # of the pairs, a different random subset per seed
    knn_max_pairs: int = 3000  # at most this many (KSG holds three N x N distance matrices)

    def to_dict(self) -> dict:
        from dataclasses import asdict

        return {**asdict(self), "budget": self.budget.to_dict()}


def estimate_mutual_information(x: torch.Tensor, z: torch.Tensor, settings: MISettings = MISettings(), *,
                                seed: int = 0) -> dict:
    """Every estimator of `settings` on pairs (x [N, ...], z [N, ...]) over `settings.seeds` seeds.

    Returns:
        {estimator: summarise(...)} plus "pairs" (how many were given) and "settings" (the resolved settings): what a
        record stores.
    """
    from splitveil.metrics.infonce import infonce
    from splitveil.metrics.knn_mi import knn_mutual_information
    from splitveil.metrics.mine import mine

    unknown = set(settings.estimators) - set(ESTIMATORS)
    if unknown:
        raise ConfigError(f"unknown estimator(s) {sorted(unknown)}; known: {', '.join(ESTIMATORS)}")
    knn_samples = min(settings.knn_max_pairs, max(2 * settings.knn_k, int(len(x) * settings.knn_fraction)))
    run = {"mine": lambda s: mine(x, z, budget=settings.budget, seed=s),
           "infonce": lambda s: infonce(x, z, budget=settings.budget, eval_batch=settings.infonce_eval_batch, seed=s),
           "knn": lambda s: knn_mutual_information(x, z, dims=settings.knn_dims, k=settings.knn_k, seed=s,
                                                   samples=knn_samples)}
    seeds = range(seed, seed + settings.seeds)
    result = {name: summarise([run[name](s) for s in seeds]) for name in settings.estimators}
    return {**result, "pairs": len(x), "settings": settings.to_dict()}


@dataclass(frozen=True)
class Ordering:
    """The verdict of `information_order(a, b)`: relation "<" (a carries less), ">" (more) or None (not supported)."""

    relation: str | None
    reason: str
    by_estimator: dict  # estimator -> "<", ">" or "overlap"

    @property
    def supported(self) -> bool:
        return self.relation is not None


def _relation(a: dict, b: dict) -> str:
    if a["high"] < b["low"]:
        return "<"
    if a["low"] > b["high"]:
        return ">"
    return "overlap"


def information_order(a: dict, b: dict, *, estimators: tuple[str, ...] | None = None, min_seeds: int = 2,
                      min_estimators: int = 2) -> Ordering:
    """Whether the records' estimates support "a carries less (or more) information than b".

    Args:
        a, b: `estimate_mutual_information` results (estimator -> {low, high, runs, ...}).
        estimators: the ones to consult (default: every one both carry).
        min_seeds: runs each estimate needs for its spread to mean anything.
        min_estimators: estimators that must all agree.

    Returns:
        an `Ordering`; `relation` is set only when every consulted estimator (at least `min_estimators`), each with
        `min_seeds` runs, puts a strictly on the same side of b with their min-max ranges apart.
    """
    names = [n for n in (estimators or ESTIMATORS) if n in a and n in b]
    if len(names) < min_estimators:
        return Ordering(None, f"needs {min_estimators} estimators in both records, found {len(names)} "
                              f"({', '.join(names) or 'none'})", {})
    thin = [n for n in names if min(len(a[n]["runs"]), len(b[n]["runs"])) < min_seeds]
    if thin:
        return Ordering(None, f"{', '.join(thin)}: fewer than {min_seeds} seeds, so no spread to judge by", {})
    by = {n: _relation(a[n], b[n]) for n in names}
    detail = "; ".join(f"{n} [{a[n]['low']:.2f}, {a[n]['high']:.2f}] {by[n] if by[n] != 'overlap' else 'overlaps'} "
                       f"[{b[n]['low']:.2f}, {b[n]['high']:.2f}]" for n in names)
    relations = set(by.values())
    if len(relations) == 1 and "overlap" not in relations:
        return Ordering(relations.pop(), f"every estimator agrees beyond its spread: {detail}", by)
    why = "the seed ranges overlap" if relations == {"overlap"} else \
        "the estimators disagree" if {"<", ">"} <= relations else "not every estimator separates them"
    return Ordering(None, f"no ordering supported ({why}): {detail}", by)
