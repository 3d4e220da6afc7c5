"""What the cloud reads of a Λ-split's prompt and answer: run the split, record what crosses, attack it."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

from splitveil.attack.training import StopRule, combined_record
from splitveil.core.errors import ConfigError
from splitveil.metrics.text import exact_match, token_f1, token_recovery
from splitveil.plan.plan import DEFAULT_LM_CUTS
from splitveil.protect.text import heldout_perplexity

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
    cuts: tuple[int, int] = DEFAULT_LM_CUTS
    attack: str = "exact"
    wire: str = "fp32"
    max_new_tokens: int = 24  # answer tokens generated (and read back from the downlink)
    defence: str | None = None  # a registered text protection (noise, permute, randcut, slip, enclave: the
    # `DEPLOYMENTS` of modality text)
    strength: float = 0.0  # noise: std as a fraction of each position's RMS; permute: on if > 0; randcut: layers;
    # slip: the secure rank k
    candidates: int = 256  # exact attack: tokens verified per batch
    max_verified: int | None = None  # exact attack: per-position budget (None = whole vocabulary)
    ranker: str | None = None  # exact attack: "learned" orders candidates with a learned readout (cost, not answer)
    aux_chars: int = 300_000  # learned attack: characters of auxiliary text (fortunes)
    attacker: StopRule = field(default_factory=StopRule)  # learned attack: trains until its held-out loss plateaus
    # (the same rule in quick and full runs; a cap reached is recorded as not converged)
    heldout_chars: int = 3_000  # perplexity cost of a defence: characters of held-out text (end of the fortunes)

    def __post_init__(self):
        """Refuses, with one line, what no run could do (before any model loads)."""
        from splitveil.attack.text.attacks import TEXT_ATTACKS
        from splitveil.protect.text import deployment_for
        from splitveil.wire.codecs import FLOAT_CODECS

        if len(self.cuts) != 2 or not 0 <= self.cuts[0] < self.cuts[1]:
            raise ConfigError(f"text attacks target a Λ-split: give --split A,B with A < B, got {self.cuts}")
        TEXT_ATTACKS.get(self.attack)
        if self.wire not in FLOAT_CODECS:
            raise ConfigError(f"unknown --wire {self.wire!r}; use one of {', '.join(FLOAT_CODECS)}")
        if self.ranker not in (None, "learned"):
            raise ConfigError(f"unknown ranker {self.ranker!r}; use learned (or none: gradient ranking)")
        if self.ranker is not None and self.attack != "exact":
            raise ConfigError("--ranker orders the exact attack's candidates: use it with --attack exact")
        for name in ("max_new_tokens", "candidates", "aux_chars", "heldout_chars"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.max_verified is not None and self.max_verified < 1:
            raise ConfigError(f"max_verified must be at least 1 (or None: the whole vocabulary), got {self.max_verified}")
        if self.strength < 0:
            raise ConfigError(f"--strength must be >= 0, got {self.strength:g}")
        if self.defence is not None:
            deployment_for(self.defence).check(self.strength, tuple(self.cuts))


def _make_attack(spec: TextAttackSpec, target, tokenizer, adaptation):
    """The spec's attack against `target` (a TextTarget: the attack is granted private copies of what its threat
    model names, never the victim's live parts), with `adaptation`'s options (the attacker knows the defence's
    mechanism and scale)."""
    from splitveil.attack.text.attacks import TEXT_ATTACKS, wire_tolerance

    if spec.attack == "learned" or spec.ranker == "learned":  # auxiliary text of its own, disjoint from the prompts
        from splitveil.attack.text.learned import fortunes_corpus

        texts = fortunes_corpus(spec.aux_chars)
        learned = TEXT_ATTACKS.get("learned")(target, [tokenizer(t)["input_ids"][:128] for t in texts], stop=spec.attacker,
                                              **adaptation.attack_options("learned", target))
        if spec.attack == "learned":
            return learned
    kwargs: dict = {}
    if spec.attack == "exact":
        kwargs = {"candidates": spec.candidates, "max_verified": spec.max_verified, "tolerance": wire_tolerance(spec.wire),
                  "ranker": learned.scores if spec.ranker == "learned" else None,
                  **adaptation.attack_options("exact", target)}
    attack = TEXT_ATTACKS.get(spec.attack)(target, **kwargs)
    if spec.ranker == "learned":
        attack.phases = learned.phases  # the record says how long its ranker trained
    return attack


def run_text_attack(spec: TextAttackSpec, prompts: list[str], *, progress=None) -> dict:
    """Attacks each prompt's uplink (prompt recovery) and downlink (answer recovery); returns the record.

    Every prompt is its own session of the protection's deployment (`protect.text`): a fresh session key for each (a
    new noise stream, a new permutation, a new cut depth, new one-time masks), and the adaptive attacker starts again
    from what that session's cloud holds.
    """
    from splitveil.attack.text.adaptive import adaptation_for
    from splitveil.attack.text.attacks import TEXT_ATTACKS, TailReadout
    from splitveil.attack.text.target import TextTarget
    from splitveil.edge.generate import SplitCausalLM
    from splitveil.core.records import environment
    from splitveil.models.causal_lm import CausalLMSplittable
    from splitveil.models.loading import load_causal_lm
    from splitveil.plan.plan import SplitPlan
    from splitveil.protect.text import deployment_for

    stamp = environment()  # the code and machine as the run starts
    if len(spec.cuts) != 2:
        raise ConfigError("text attacks target a Λ-split: give --split A,B")
    TEXT_ATTACKS.get(spec.attack)
    deployment_class = deployment_for(spec.defence)
    if spec.defence:
        deployment_class.check(spec.strength, tuple(spec.cuts))
    model, tokenizer = load_causal_lm(spec.model)
    plan = SplitPlan.lambda_split(*spec.cuts)
    public = CausalLMSplittable(model)  # the public model: what every attacker knows
    reference = SplitCausalLM(model, plan, tokenizer=tokenizer, wire=spec.wire) if spec.defence else None
    attacks: dict[int, object] = {}  # head depth -> the attack built for it (one per depth the attacker meets)
    adaptation = adaptation_for(spec.defence, spec.strength, spec.wire)
    rows, blind, setup_seconds, readout, searches = [], None, 0.0, None, []
    with deployment_class(spec.model, model, tokenizer, plan, strength=spec.strength, wire=spec.wire) as deployment:
        adaptation.bind(deployment)
        for index, prompt in enumerate(prompts):
            session = deployment.session()
            depth = session.depth  # what the cloud runs tells it where the cut is (randcut's secret included)
            target = TextTarget(public, public.boundary(depth), public.boundary(spec.cuts[1]))  # never live parts
            undo, secret_recovered = adaptation.session(session.lm, session.defence, depth)
            if depth not in attacks:
                building = time.perf_counter()
                attacks[depth] = _make_attack(spec, target, tokenizer, adaptation)
                setup_seconds += time.perf_counter() - building
            attack = attacks[depth]
            readout = readout or TailReadout(target)  # the tail's cut is the same in every session
            seen = session.observe(prompt, spec.max_new_tokens)
            n = len(seen.prompt_ids)
            probe = adaptation.probe(session.lm, seen.uplink[:n], spec.cuts[0])  # e.g. a blind search for the secret
            if probe is not None:
                probe = {"true_depth": depth, **probe}
                blind = blind or probe
                if secret_recovered is None:
                    secret_recovered = adaptation.secret_recovered(probe, depth)
            started = time.perf_counter()
            recovered = attack.reconstruct(undo(seen.uplink[:n]))
            seconds = time.perf_counter() - started
            searches += getattr(attack, "search", [])
            control = None
            if seen.clear_uplink is not None and spec.attack == "exact":  # the same attack on the view without hiding
                control = token_recovery(seen.prompt_ids, attack.reconstruct(seen.clear_uplink[:n]))
            answer_read = readout.reconstruct(undo(seen.downlink))[n - 1 : n - 1 + len(seen.generated_ids)]
            utility = 1.0
            if reference is not None:  # greedy tokens against the undefended split, position by position
                clean = reference.generate(prompt, max_new_tokens=spec.max_new_tokens).token_ids
                utility = token_recovery(clean, seen.generated_ids)
            rows.append({
                "utility_greedy_match": utility,
                "prompt": prompt,
                "prompt_tokens": n,
                "head_depth": depth,
                "secret_recovered_by_attacker": secret_recovered,
                **({"blind_probe": probe} if probe is not None else {}),
                "recovered": tokenizer.decode(recovered),
                "token_recovery": token_recovery(seen.prompt_ids, recovered),
                **({"control_clear_view_token_recovery": control} if control is not None else {}),
                "prompt_exact": exact_match(seen.prompt_ids, recovered),
                "token_f1": token_f1(seen.prompt_ids, recovered),
                "answer": tokenizer.decode(seen.generated_ids, skip_special_tokens=True),
                "answer_recovery": token_recovery(seen.generated_ids, answer_read),
                "seconds_per_token": seconds / max(n, 1),
            })
            if progress is not None:
                progress(index + 1, len(prompts))
        perplexity = None
        if spec.defence:  # on held-out text (the end of the fortunes corpus), defended vs undefended
            from splitveil.attack.text.learned import fortunes_corpus

            heldout = [tokenizer(t)["input_ids"][:96] for t in fortunes_corpus(spec.heldout_chars, from_end=True)]
            defended = deployment.perplexity(heldout)
            perplexity = {"undefended": heldout_perplexity(reference, heldout), "defended": defended,
                          "tokens": sum(len(ids) - 1 for ids in heldout)} if defended is not None else None
        described = deployment.describe()
    total = sum(r["prompt_tokens"] for r in rows)
    recovered_secrets = [r["secret_recovered_by_attacker"] for r in rows if r["secret_recovered_by_attacker"] is not None]
    controls = [(r["control_clear_view_token_recovery"], r["prompt_tokens"]) for r in rows if "control_clear_view_token_recovery" in r]
    attack = next(iter(attacks.values()))
    if controls:
        described["control_clear_view_token_recovery"] = sum(c * t for c, t in controls) / sum(t for _, t in controls)
    if searches and getattr(attack, "output_bound", None) is not None:  # how the exact search ran against the view
        described["exact_search"] = {
            "output_bound": attack.output_bound,
            "rule": "every candidate's output has norm <= output_bound (public weights: the norm's, or with SLIP's fused "
                    "groups a bound on the residual stream's length), so a position whose "
                    "observation has ||o|| - output_bound > tolerance x ||o|| cannot match any token: its search stops "
                    "after the first round (candidates + 1 verified) and takes the closest",
            "positions": len(searches),
            "positions_unmatchable": sum(s["unmatchable"] for s in searches),
            "mean_verified_per_position": sum(s["verified"] for s in searches) / len(searches),
            "closest_relative_distance_min": min(s["closest_relative"] for s in searches),
            "tolerance": attack.tolerance}
    return {
        "experiment": "text-attack",
        "spec": asdict(spec),
        "threat_model": {**attack.threat_model.to_dict(), **({"auxiliary_data": True} if spec.ranker else {})},
        "environment": stamp,
        "token_recovery": sum(r["token_recovery"] * r["prompt_tokens"] for r in rows) / total,
        "prompt_exact": sum(r["prompt_exact"] for r in rows) / len(rows),
        "token_f1": sum(r["token_f1"] for r in rows) / len(rows),
        "answer_recovery": sum(r["answer_recovery"] for r in rows) / len(rows),
        "seconds_per_token": sum(r["seconds_per_token"] * r["prompt_tokens"] for r in rows) / total,
        "setup_seconds": setup_seconds,  # building the attack once: training a readout or ranker (0 for the others)
        **combined_record({f"{name} (head depth {depth})" if len(attacks) > 1 else name: phase
                           for depth, built in sorted(attacks.items()) for name, phase in built.phases.items()}),
        "utility_greedy_match": sum(r["utility_greedy_match"] for r in rows) / len(rows),
        "perplexity": perplexity,
        "defence": {"name": spec.defence, "strength": spec.strength, "cloud_holds": deployment.cloud_holds,
                    "reveals_secret": deployment.reveals_secret,
                    "secret_recovered_by_attacker": all(recovered_secrets) if recovered_secrets else None,
                    "head_depths": sorted({r["head_depth"] for r in rows}),
                    "blind_depth_search": blind, **described} if spec.defence else None,
        "examples": [{"prompt": r["prompt"], "recovered": r["recovered"]} for r in rows],
        "rows": rows,
    }


def attack_label(spec: dict) -> str:
    """The attack's name as reports show it (the exact attack names its ranker when it has one)."""
    return spec["attack"] + (f"+{spec['ranker']}-ranked" if spec.get("ranker") else "")


