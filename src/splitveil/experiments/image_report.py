"""Plots of image-privacy records (originals vs reconstructions, SSIM / MINE against split depth) and the MINE
intervals over seeds that the report states instead of a bare mean."""

from __future__ import annotations

from pathlib import Path


def mine_intervals(records: list[dict]) -> dict[int, dict]:
    """Per split: the MINE mean of the records and the lowest and highest estimate over its seeds (`mine_runs`; a
    record without them counts as one estimate). MINE depends on the cut, not on the attack."""
    intervals = {}
    for record in records:
        runs = record.get("mine_runs") or [record["mine"]]
        intervals[record["split"]] = {"mean": record["mine"], "low": min(runs), "high": max(runs), "seeds": len(runs)}
    return dict(sorted(intervals.items()))


def information_by_cut(records: list[dict]) -> dict[int, dict]:
    """Per split: the record's `mutual_information` (estimator -> {mean, low, high, runs}); the estimates depend on
    the cut, not on the attack. Records from before the second and third estimators give MINE alone."""
    by_cut = {}
    for record in records:
        estimates = record.get("mutual_information")
        if not estimates:
            runs = record.get("mine_runs") or [record["mine"]]
            estimates = {"mine": {"mean": record["mine"], "low": min(runs), "high": max(runs), "runs": runs}}
        by_cut[record["split"]] = {name: value for name, value in estimates.items()
                                   if isinstance(value, dict) and "runs" in value}
    return dict(sorted(by_cut.items()))


def information_lines(records: list[dict]) -> list[str]:
    """Markdown: a table of every MI estimator's mean [min, max over seeds] per cut, and for each pair of neighbouring
    cuts what `information_order` supports (an order only where two estimators agree beyond their spread)."""
    from splitveil.metrics.mi_compare import ESTIMATORS, information_order

    by_cut = information_by_cut(records)
    names = [n for n in ESTIMATORS if any(n in e for e in by_cut.values())]
    if not names:
        return []
    lines = ["| split | " + " | ".join(f"{n} (nats) mean [min, max]" for n in names) + " |",
             "|---|" + "---|" * len(names)]
    for cut, estimates in by_cut.items():
        cells = [f"{estimates[n]['mean']:.2f} [{estimates[n]['low']:.2f}, {estimates[n]['high']:.2f}] "
                 f"({len(estimates[n]['runs'])})" if n in estimates else "-" for n in names]
        lines.append(f"| {cut} | " + " | ".join(cells) + " |")
    cuts = list(by_cut)
    if len(cuts) > 1:
        lines.append("")
        for shallow, deep in zip(cuts, cuts[1:]):
            order = information_order(by_cut[deep], by_cut[shallow])
            verdict = {"<": "less information at the deeper cut", ">": "more information at the deeper cut"}
            lines.append(f"- cuts {shallow} -> {deep}: {verdict.get(order.relation, 'no order claimed')} "
                         f"({order.reason})")
    return lines


def attacker_training(record: dict) -> str:
    """How long a record's attacker trained: "62 (plateau)", "200 (cap)", or "-" for an attack that does not learn."""
    if record.get("attacker_epochs") is None:
        return "-"
    return f"{record['attacker_epochs']} ({'plateau' if record.get('attacker_converged') else 'cap'})"


