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
    assert described["control_clear_view_token_recovery"] == 1.0
    assert record["token_recovery"] <= 0.1
    assert record["utility_greedy_match"] == 1.0
    assert described["dealer_frames_received"] > 0 and described["frames_received"] > 0
