"""The adaptive attacker on SLIP's prompt deployment's view (`protect.slip.view`): it knows the protocol, the public
weights and the fixed-point scale, and has every frame the executor received. It does what is open to it:

1. inversion of the unmasking-free view: for each position, rank candidate tokens by how close the state they
   would give at the protected layer's input is to the observed row (the exact / nearest attack's criterion,
   with the true prefix given to it for free); recovery is the fraction of positions where the true token ranks
   first;
2. a search for reused masks: two rows masked with the same r differ by x1 - x2, a small fixed-point number,
   whereas rows under fresh uniform masks differ by a uniform ring element (a coordinate below 2^40 in magnitude
   has probability 2^-23);
3. distinguishing tests: chi-square of the rows' high bits against uniform, and a Kolmogorov-Smirnov test of the
   rows as fractions of 2^64 (fixed point), or of the rows against the mask distribution (float variant).

The text attacks also read the view through the registered text protection `slip` (`attack text --defence slip`).
"""

from __future__ import annotations

import numpy as np
import torch

from splitveil.protect.slip.fixedpoint import FixedPoint, high_bits, wire_to_float64
from splitveil.protect.slip.view import ViewEntry, layer_inputs, rows_for_group, states_for_group


def uniformity_tests(rows: torch.Tensor, *, bits: int = 8, mode: str = "fixed", mask_scale: float = 2.0**24) -> dict:
    """Tests that the masked rows look like the masks alone (independent of the inputs).

    Fixed point: chi-square of the top `bits` bits against uniform over 2^bits cells, and KS of value / 2^64 + 1/2
    against U(0, 1). Float variant: KS of the values / scale against U(-1, 1) (they are x + r, not uniform in
    the ring sense; a shift of x / scale is what hides in the masks' spread).
    """
    from scipy.stats import chisquare, kstest

    flat = rows.reshape(-1)
    if flat.numel() == 0:
        return {"samples": 0}
    sample = flat[torch.randperm(flat.numel(), generator=torch.Generator().manual_seed(0))[:200_000]]
    if mode == "float":
        values = wire_to_float64(sample).numpy() / mask_scale
        ks = kstest(values, "uniform", args=(-1.0, 2.0))
        return {"samples": int(sample.numel()), "ks_statistic": float(ks.statistic), "ks_pvalue": float(ks.pvalue),
                "mean_over_scale": float(values.mean())}
    counts = torch.bincount(high_bits(sample, bits), minlength=2**bits).numpy()
    chi = chisquare(counts)
    fractions = sample.to(torch.float64).numpy() / 2.0**64 + 0.5
    ks = kstest(fractions, "uniform")
    return {"samples": int(sample.numel()), "bits": bits, "chi2_statistic": float(chi.statistic),
            "chi2_pvalue": float(chi.pvalue), "ks_statistic": float(ks.statistic), "ks_pvalue": float(ks.pvalue)}

def find_mask_reuse(rows: torch.Tensor, *, small_bits: int = 40, max_rows: int = 2048) -> int:
    """Pairs of rows whose difference is small in every coordinate (|d| < 2^small_bits): what a reused mask leaves.
    With fresh uniform masks the expected count is pairs x 2^-(64 - small_bits - 1) per coordinate, ~0."""
    rows = rows[:max_rows]
    found = 0
    limit = 1 << small_bits
    for i in range(1, rows.shape[0]):
        difference = rows[:i] - rows[i]  # wraps: the ring difference
        found += int(((difference.abs() < limit) & (difference != torch.iinfo(torch.int64).min)).all(dim=1).sum())
    return found


# -- inversion of the unmasking-free view -------------------------------------------------------------------------

def candidate_ranking_attack(observed: torch.Tensor, model, module, true_tokens: list[int], *, candidates: int = 64,
                             seed: int = 0) -> dict:
    """Inverts observed rows [T, n] of `module`'s input: at each position the attacker gets the true prefix for free
    and ranks `candidates` tokens (the true one and random others) by the distance between the input they would give
    and the observed row. Returns the recovery (true token ranked first) and the chance level 1 / candidates."""
    rng = np.random.default_rng(seed)
    vocab = model.get_input_embeddings().weight.shape[0]
    positions = min(len(true_tokens), observed.shape[0])
    hits, ranks = 0, []
    for i in range(positions):
        others = rng.choice(vocab, size=candidates * 2, replace=False)
        pool = [true_tokens[i]] + [int(t) for t in others if t != true_tokens[i]][: candidates - 1]
        batch = torch.tensor([true_tokens[:i] + [token] for token in pool])
        states = layer_inputs(model, batch, module)[:, -1].to(torch.float64)  # [C, n]
        distances = (states - observed[i].to(torch.float64)).norm(dim=-1)
        rank = int((distances < distances[0]).sum())
        ties = int((distances == distances[0]).sum()) - 1  # broken at random: a tie is no evidence
        ranks.append(rank + ties / 2)
        hits += 1.0 / (1 + ties) if rank == 0 else 0.0
    return {"positions": positions, "candidates": candidates, "token_recovery": hits / max(positions, 1),
            "chance": 1.0 / candidates, "mean_rank_of_true_token": float(np.mean(ranks)) if ranks else None}

def adaptive_attack(view: list[ViewEntry], model, module, group_id: int, true_tokens: list[int], *, mode: str,
                    fixed_point: FixedPoint = FixedPoint(), candidates: int = 64, mask_scale: float = 2.0**24) -> dict:
    """Everything an attacker who knows SLIP tries on the executor's view of one session (see the module docstring).

    `module` is the clear model's first member of `group_id` (e.g. layer A's q_proj), whose input the group's rows
    mask; `true_tokens` are the prompt's tokens, used only to score the attack.
    """
    rows = rows_for_group(view, group_id)
    states = states_for_group(view, group_id, mode=mode, fixed_point=fixed_point)
    inversion = candidate_ranking_attack(states, model, module, true_tokens, candidates=candidates)
    every_row = torch.cat([entry.values.reshape(-1) for entry in view]) if view else torch.zeros(0, dtype=torch.int64)
    return {
        "inversion": inversion,
        "mask_reuse_pairs": find_mask_reuse(rows) if mode == "fixed" else None,
        "uniformity": uniformity_tests(every_row, mode=mode, mask_scale=mask_scale),
        "frames": len(view),
        "rows": int(rows.shape[0]),
    }

def read_view_text(view: list[ViewEntry], model, *, mode: str, fixed_point: FixedPoint = FixedPoint(),
                   group_id: int = 0) -> list[int]:
    """A blind reading of the view (no true tokens given): for each row of `group_id`, the token whose embedding is
    nearest in cosine (the nearest attack of `attack.text`), i.e. what an attacker reads off the unmasking-free view
    of the first offloaded layer. Against the masks it reads noise; on an unmasked offload of an early layer it reads
    the prompt."""
    from splitveil.attack.text.attacks import nearest_tokens

    states = states_for_group(view, group_id, mode=mode, fixed_point=fixed_point)
    if states.numel() == 0:
        return []
    unit = torch.nn.functional.normalize(model.get_input_embeddings().weight.detach().float(), dim=-1)
    return nearest_tokens(states.float(), unit)
