"""`splitveil bench gpu` (experiments/gpu_bench.py): skipped with one line where CUDA is missing; on the CPU with the
tiny dummy Llama it runs every measurement and writes a record whose baselines ran in the same process."""

import json

import pytest
import torch

from splitveil.cli.main import main


def test_without_cuda_it_says_so_and_stops(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["bench", "gpu", "--out", str(tmp_path)]) == 0
    assert "skipped: this machine has no CUDA GPU" in capsys.readouterr().out
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("args, expected", [
    (["--dtype", "int4"], "unknown dtype 'int4'"),
    (["--device", "cpu", "--split", "3"], "give --split A,B"),
    (["--device", "cpu", "--model", "llama-tiny", "--split", "1,5"], "needs 5 layers: llama-tiny has 2"),
])
def test_bad_input_is_one_line(args, expected, capsys):
    assert main(["bench", "gpu", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and expected in err, err


@pytest.mark.model
def test_on_the_cpu_every_measurement_is_recorded(tmp_path, capsys):
    assert main(["bench", "gpu", "--device", "cpu", "--model", "llama-tiny", "--split", "1,2", "--sessions", "1,4",
                 "--decode-tokens", "4", "--prompt-tokens", "8", "--context", "8", "--steps", "2", "--repeats", "1",
                 "--out", str(tmp_path), "--allow-dirty"]) == 0
    record = json.loads((tmp_path / "gpu_llama-tiny_split-1-2_cpu_bfloat16.json").read_text())
    assert (tmp_path / "gpu_llama-tiny_split-1-2_cpu_bfloat16.png").stat().st_size > 0
    assert record["dtype"] == "bfloat16" and record["weights_are_dummy"]
    decode = record["decode_batch1"]
    assert decode["tokens_identical"] and decode["ours_median"] > 0 and decode["transformers_median"] > 0
    assert [row["sessions"] for row in record["trunk_steps"]] == [1, 4] and record["trunk_steps"][1]["batched"]
    assert [row["positions"] for row in record["masked_products"]] == [1, 64]
    assert record["memory_per_session"]["kv_bytes_per_session"] > 0
    assert record["verdict"]["sessions64_vs_one"] is None  # no 64-session row: no verdict claimed
    assert "decode at batch 1" in capsys.readouterr().out
