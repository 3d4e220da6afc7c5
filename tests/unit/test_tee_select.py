"""TEE cut selection by the strongest attack at each cut, the white-box rMLE included; when no cut qualifies the
record and the command say so and give the tau each cut would need."""

from __future__ import annotations

import json

import pytest

from splitveil.attack.image import IMAGE_ATTACKS
from splitveil.tee.cost import CostModel, partition_costs
from splitveil.tee.select import DEFAULT_ATTACKS, DEFAULT_TAU, partition_table


def record(cut: int, attack: str, ssim: float) -> dict:
    """An image-privacy record as the sweep writes it: the threat model is the attack class's own declaration."""
    threat = {"name": attack, **IMAGE_ATTACKS.get(attack).threat_model.to_dict()}
    return {"split": cut, "attack": attack, "ssim": ssim, "mine": 1.0, "threat_model": threat,
            "feature_shape": [8, 4, 4]}


def costs(cuts):
    return partition_costs([1.0] * (max(cuts) + 1), list(cuts), model=CostModel(), seal_seconds=0.0)


def test_default_attacks_include_a_white_box_one():
    threats = {name: IMAGE_ATTACKS.get(name).threat_model for name in DEFAULT_ATTACKS}
    assert "rmle" in threats and threats["rmle"].knows_head_weights
    assert any(not t.knows_head_weights for t in threats.values())  # and black-box learned ones


def test_white_box_attack_counts_as_the_strongest():
    # black-box attacks alone would choose cut 2 (0.60 < 0.66); rMLE still rebuilds the image there
    ssim = {(1, "cgan"): 0.90, (1, "inverse"): 0.88, (1, "rmle"): 1.00,
            (2, "cgan"): 0.60, (2, "inverse"): 0.58, (2, "rmle"): 0.97,
            (3, "cgan"): 0.55, (3, "inverse"): 0.57, (3, "rmle"): 0.62}
    table = partition_table([record(c, a, s) for (c, a), s in ssim.items()], costs([1, 2, 3]), DEFAULT_TAU)
    rows = {row["cut"]: row for row in table["cuts"]}
    assert [rows[c]["attack"] for c in (1, 2, 3)] == ["rmle", "rmle", "rmle"]
    assert all(rows[c]["white_box"] for c in (1, 2, 3))
    assert rows[2]["ssim_by_attack"] == {"cgan": 0.60, "inverse": 0.58, "rmle": 0.97}
    assert table["chosen_cut"] == 3 and rows[3]["qualifies"] and not rows[2]["qualifies"]
    assert table["attacks"] == ["cgan", "inverse", "rmle"]
    assert table["verdict"].startswith("chosen cut 3")
    black_box_only = partition_table([record(c, a, s) for (c, a), s in ssim.items() if a != "rmle"],
                                     costs([1, 2, 3]), DEFAULT_TAU)
    assert black_box_only["chosen_cut"] == 2  # what leaving the white-box attack out would have chosen


NO_CUT = [record(c, a, s) for c, a, s in [(1, "cgan", 0.97), (1, "rmle", 1.0), (2, "inverse", 0.744),
                                          (2, "rmle", 0.70), (3, "inverse", 0.705), (3, "cgan", 0.69)]]


def test_no_cut_qualifies_record_says_so_and_gives_each_cuts_tau():
    table = partition_table(NO_CUT, costs([1, 2, 3]), 0.66)
    assert table["chosen_cut"] is None
    assert [(r["cut"], r["required_tau"], r["qualifies"]) for r in table["cuts"]] == \
        [(1, 1.0, False), (2, 0.744, False), (3, 0.705, False)]
    line = table["verdict"]
    assert line.startswith("no cut qualifies at tau 0.66") and "whole model belongs in the TEE" in line
    assert "cut 1 > 1.000" in line and "cut 2 > 0.744" in line and "cut 3 > 0.705" in line
    # a tau just above a cut's requirement makes it qualify
    assert partition_table(NO_CUT, costs([1, 2, 3]), 0.706)["chosen_cut"] == 3


