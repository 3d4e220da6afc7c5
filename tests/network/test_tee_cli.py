"""`splitveil partition run` end to end: the trusted executor and the accelerator as their own processes over TLS
on 127.0.0.1 (LeNet on the 8x8 digits, trained into a temporary cache in seconds)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.network


def test_partition_run_through_two_processes_equals_the_whole_model(tmp_path):
    env = {**os.environ, "SPLITVEIL_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "splitveil.cli.main", "partition", "run", "--model", "lenet",
                           "--dataset", "digits", "--cut", "2", "--images", "16", "--json"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-500:]
    record = json.loads(done.stdout.strip().splitlines()[-1])
    assert record["kind"] == "tee-partition-run" and record["cut"] == 2 and record["images"] == 16
    assert record["max_abs_logit_diff"] < 1e-5 and record["same_labels"]
    assert record["refusals"]["tampered"].startswith("sealed input refused: authentication failed")
    assert record["refusals"]["replayed"].startswith("sealed input refused: replayed message")
    assert "SIMULATED" in record["attestation"]


def test_partition_run_refuses_a_cut_outside_the_model(tmp_path):
    env = {**os.environ, "SPLITVEIL_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "splitveil.cli.main", "partition", "run", "--model", "lenet",
                           "--dataset", "digits", "--cut", "9"], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 2
    assert len(done.stderr.strip().splitlines()) == 1 and "cut" in done.stderr
