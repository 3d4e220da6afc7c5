"""`splitveil generate-image` and `attack diffusion` on a tiny pipeline: equal hashes across placements, JSON fields,
one-line errors with exit status 2."""

from __future__ import annotations

import json

import pytest

from splitveil.cli.main import main


def run(capsys, *args):
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_generate_image_hashes_match_across_placements(capsys, tmp_path):
    hashes = {}
    for placement in ("none", "reference", "unet-split"):
        code, out, _ = run(capsys, "generate-image", "--model", "tiny-diffusion", "--placement", placement, "--prompt",
                           "a photo of a sneaker", "--steps", "3", "--seed", "3", "--out", str(tmp_path / f"{placement}.png"),
                           "--json")
        assert code == 0
        record = json.loads(out)
        assert {"image_sha256", "bytes_up", "bytes_down", "round_trips", "seconds"} <= set(record)
        hashes[placement] = record["image_sha256"]
        assert (tmp_path / f"{placement}.png").is_file()
    assert len(set(hashes.values())) == 1


@pytest.mark.parametrize("args, words", [
    (["--placement", "sideways"], "--placement"),
    (["--wire", "int4"], "--wire"),
    (["--split", "9"], "out of range"),
    (["--placement", "none", "--split", "1"], "--split"),
    (["--model", "no-such-model"], "unknown diffusion model"),
])
def test_bad_flags_exit_2_with_one_line(capsys, tmp_path, args, words):
    code, _, err = run(capsys, "generate-image", "--model", "tiny-diffusion", "--prompt", "x", "--out",
                       str(tmp_path / "x.png"), *args)
    assert code == 2
    assert words in err and len(err.strip().splitlines()) == 1


def test_attack_diffusion_json(capsys, tmp_path):
    code, out, _ = run(capsys, "attack", "diffusion", "--model", "tiny-diffusion", "--placement", "unet-split", "--quick",
                       "--steps", "2", "--json")
    assert code == 0
    record = json.loads(out)
    assert {"prompt_token_recovery", "image_ssim", "ssim_by_step"} <= set(record)
    assert len(record["ssim_by_step"]) == 2


def test_bench_diffusion_refuses_an_unknown_model(capsys, tmp_path):
    assert main(["bench", "diffusion", "--model", "nope", "--allow-dirty", "--out", str(tmp_path)]) == 2
    assert "unknown diffusion model" in capsys.readouterr().err


@pytest.mark.slow
def test_bench_diffusion_writes_records_summary_and_plots(tmp_path):
    assert main(["bench", "diffusion", "--model", "tiny-diffusion", "--quick", "--allow-dirty", "--out", str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "diffusion_tiny-diffusion_summary.json").read_text())
    assert {r["placement"] for r in summary["leakage"]} >= {"reference", "unet-split"}
    assert len(list(tmp_path.glob("*.png"))) >= 3
