"""Scores of a clustering whose group names mean nothing: the best one-to-one naming (Hungarian)."""

from __future__ import annotations

import torch

from splitveil.metrics.clustering import best_matching, contingency, matched_accuracy


def test_groups_equal_to_the_truth_up_to_renaming_score_one():
    truth = torch.randint(5, (200,), generator=torch.Generator().manual_seed(0))
    renamed = torch.tensor([3, 0, 4, 1, 2])[truth]
    assert matched_accuracy(renamed, truth, clusters=5, classes=5) == 1.0
    assert torch.equal(best_matching(renamed, truth, clusters=5, classes=5)[torch.tensor([3, 0, 4, 1, 2])],
                       torch.arange(5))


def test_a_merged_group_loses_exactly_its_smaller_part():
    truth = torch.tensor([0] * 6 + [1] * 3 + [2] * 1)
    merged = torch.tensor([0] * 6 + [1] * 4)  # classes 1 and 2 in one group, group 2 empty
    assert contingency(merged, truth, clusters=3, classes=3).tolist() == [[6, 0, 0], [0, 3, 1], [0, 0, 0]]
    assert matched_accuracy(merged, truth, clusters=3, classes=3) == 0.9


def test_a_random_partition_scores_near_chance():
    generator = torch.Generator().manual_seed(1)
    truth, groups = torch.randint(10, (2000,), generator=generator), torch.randint(10, (2000,), generator=generator)
    assert 0.1 <= matched_accuracy(groups, truth, clusters=10, classes=10) < 0.15
