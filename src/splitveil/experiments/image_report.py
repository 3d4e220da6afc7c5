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


def mine_trend(intervals: dict[int, dict]) -> str:
    """What the seeds support about MINE against depth: for each pair of neighbouring cuts, whether their seed ranges
    separate (the deeper cut's highest estimate below the shallower cut's lowest) or overlap."""
    cuts = list(intervals)
    if len(cuts) < 2:
        return ""
    if min(i["seeds"] for i in intervals.values()) < 2:
        return "MINE has a single seed at some cuts: no interval, so no claim about its order with depth."
    falls, overlaps, rises = [], [], []
    for shallow, deep in zip(cuts, cuts[1:]):
        a, b = intervals[shallow], intervals[deep]
        pair = f"{shallow}->{deep}"
        (falls if b["high"] < a["low"] else rises if b["low"] > a["high"] else overlaps).append(pair)
    counts = sorted({i["seeds"] for i in intervals.values()})
    seeds = f"{counts[0]} seeds" if len(counts) == 1 else f"{counts[0]} to {counts[-1]} seeds"
    parts = [f"falls between cuts {', '.join(falls)}" if falls else "",
             f"rises between cuts {', '.join(rises)}" if rises else "",
             f"overlaps between cuts {', '.join(overlaps)} (order not resolved)" if overlaps else ""]
    return f"MINE over {seeds} per cut (min-max ranges): " + "; ".join(p for p in parts if p) + "."


def plot_grid(records: list[dict], path: Path) -> Path:
    """One row of originals, then one row per (attack, split) record with its reconstructions of the same images."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from splitveil.experiments.records import save_figure

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
    """SSIM (one line per attack) and MINE against split depth, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from splitveil.experiments.records import save_figure

    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.4))
    for attack in sorted({r["attack"] for r in records}):
        points = sorted((r["split"], r["ssim"]) for r in records if r["attack"] == attack)
        left.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=attack)
    baseline = records[0]["baseline_ssim"]
    left.axhline(baseline, color="grey", linestyle=":", label="mean image")
    left.set(xlabel="split (blocks on the edge)", ylabel="SSIM", title="reconstruction quality", ylim=(0, 1.02))
    left.legend(fontsize=7)
    intervals = mine_intervals(records)
    cuts = list(intervals)
    means = [intervals[c]["mean"] for c in cuts]
    spread = [[m - intervals[c]["low"] for c, m in zip(cuts, means)], [intervals[c]["high"] - m for c, m in zip(cuts, means)]]
    seeds = min(i["seeds"] for i in intervals.values())
    right.errorbar(cuts, means, yerr=spread, marker="s", color="tab:purple", capsize=4,
                   label=f"mean, bars: min-max over {seeds} seeds" if seeds > 1 else "one seed (no interval)")
    right.legend(fontsize=7)
    right.set(xlabel="split (blocks on the edge)", ylabel="MINE I(x; z) (nats)", title="mutual information (DV bound)")
    for axis in (left, right):
        axis.set_xticks(sorted({r["split"] for r in records}))
        axis.grid(alpha=0.3)
    fig.suptitle(f"{records[0]['model']} on {records[0]['dataset']}", fontsize=9)
    return save_figure(fig, path)
