"""`serve --enclave` as shipped (real processes, a tiny Llama saved to disk): the attestation covers the code that
sees clear data, the client computes what it expects itself, a flood of token-less upgrades cannot hang the executor,
and plaintext never listens beyond loopback (hardening II, items 1, 3, 4 and 6)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import splitveil
from splitveil.core.errors import ConfigError
from splitveil.edge.generate import GenerationConfig, SplitCausalLM
from splitveil.models.tiny import tiny_causal_lm
from splitveil.plan.plan import SplitPlan
from splitveil.serve.auth import new_token, write_token
from splitveil.tee.channel import SealError, read_attestation_key
from splitveil.tee.enclave_lm import expected_trunk_measurement
from splitveil.tee.measure import expected_measurement

from .conftest import free_port, wait_for_port

CUTS = (1, 3)
PROMPT = torch.tensor([[5, 17, 3, 42, 8, 11]])


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
    tiny_causal_lm("llama").save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def patched_trees(tmp_path_factory) -> dict[str, Path]:
    """Copies of our package and of a pure-Python dependency the executor imports, each with one extra line."""
    root = tmp_path_factory.mktemp("patched")
    ours = root / "ours"
    shutil.copytree(Path(splitveil.__file__).parent, ours / "splitveil", ignore=shutil.ignore_patterns("__pycache__"))
    with open(ours / "splitveil" / "serve" / "service.py", "a") as handle:
        handle.write('\nLEAK_HIDDEN_STATES_TO = "/tmp/operator-reads-this"\n')
    import packaging  # loaded by every executor (transformers needs it)

    dependency = root / "dependency"
    shutil.copytree(Path(packaging.__file__).parent, dependency / "packaging", ignore=shutil.ignore_patterns("__pycache__"))
    with open(dependency / "packaging" / "version.py", "a") as handle:
        handle.write("\nBACKDOOR = True\n")
    return {"ours": ours, "dependency": dependency}


def _env(pythonpath: Path | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    return env


def _measure_only(model_dir: Path, pythonpath: Path | None = None) -> bytes:
    return expected_measurement("enclave-lm", {"model": str(model_dir), "cuts": [1, 3]}, env=_env(pythonpath))


def test_patching_one_imported_file_ours_or_a_dependency_changes_the_measurement(model_dir, patched_trees):
    clean = _measure_only(model_dir)
    assert clean == expected_trunk_measurement(str(model_dir), CUTS)  # deterministic across processes
    assert _measure_only(model_dir, patched_trees["ours"]) != clean
    assert _measure_only(model_dir, patched_trees["dependency"]) != clean


class Operator:
    """`splitveil serve --enclave` on the tiny model, with the environment given (a patched tree, or none)."""

    def __init__(self, folder: Path, model_dir: Path, pythonpath: Path | None = None, host: str = "127.0.0.1"):
        self.folder, self.port = folder, free_port()
        self.token = new_token()
        write_token(folder / "token", self.token)
        self.key_file = folder / "attest.key"  # created by serve --enclave
        self.command = [sys.executable, "-m", "splitveil.cli.main", "serve", "--enclave", "--model", str(model_dir),
                        "--split", "1,3", "--host", host, "--port", str(self.port), "--insecure",
                        "--token-file", str(folder / "token"), "--attestation-key", str(self.key_file)]
        self.env = _env(pythonpath)
        self.log = folder / "operator.log"

    def __enter__(self) -> "Operator":
        with open(self.log, "w") as log:
            self.process = subprocess.Popen(self.command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                            env=self.env)
        wait_for_port(self.port, timeout=120)
        return self

    def __exit__(self, *exc) -> None:
        self.process.terminate()
        try:
            self.process.wait(20)
        except subprocess.TimeoutExpired:
            self.process.kill()

    def connect(self, model_dir: Path, expected: bytes) -> SplitCausalLM:
        return SplitCausalLM.connect(f"ws://127.0.0.1:{self.port}", token=self.token, model=str(model_dir),
                                     plan=SplitPlan.lambda_split(*CUTS), tokenizer=None,
                                     attestation=read_attestation_key(self.key_file, private=False),
                                     expected_measurement=expected)


def test_the_attested_client_refuses_a_patched_executor(model_dir, patched_trees, tmp_path):
    expected = expected_trunk_measurement(str(model_dir), CUTS)  # from this machine's own code and weights
    with Operator(tmp_path, model_dir, patched_trees["ours"]) as operator:
        with pytest.raises(SealError, match="measurement is .* not the expected"):
            operator.connect(model_dir, expected)


def test_a_flood_of_tokenless_upgrades_does_not_hang_the_executor_and_plain_clients_send_nothing(model_dir, tmp_path):
    """Before the fix the executor's log went to a pipe nobody read: about 1,250 refusals filled it for good. And a
    plain client pointed at the relay sent its hidden states in clear; now it refuses after the OPEN reply."""
    from splitveil.tee.enclave_lm import read_observed

    expected = expected_trunk_measurement(str(model_dir), CUTS)
    reference = SplitCausalLM(tiny_causal_lm_from(model_dir)).generate(PROMPT, GenerationConfig(max_new_tokens=6))
    observe = tmp_path / "observed.bin"
    operator = Operator(tmp_path, model_dir)
    operator.command += ["--observe", str(observe)]
    with operator:
        assert operator.key_file.is_file() and oct(operator.key_file.stat().st_mode & 0o777) == "0o600"
        with pytest.raises(ConfigError, match="sealed channel"):
            SplitCausalLM.connect(f"ws://127.0.0.1:{operator.port}", token=operator.token, model=str(model_dir),
                                  plan=SplitPlan.lambda_split(*CUTS), tokenizer=None).generate(
                PROMPT, GenerationConfig(max_new_tokens=2))
        time.sleep(0.5)
        up = read_observed(observe)["up"]
        assert len(up) < 1024  # an OPEN and a CLOSE; the [1, 6, 64] fp32 uplink alone is 1,536 bytes
        answered = 0
        for _ in range(5000):
            with socket.create_connection(("127.0.0.1", operator.port), timeout=10) as raw:
                raw.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
                answered += raw.recv(64).startswith(b"HTTP/1.1 401")
        assert answered == 5000
        began = time.perf_counter()
        lm = operator.connect(model_dir, expected)
        try:
            result = lm.generate(PROMPT, GenerationConfig(max_new_tokens=6))
        finally:
            lm.close()
        seconds = time.perf_counter() - began
    assert result.token_ids == reference.token_ids
    assert seconds < 10, f"an honest client waited {seconds:.1f} s after the flood"


def tiny_causal_lm_from(model_dir: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir).eval()


def test_enclave_relay_refuses_plaintext_beyond_loopback(model_dir, tmp_path):
    done = subprocess.run([sys.executable, "-m", "splitveil.cli.main", "serve", "--enclave", "--model", str(model_dir),
                           "--split", "1,3", "--host", "0.0.0.0", "--port", str(free_port()), "--insecure"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "non-loopback" in done.stderr and len(done.stderr.strip().splitlines()) == 1
