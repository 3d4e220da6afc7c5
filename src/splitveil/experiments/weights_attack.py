"""SLIP's weights deployment under a weights attack: what the residual bundle is worth to a thief.

`run_weights_attack(spec)`:
1. the victim: perplexity of the original model on held-out text (the end of the fortunes corpus);
2. every decomposable matrix split at rank k (the weights deployment's default unless given), plain or hardened
   (`decompose(mask_rank=...)`); the split's cost and exactness measured on a real protected generation (float
   variant, in-process executor): secure FLOPs share, tokens identical to the unprotected model;
3. the residual bundle (every protected weight its residual; embeddings and norms given to the attacker) and its
   perplexity;
4. the attack granted that bundle: the null-space attack recovers each matrix's secret subspaces, scored against
   the true ones (`subspace_alignment`, narrow sides, with what random subspaces score and a hindsight upper
   bound); then it fits what is left on the start of the fortunes corpus (learning rate swept, stopped on a
   held-out plateau or a cap), and the result's perplexity on the same held-out text.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field, replace

import torch
from torch import nn

from splitveil.attack.training import StopRule
from splitveil.attack.weights.finetune import FineTuneSpec
from splitveil.core.errors import ConfigError

COST_PROMPT = "The capital of France is"


@dataclass(frozen=True)
class WeightsAttackSpec:
    """One weights-attack run (saved with its record)."""

    model: str = "smollm2-135m"
    attack: str = "nullspace"
    rank: int | None = None  # secure rank k per matrix; None: the weights deployment's default for the model
    hardened: bool = False  # attack the hardened split (`decompose(mask_rank=...)`)
    mask_rank: int = 4  # the hardened split's extra secret directions per matrix
    train_tokens: int = 102_400  # the attacker's public text (the start of the fortunes corpus), tokens
    held_out_sequences: int = 16  # of the attacker's own text, held out to choose the learning rate and stop
    heldout_chars: int = 3_000  # perplexity text: the end of the fortunes corpus (as `slip eval`)
    heldout_max_tokens: int = 96  # per held-out text
    cost_tokens: int = 16  # greedy tokens of the protected generation that measures cost and exactness
    finetune: FineTuneSpec = field(default_factory=lambda: FineTuneSpec(
        learning_rates=(1e-2, 3e-2, 1e-1), sweep_steps=15, steps_per_round=25,
        stop=StopRule(max_epochs=24, patience=3, lr_patience=2, min_delta=2e-3)))
    seed: int = 0
    quick: bool = False

    def __post_init__(self):
        """Refuses, with one line, what no run could do (before the model loads)."""
        from splitveil.attack.weights import WEIGHTS_ATTACKS

        WEIGHTS_ATTACKS.get(self.attack)
        if self.rank is not None and self.rank < 1:
            raise ConfigError(f"--rank must be >= 1 (the weights deployment keeps a secure part), got {self.rank}")
        if self.hardened and self.mask_rank < 1:
            raise ConfigError(f"--mask-rank must be >= 1 for the hardened split, got {self.mask_rank}")
        if self.train_tokens < 10 * self.finetune.seq_len or self.held_out_sequences < 1:
            raise ConfigError(f"the attacker needs at least {10 * self.finetune.seq_len} tokens of text (ten sequences) "
                              f"and one held-out sequence, got {self.train_tokens} and {self.held_out_sequences}")
        if self.seed < 0:
            raise ConfigError(f"--seed must be non-negative, got {self.seed}")

    @classmethod
    def for_run(cls, *, quick: bool = False, **fields) -> "WeightsAttackSpec":
        """The spec of a run; `quick` shrinks the attacker's text and its step cap (it then stops on the cap)."""
        spec = cls(**{k: v for k, v in fields.items() if v is not None})
        if not quick:
            return spec
        return replace(spec, quick=True, train_tokens=12_800, held_out_sequences=8,
                       finetune=replace(spec.finetune, sweep_steps=6, steps_per_round=10,
                                        stop=replace(spec.finetune.stop, max_epochs=4)))

    def to_dict(self) -> dict:
        return {**asdict(self), "finetune": self.finetune.to_dict()}


