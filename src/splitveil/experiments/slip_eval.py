"""SLIP's evaluation: safety of the residual (weights deployment), what the untrusted side reads (prompt deployment),
and the costs of both. Records (JSON, with `environment()`) and plots under benchmarks/results/.

- `residual_perplexity_curve`: SmolLM2 with every linear layer (and the LM head) replaced by its residual, as k grows.
- `cnn_safety`: a CNN's residual-only accuracy as k grows, and the tuned extraction attack (the residual plus
  N stolen labelled samples) against training from scratch on the same N.
- `protocol_runs`: real runs (executor child process over TLS): tokens, secure FLOPs share, latency, round trips,
  against the unprotected model; greedy agreement of fixed point with fp32 over several prompts.
- `prompt_view_attack`: the prompt deployment's executor logs every frame; the adaptive attacker of
  `protect.slip.view` inverts that view, searches for reused masks and tests uniformity.
"""

from __future__ import annotations

import copy
import math
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

RESULTS = Path("benchmarks/results")


# -- weights deployment: what the residual is worth ------------------------------------------------------------


def _top_factors(weight: torch.Tensor, k_max: int) -> tuple[torch.Tensor, torch.Tensor]:
    u, s, vh = torch.linalg.svd(weight.detach().double(), full_matrices=False)
    k = min(k_max, s.numel())
    return (u[:, :k] * s[:k]).float(), vh[:k].float()


def residual_perplexity_curve(model_name: str, ranks: list[int], *, heldout_chars: int = 3000, max_tokens: int = 96,
                              progress=print) -> dict:
    """Perplexity on held-out text (the end of the fortunes corpus) of SmolLM2 whose every decomposable weight is
    its residual W - W_secure(k); embeddings and norms kept (the most generous attacker: it is given them)."""
    from splitveil.attack.text.learned import fortunes_corpus
    from splitveil.metrics.text import model_perplexity
    from splitveil.models.loading import load_causal_lm
    from splitveil.protect.slip.decompose import is_decomposable, set_weight_matrix, weight_matrix

    model, tokenizer = load_causal_lm(model_name)
    head = model.get_output_embeddings()
    if head is not None and head.weight is model.get_input_embeddings().weight:  # untie: the embedding stays whole
        head.weight = nn.Parameter(head.weight.detach().clone())
    texts = [tokenizer(t)["input_ids"][:max_tokens] for t in fortunes_corpus(heldout_chars, from_end=True)]
    texts = [t for t in texts if len(t) > 1]
    modules = [(name, m) for name, m in model.named_modules() if is_decomposable(m)]
    started = time.perf_counter()
    originals = {name: weight_matrix(m).clone() for name, m in modules}
    factors = {name: _top_factors(originals[name], max(ranks)) for name, _ in modules}
    svd_seconds = time.perf_counter() - started

    def score() -> float:
        return model_perplexity(model, texts)

    points = []
    for k in ranks:
        energy = []
        for name, module in modules:
            left, right = factors[name]
            secure = left[:, :k] @ right[:k]
            set_weight_matrix(module, originals[name] - secure)
            energy.append(float(secure.norm() ** 2 / originals[name].norm() ** 2))
        points.append({"rank": k, "perplexity": score(), "mean_energy_removed": sum(energy) / len(energy)})
        progress(f"residual-only {model_name}, k={k}: perplexity {points[-1]['perplexity']:.1f}")
    return {"model": model_name, "vocab_size": model.config.vocab_size, "heldout_texts": len(texts), "heldout_tokens": sum(len(t) - 1 for t in texts),
            "matrices": len(modules), "svd_seconds": svd_seconds, "points": points}


