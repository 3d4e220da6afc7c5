"""Pure next-token selection: temperature, top-k, top-p (nucleus), greedy. Functions of logits [V] -> token."""

from __future__ import annotations

import torch


def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return logits / temperature if temperature != 1.0 else logits


def top_k_filter(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """Keeps the `top_k` largest logits (0 = all), the rest become -inf."""
    if top_k <= 0 or top_k >= logits.shape[-1]:
        return logits
    threshold = torch.topk(logits, top_k).values[..., -1, None]
    return logits.masked_fill(logits < threshold, float("-inf"))


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keeps the smallest set of tokens whose probability mass reaches `top_p` (1.0 = all)."""
    if top_p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, descending=True)
    cumulative = sorted_logits.softmax(-1).cumsum(-1)
    remove = cumulative - sorted_logits.softmax(-1) >= top_p  # mass before this token already reaches top_p
    remove[..., 0] = False
    mask = torch.zeros_like(remove).scatter(-1, order, remove)
    return logits.masked_fill(mask, float("-inf"))


def token_probabilities(logits: torch.Tensor, *, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """The distribution sampling draws from: softmax after temperature, top-k and top-p (logits [..., V])."""
    return top_p_filter(top_k_filter(apply_temperature(logits.float(), temperature), top_k), top_p).softmax(-1)


def select_token(
    logits: torch.Tensor,  # [V]
    *,
    do_sample: bool,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> int:
    """Greedy argmax, or a sample after temperature, top-k and top-p (the order transformers applies them)."""
    logits = logits.float()
    if not do_sample:
        return int(torch.argmax(logits))
    probs = token_probabilities(logits, temperature=temperature, top_k=top_k, top_p=top_p)
    return int(torch.multinomial(probs, 1, generator=generator))