def attacker_text(tokenizer, spec: WeightsAttackSpec) -> tuple[torch.Tensor, torch.Tensor, list[list[int]]]:
    """(training sequences [N, T], the attacker's held-out sequences [V, T], perplexity texts) from the fortunes
    corpus: the attacker's text from its start, the perplexity texts from its end (disjoint)."""
    from splitveil.attack.text.learned import fortunes_corpus
    from splitveil.attack.weights.finetune import pack

    seq_len = spec.finetune.seq_len
    wanted = (spec.train_tokens // seq_len + spec.held_out_sequences) * seq_len
    texts = fortunes_corpus(6 * wanted)  # ~3.5 characters per token on this corpus; packed, then cut to size
    separator = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    sequences = pack([tokenizer(t)["input_ids"] for t in texts], seq_len, separator=separator)
    train_count = spec.train_tokens // seq_len
    if len(sequences) < train_count + spec.held_out_sequences:
        raise ConfigError(f"the fortunes corpus gives {len(sequences) * seq_len} tokens, fewer than the "
                          f"{wanted} asked for: lower the attacker's text")
    perplexity_texts = [tokenizer(t)["input_ids"][:spec.heldout_max_tokens]
                        for t in fortunes_corpus(spec.heldout_chars, from_end=True)]
    return (sequences[:train_count], sequences[train_count:train_count + spec.held_out_sequences],
            [t for t in perplexity_texts if len(t) > 1])


def protected_matrices(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The decomposable modules of `model` (each weight once: a tied LM head counts as the head)."""
    from splitveil.protect.slip.decompose import is_decomposable

    seen, found = set(), []
    for name, module in model.named_modules():
        if is_decomposable(module) and id(module.weight) not in seen:
            seen.add(id(module.weight))
            found.append((name, module))
    return found


def split_cost(model: nn.Module, tokenizer, parts: dict[int, object], rank: int, *, tokens: int) -> dict:
    """A real protected greedy generation (float variant, in-process executor) with the given decompositions
    (module id -> Decomposition): its secure FLOPs share and whether its tokens equal the unprotected model's."""
    import copy

    from splitveil.edge.generate import GenerationConfig, SplitCausalLM
    from splitveil.protect.slip.client import SlipClient
    from splitveil.protect.slip.decompose import causal_lm_groups
    from splitveil.protect.slip.executor import SlipExecutorService
    from splitveil.protect.slip.runtime import run_generation
    from splitveil.protect.slip.trusted import SlipConfig, SlipModel
    from splitveil.transport.loopback import LoopbackTransport

    layers = model.config.num_hidden_layers
    found = causal_lm_groups(model, layers=range(layers), include_head=True)
    decompositions = {group.group_id: [parts[id(module)] for module in modules] for group, modules in found}
    prompt_ids = SplitCausalLM(model, None, tokenizer=tokenizer).encode_prompt(COST_PROMPT)
    plain = SplitCausalLM(model, None, tokenizer=tokenizer).generate(
        prompt_ids, GenerationConfig(max_new_tokens=tokens, eos_token_ids=())).token_ids
    slip = SlipModel(copy.deepcopy(model), SlipConfig(mode="float", rank=rank, layers=(0, layers), include_head=True),
                     decompositions=decompositions)
    service = SlipExecutorService(slip.executor_weights(), mode="float")
    transport = LoopbackTransport(service.handle)
    client = SlipClient(transport)
    try:
        result = run_generation(slip, tokenizer, client, transport, COST_PROMPT, max_new_tokens=tokens,
                                prompt_ids=prompt_ids, ignore_eos=True)
    finally:
        client.close()
        transport.close()
    return {"secure_flops_share": result["secure_flops_share"], "tokens_identical": result["token_ids"] == plain,
            "cost_prompt": COST_PROMPT, "cost_tokens": tokens, "secure_rank_total": slip.secure_rank()}


def _kind(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def run_weights_attack(spec: WeightsAttackSpec, *, progress=None, quiet: bool = True) -> dict:
    """Runs the attack of `spec`; returns its record (see the module docstring). `progress(message)` is told each
    stage."""
    from splitveil.attack.weights import WEIGHTS_ATTACKS, WeightsTarget
    from splitveil.attack.weights.subspace import orthonormal
    from splitveil.core.records import environment
    from splitveil.metrics.text import model_perplexity
    from splitveil.models.loading import load_causal_lm
    from splitveil.protect.slip.cost import default_rank
    from splitveil.protect.slip.decompose import decompose, set_weight_matrix, weight_matrix

    say = progress or (lambda message: None)
    attack_class = WEIGHTS_ATTACKS.get(spec.attack)
    began = time.perf_counter()
    model, tokenizer = load_causal_lm(spec.model)
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    rank = spec.rank if spec.rank is not None else default_rank(model.config)
    if rank < 1:
        raise ConfigError(f"the secure rank must be >= 1 to attack the weights deployment, got {rank}")
    train, held_out, perplexity_texts = attacker_text(tokenizer, spec)
    say("perplexity of the original model ...")
    perplexity_original = model_perplexity(model, perplexity_texts)

    matrices = protected_matrices(model)
    generator = torch.Generator().manual_seed(spec.seed)
    parts, truths, started = {}, {}, time.perf_counter()
    for index, (name, module) in enumerate(matrices):
        say(f"splitting {index + 1}/{len(matrices)} matrices ({'hardened, ' if spec.hardened else ''}k = {rank}) ...")
        part = decompose(weight_matrix(module), rank=rank, mask_rank=spec.mask_rank if spec.hardened else 0,
                         generator=generator)
        parts[id(module)] = part
        truths[name] = (orthonormal(part.left), orthonormal(part.right.T))  # the secret column / row spaces
    split_seconds = time.perf_counter() - started
    say("a protected generation with this split (cost, exactness) ...")
    cost = split_cost(model, tokenizer, parts, rank, tokens=spec.cost_tokens)

    head = model.get_output_embeddings()
    if head is not None and head.weight is model.get_input_embeddings().weight:  # untie: the embedding stays whole
        head.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=False)
    for name, module in matrices:
        set_weight_matrix(module, parts[id(module)].residual)
    secure_ranks = {name: parts[id(module)].rank for name, module in matrices}
    del parts
    say("perplexity of the residual-only model ...")
    perplexity_residual = model_perplexity(model, perplexity_texts)

    attack = attack_class(WeightsTarget(model, secure_ranks), seed=spec.seed)
    del model
    started = time.perf_counter()
    attack.prepare(progress=lambda done, total: say(f"{spec.attack}: reading {done}/{total} residuals ..."))
    recover_seconds = time.perf_counter() - started
    structure = alignment_record(attack, truths)
    say(f"{spec.attack}: fine-tuning {attack.unknowns():,} unknowns on {len(train) * train.shape[1]:,} tokens ...")
    training = attack.fit(train, held_out, spec.finetune, quiet=quiet, report=progress)
    say("perplexity after the attack ...")
    perplexity_after = model_perplexity(attack.reconstruct(), perplexity_texts)
    return {
        "spec": spec.to_dict(), "model": spec.model, "attack": spec.attack, "hardened": spec.hardened,
        "rank": rank, "mask_rank": spec.mask_rank if spec.hardened else 0, "matrices": len(matrices),
        **structure,
        "perplexity_original": perplexity_original, "perplexity_residual": perplexity_residual,
        "perplexity_after": perplexity_after,
        "tokens": int(train.numel() + held_out.numel()), "train_tokens": int(train.numel()),
        "held_out_tokens": int(held_out.numel()),
        "perplexity_tokens": sum(len(t) - 1 for t in perplexity_texts),
        "unknowns": attack.unknowns(), "weights_total": sum(p.numel() for p in attack.reconstruct().parameters()),
        **cost, **training, "threat_model": attack.threat_model.to_dict(),
        "split_seconds": split_seconds, "recover_seconds": recover_seconds,
        "seconds": time.perf_counter() - began, "environment": environment(),
    }


def run_weights_curves(spec: WeightsAttackSpec, attacks: list[str], budgets: list[int], *, progress=None,
                       on_record=None, resume: bool = False) -> dict:
    """Extraction curves: every attack of `attacks` at every budget of `budgets` (tokens of the attacker's text), each
    a full `run_weights_attack` (its learning rate swept, stopped on its held-out plateau). Returns the curves'
    record: the runs, and per attack the perplexity after the attack against tokens. Each run is kept
    (`experiments.units`); with `resume`, runs an earlier run of the same commit finished are read back."""
    from splitveil.core.records import environment
    from splitveil.experiments.units import kept_or_run

    stamp, began, runs = environment(), time.perf_counter(), []
    for attack in attacks:
        for budget in budgets:
            say = (lambda message, a=attack, b=budget: progress(f"[{a}, {b:,} tokens] {message}")) if progress else None
            unit = replace(spec, attack=attack, train_tokens=budget)
            record = kept_or_run("weights-attack", unit.to_dict(), lambda: run_weights_attack(unit, progress=say),
                                 resume=resume)
            runs.append(record)
            if on_record is not None:
                on_record(record)
    curves = {attack: [{"train_tokens": r["train_tokens"], "perplexity_after": r["perplexity_after"],
                        "unknowns": r["unknowns"], "learning_rate": r.get("learning_rate"),
                        "attacker_converged": r.get("attacker_converged")}
                       for r in runs if r["attack"] == attack] for attack in attacks}
    first = runs[0]
    return {"kind": "weights-curves", "spec": spec.to_dict(), "model": spec.model, "hardened": spec.hardened,
            "attacks": attacks, "budgets": budgets, "curves": curves,
            "perplexity_original": first["perplexity_original"], "perplexity_residual": first["perplexity_residual"],
            "runs": runs, "seconds": time.perf_counter() - began, "environment": stamp}


def plot_weights_curves(record: dict, path) -> object:
    """An extraction-curves record's plot: per attack, what the thief's model scores against its data (an LM:
    held-out perplexity against tokens of public text, log scales; a CNN: test accuracy against stolen images), with
    the original and the residual-only model as horizontal lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from splitveil.core.records import save_figure

    cnn = "accuracy_original" in record
    x, y, score = ("stolen", "accuracy_after", "accuracy") if cnn else ("train_tokens", "perplexity_after", "perplexity")
    fig, axis = plt.subplots(figsize=(7, 4.5))
    for attack, points in record["curves"].items():
        axis.plot([p[x] for p in points], [p[y] for p in points], marker="o",
                  label=f"{attack} ({points[0]['unknowns']:,} unknowns)")
    axis.axhline(record[f"{score}_original"], color="black", linestyle="--", linewidth=1,
                 label=f"original model ({record[f'{score}_original']:.4g})")
    axis.axhline(record[f"{score}_residual"], color="grey", linestyle=":", linewidth=1,
                 label=f"residual only ({record[f'{score}_residual']:.4g})")
    if cnn:
        axis.set(xscale="log", xlabel="thief's stolen labelled images (a fifth held out)", ylabel="test accuracy")
    else:
        axis.set(xscale="log", yscale="log", xlabel="attacker's public text (tokens)", ylabel="held-out perplexity")
    axis.set_title(f"{record['model']}: what a thief of SLIP's {'hardened ' if record['hardened'] else ''}residual "
                   "recovers, by attack")
    axis.grid(alpha=0.3, which="both")
    axis.legend(fontsize=7)
    return save_figure(fig, path)


def alignment_record(attack, truths: dict) -> dict:
    """Per-matrix subspace alignment of what the attack recovered (null-space attack only) with the secret
    subspaces `truths` (name -> (left, right) orthonormal bases): the mean, the worst, the mean by matrix kind, what
    random subspaces score, and the hindsight bound."""
    from splitveil.attack.weights.subspace import hindsight_alignment, narrow_alignment
    recovered = getattr(attack, "recovered", None)
    if not recovered:
        return {"subspace_alignment": None}
    scores, chances, hindsight, kinds = [], [], [], {}
    for name, found in recovered.items():
        left, right = truths[name]
        score, chance = narrow_alignment(found, left, right)
        scores.append(score)
        chances.append(chance)
        hindsight.append(hindsight_alignment(found, left, right))
        kinds.setdefault(_kind(name), []).append(score)
    mean = lambda values: sum(values) / len(values)  # noqa: E731
    return {"subspace_alignment": mean(scores), "subspace_alignment_min": min(scores),
            "subspace_alignment_by_kind": {kind: mean(values) for kind, values in kinds.items()},
            "subspace_alignment_chance": mean(chances), "subspace_alignment_hindsight": mean(hindsight),
            "smallest_singular_ratio": _null_gap(recovered)}


def _null_gap(recovered: dict) -> float:
    """The largest, over matrices, of (the secret-rank-th smallest singular value / the largest) of the residual:
    ~1e-7 when every residual has an exact null space of the secret's dimension."""
    worst = 0.0
    for found in recovered.values():
        s = found.singular_values
        dim = min(found.left.dim, found.right.dim)
        if dim and s.numel() >= dim and float(s[0]) > 0:
            worst = max(worst, float(s[-dim] / s[0]))
    return worst if math.isfinite(worst) else float("nan")