def cnn_safety(*, model_name: str = "lenet", ranks: tuple[int, ...] = (0, 1, 2, 4, 8), stolen: tuple[int, ...] = (100, 500, 2000),
               attack_rank: int = 4, seed: int = 0, progress=print) -> dict:
    """Residual-only accuracy of a CNN (Fashion-MNIST) as k grows; then the extraction attack from the residual at
    `attack_rank` with N stolen labelled images (`full`: every protected weight fine-tuned from the residual) against
    the same architecture trained from scratch on them (`scratch`), both tuned and stopped on their held-out plateau
    (`experiments.weights_cnn`; `splitveil attack weights-curves --model lenet` adds the structured attacks)."""
    from splitveil.experiments.weights_cnn import CnnWeightsSpec, cnn_victim, run_cnn_weights_curves
    from splitveil.protect.slip.decompose import residual_model_
    from splitveil.train.classifier import accuracy, predict

    victim, splits = cnn_victim(model_name, seed)
    test_x, test_y = splits.test.images, splits.test.labels
    victim_accuracy = accuracy(predict(victim, test_x), test_y)
    curve = []
    for k in ranks:
        residual = copy.deepcopy(victim)
        residual_model_(residual, rank=k)
        curve.append({"rank": k, "accuracy": accuracy(predict(residual.eval(), test_x), test_y)})
        progress(f"residual-only {model_name}, k={k}: accuracy {curve[-1]['accuracy']:.3f}")
    curves = run_cnn_weights_curves(CnnWeightsSpec(model=model_name, rank=attack_rank, seed=seed), ["full", "scratch"],
                                    list(stolen), progress=progress)
    runs = {(r["attack"], r["stolen"]): r for r in curves["runs"]}
    attack = [{"stolen": n, "finetuned_from_residual": runs["full", n]["accuracy_after"],
               "from_scratch": runs["scratch", n]["accuracy_after"],
               "converged": runs["full", n]["attacker_converged"] and runs["scratch", n]["attacker_converged"]}
              for n in stolen]
    for point in attack:
        progress(f"{model_name} with {point['stolen']} stolen images: fine-tuned residual "
                 f"{point['finetuned_from_residual']:.3f}, scratch {point['from_scratch']:.3f}")
    return {"model": model_name, "dataset": "fashion-mnist", "victim_accuracy": victim_accuracy, "residual_curve": curve,
            "attack_rank": attack_rank, "extraction": attack, "extraction_runs": curves["runs"],
            "test_images": len(test_y)}


# -- real runs -------------------------------------------------------------------------------------------------


def unprotected_run(model_name: str, prompt: str, max_new_tokens: int, *, ignore_eos: bool = True) -> dict:
    from splitveil.edge.generate import SplitCausalLM
    from splitveil.models.loading import load_causal_lm

    model, tokenizer = load_causal_lm(model_name)
    result = SplitCausalLM(model, None, tokenizer=tokenizer).generate(prompt, max_new_tokens=max_new_tokens,
                                                                      **({"eos_token_ids": ()} if ignore_eos else {}))
    steps = len(result.step_seconds)
    return {"token_ids": result.token_ids, "online_seconds": result.seconds,
            "decode_tokens_per_second": steps / result.decode_seconds if result.decode_seconds > 0 else None}


def slip_run(model_name: str, config, prompt: str, max_new_tokens: int, *, log_frames: Path | None = None,
             ignore_eos: bool = False, chat: bool = False) -> dict:
    """One generation with the executor as a child process over TLS (as `splitveil slip generate`)."""
    import json

    from splitveil.edge.generate import SplitCausalLM
    from splitveil.protect.slip.runtime import ExecutorProcess, connect_client, protect_registered, run_generation

    slip, tokenizer, bundle, _ = protect_registered(model_name, config)
    sha = json.loads((bundle / "manifest.json").read_text())["sha256"]
    with ExecutorProcess(bundle, config.mode, log_frames=log_frames) as executor:
        client, transport = connect_client(executor.url, token=executor.token, mode=config.mode, residual_sha256=sha,
                                           groups=len(slip.groups), ca_file=executor.cert)
        try:
            result = run_generation(slip, tokenizer, client, transport, prompt, max_new_tokens=max_new_tokens,
                                    ignore_eos=ignore_eos, chat=chat)
        finally:
            client.close()
            transport.close()
    result["rank"] = slip.secure_rank()
    result["groups"] = len(slip.groups)
    result["prompt_ids"] = SplitCausalLM(slip.model, None, tokenizer=tokenizer).encode_prompt(prompt, chat=chat)
    return result


