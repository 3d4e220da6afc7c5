"""`attack text --defence enclave|slip-dealer`: the enclave trunk and the dealt SLIP executor attacked through the same
text-attack path as every other protection (real operator, executor and dealer processes, a tiny Llama with a
character tokenizer saved to disk)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> str:
    from splitveil.models.tiny import save_tiny_with_tokenizer

    return save_tiny_with_tokenizer(tmp_path_factory.mktemp("enclave-text") / "tiny")


def test_the_operator_reads_nothing_while_the_same_attack_reads_the_clear_uplink(tiny_folder):
    from splitveil.experiments.text_privacy import TextAttackSpec, run_text_attack

    spec = TextAttackSpec(model=tiny_folder, cuts=(1, 3), attack="exact", defence="enclave", max_new_tokens=3,
                          heldout_chars=200)
    record = run_text_attack(spec, ["my pin is 4417", "meet me at noon"])
    described = record["defence"]
    assert described["attestation"].startswith("SIMULATED")
    assert described["control_clear_view_token_recovery"] == 1.0  # the attack works on what a plain split sends
    assert record["token_recovery"] <= 0.1  # ciphertext: at most chance matches among 101 tokens
    assert record["utility_greedy_match"] == 1.0  # the sealed split generates the unsplit model's tokens
    assert described["bytes_relayed_up"] > 0 and record["perplexity"]["defended"] == pytest.approx(
        record["perplexity"]["undefended"], rel=1e-5)


def test_the_dealt_executor_reads_nothing_while_the_same_attack_reads_the_clear_uplink(tiny_folder):
    """`attack text --defence slip-dealer`: executor and mask dealer processes; the device holds no linear weight."""
    from splitveil.experiments.text_privacy import TextAttackSpec, run_text_attack

    spec = TextAttackSpec(model=tiny_folder, cuts=(1, 3), attack="exact", defence="slip-dealer", max_new_tokens=3,
                          heldout_chars=200)
    record = run_text_attack(spec, ["my pin is 4417", "meet me at noon"])
    described = record["defence"]
    assert "collude" in described["trust"] and "seed" in described["dealer_view"]
    assert described["fused"] and described["round_trips_per_decode_step"] == 1 + 2 * 2 + 1  # fused groups, 2 layers
    assert described["control_clear_view_token_recovery"] == 1.0
    assert record["token_recovery"] <= 0.1
    assert record["utility_greedy_match"] == 1.0
    assert described["dealer_frames_received"] > 0 and described["frames_received"] > 0


def test_a_dealt_device_runs_against_servers_that_serve_the_exported_dealer_bundle(tiny_folder, tmp_path):
    """`slip export-bundle --protect prompt --dealer` writes what `slip serve` and `slip dealer` serve to a device
    with `--server URL --dealer URL`: the fused public bundle the device expects (same digest), nothing else."""
    from splitveil.cli.main import main
    from splitveil.edge.generate import GenerationConfig, SplitCausalLM
    from splitveil.models.loading import load_causal_lm
    from splitveil.protect.slip.dealt import DealtDevice
    from splitveil.protect.slip.runtime import DealerProcess, ExecutorProcess
    from splitveil.protect.slip.trusted import SlipConfig

    out = tmp_path / "public"
    assert main(["slip", "export-bundle", "--model", tiny_folder, "--protect", "prompt", "--split", "1,3", "--dealer",
                 "--out", str(out)]) == 0
    assert main(["slip", "export-bundle", "--model", tiny_folder, "--protect", "weights", "--dealer",
                 "--out", str(tmp_path / "refused")]) == 2
    config = SlipConfig(mode="fixed", rank=0, layers=(1, 3), include_head=True)
    with ExecutorProcess(out, "fixed") as executor, DealerProcess(out) as dealer:
        at = lambda p: (p.url, p.token, p.cert, None)  # noqa: E731
        with DealtDevice(tiny_folder, config, executor=at(executor), dealer=at(dealer)) as device:
            result, figures = device.generate("meet me at noon", GenerationConfig(max_new_tokens=4, eos_token_ids=()))
    assert figures["fused"] and figures["round_trips_per_decode_step"] == 1 + 2 * 2 + 1
    full, tokenizer = load_causal_lm(tiny_folder)
    plain = SplitCausalLM(full, None, tokenizer=tokenizer).generate("meet me at noon",
                                                                    GenerationConfig(max_new_tokens=4, eos_token_ids=()))
    assert result.token_ids == plain.token_ids


def test_a_dealt_device_that_waits_longer_than_the_servers_idle_timeout_still_generates(tiny_folder, tmp_path):
    """A device may pause between connecting and generating (the learned text attack trains its readout there for
    many minutes): it holds no executor session while it does, so nothing is evicted and its connections survive."""
    import time

    from splitveil.cli.main import main
    from splitveil.edge.generate import GenerationConfig
    from splitveil.protect.slip.dealt import DealtDevice
    from splitveil.protect.slip.runtime import DealerProcess, ExecutorProcess
    from splitveil.protect.slip.trusted import SlipConfig

    out = tmp_path / "public"
    assert main(["slip", "export-bundle", "--model", tiny_folder, "--protect", "prompt", "--split", "1,3", "--dealer",
                 "--out", str(out)]) == 0
    config = SlipConfig(mode="fixed", rank=0, layers=(1, 3), include_head=True)
    with ExecutorProcess(out, "fixed", extra_args=["--idle-timeout", "0.5"]) as executor, DealerProcess(out) as dealer:
        at = lambda p: (p.url, p.token, p.cert, None)  # noqa: E731
        with DealtDevice(tiny_folder, config, executor=at(executor), dealer=at(dealer)) as device:
            time.sleep(2.0)  # four idle timeouts: a session held now would be evicted and its connection closed
            first, _ = device.generate("meet me at noon", GenerationConfig(max_new_tokens=3, eos_token_ids=()))
            time.sleep(2.0)
            again, _ = device.generate("meet me at noon", GenerationConfig(max_new_tokens=3, eos_token_ids=()))
    assert again.token_ids == first.token_ids
