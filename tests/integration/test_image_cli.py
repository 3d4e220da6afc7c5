"""`splitveil attack image` / `image-sweep` as a user runs them: one JSON object, reports, one-line errors."""

import json
from pathlib import Path

import pytest

from splitveil.cli.main import main
from test_cli import expect_one_line_error

FASHION = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SPLITVEIL_CACHE", str(tmp_path / "cache"))


@pytest.mark.parametrize("args, expected", [
    (["--dataset", "cifar"], "unknown dataset 'cifar'; known: digits, fashion-mnist, lfw, mnist"),
    (["--model", "alexnet"], "unknown vision model 'alexnet'; known: lenet, "),
    (["--attack", "magic"], "unknown image attack 'magic'; known: cgan, inverse, rmle, shadow"),
    (["--split", "0"], "--split 0 is out of range: vgg has 5 blocks"),
    (["--model", "lenet", "--split", "5"], "--split 5 is out of range: lenet has 4 blocks"),
    (["--split", "two"], "Invalid value for '--split'"),
    (["--samples", "1"], "--samples must be at least 2"),
    (["--threads", "0"], "--threads must be at least 1"),
    (["--out", "/proc/no/such/dir"], "cannot write to --out"),
    (["--bogus"], "No such option: --bogus"),
    (["--defence", "magic"], "unknown image defence 'magic'; known: cem, dropout, noise, none, nopeek, siftfunnel, vib"),
    (["--defence", "noise", "--strength", "-1"], "noise strength must be >= 0, got -1"),
    (["--defence", "dropout", "--strength", "1"], "dropout strength must be below 1, got 1"),
    (["--defence", "noise", "--strength", "x"], "Invalid value for '--strength'"),
])
def test_bad_image_flags_exit_2_with_one_line(args, expected, capsys):
    expect_one_line_error(["attack", "image", "--dataset", "digits", *args] if "--dataset" not in args
                          else ["attack", "image", *args], expected, capsys)


@pytest.mark.parametrize("args, expected", [
    (["--splits", "1,x"], "bad --splits '1,x'"),
    (["--splits", "1,6"], "--split 6 is out of range"),
    (["--attacks", "inverse,nope"], "unknown image attack 'nope'"),
    (["--attacks", ","], "give at least one cut"),
    (["--jobs", "0"], "--jobs must be at least 1"),
    (["--defences", "none,noise:x"], "bad --defences item 'noise:x': give NAME or NAME:STRENGTH"),
    (["--defences", "none,funnel"], "unknown image defence 'funnel'"),
    (["--defences", "dropout:1.5"], "dropout strength must be below 1, got 1.5"),
    (["--defences", ","], "give at least one defence"),
    (["--frontier"], "--frontier sweeps the baselines of --defences: give --defences"),
])
def test_bad_sweep_flags_exit_2_with_one_line(args, expected, capsys, tmp_path):
    expect_one_line_error(["attack", "image-sweep", "--dataset", "digits", "--out", str(tmp_path), *args], expected, capsys)