def greedy_agreement(model_name: str, config, prompts: list[str], max_new_tokens: int) -> dict:
    """Greedy tokens of the protected model (executor in process, loopback) against the fp32 model, per prompt, with
    end-of-sequence ignored so that every run has `max_new_tokens` positions: the fraction of positions that agree
    before the first difference, and identical runs."""
    from splitveil.edge.generate import SplitCausalLM
    from splitveil.models.loading import load_causal_lm
    from splitveil.protect.slip.client import SlipClient
    from splitveil.protect.slip.executor import SlipExecutorService
    from splitveil.protect.slip.runtime import protect_registered
    from splitveil.transport.loopback import LoopbackTransport

    plain, tokenizer = load_causal_lm(model_name)
    slip, _, _, _ = protect_registered(model_name, config)
    service = SlipExecutorService(slip.executor_weights(), mode=config.mode)
    transport = LoopbackTransport(service.handle)
    slip.attach(SlipClient(transport))
    rows = []
    for prompt in prompts:
        options = {"max_new_tokens": max_new_tokens, "eos_token_ids": ()}  # every run compares max_new_tokens positions
        expected = SplitCausalLM(plain, None, tokenizer=tokenizer).generate(prompt, **options).token_ids
        got = SplitCausalLM(slip.model, None, tokenizer=tokenizer, transport=transport).generate(prompt, **options).token_ids
        prefix = next((i for i, (a, b) in enumerate(zip(expected, got)) if a != b), min(len(expected), len(got)))
        rows.append({"prompt": prompt, "identical": expected == got, "agreeing_prefix": prefix, "length": len(expected)})
    return {"mode": config.mode, "rank": slip.secure_rank(), "prompts": len(rows),
            "identical": sum(r["identical"] for r in rows),
            "position_agreement": sum(r["agreeing_prefix"] for r in rows) / max(sum(r["length"] for r in rows), 1),
            "runs": rows}


def prompt_view(model_name: str, config, prompt: str, *, max_new_tokens: int = 4, chat: bool = False) -> dict:
    """Runs the prompt deployment once with the executor (child process, TLS) logging every frame it receives, and
    returns that view: `view` (entries), `states` (the first protected group's rows read as activations, [T, n]
    float64: the unmasking-free view in the shape the text attacks take), `prompt_ids` and the run's figures. This
    is the hook for registering `slip` as a text defence."""
    from splitveil.protect.slip.runtime import read_frame_log
    from splitveil.protect.slip.view import masked_view, states_for_group

    with tempfile.TemporaryDirectory() as folder:
        log = Path(folder) / "frames.bin"
        run = slip_run(model_name, config, prompt, max_new_tokens, log_frames=log, chat=chat)
        view = masked_view(read_frame_log(log))
    states = states_for_group(view, 0, mode=config.mode, fixed_point=config.fixed_point)
    return {"view": view, "states": states, "prompt_ids": run["prompt_ids"], "run": run}


def demo_prompt_line(model_name: str, prompt: str, *, split: tuple[int, int] = (2, 28), max_new_tokens: int = 16,
                     chat: bool = False) -> dict:
    """For the demo: the prompt deployment (fixed point, k = 0) with its executor logging its view; what the nearest
    attack reads blind from that view (`read_view_text`), its token recovery, the answer and the decode speed."""
    from splitveil.metrics.text import token_recovery
    from splitveil.models.loading import load_causal_lm
    from splitveil.protect.slip.trusted import SlipConfig
    from splitveil.attack.text.slip_view import read_view_text

    config = SlipConfig(mode="fixed", rank=0, layers=split)
    seen = prompt_view(model_name, config, prompt, max_new_tokens=max_new_tokens, chat=chat)
    plain, tokenizer = load_causal_lm(model_name)
    guessed = read_view_text(seen["view"], plain, mode="fixed", fixed_point=config.fixed_point)[: len(seen["prompt_ids"])]
    run = seen["run"]
    return {"read_text": tokenizer.decode(guessed), "token_recovery": token_recovery(seen["prompt_ids"], guessed),
            "answer": run["text"], "decode_tokens_per_second": run["decode_tokens_per_second"],
            "round_trips_per_decode_step": run["round_trips_per_decode_step"]}