def test_partition_command_prints_the_verdict_and_json_null(monkeypatch, capsys, tmp_path):
    from splitveil.cli.main import main
    from splitveil.experiments import tee_partition

    partial, seen = tmp_path / "tee-partition_digits_lenet.partial.jsonl", []

    def fake_run(spec, on_records=None, **_):
        assert spec.attacks == DEFAULT_ATTACKS and spec.cuts == (1, 2, 3)
        on_records([{**NO_CUT[0], "attacker_epochs": 3, "attacker_converged": False}])
        on_records([{**NO_CUT[0], "attacker_epochs": 3, "attacker_converged": False}, {**NO_CUT[1], "resumed": True}])
        seen.append(len(partial.read_text().splitlines()) if partial.exists() else 0)  # measured so far, while it runs
        table = partition_table(NO_CUT, costs([1, 2, 3]), spec.tau)
        return {**table, "spec": spec.to_dict(), "attestation": "SIMULATED", "attack_records": NO_CUT,
                "accuracy": 0.9, "model": spec.model, "dataset": spec.dataset}

    monkeypatch.setattr(tee_partition, "run_partition", fake_run)
    monkeypatch.setattr(tee_partition, "write_partition_report", lambda result, out, stem: [out / f"{stem}.json"])
    assert main(["partition", "--dataset", "digits", "--model", "lenet", "--cuts", "1,2,3", "--json", "--out",
                 str(tmp_path), "--allow-dirty"]) == 0
    assert seen == [2] and not partial.exists()  # the whole record replaces it
    printed = capsys.readouterr()
    out = json.loads(printed.out.strip().splitlines()[-1])
    progress = [line for line in printed.err.splitlines() if line.startswith("cut ")]
    assert progress == ["cut 1 cgan: SSIM 0.970, 3 epochs (stopped by the cap)", "cut 1 rmle: SSIM 1.000 (resumed)"]
    assert out["chosen_cut"] is None and out["verdict"].startswith("no cut qualifies")
    assert [c["required_tau"] for c in out["cuts"]] == [1.0, 0.744, 0.705] and out["cuts"][0]["white_box"]
    assert main(["partition", "--dataset", "digits", "--model", "lenet", "--cuts", "1,2,3"]) == 0
    text = capsys.readouterr().out
    assert "rmle    (white box) SSIM 1.000 (qualifies for tau > 1.000)" in text
    assert "no cut qualifies at tau 0.66" in text and "tau would have to exceed" in text


@pytest.mark.parametrize("tau", [0.5, 0.66, 0.99])
def test_required_tau_is_the_boundary_of_qualifying(tau):
    table = partition_table(NO_CUT, costs([1, 2, 3]), tau)
    assert all(row["qualifies"] == (tau > row["required_tau"]) for row in table["cuts"])


def test_markdown_report_gives_every_cut_its_attacks_the_verdict_and_the_attackers_training():
    from splitveil.experiments.tee_partition import partition_markdown
    from splitveil.tee.channel import SIMULATED

    records = [{**r, "attacker_epochs": 40 if r["attack"] != "rmle" else None, "attacker_converged": r["split"] != 2}
               for r in NO_CUT]
    records = [{k: v for k, v in r.items() if not (k == "attacker_epochs" and v is None)} for r in records]
    result = {"model": "vgg", "dataset": "fashion-mnist", "attestation": SIMULATED, "accuracy": 0.81,
              "attack_seconds": 600.0, "attack_records": records, "spec": {"quick": True, "cost": CostModel().to_dict()},
              "environment": {"git_sha": "f" * 40, "git_dirty": False, "timestamp": "2026-12-07T00:00:00+00:00"},
              **partition_table(records, costs([1, 2, 3]), 0.66)}
    text = partition_markdown(result)
    assert SIMULATED in text and "(--quick)" in text and "ffffffffffff" in text
    assert f"**{result['verdict']}**" in text and "no cut qualifies at tau 0.66" in text
    rows = [line for line in text.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert len(rows) == 3
    assert rows[0].startswith("| 1 | 0.970 | - | 1.000 | rmle (white box) | 1.000 |")
    assert rows[1].endswith("| inverse 40* |") and rows[2].endswith("| inverse 40, cgan 40 |")  # * = stopped by the cap
