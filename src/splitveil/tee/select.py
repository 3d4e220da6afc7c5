"""Partition selection: the smallest cut whose strongest measured attack stays below the SSIM threshold tau.

Pure functions on recorded figures (image-privacy records and the cost model's output), so the rule is tested on
numbers alone. The strongest attack at a cut is the highest SSIM over every attack run there, white-box ones
included: the cloud that owns the model knows the enclave's layers, so rMLE (optimisation through those weights)
is in the default list. For every cut the table also gives the tau it would need (`required_tau`: its strongest
SSIM; the cut qualifies only for a tau above it), and when no cut qualifies it says so in one line.
"""

from __future__ import annotations

#: Default SSIM threshold. On Fashion-MNIST the closest of the attacker's 5,000 auxiliary images to a private test
#: image scores SSIM 0.66 on average (median 0.65, 100 test images; docs/tee-partition.md): a reconstruction below
#: that is no more like the private image than the most similar real image the attacker already holds.
DEFAULT_TAU = 0.66

#: Attacks run at every cut by default: the black-box learned ones (c-GAN, inverse network; query access and
#: auxiliary data) and the white-box rMLE (the first part's weights, which the model's owner in the cloud holds).
DEFAULT_ATTACKS = ("cgan", "inverse", "rmle")


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


def _white_box(record: dict) -> bool:
    return bool(record.get("threat_model", {}).get("knows_head_weights"))


def verdict(rows: list[dict], chosen: int | None, tau: float) -> str:
    """One line saying which cut the rule chose, or that none qualifies and what tau each cut would need."""
    if not rows:
        return "no cut was measured"
    if chosen is not None:
        row = next(r for r in rows if r["cut"] == chosen)
        return (f"chosen cut {chosen}: its strongest attack ({row['attack']}) scores SSIM {row['ssim']:.3f} < tau "
                f"{tau:g}; every shallower cut scores at least tau")
    needs = ", ".join(f"cut {r['cut']} > {r['required_tau']:.3f}" for r in rows)
    return (f"no cut qualifies at tau {tau:g}: the strongest attack scores at least tau at every cut, so the whole "
            f"model belongs in the TEE; tau would have to exceed: {needs}")


def partition_table(records: list[dict], costs: dict[int, dict], tau: float) -> dict:
    """The `partition --json` object: chosen cut (None when no cut qualifies), tau, a one-line `verdict`, and one row
    per cut in cut order: the strongest attack's SSIM and name (white box or not), the SSIM of every attack, the tau
    the cut would need (`required_tau`), whether it qualifies, MINE, and the speed-up over all-in-TEE."""
    strongest = strongest_by_cut(records)
    rows = []
    for cut in sorted(strongest):
        record = strongest[cut]
        at_cut = [r for r in records if int(r["split"]) == cut]
        rows.append({"cut": cut, "ssim": record["ssim"], "attack": record["attack"], "white_box": _white_box(record),
                     "required_tau": record["ssim"], "qualifies": record["ssim"] < tau, "mine": record.get("mine"),
                     "ssim_by_attack": {r["attack"]: r["ssim"] for r in at_cut},
                     "feature_shape": record.get("feature_shape"),
                     "speedup_vs_all_tee": costs[cut]["speedup_vs_all_tee"],
                     "trusted_s": costs[cut]["trusted_s"], "untrusted_s": costs[cut]["untrusted_s"]})
    chosen = choose_cut({row["cut"]: row["ssim"] for row in rows}, tau)
    return {"chosen_cut": chosen, "tau": tau, "verdict": verdict(rows, chosen, tau),
            "attacks": sorted({r["attack"] for r in records}), "cuts": rows}