def prompt_view_attack(model_name: str, config, prompts: list[str], *, max_new_tokens: int = 4, candidates: int = 64,
                       progress=print) -> dict:
    """The prompt deployment with its executor logging every frame; the adaptive attacker on that view, per prompt,
    and the same inversion on the clear inputs (what an unmasked offload would show)."""
    from splitveil.models.loading import load_causal_lm
    from splitveil.attack.text.slip_view import adaptive_attack, candidate_ranking_attack
    from splitveil.protect.slip.view import layer_inputs

    plain, _ = load_causal_lm(model_name)
    first_layer = config.layers[0]
    q_proj = plain.model.layers[first_layer].self_attn.q_proj
    rows, runs = [], []
    for prompt in prompts:
        seen = prompt_view(model_name, config, prompt, max_new_tokens=max_new_tokens)
        view, run, tokens = seen["view"], seen["run"], seen["prompt_ids"]
        attacked = adaptive_attack(view, plain, q_proj, 0, tokens, mode=config.mode, fixed_point=config.fixed_point,
                                   candidates=candidates)
        clear = candidate_ranking_attack(layer_inputs(plain, torch.tensor([tokens]), q_proj)[0], plain, q_proj, tokens,
                                         candidates=candidates)
        rows.append({"prompt_tokens": len(tokens), "masked": attacked, "clear_token_recovery": clear["token_recovery"]})
        runs.append({key: run[key] for key in ("online_seconds", "decode_tokens_per_second", "round_trips",
                                               "round_trips_per_decode_step", "offline_seconds", "trusted_flops",
                                               "untrusted_flops", "unprotected_flops", "bytes_up", "bytes_down")})
        progress(f"prompt view: recovery {attacked['inversion']['token_recovery']:.3f} masked vs "
                 f"{clear['token_recovery']:.3f} clear; chi2 p {attacked['uniformity'].get('chi2_pvalue', float('nan')):.3f}")
    positions = sum(r["masked"]["inversion"]["positions"] for r in rows)
    recovered = sum(r["masked"]["inversion"]["token_recovery"] * r["masked"]["inversion"]["positions"] for r in rows)
    clear_recovered = sum(r["clear_token_recovery"] * r["masked"]["inversion"]["positions"] for r in rows)
    return {"layers": list(config.layers), "mode": config.mode, "candidates": candidates, "chance": 1 / candidates,
            "token_recovery_masked": recovered / max(positions, 1), "token_recovery_clear": clear_recovered / max(positions, 1),
            "mask_reuse_pairs": sum(r["masked"]["mask_reuse_pairs"] or 0 for r in rows), "per_prompt": rows, "runs": runs}


# -- plots -----------------------------------------------------------------------------------------------------


