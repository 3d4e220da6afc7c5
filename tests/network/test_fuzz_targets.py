"""`bench fuzz --target enclave|slip|accelerator|edge` in short runs on tiny models: hostile frames against the real
server process while its honest client works; 0 failures (no hang, no unhandled path), the bystander exact during
and after, the server alive. The 20,000-message records come from `splitveil bench fuzz --target T`."""

import pytest

from splitveil.harness.fuzz_service import FuzzBenchSpec, run_fuzz_bench
from splitveil.models.tiny import tiny_causal_lm

pytestmark = pytest.mark.network
MESSAGES = 300


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fuzz-targets") / "tiny-llama"
    tiny_causal_lm("llama", weight_scale=1.0).save_pretrained(folder)
    return str(folder)


def check(record: dict) -> None:
    summary = record["summary"]
    assert summary["messages_sent"] >= MESSAGES
    assert summary["total_failures"] == 0, record["reproducers"][:3]
    assert summary["hangs"] == 0 and summary["unhandled_paths"] == 0 and summary["server_log_tracebacks"] == 0
    assert record["bystander"]["generations"] >= 1 and record["bystander"]["identical_to_unsplit"], record["bystander"]
    assert record["after_fuzz_identical"] and record["server_alive"] and record["passed"]
    assert set(record["per_category"]) == set(record["categories"])  # every category ran


def test_enclave_relay_and_executor(tiny_folder):
    from splitveil.harness.fuzz_targets.enclave import CATEGORIES

    outer = tuple(n for n in CATEGORIES.names() if n != "inner_hostile")
    record = run_fuzz_bench(FuzzBenchSpec(target="enclave", model=tiny_folder, cuts=(1, 3), messages=MESSAGES, workers=2,
                                          timeout_seconds=20, bystander_tokens=8, categories=outer))
    check(record)


def test_enclave_sealed_hostile_frames_are_refused_inside(tiny_folder):
    record = run_fuzz_bench(FuzzBenchSpec(target="enclave", model=tiny_folder, cuts=(1, 3), messages=MESSAGES, workers=2,
                                          timeout_seconds=20, bystander_tokens=8, categories=("inner_hostile",)))
    assert record["per_category"]["inner_hostile"].get("inner_error", 0) > 0  # refusals came back sealed
    check(record)


def test_slip_executor(tiny_folder, tmp_path, monkeypatch):
    monkeypatch.setenv("SPLITVEIL_CACHE", str(tmp_path / "cache"))  # the decomposition of the tiny model
    record = run_fuzz_bench(FuzzBenchSpec(target="slip", model=tiny_folder, cuts=(), messages=MESSAGES, workers=2,
                                          timeout_seconds=20, bystander_tokens=8))
    check(record)
    assert record["slip"]["bundle_files"] == ["manifest.json", "residual.safetensors"]
    assert record["per_category"]["slip_header"].get("result", 0) == 0


def test_accelerator_of_partition_run(tmp_path, monkeypatch):
    monkeypatch.setenv("SPLITVEIL_CACHE", str(tmp_path / "cache"))  # LeNet on the 8x8 digits, trained in seconds
    record = run_fuzz_bench(FuzzBenchSpec(target="accelerator", model="lenet", dataset="digits", cuts=(2,),
                                          messages=MESSAGES, workers=2, timeout_seconds=20))
    check(record)
    assert record["accelerator"]["feature_shape"] and record["per_category"]["nonfinite"].get("error", 0) > 0


@pytest.fixture(scope="module")
def tiny_chat_folder(tmp_path_factory):
    """A tiny Llama with a character-level tokenizer and a chat template, made here (what `splitveil edge` needs)."""
    from splitveil.models.tiny import save_tiny_with_tokenizer

    return save_tiny_with_tokenizer(tmp_path_factory.mktemp("fuzz-edge") / "tiny-chat", chat=True)


def test_openai_edge(tiny_chat_folder):
    """Hostile HTTP against a real `splitveil edge --local` process, a flood of hundreds of streams included."""
    record = run_fuzz_bench(FuzzBenchSpec(target="edge", model=tiny_chat_folder, cuts=(1, 3), messages=MESSAGES, workers=2,
                                          timeout_seconds=20, bystander_tokens=8))
    check(record)
    assert record["edge"]["undisturbed_run_equals_reference"]
    assert record["per_category"]["valid"].get("http_2xx", 0) > 0 and record["per_category"]["wrong_types"].get("http_2xx", 0) == 0
    assert record["per_category"]["flood"]["messages"] >= 64
