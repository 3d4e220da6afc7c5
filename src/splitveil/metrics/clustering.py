"""Pure scores of a clustering against the truth, where the clusters' names mean nothing (cluster 3 may be salt 7)."""

from __future__ import annotations

import torch


def contingency(assigned: torch.Tensor, truth: torch.Tensor, *, clusters: int, classes: int) -> torch.Tensor:
    """Counts [clusters, classes]: how many items of each true class fell in each cluster."""
    counts = torch.zeros(clusters * classes, dtype=torch.int64)
    counts.index_add_(0, assigned.long() * classes + truth.long(), torch.ones(len(truth), dtype=torch.int64))
    return counts.view(clusters, classes)


def best_matching(assigned: torch.Tensor, truth: torch.Tensor, *, clusters: int, classes: int) -> torch.Tensor:
    """The one-to-one naming of clusters by classes that agrees with the truth most often (Hungarian algorithm):
    [clusters] int64, the class each cluster is named (-1 for a cluster left unnamed when there are more clusters
    than classes)."""
    from scipy.optimize import linear_sum_assignment

    counts = contingency(assigned, truth, clusters=clusters, classes=classes)
    rows, cols = linear_sum_assignment(counts.numpy(), maximize=True)
    naming = torch.full((clusters,), -1, dtype=torch.int64)
    naming[torch.as_tensor(rows, dtype=torch.int64)] = torch.as_tensor(cols, dtype=torch.int64)
    return naming


def matched_accuracy(assigned: torch.Tensor, truth: torch.Tensor, *, clusters: int, classes: int) -> float:
    """Fraction of items whose cluster, named by `best_matching`, is their true class: 1.0 when the clusters are the
    classes up to renaming; a random partition scores a little above 1 / classes (the matching picks its best)."""
    naming = best_matching(assigned, truth, clusters=clusters, classes=classes)
    return int((naming[assigned.long()] == truth.long()).sum()) / len(truth)
