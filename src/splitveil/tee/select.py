"""Partition selection: the smallest cut whose strongest measured attack stays below the SSIM threshold tau.

Pure functions on recorded figures (image-privacy records and the cost model's output), so the rule is tested on
numbers alone.
"""

from __future__ import annotations

#: Default SSIM threshold. On Fashion-MNIST the closest of the attacker's 5,000 auxiliary images to a private test
#: image scores SSIM 0.66 on average (median 0.65, 100 test images; docs/tee-partition.md): a reconstruction below
#: that is no more like the private image than the most similar real image the attacker already holds.
DEFAULT_TAU = 0.66


def strongest_by_cut(records: list[dict]) -> dict[int, dict]:
    """Cut -> the record of the attack with the highest SSIM there (the strongest attack at that cut)."""
    best: dict[int, dict] = {}
    for record in records:
        cut = int(record["split"])
        if cut not in best or record["ssim"] > best[cut]["ssim"]:
            best[cut] = record
    return best


def choose_cut(ssim_by_cut: dict[int, float], tau: float) -> int | None:
    """The smallest cut whose (strongest) SSIM is below `tau`; None when no cut is."""
    passing = [cut for cut, value in ssim_by_cut.items() if value < tau]
    return min(passing) if passing else None


def partition_table(records: list[dict], costs: dict[int, dict], tau: float) -> dict:
    """The `partition --json` object: chosen cut, tau and one row per cut (strongest attack's SSIM, which attack,
    MINE, the speed-up over all-in-TEE), rows in cut order."""
    strongest = strongest_by_cut(records)
    rows = []
    for cut in sorted(strongest):
        record = strongest[cut]
        rows.append({"cut": cut, "ssim": record["ssim"], "attack": record["attack"], "mine": record.get("mine"),
                     "ssim_by_attack": {r["attack"]: r["ssim"] for r in records if int(r["split"]) == cut},
                     "feature_shape": record.get("feature_shape"),
                     "speedup_vs_all_tee": costs[cut]["speedup_vs_all_tee"],
                     "trusted_s": costs[cut]["trusted_s"], "untrusted_s": costs[cut]["untrusted_s"]})
    chosen = choose_cut({row["cut"]: row["ssim"] for row in rows}, tau)
    return {"chosen_cut": chosen, "tau": tau, "cuts": rows}