def plot_grid(records: list[dict], path: Path) -> Path:
    """One row of originals, then one row per (attack, split) record with its reconstructions of the same images."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from splitveil.core.records import save_figure

    rows = sorted(records, key=lambda r: (r["attack"], r["split"]))
    originals = np.asarray(rows[0]["examples"]["originals"])  # [k, C, H, W]
    k = len(originals)
    fig, axes = plt.subplots(len(rows) + 1, k, figsize=(1.1 * k + 1.2, 1.1 * (len(rows) + 1)), squeeze=False)
    labelled = [("original", originals)] + [(f"{r['attack']} @{r['split']}\nSSIM {r['ssim']:.2f}",
                                              np.asarray(r["examples"]["reconstructions"])) for r in rows]
    for row, (label, images) in enumerate(labelled):
        for col in range(k):
            axis = axes[row][col]
            axis.imshow(images[col].mean(0), cmap="gray", vmin=0, vmax=1)
            axis.set_xticks([]), axis.set_yticks([])
        axes[row][0].set_ylabel(label, rotation=0, ha="right", va="center", fontsize=7)
    return save_figure(fig, path)


def plot_depth(records: list[dict], path: Path) -> Path:
    """SSIM (one line per attack) and each MI estimator (mean, min-max bars over seeds) against split depth."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from splitveil.core.records import save_figure

    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.4))
    for attack in sorted({r["attack"] for r in records}):
        points = sorted((r["split"], r["ssim"]) for r in records if r["attack"] == attack)
        left.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=attack)
    baseline = records[0]["baseline_ssim"]
    left.axhline(baseline, color="grey", linestyle=":", label="mean image")
    left.set(xlabel="split (blocks on the edge)", ylabel="SSIM", title="reconstruction quality", ylim=(0, 1.02))
    left.legend(fontsize=7)
    from splitveil.metrics.mi_compare import ESTIMATORS

    by_cut = information_by_cut(records)
    names = [n for n in ESTIMATORS if any(n in e for e in by_cut.values())]
    for offset, name in enumerate(names):
        cuts = [c for c, e in by_cut.items() if name in e]
        values = [by_cut[c][name] for c in cuts]
        seeds = min(len(v["runs"]) for v in values)
        right.errorbar([c + 0.06 * (offset - (len(names) - 1) / 2) for c in cuts], [v["mean"] for v in values],
                       yerr=[[v["mean"] - v["low"] for v in values], [v["high"] - v["mean"] for v in values]],
                       marker="s", capsize=3, label=f"{name} ({seeds} seeds, bars: min-max)" if seeds > 1 else
                       f"{name} (one seed)")
    right.legend(fontsize=7)
    right.set(xlabel="split (blocks on the edge)", ylabel="I(x; z) estimate (nats)", title="mutual information")
    for axis in (left, right):
        axis.set_xticks(sorted({r["split"] for r in records}))
        axis.grid(alpha=0.3)
    fig.suptitle(f"{records[0]['model']} on {records[0]['dataset']}", fontsize=9)
    return save_figure(fig, path)


#: the paper's claims for SiftFunnel against the best earlier defence (arXiv 2501.00824)
CLAIM_ACCURACY_DROP = 0.03  # accuracy loss below 3 points (v1)
CLAIM_MSE_RATIO = 1.3  # reconstruction error about 30% higher than the best baseline's (v7)
CLAIM_MINE_REDUCTION = 0.5  # mutual information at least 50% lower (v7)
CLAIM_EDGE_LIGHTER = 20.0  # edge burden about 20x lower (v7): parameters and multiply-accumulates


def defence_settings(records: list[dict]) -> list[dict]:
    """One row per (defence, strength, cut): accuracy, MINE, edge cost, and per attack SSIM / MSE; the strongest
    attack is the one with the highest SSIM (it also reports that attack's MSE, and the lowest MSE over attacks)."""
    rows: dict[tuple, dict] = {}
    for r in records:
        key = (r.get("defence", "none"), r.get("strength", 0.0), r["split"])
        row = rows.setdefault(key, {"defence": key[0], "strength": key[1], "split": key[2], "accuracy": r["accuracy"],
                                    "accuracy_undefended": r.get("accuracy_undefended", r["accuracy"]),
                                    "mine": r["mine"], "mine_runs": r.get("mine_runs") or [r["mine"]],
                                    "dcor": r["dcor"], "feature_shape": r["feature_shape"],
                                    "edge_cost": r.get("edge_cost"), "attacks": {}})
        row["attacks"][r["attack"]] = {"ssim": r["ssim"], "mse": r["mse"], "psnr": r["psnr"],
                                       "recon_accuracy": r["recon_accuracy"], "examples": r.get("examples")}
    for row in rows.values():
        strongest = max(row["attacks"], key=lambda a: row["attacks"][a]["ssim"])
        row["strongest"] = strongest
        row["strongest_ssim"] = row["attacks"][strongest]["ssim"]
        row["lowest_mse"] = min(a["mse"] for a in row["attacks"].values())
    return sorted(rows.values(), key=lambda r: (r["split"], r["defence"] != "none", r["defence"], r["strength"]))


