"""Token-level recovery metrics for text inversion (pure functions on id sequences)."""

from __future__ import annotations

from collections import Counter


def token_recovery(true_ids: list[int], recovered_ids: list[int]) -> float:
    """Fraction of positions where the recovered token equals the true one (position by position)."""
    if not true_ids:
        return float("nan")
    hits = sum(1 for a, b in zip(true_ids, recovered_ids) if a == b)
    return hits / len(true_ids)


def exact_match(true_ids: list[int], recovered_ids: list[int]) -> bool:
    return list(true_ids) == list(recovered_ids)


def token_f1(true_ids: list[int], recovered_ids: list[int]) -> float:
    """F1 of the recovered tokens as a bag (order ignored): partial leaks that are misplaced still count."""
    if not true_ids and not recovered_ids:
        return 1.0
    overlap = sum((Counter(true_ids) & Counter(recovered_ids)).values())
    if overlap == 0:
        return 0.0
    precision, recall = overlap / len(recovered_ids), overlap / len(true_ids)
    return 2 * precision * recall / (precision + recall)


def mean_nll(logits, token_ids: list[int]) -> tuple[float, int]:
    """Summed negative log-likelihood (nats) of token_ids[1:] under next-token logits [T, V], and how many tokens."""
    import torch

    targets = torch.tensor(list(token_ids)[1:], dtype=torch.long)
    if len(targets) == 0:
        return 0.0, 0
    nll = torch.nn.functional.cross_entropy(logits[:-1].float(), targets, reduction="sum")
    return float(nll.detach()), len(targets)


def perplexity(nll_sum: float, count: int) -> float:
    """exp(mean NLL): the model's perplexity over `count` scored tokens."""
    import math

    return math.exp(nll_sum / count) if count else float("nan")


def model_perplexity(model, texts: list[list[int]]) -> float:
    """Perplexity of a causal LM (a transformers model: `model(ids).logits`) over token-id texts, each scored on its
    own."""
    import torch

    total, count = 0.0, 0
    with torch.inference_mode():
        for ids in texts:
            nll, n = mean_nll(model(torch.tensor([ids])).logits[0], ids)
            total, count = total + nll, count + n
    return perplexity(total, count)