def plot_weights(record: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from splitveil.core.records import save_figure

    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    lm = record.get("residual_perplexity")
    if lm:
        ks = [p["rank"] for p in lm["points"]]
        axes[0].plot(ks, [p["perplexity"] for p in lm["points"]], "o-")
        axes[0].set_yscale("log")
        axes[0].set_xscale("symlog", linthresh=1)
        axes[0].set_xlim(left=-0.3)
        if lm.get("vocab_size"):
            axes[0].axhline(lm["vocab_size"], ls=":", c="red", label="uniform guess (vocabulary size)")
        axes[0].axhline(lm["points"][0]["perplexity"], ls="--", c="gray", label="original model (k = 0)")
        axes[0].legend()
        axes[0].set_xlabel("secure rank k per matrix")
        axes[0].set_ylabel("held-out perplexity")
        axes[0].set_title(f"{lm['model']}: model from W_residual alone")
    cnn = record.get("cnn")
    if cnn:
        axes[1].plot([p["rank"] for p in cnn["residual_curve"]], [p["accuracy"] for p in cnn["residual_curve"]], "o-")
        axes[1].axhline(cnn["victim_accuracy"], ls="--", c="gray", label="victim")
        axes[1].axhline(0.1, ls=":", c="red", label="chance")
        axes[1].set_xlabel("secure rank k per matrix")
        axes[1].set_ylabel("test accuracy")
        axes[1].set_title(f"{cnn['model']} (Fashion-MNIST) from W_residual alone")
        axes[1].legend()
        n = [p["stolen"] for p in cnn["extraction"]]
        axes[2].plot(n, [p["finetuned_from_residual"] for p in cnn["extraction"]], "o-", label=f"fine-tune residual (k={cnn['attack_rank']})")
        axes[2].plot(n, [p["from_scratch"] for p in cnn["extraction"]], "s-", label="train from scratch")
        axes[2].axhline(cnn["victim_accuracy"], ls="--", c="gray", label="victim")
        axes[2].set_xscale("log")
        axes[2].set_xlabel("stolen labelled samples N")
        axes[2].set_ylabel("test accuracy")
        axes[2].set_title("extraction from the residual vs scratch")
        axes[2].legend()
    return save_figure(fig, path)


def plot_prompt(record: dict, path: Path) -> Path:
    """Token recovery on the executor's view (masked) against an unmasked offload and chance; the uniformity tests'
    p-values per prompt; the device's work and speed against running the whole model on the device."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from splitveil.core.records import save_figure

    attack = record["view_attack"]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    bars = {"masked view\n(adaptive attacker)": attack["token_recovery_masked"],
            "same attack,\nunmasked offload": attack["token_recovery_clear"], "chance": attack["chance"]}
    axes[0].bar(list(bars), list(bars.values()), color=["tab:green", "tab:red", "gray"])
    axes[0].set_ylim(0, 1.05)
    axes[0].set_ylabel("prompt token recovery")
    axes[0].set_title(f"layers {attack['layers'][0]}..{attack['layers'][1] - 1} offloaded, {attack['mode']} point")
    prompts = list(range(1, len(attack["per_prompt"]) + 1))
    axes[1].plot(prompts, [p["masked"]["uniformity"]["chi2_pvalue"] for p in attack["per_prompt"]], "o", label="chi-square, top 8 bits")
    axes[1].plot(prompts, [p["masked"]["uniformity"]["ks_pvalue"] for p in attack["per_prompt"]], "s", label="Kolmogorov-Smirnov")
    axes[1].axhline(0.01, ls=":", c="red", label="p = 0.01")
    axes[1].set_ylim(0, 1)
    axes[1].set_xticks(prompts)
    axes[1].set_xlabel("prompt")
    axes[1].set_ylabel("p-value (uniform over Z_2^64)")
    axes[1].set_title("is the executor's view uniform?")
    axes[1].legend()
    run, plain = record["run"], record["unprotected"]
    device = run["trusted_flops"] / max(run["unprotected_flops"], 1)
    offline = run["untrusted_flops"] / max(run["unprotected_flops"], 1)
    axes[2].bar(["device online", "mask terms\n(offline, dealer\nor device)", "whole model\non device"],
                [device, offline, 1.0], color=["tab:green", "tab:orange", "gray"])
    axes[2].set_ylabel("FLOPs / whole model's FLOPs")
    speed = run.get("decode_tokens_per_second")
    axes[2].set_title(f"decode {speed or 0:.2f} tok/s vs {plain.get('decode_tokens_per_second') or 0:.2f} unprotected")
    return save_figure(fig, path)


def finite(value):
    return value if isinstance(value, (int, float)) and math.isfinite(value) else None


def slip_text_attack(model_name: str, cuts: tuple[int, int], attack_name: str, prompts: list[str], *,
                     max_new_tokens: int = 8, candidates: int = 256, max_verified: int | None = None,
                     progress=None) -> dict:
    """`splitveil attack text --defence slip` as a function: the registered text defence (`experiments.slip_text`),
    each prompt one session of a real executor process that logs every frame, attacked by the adaptive attacker of
    `attack.text.adaptive`. Returns the `text_privacy` record."""
    from splitveil.experiments.text_privacy import TextAttackSpec, run_text_attack

    spec = TextAttackSpec(model=model_name, cuts=tuple(cuts), attack=attack_name, max_new_tokens=max_new_tokens,
                          defence="slip", strength=0, candidates=candidates, max_verified=max_verified)
    return run_text_attack(spec, prompts, progress=progress)