def frontier_at(rows: list[dict], defence: str, cut: int, accuracy: float, attacks) -> dict | None:
    """`defence`'s frontier at `cut` read at `accuracy`: its strongest attack's SSIM, its lowest MSE and its MINE,
    linearly interpolated (in accuracy) between the two settings that bracket it; the undefended model is every
    frontier's strength-0 end. Only settings attacked by every attack in `attacks` count. None when no two settings
    bracket `accuracy` (the defence was never pushed to that accuracy cost)."""
    points = sorted((r for r in rows if r["split"] == cut and r["defence"] in (defence, "none")
                     and set(r["attacks"]) >= set(attacks)), key=lambda r: r["accuracy"])
    for low, high in zip(points, points[1:]):
        if low["accuracy"] <= accuracy <= high["accuracy"]:
            span = high["accuracy"] - low["accuracy"]
            t = (accuracy - low["accuracy"]) / span if span > 0 else 1.0
            value = {key: low[key] + t * (high[key] - low[key]) for key in ("lowest_mse", "strongest_ssim", "mine")}
            between = f"{defence} {low['strength']:g} ({low['accuracy']:.3f}) and {high['strength']:g} ({high['accuracy']:.3f})"
            return {"defence": defence, "accuracy": accuracy, **value, "between": between, "low": low, "high": high}
    if any(p["accuracy"] == accuracy for p in points):
        p = next(p for p in points if p["accuracy"] == accuracy)
        return {"defence": defence, "accuracy": accuracy, "lowest_mse": p["lowest_mse"],
                "strongest_ssim": p["strongest_ssim"], "mine": p["mine"], "between": f"{defence} {p['strength']:g}",
                "low": p, "high": p}
    return None


def _edge_claim(funnel: dict) -> tuple[str, str, str]:
    cost = funnel.get("edge_cost")
    if not cost:
        return "edge cost not recorded", "-", "not tested"
    d, u, by = cost["defended"], cost["undefended"], cost["lighter_by"]
    measured = (f"parameters {u['parameters']:,} -> {d['parameters']:,} ({by['parameters']:.1f}x); MACs "
                f"{u['macs'] / 1e6:.2f}M -> {d['macs'] / 1e6:.2f}M ({by['macs']:.1f}x); batch-1 latency "
                f"{u['latency_ms']:.2f} -> {d['latency_ms']:.2f} ms ({by['latency_ms']:.1f}x)")
    met = min(by["parameters"], by["macs"]) >= CLAIM_EDGE_LIGHTER
    return measured, "-", "met" if met else "not met"


