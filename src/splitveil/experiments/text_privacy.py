"""What the cloud reads of a Λ-split's prompt and answer: run the split, record what crosses, attack it."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch

from splitveil.core.errors import ConfigError
from splitveil.metrics.text import exact_match, token_f1, token_recovery
from splitveil.wire.frame import FrameKind, decode_frame

#: built-in evaluation prompts (private-looking, written for this bench; no attack was tuned on them)
EVALUATION_PROMPTS = (
    "My blood test came back with an LDL of 190 and my doctor wants me on statins. Is that normal at 42?",
    "Draft an email to HR: I am pregnant and want to ask about maternity leave before I tell my manager.",
    "My social security number is 512-44-9087; can you check whether this form is filled in correctly?",
    "I was diagnosed with bipolar disorder last month. How do I explain this to my partner, Sam?",
    "We owe 23,400 dollars on two credit cards and my husband lost his job. What should we pay first?",
    "Write a note to my landlord at 14 Elm Street saying the rent will be late because of my surgery.",
)


@dataclass(frozen=True)
class TextAttackSpec:
    model: str = "smollm2-135m"
    cuts: tuple[int, int] = (2, 28)
    attack: str = "exact"
    wire: str = "fp32"
    max_new_tokens: int = 24  # answer tokens generated (and read back from the downlink)
    defence: str | None = None  # a registered cut defence (noise), applied to the uplink on the device
    strength: float = 0.0  # the defence's strength (noise: std as a fraction of each position's RMS)
    candidates: int = 256  # exact attack: tokens verified per batch
    max_verified: int | None = None  # exact attack: per-position budget (None = whole vocabulary)
    aux_chars: int = 300_000  # learned attack: characters of auxiliary text (fortunes)
    learned_steps: int = 1500  # learned attack: optimisation steps


@dataclass
class Observation:
    prompt_ids: list[int]
    generated_ids: list[int]
    uplink: torch.Tensor  # [positions, H] every state the cloud received, in order
    downlink: torch.Tensor  # [positions, H] every state the cloud sent back


def observe(lm, prompt: str, max_new_tokens: int) -> Observation:
    """Runs a greedy split generation and records every FORWARD frame's tensor as the cloud decoded it."""
    transport = lm.transport
    if lm.service is None or not hasattr(transport, "handler"):
        raise ConfigError("observing needs the in-process service (a Λ-split without --server)")
    handler, uplink, downlink = transport.handler, [], []

    def record(data: bytes) -> bytes:
        reply = handler(data)
        request = decode_frame(data, finite=False)
        if request.kind == FrameKind.FORWARD:
            uplink.append(request.tensor[0])
            downlink.append(decode_frame(reply, finite=False).tensor[0])
        return reply

    transport.handler = record
    try:
        result = lm.generate(prompt, max_new_tokens=max_new_tokens)
    finally:
        transport.handler = handler
    return Observation(result.prompt_ids, result.token_ids, torch.cat(uplink), torch.cat(downlink))


