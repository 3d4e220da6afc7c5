"""Plots of image-privacy records: originals vs reconstructions, and SSIM / MINE against split depth."""

from __future__ import annotations

from pathlib import Path


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
    mine = sorted({r["split"]: r["mine"] for r in records}.items())
    right.plot([m[0] for m in mine], [m[1] for m in mine], marker="s", color="tab:purple")
    right.set(xlabel="split (blocks on the edge)", ylabel="MINE I(x; z) (nats)", title="mutual information (DV bound)")
    for axis in (left, right):
        axis.set_xticks(sorted({r["split"] for r in records}))
        axis.grid(alpha=0.3)
    fig.suptitle(f"{records[0]['model']} on {records[0]['dataset']}", fontsize=9)
    return save_figure(fig, path)
