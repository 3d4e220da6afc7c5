"""What SLIP costs, counted per side: the FLOPs of a run (`SlipCost`), the analytic FLOPs of what stays on the
trusted side besides the linear layers (`other_flops`), and the default secure rank that keeps the trusted side's
share of a decode step within a target (`default_rank`). Pure functions and one counter."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class SlipCost:
    """FLOPs (2 per multiply-accumulate, 1 per element-wise operation) counted on the run, per side."""

    untrusted_flops: int = 0  # W_res (x + r) on the executor
    secure_linear_flops: int = 0  # W_sec x through the factors
    check_flops: int = 0  # Freivalds
    mask_flops: int = 0  # encode, mask, unmask, decode
    local_linear_flops: int = 0  # unprotected linear layers run whole on the trusted side
    other_flops: int = 0  # attention products, norms, activations, rotary, residual adds (analytic count)
    dealer_flops: int = 0  # r W^T made by a mask dealer (a third party: neither side's work)
    products: int = 0  # masked products sent
    rows: int = 0  # masked rows (positions x groups)

    @property
    def trusted_flops(self) -> int:
        return self.secure_linear_flops + self.check_flops + self.mask_flops + self.local_linear_flops + self.other_flops

    @property
    def secure_share(self) -> float:
        total = self.trusted_flops + self.untrusted_flops
        return self.trusted_flops / total if total else 0.0

    @property
    def unprotected_flops(self) -> int:
        """What the plain model would do for the same run (W = W_sec + W_res costs one product)."""
        return self.untrusted_flops + self.local_linear_flops + self.other_flops

    def to_dict(self) -> dict:
        return {**asdict(self), "trusted_flops": self.trusted_flops, "secure_share": self.secure_share,
                "unprotected_flops": self.unprotected_flops}


def other_flops(config, positions: int, past: int) -> int:
    """FLOPs of a forward of `positions` new positions after `past` cached ones, outside the linear layers:
    attention scores and value products (2 x 2 x heads x head_dim per attended position), softmax, norms, rotary,
    the gated activation and residual adds (element-wise, a few operations per element). Analytic."""
    hidden = config.hidden_size
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    inner = getattr(config, "intermediate_size", None) or 4 * hidden
    attended = positions * past + positions * (positions + 1) // 2  # sum over new positions of the context length
    per_layer = (4 * heads * head_dim * attended  # QK^T and AV, 2 FLOPs per multiply-accumulate
                 + 5 * heads * attended  # softmax
                 + positions * (2 * 4 * hidden + 2 * hidden + 6 * (heads + kv_heads) * head_dim + 5 * inner))
    return config.num_hidden_layers * per_layer + positions * 4 * hidden


def default_rank(config, *, target_share: float = 0.045, context: int = 32, include_head: bool = True,
                 repetitions: int = 2) -> int:
    """The largest secure rank k whose predicted secure-side FLOPs share of one decode step at `context` cached
    positions stays within `target_share` (the issue asks <= 5%; 4.5% leaves a margin). The trusted side's attention
    grows with the context, so at long contexts no k meets a fixed share: the measured share is reported per run."""
    hidden = config.hidden_size
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    inner = getattr(config, "intermediate_size", None) or 4 * hidden
    q, kv = heads * head_dim, kv_heads * head_dim
    shapes = [(hidden, q + 2 * kv), (q, hidden), (hidden, 2 * inner), (inner, hidden)]  # (n, m) per group
    shapes = shapes * config.num_hidden_layers + ([(hidden, config.vocab_size)] if include_head else [])
    untrusted = sum(2 * n * m for n, m in shapes)
    fixed = other_flops(config, 1, context) + sum(2 * (n + m) + 2 * repetitions * (n + m) for n, m in shapes)
    members = [(hidden, q), (hidden, kv), (hidden, kv), (q, hidden), (hidden, inner), (hidden, inner), (inner, hidden)]
    per_rank = sum(2 * (n + m) for n, m in members) * config.num_hidden_layers + (2 * (hidden + config.vocab_size) if include_head else 0)
    best = 0
    for k in range(0, hidden + 1):
        share = (fixed + k * per_rank) / (fixed + k * per_rank + untrusted)
        if share > target_share:
            break
        best = k
    return best