def test_missing_data_set_is_one_line_with_the_install_hint(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("SPLITVEIL_FASHION_MNIST", str(tmp_path))
    expect_one_line_error(["attack", "image", "--dataset", "fashion-mnist", "--quick"], "run `make data`", capsys)


def test_quick_json_run_on_digits(capsys, tmp_path):
    out_dir = tmp_path / "out"
    assert main(["attack", "image", "--dataset", "digits", "--model", "lenet", "--split", "1", "--attack", "inverse",
                 "--quick", "--json", "--samples", "50", "--mi-seeds", "1", "--mi-pairs", "300", "--out", str(out_dir)]) == 0
    out = capsys.readouterr().out
    assert len(out.strip().splitlines()) == 1
    record = json.loads(out)
    for key in ("mse", "psnr", "ssim", "accuracy", "accuracy_unsplit", "threat_model", "mine", "dcor", "recon_accuracy",
                "baseline_ssim", "feature_shape", "environment"):
        assert key in record, key
    assert record["accuracy"] == record["accuracy_unsplit"] and record["split_max_abs_logit_diff"] == 0.0
    assert record["threat_model"]["queries_edge"] and not record["threat_model"]["knows_head_weights"]
    assert record["feature_shape"] == [6, 4, 4] and record["ssim"] > record["baseline_ssim"]
    written = sorted(p.name for p in out_dir.iterdir())
    stem = "image-attack_digits_lenet_inverse_split1"
    assert written == sorted([f"{stem}.jsonl", f"{stem}.md", f"{stem}_depth.png", f"{stem}_grid.png"])


def test_defended_quick_json_run_on_digits(capsys, tmp_path):
    assert main(["attack", "image", "--dataset", "digits", "--model", "vgg", "--split", "2", "--attack", "inverse",
                 "--defence", "siftfunnel", "--strength", "0.5", "--quick", "--json", "--samples", "30", "--mi-seeds", "1",
                 "--mi-pairs", "300",
                 "--out", str(tmp_path)]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["defence"] == "siftfunnel" and record["strength"] == 0.5
    for key in ("accuracy", "accuracy_undefended", "ssim", "mine", "defence_info"):
        assert key in record, key
    assert record["split_max_abs_logit_diff"] == 0.0  # the defended split equals the defended unsplit model
    assert record["feature_shape"] == [6, 4, 4]  # the funnel sends 6 of the cut's 32 channels
    assert record["threat_model"]["knows_defence"]
    assert (tmp_path / "image-attack_digits_vgg_inverse_split2_siftfunnel-0.5.jsonl").is_file()


@pytest.mark.slow
def test_defence_at_strength_zero_is_the_undefended_run(capsys):
    args = ["attack", "image", "--dataset", "digits", "--model", "lenet", "--split", "1", "--attack", "inverse",
            "--quick", "--json", "--samples", "20"]
    assert main(args) == 0
    plain = json.loads(capsys.readouterr().out)
    assert main([*args, "--defence", "noise", "--strength", "0"]) == 0
    zero = json.loads(capsys.readouterr().out)
    assert zero["defence"] == "noise" and zero["strength"] == 0.0
    assert (zero["accuracy"], zero["ssim"], zero["mine"]) == (plain["accuracy"], plain["ssim"], plain["mine"])


@pytest.mark.slow
def test_quick_defence_sweep_on_digits_writes_records_plots_and_claims(capsys, tmp_path):
    assert main(["attack", "image-sweep", "--dataset", "digits", "--model", "vgg", "--splits", "2", "--attacks",
                 "inverse,rmle", "--defences", "none,noise:0.5,siftfunnel", "--quick", "--samples", "30",
                 "--out", str(tmp_path), "--allow-dirty", "--jobs", "1"]) == 0
    stem = tmp_path / "image-defences_digits_vgg_quick"
    records = [json.loads(line) for line in stem.with_suffix(".jsonl").read_text().splitlines()]
    assert [(r["defence"], r["attack"]) for r in records] == [
        ("none", "inverse"), ("none", "rmle"), ("noise", "inverse"), ("noise", "rmle"),
        ("siftfunnel", "inverse"), ("siftfunnel", "rmle")]
    assert "## SiftFunnel's claims" in stem.with_suffix(".md").read_text()
    assert (tmp_path / "image-defences_digits_vgg_quick_utility.png").stat().st_size > 1000


@pytest.mark.slow
def test_quick_sweep_on_digits_writes_records_and_report(capsys, tmp_path):
    assert main(["attack", "image-sweep", "--dataset", "digits", "--model", "vgg", "--splits", "1,3,5",
                 "--attacks", "inverse,rmle", "--quick", "--samples", "50", "--out", str(tmp_path), "--allow-dirty"]) == 0
    records = [json.loads(line) for line in (tmp_path / "image-privacy_digits_vgg_quick.jsonl").read_text().splitlines()]
    assert [(r["attack"], r["split"]) for r in records] == [("inverse", 1), ("inverse", 3), ("inverse", 5),
                                                            ("rmle", 1), ("rmle", 3), ("rmle", 5)]
    assert "| inverse | 1 |" in (tmp_path / "image-privacy_digits_vgg_quick.md").read_text()


def test_a_frontier_walks_each_baselines_ladder_one_step_past_siftfunnels_accuracy_cost(monkeypatch, tmp_path):
    """The walks run in worker processes (the same frontier as in one process); each point is kept, so a resumed
    sweep on a machine with an empty training cache reads the walk back instead of retraining its victims."""
    import json

    from splitveil.core.records import RUN_STATE_VARIABLE
    from splitveil.experiments import image_privacy
    from splitveil.experiments.image_privacy import ImageAttackSpec, frontier_units, prepare_victim
    from splitveil.protect.image import IMAGE_DEFENCES

    monkeypatch.setenv("SPLITVEIL_CACHE", str(tmp_path))  # workers inherit it: a fresh cache for victims and units
    monkeypatch.setenv(RUN_STATE_VARIABLE, json.dumps({"git_sha": "c" * 40, "git_dirty": False}))
    spec = ImageAttackSpec.quick(dataset="digits", model="vgg", split=2, epochs=2)
    victim = prepare_victim(spec)
    defences = [("none", None), ("siftfunnel", 0.5), ("noise", None), ("dropout", 0.5), ("nopeek", None)]
    units, frontier = frontier_units(spec, [2], defences, victim, jobs=2)
    assert frontier_units(spec, [2], defences, victim) == (units, frontier)  # one process: the same walk
    trained = []
    monkeypatch.setattr(image_privacy, "accuracy_cost", lambda *a, **k: trained.append(a) or 1 / 0)
    assert frontier_units(spec, [2], defences, victim, resume=True) == (units, frontier)  # read back, none trained
    assert trained == []
    summary = frontier[2]
    target = summary["target_cost"]
    assert target is not None and list(summary["baselines"]) == ["noise", "nopeek"]  # dropout:0.5 is a fixed setting
    walk = summary["baselines"]["noise"]["points"]
    ladder = IMAGE_DEFENCES.get("noise").frontier_strengths
    assert [p["strength"] for p in walk] == list(ladder[:len(walk)])
    reached = [p["cost"] >= target for p in walk]
    if summary["baselines"]["noise"]["reached"]:
        assert sum(reached) in (1, 2) and (sum(reached) == 2 or len(walk) == len(ladder))
        assert reached[-1] and (len(walk) == len(ladder) or sum(reached[:-1]) == 1)
    else:
        assert not any(reached) and len(walk) == len(ladder)
    settings = [(u.defence, u.strength) for u in units]
    assert settings == [("none", 0.0), ("siftfunnel", 0.5), ("dropout", 0.5), *(("noise", p["strength"]) for p in walk),
                        *(("nopeek", p["strength"]) for p in summary["baselines"]["nopeek"]["points"])]


def test_sweep_in_worker_processes_gives_the_records_of_one_process():
    """The worker processes' records equal one process's, bit for bit (attackers capped at 3 epochs here to keep it
    fast: what is compared is the sweep's machinery, not the attack's strength)."""
    from splitveil.attack.training import StopRule
    from splitveil.experiments.image_privacy import ImageAttackSpec, run_image_sweep

    spec = ImageAttackSpec.quick(dataset="digits", model="lenet", samples=20, mine_repeats=1, mi_pairs=300,
                                 mine_steps=100, attacker=StopRule(max_epochs=3))
    parallel = run_image_sweep(spec, [1, 2], ["inverse"], jobs=2)
    serial = run_image_sweep(spec, [1, 2], ["inverse"], jobs=1)
    assert [(r["split"], r["ssim"], r["mine"]) for r in parallel] == [(r["split"], r["ssim"], r["mine"]) for r in serial]
    assert all(r["attacker_epochs"] == 3 and r["attacker_converged"] is False for r in serial)  # the cap is recorded


def test_a_stopped_sweep_resumes_from_the_units_it_finished(monkeypatch, tmp_path):
    """Finished units are kept per commit; `resume` reads them back (marked resumed) and runs only the missing ones;
    a damaged file is run again; results of uncommitted code are never kept."""
    import json

    from splitveil.attack.training import StopRule
    from splitveil.core.records import RUN_STATE_VARIABLE
    from splitveil.experiments import image_privacy
    from splitveil.experiments.image_privacy import ImageAttackSpec, run_image_sweep
    from splitveil.experiments.units import unit_path

    monkeypatch.setattr("splitveil.models.loading.cache_root", lambda: tmp_path)
    monkeypatch.setenv(RUN_STATE_VARIABLE, json.dumps({"git_sha": "a" * 40, "git_dirty": False}))
    spec = ImageAttackSpec.quick(dataset="digits", model="lenet", samples=20, mine_repeats=1, mi_pairs=300,
                                 mine_steps=100, attacker=StopRule(max_epochs=2))
    first = run_image_sweep(spec, [1, 2], ["inverse"], jobs=1)
    kept = sorted((tmp_path / "sweep-units").glob("*.json"))
    assert len(kept) == 2 and not any(r.get("resumed") for r in first)

    ran = []
    real = image_privacy.sweep_cut
    monkeypatch.setattr(image_privacy, "sweep_cut", lambda unit, *a, **k: ran.append(unit.split) or real(unit, *a, **k))
    again = run_image_sweep(spec, [1, 2], ["inverse"], jobs=1, resume=True)
    assert ran == [] and all(r["resumed"] for r in again)
    from splitveil.cli.attack_image import _summary
    assert "(resumed" in _summary(again[0]) and "(resumed" not in _summary(first[0])  # the sweep's line says so
    assert [(r["split"], r["ssim"]) for r in again] == [(r["split"], r["ssim"]) for r in first]

    damaged = next(path for path in kept if json.loads(path.read_text())[0]["split"] == 2)
    damaged.write_text("{not json")
    partial = run_image_sweep(spec, [1, 2], ["inverse"], jobs=1, resume=True)
    assert ran == [2] and [r.get("resumed", False) for r in partial] == [True, False]
    assert json.loads(damaged.read_text())[0]["split"] == 2  # the rerun unit is kept again
    run_image_sweep(spec, [1], ["inverse"], jobs=1)  # without resume every unit runs again
    assert ran == [2, 1]

    monkeypatch.setenv(RUN_STATE_VARIABLE, json.dumps({"git_sha": "b" * 40, "git_dirty": True}))
    assert unit_path("image-sweep", {"unit": 1}) is None  # uncommitted code: nothing kept, nothing reused


@pytest.mark.slow
@pytest.mark.skipif(not FASHION.is_file(), reason="Fashion-MNIST is not installed (run `make data`)")
def test_inverse_network_on_vgg_fashion_mnist_split_1_reconstructs_well(capsys):
    assert main(["attack", "image", "--dataset", "fashion-mnist", "--model", "vgg", "--split", "1",
                 "--attack", "inverse", "--quick", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["ssim"] >= 0.7