def siftfunnel_claims(rows: list[dict]) -> list[str]:
    """The paper's claims checked on the rows: a Markdown table, one row per (SiftFunnel setting, claim), each met
    or not with the numbers.

    Each baseline is read off its frontier at SiftFunnel's accuracy (`frontier_at`: interpolated between the two
    settings that bracket it); the best baseline is the one whose strongest attacker there reconstructs worst
    (highest lowest-MSE over the attacks). A baseline never pushed to SiftFunnel's accuracy cost is not compared.
    """
    lines = []
    for funnel in [r for r in rows if r["defence"] == "siftfunnel"]:
        tag = f"siftfunnel {funnel['strength']:g} at cut {funnel['split']}"
        drop = funnel["accuracy_undefended"] - funnel["accuracy"]
        lines.append(f"| {tag} | accuracy drop < {CLAIM_ACCURACY_DROP:.0%} | {funnel['accuracy_undefended']:.3f} -> "
                     f"{funnel['accuracy']:.3f}, drop {drop:+.3f} | {'met' if drop < CLAIM_ACCURACY_DROP else 'not met'} |")
        measured, _, verdict = _edge_claim(funnel)
        lines.append(f"| {tag} | edge burden {CLAIM_EDGE_LIGHTER:g}x lower than the undefended edge | {measured} | "
                     f"{verdict} |")
        baselines = sorted({r["defence"] for r in rows if r["split"] == funnel["split"]} - {"none", "siftfunnel"})
        matched = [m for m in (frontier_at(rows, name, funnel["split"], funnel["accuracy"], funnel["attacks"])
                               for name in baselines) if m is not None]
        if not matched:
            lines.append(f"| {tag} | reconstruction MSE and MINE against the baselines at matched accuracy | no "
                         f"baseline was pushed to accuracy {funnel['accuracy']:.3f} with the same attacks | not tested |")
            continue
        best = max(matched, key=lambda m: m["lowest_mse"])
        ratio = funnel["lowest_mse"] / best["lowest_mse"] if best["lowest_mse"] > 0 else float("inf")
        lines.append(f"| {tag} | reconstruction MSE >= {CLAIM_MSE_RATIO}x the best baseline at matched accuracy | "
                     f"strongest attacker's MSE {funnel['lowest_mse']:.4f} vs {best['lowest_mse']:.4f} ({best['between']}"
                     f", read at {funnel['accuracy']:.3f}): {ratio:.2f}x | {'met' if ratio >= CLAIM_MSE_RATIO else 'not met'} |")
        lowest_mine = min(matched, key=lambda m: m["mine"])
        for label, base in (("the best baseline", best), ("the matched baseline with the lowest MINE", lowest_mine)):
            reduction = 1 - funnel["mine"] / base["mine"] if base["mine"] > 0 else float("nan")
            lines.append(f"| {tag} | MINE >= {CLAIM_MINE_REDUCTION:.0%} lower than {label} | {funnel['mine']:.2f} vs "
                         f"{base['mine']:.2f} nats ({base['between']}): {reduction:.0%} lower | "
                         f"{'met' if reduction >= CLAIM_MINE_REDUCTION else 'not met'} |")
            if base is best and lowest_mine is best:
                break
        missing = [name for name in baselines if name not in {m["defence"] for m in matched}]
        if missing:
            lines.append(f"| {tag} | (baselines not pushed to this accuracy cost, so not compared) | "
                         f"{', '.join(missing)} | - |")
    return ["| setting | claim (paper) | measured | verdict |", "|---|---|---|---|", *lines] if lines else []