def run_text_attack(spec: TextAttackSpec, prompts: list[str], *, progress=None) -> dict:
    """Attacks each prompt's uplink (prompt recovery) and downlink (answer recovery); returns the record."""
    from splitveil.attack.text.attacks import TEXT_ATTACKS, TailReadout
    from splitveil.edge.generate import SplitCausalLM
    from splitveil.experiments.records import environment
    from splitveil.models.loading import load_causal_lm
    from splitveil.plan.plan import SplitPlan

    if len(spec.cuts) != 2:
        raise ConfigError("text attacks target a Λ-split: give --split A,B")
    from splitveil.protect.cut import CUT_DEFENCES

    attack_class = TEXT_ATTACKS.get(spec.attack)
    defence = CUT_DEFENCES.get(spec.defence)(spec.strength) if spec.defence else None
    model, tokenizer = load_causal_lm(spec.model)
    plan = SplitPlan.lambda_split(*spec.cuts)
    lm = SplitCausalLM(model, plan, tokenizer=tokenizer, wire=spec.wire, defence=defence)
    reference = SplitCausalLM(model, plan, tokenizer=tokenizer, wire=spec.wire) if defence is not None else None
    head, tail = getattr(lm.stages[0], "stage", lm.stages[0]), getattr(lm.stages[2], "stage", lm.stages[2])
    undo, secret_recovered = (lambda states: states), None
    if spec.defence == "permute" and spec.strength > 0:
        # adaptive: the cloud holds the permuted trunk; matching it against the public weights gives the permutation
        from splitveil.protect.cut import recover_permutation

        cloud = next(iter(lm.service.parts.values()))
        guess = recover_permutation(lm.splittable.layers[cloud.first_layer], cloud.owner.layers[cloud.first_layer])
        secret_recovered = bool(torch.equal(guess, defence.permutation))
        inverse = torch.argsort(guess)
        undo = lambda states: states[..., inverse]  # noqa: E731
    kwargs = {"candidates": spec.candidates, "max_verified": spec.max_verified} if spec.attack == "exact" else {}
    if spec.attack == "learned":  # auxiliary text of the attacker's own, disjoint from the evaluation prompts
        from splitveil.attack.text.learned import fortunes_corpus

        texts = fortunes_corpus(spec.aux_chars)
        kwargs = {"corpus": [tokenizer(t)["input_ids"][:128] for t in texts], "steps": spec.learned_steps}
    if spec.attack == "exact" and spec.defence == "noise":
        # adaptive: the attacker knows the noise's scale. In H dimensions the noise norm concentrates at
        # strength x ||clean state|| = strength / sqrt(1 + strength^2) x ||observed||; accept up to 10% above that
        kwargs["tolerance"] = 1e-2 + 1.1 * spec.strength / (1 + spec.strength**2) ** 0.5
    attack = attack_class(head, **kwargs)
    readout = TailReadout(tail)
    rows = []
    for index, prompt in enumerate(prompts):
        seen = observe(lm, prompt, spec.max_new_tokens)
        n = len(seen.prompt_ids)
        started = time.perf_counter()
        recovered = attack.reconstruct(undo(seen.uplink[:n]))
        seconds = time.perf_counter() - started
        answer_read = readout.reconstruct(undo(seen.downlink))[n - 1 : n - 1 + len(seen.generated_ids)]
        utility = 1.0
        if reference is not None:  # greedy tokens against the undefended split, position by position
            clean = reference.generate(prompt, max_new_tokens=spec.max_new_tokens).token_ids
            utility = token_recovery(clean, seen.generated_ids)
        rows.append({
            "utility_greedy_match": utility,
            "prompt": prompt,
            "prompt_tokens": n,
            "recovered": tokenizer.decode(recovered),
            "token_recovery": token_recovery(seen.prompt_ids, recovered),
            "prompt_exact": exact_match(seen.prompt_ids, recovered),
            "token_f1": token_f1(seen.prompt_ids, recovered),
            "answer": tokenizer.decode(seen.generated_ids, skip_special_tokens=True),
            "answer_recovery": token_recovery(seen.generated_ids, answer_read),
            "seconds_per_token": seconds / max(n, 1),
        })
        if progress is not None:
            progress(index + 1, len(prompts))
    total = sum(r["prompt_tokens"] for r in rows)
    return {
        "experiment": "text-attack",
        "spec": asdict(spec),
        "threat_model": attack.threat_model.to_dict(),
        "environment": environment(),
        "token_recovery": sum(r["token_recovery"] * r["prompt_tokens"] for r in rows) / total,
        "prompt_exact": sum(r["prompt_exact"] for r in rows) / len(rows),
        "token_f1": sum(r["token_f1"] for r in rows) / len(rows),
        "answer_recovery": sum(r["answer_recovery"] for r in rows) / len(rows),
        "seconds_per_token": sum(r["seconds_per_token"] * r["prompt_tokens"] for r in rows) / total,
        "utility_greedy_match": sum(r["utility_greedy_match"] for r in rows) / len(rows),
        "defence": {"name": spec.defence, "strength": spec.strength, "cloud_holds": getattr(defence, "cloud_holds", None),
                    "reveals_secret": getattr(defence, "reveals_secret", None),
                    "secret_recovered_by_attacker": secret_recovered} if defence else None,
        "examples": [{"prompt": r["prompt"], "recovered": r["recovered"]} for r in rows],
        "rows": rows,
    }


def plot_recovery_vs_depth(records: list[dict], path) -> None:
    """Prompt token recovery (uplink) against head depth, one curve per attack and wire, from attack records."""
    from pathlib import Path

    import matplotlib

    from splitveil.experiments.records import save_figure

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves: dict[str, list[tuple[int, float]]] = {}
    for record in records:
        spec = record["spec"]
        curves.setdefault(f"{spec['attack']} ({spec['wire']} wire)", []).append((spec["cuts"][0], record["token_recovery"]))
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, points in sorted(curves.items()):
        points.sort()
        ax.plot([d for d, _ in points], [r for _, r in points], "o-", label=label)
    ax.set_xlabel("head depth (decoder layers before the cut)")
    ax.set_ylabel("prompt token recovery from the uplink")
    ax.set_ylim(-0.03, 1.03)
    ax.set_title(f"{records[0]['spec']['model']}: what the cloud reads of the prompt")
    ax.legend(fontsize=8)
    save_figure(fig, Path(path))


def write_text_report(records: list[dict], out_dir, stem: str) -> tuple:
    """Records -> JSONL, a PNG of recovery against depth, and a Markdown report (tables + examples)."""
    import json
    from pathlib import Path

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    jsonl = out_dir / f"{stem}.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in records))
    undefended = [r for r in records if not r.get("defence")]
    png = out_dir / f"{stem}.png"
    if undefended:
        plot_recovery_vs_depth(undefended, png)
    lines = [f"# Text privacy: what the cloud reads ({records[0]['spec']['model']})", "",
             "Generated from the records in " + jsonl.name + " by `write_text_report`.", "",
             "| attack | wire | head depth | defence | prompt token recovery | prompts exact | token F1 | answer read (downlink) | greedy utility | s per token |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(records, key=lambda r: (r["spec"]["attack"], r["spec"]["wire"], r["spec"]["cuts"][0], r["spec"].get("strength", 0))):
        spec, defence = r["spec"], r.get("defence")
        lines.append(f"| {spec['attack']} | {spec['wire']} | {spec['cuts'][0]} | "
                     f"{(defence['name'] + ' ' + format(defence['strength'], 'g')) if defence else '-'} | "
                     f"{r['token_recovery']:.3f} | {r['prompt_exact']:.2f} | {r['token_f1']:.3f} | {r['answer_recovery']:.3f} | "
                     f"{r.get('utility_greedy_match', 1.0):.3f} | {r['seconds_per_token']:.2f} |")
    lines += ["", "## Examples (sent -> recovered)", ""]
    for r in records:
        spec = r["spec"]
        for example in r["examples"][:2]:
            lines.append(f"- {spec['attack']}, depth {spec['cuts'][0]}: `{example['prompt']}` -> `{example['recovered']}`")
    markdown = out_dir / f"{stem}.md"
    markdown.write_text("\n".join(lines) + "\n")
    return jsonl, png, markdown