def plot_recovery_vs_depth(records: list[dict], path) -> None:
    """Prompt token recovery (uplink) against head depth, one curve per attack and wire, from attack records."""
    from pathlib import Path

    import matplotlib

    from splitveil.core.records import save_figure

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves: dict[str, list[tuple[int, float]]] = {}
    for record in records:
        spec = record["spec"]
        curves.setdefault(f"{attack_label(spec)} ({spec['wire']} wire)", []).append((spec["cuts"][0], record["token_recovery"]))
    fig, ax = plt.subplots(figsize=(6, 4))
    styles = ["o-", "s--", "^:", "D-.", "v-", "x--"]  # curves that coincide (e.g. at 1.000) stay visible
    for index, (label, points) in enumerate(sorted(curves.items())):
        points.sort()
        ax.plot([d for d, _ in points], [r for _, r in points], styles[index % len(styles)], label=label,
                markersize=9 - 1.5 * (index % 4), markerfacecolor="none" if index % 2 else None)
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
             "## Undefended: recovery against head depth", "",
             "| attack | wire | head depth | prompt token recovery | prompts exact | token F1 | answer read (downlink) | s per token | setup s | prompts |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(undefended, key=lambda r: (attack_label(r["spec"]), r["spec"]["wire"], r["spec"]["cuts"][0])):
        spec = r["spec"]
        lines.append(f"| {attack_label(spec)} | {spec['wire']} | {spec['cuts'][0]} | {r['token_recovery']:.3f} | "
                     f"{r['prompt_exact']:.2f} | {r['token_f1']:.3f} | {r['answer_recovery']:.3f} | "
                     f"{r['seconds_per_token']:.2f} | {format(r['setup_seconds'], '.0f') if 'setup_seconds' in r else '-'} | "
                     f"{len(r['examples'])} |")
    defended = [r for r in records if r.get("defence")]
    if defended:
        lines += ["", "## Defences against their adaptive attackers, with their utility cost", "",
                  "Greedy utility: fraction of greedy answer tokens equal to the undefended split's. Perplexity on "
                  "held-out text (the end of the fortunes corpus): defended / undefended.", "",
                  "| attack | defence | head depth(s) | prompt token recovery | answer read | greedy utility | perplexity | "
                  "secret recovered | protects? | the cloud holds |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r in sorted(defended, key=lambda r: (r["spec"]["attack"], r["defence"]["name"], r["defence"]["strength"])):
            spec, defence, ppl = r["spec"], r["defence"], r.get("perplexity")
            depths = ",".join(map(str, defence.get("head_depths") or [spec["cuts"][0]]))
            verdict = "no" if r["token_recovery"] >= 0.5 else "partly" if r["token_recovery"] >= 0.1 else "yes"
            lines.append(f"| {attack_label(spec)} | {defence['name']} {defence['strength']:g} | {depths} | {r['token_recovery']:.3f} | "
                         f"{r['answer_recovery']:.3f} | {r.get('utility_greedy_match', 1.0):.3f} | "
                         f"{(format(ppl['defended'], '.2f') + ' / ' + format(ppl['undefended'], '.2f')) if ppl else '-'} | "
                         f"{defence.get('secret_recovered_by_attacker')} | {verdict} | {defence.get('cloud_holds')} |")
    notes = [r for r in records if r.get("note")]
    if notes:
        lines += ["", "## Notes on single runs", ""]
        lines += [f"- {attack_label(r['spec'])}, {r['spec']['wire']}, depth {r['spec']['cuts'][0]}: {r['note']}" for r in notes]
    lines += ["", "## Examples (sent -> recovered)", ""]
    for r in records:
        spec = r["spec"]
        for example in r["examples"][:2]:
            defence = r.get("defence")
            label = f", {defence['name']} {defence['strength']:g}" if defence else ""
            lines.append(f"- {attack_label(spec)}, depth {spec['cuts'][0]}{label}: `{example['prompt']}` -> `{example['recovered']}`")
    markdown = out_dir / f"{stem}.md"
    markdown.write_text("\n".join(lines) + "\n")
    return jsonl, png, markdown