def plot_privacy_utility(records: list[dict], path: Path) -> Path:
    """Per cut, each defence's frontier over its strengths: the strongest attack's SSIM (left), the lowest MSE over
    the attacks (middle) and MINE (right) against accuracy; the undefended model is a star at every frontier's end."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from splitveil.core.records import save_figure

    rows = defence_settings(records)
    cuts = sorted({r["split"] for r in rows})
    fig, axes = plt.subplots(len(cuts), 3, figsize=(15, 3.8 * len(cuts)), squeeze=False)
    for (left, middle, right), cut in zip(axes, cuts):
        at_cut = [r for r in rows if r["split"] == cut]
        origin = [r for r in at_cut if r["defence"] == "none"]
        for defence in sorted({r["defence"] for r in at_cut}):
            points = sorted((r for r in at_cut if r["defence"] == defence), key=lambda r: r["strength"])
            if defence == "none":
                style = {"marker": "*", "markersize": 12, "linestyle": "none", "color": "black"}
            else:
                style = {"marker": "o"}
                points = [*origin, *points]  # every frontier starts at the undefended model
            accuracy = [p["accuracy"] for p in points]
            line = left.plot(accuracy, [p["strongest_ssim"] for p in points], label=defence, **style)[0]
            style = {**style, "color": line.get_color()}
            middle.plot(accuracy, [p["lowest_mse"] for p in points], label=defence, **style)
            lows = [p["mine"] - min(p["mine_runs"]) for p in points]
            highs = [max(p["mine_runs"]) - p["mine"] for p in points]
            right.errorbar(accuracy, [p["mine"] for p in points], yerr=[lows, highs], capsize=3, label=defence, **style)
            for p in points:
                if p["defence"] != "none":
                    for axis, y in ((left, p["strongest_ssim"]), (middle, p["lowest_mse"])):
                        axis.annotate(f"{p['strength']:g}", (p["accuracy"], y), fontsize=6, textcoords="offset points",
                                      xytext=(3, 3))
        left.set(xlabel="test accuracy (defended model)", ylabel="SSIM of the strongest attack",
                 title=f"cut {cut}: frontier, SSIM (lower-right is better)")
        middle.set(xlabel="test accuracy (defended model)", ylabel="MSE of the strongest attack (lowest over attacks)",
                   title=f"cut {cut}: frontier, MSE (upper-right is better)")
        right.set(xlabel="test accuracy (defended model)", ylabel="MINE I(x; z) (nats), bars: min-max over seeds",
                  title=f"cut {cut}: mutual information")
        for axis in (left, middle, right):
            axis.grid(alpha=0.3)
            axis.legend(fontsize=7)
    fig.suptitle(f"{records[0]['model']} on {records[0]['dataset']}: each defence's frontier over its strengths, "
                 "each point attacked by every attack", fontsize=9)
    return save_figure(fig, path)


def plot_defence_grid(records: list[dict], path: Path) -> Path:
    """Originals, then per (defence, strength, cut) the strongest attack's reconstructions of the same images."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from splitveil.core.records import save_figure

    rows = defence_settings(records)
    originals = np.asarray(records[0]["examples"]["originals"])
    k = len(originals)
    labelled = [("original", originals)]
    for r in rows:
        best = r["attacks"][r["strongest"]]
        if best.get("examples"):
            labelled.append((f"{r['defence']} {r['strength']:g} @{r['split']}\n{r['strongest']} SSIM {best['ssim']:.2f}",
                             np.asarray(best["examples"]["reconstructions"])))
    fig, axes = plt.subplots(len(labelled), k, figsize=(1.1 * k + 1.6, 1.1 * len(labelled)), squeeze=False)
    for row, (label, images) in enumerate(labelled):
        for col in range(k):
            axes[row][col].imshow(images[col].mean(0), cmap="gray", vmin=0, vmax=1)
            axes[row][col].set_xticks([]), axes[row][col].set_yticks([])
        axes[row][0].set_ylabel(label, rotation=0, ha="right", va="center", fontsize=7)
    return save_figure(fig, path)


def frontier_lines(records: list[dict]) -> list[str]:
    """The report's account of an `image-sweep --frontier`: per cut, SiftFunnel's accuracy cost and how far each
    baseline's ladder went."""
    by_cut = {r["split"]: r["frontier"] for r in records if r.get("frontier")}
    if not by_cut:
        return []
    lines = ["", "## Frontier sweep", "",
             "Each baseline given without a strength walked up its ladder of strengths until its accuracy cost reached "
             "SiftFunnel's (the largest of its settings'), then one step beyond. Steps: strength (accuracy cost).", ""]
    for cut, frontier in sorted(by_cut.items()):
        target = frontier.get("target_cost")
        lines.append(f"Cut {cut}: undefended accuracy {frontier['accuracy_undefended']:.3f}, SiftFunnel's cost "
                     + (f"{target:+.3f}" if target is not None else "not measured (no SiftFunnel setting: whole ladders)"))
        lines.append("")
        for name, walk in sorted(frontier["baselines"].items()):
            steps = ", ".join(f"{p['strength']:g} ({p['cost']:+.3f})" for p in walk["points"])
            lines.append(f"- **{name}**: {steps}" + ("" if walk["reached"] else
                                                      " (the ladder ended before SiftFunnel's cost: not matched)"))
        lines.append("")
    return lines[:-1]


def write_defence_report(records: list[dict], out_dir, stem: str) -> tuple:
    """Records of a defence sweep -> `<stem>.jsonl`, `<stem>_utility.png`, `<stem>_grid.png`, `<stem>.md`."""
    from splitveil.core.records import write_records

    out_dir, jsonl = write_records(records, out_dir, stem)
    utility, grid = out_dir / f"{stem}_utility.png", out_dir / f"{stem}_grid.png"
    plot_privacy_utility(records, utility)
    plot_defence_grid(records, grid)
    rows = defence_settings(records)
    attacks = sorted({r["attack"] for r in records})
    first = records[0]
    lines = [f"# Image defences: {first['model']} on {first['dataset']}", "",
             f"Generated from the records in `{jsonl.name}` by `write_defence_report`. Victims trained on "
             f"{first['sizes']['train']} images ({first['spec']['epochs']} epoch(s)); attacker's auxiliary set "
             f"{first['sizes']['aux']} (disjoint); accuracy on {first['sizes']['test']} test images, "
             f"{first['sizes']['attacked']} attacked. Every attack is adaptive: it queries or holds the defended edge "
             "(noise and dropout on, as deployed), and the shadow attacker trains a substitute of the defended "
             "architecture. Cells: SSIM / MSE; the strongest attack (highest SSIM) is in bold.", ""]
    if "accuracy_undefended_heldout" in first:
        held = first["accuracy_undefended_heldout"]
        lines += [f"Undefended victim on every held-out image ({held['images']} images outside train and auxiliary "
                  f"sets): accuracy {held['accuracy']:.4f}.", ""]
    header = " | ".join(attacks)
    lines += [f"| defence | strength | cut | sent | accuracy (drop) | {header} | MINE (nats) [min, max] | dCor² |",
              "|---|---|---|---|---|" + "---|" * len(attacks) + "---|---|"]
    for r in rows:
        cells = []
        for attack in attacks:
            a = r["attacks"].get(attack)
            cell = "-" if a is None else f"{a['ssim']:.3f} / {a['mse']:.4f}"
            cells.append(f"**{cell}**" if attack == r["strongest"] else cell)
        drop = r["accuracy_undefended"] - r["accuracy"]
        lines.append(f"| {r['defence']} | {r['strength']:g} | {r['split']} | {'x'.join(map(str, r['feature_shape']))} | "
                     f"{r['accuracy']:.3f} ({drop:+.3f}) | {' | '.join(cells)} | {r['mine']:.2f} "
                     f"[{min(r['mine_runs']):.2f}, {max(r['mine_runs']):.2f}] | {r['dcor']:.3f} |")
    claims = siftfunnel_claims(rows)
    if claims:
        lines += ["", "## SiftFunnel's claims (arXiv 2501.00824) on these records", "",
                  "Matched accuracy: each baseline's frontier (its settings and the undefended model, by accuracy) read "
                  "at SiftFunnel's accuracy, linearly interpolated between the two settings that bracket it. "
                  "Reconstruction error: the lowest MSE over the attacks run (the strongest attacker). Edge burden: "
                  "the defended edge against the undefended edge at the same cut.", "", *claims]
    lines += frontier_lines(records)
    lines += ["", "## Defences", ""]
    for name, info in sorted({r.get("defence", "none"): r.get("defence_info", {}) for r in records}.items()):
        lines.append(f"- **{name}**: {info.get('description', '')}")
    lines += ["", f"![privacy against utility]({utility.name})", "", f"![strongest attack's reconstructions]({grid.name})", ""]
    markdown = out_dir / f"{stem}.md"
    markdown.write_text("\n".join(lines))
    return jsonl, utility, grid, markdown
