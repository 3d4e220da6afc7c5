"""The null-space attack on SLIP's residual and the hardened split that removes its structure, at tiny sizes."""

import copy

import numpy as np
import pytest
import torch

from splitveil.attack.training import StopRule
from splitveil.attack.weights import WEIGHTS_ATTACKS, NullspaceAttack, WeightsTarget
from splitveil.attack.weights.finetune import FineTuneSpec, mean_loss
from splitveil.attack.weights.subspace import narrow_alignment, orthonormal, recover
from splitveil.core.errors import ConfigError
from splitveil.models.tiny import tiny_causal_lm
from splitveil.protect.slip.decompose import decompose, residual_model_

SHAPES = [(40, 40), (56, 32), (24, 48)]  # square, tall, wide


def weight_like(m: int, n: int, seed: int = 0) -> torch.Tensor:
    """A random matrix with a decaying spectrum, as trained weights have (singular values 10 ... 0.01)."""
    g = torch.Generator().manual_seed(seed)
    d = min(m, n)
    u = torch.linalg.qr(torch.randn(m, d, generator=g, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(n, d, generator=g, dtype=torch.float64)).Q
    s = torch.logspace(1, -2, d, dtype=torch.float64)
    return (u * s @ v.T).float()


def secret_alignment(weight: torch.Tensor, *, rank: int, mask_rank: int) -> tuple[float, float]:
    part = decompose(weight, rank=rank, mask_rank=mask_rank, generator=torch.Generator().manual_seed(1))
    found = recover(part.residual, part.rank)  # the attacker knows the secure rank
    return narrow_alignment(found, orthonormal(part.left), orthonormal(part.right.T))


@pytest.mark.parametrize("shape", SHAPES)
def test_the_nullspace_attack_recovers_the_secret_subspaces_from_a_plain_residual(shape):
    score, chance = secret_alignment(weight_like(*shape), rank=4, mask_rank=0)
    assert score > 0.99
    assert chance < 0.2  # a random subspace would score this


@pytest.mark.parametrize("shape", SHAPES)
def test_the_nullspace_attack_finds_nothing_in_the_hardened_residual(shape):
    score, chance = secret_alignment(weight_like(*shape), rank=4, mask_rank=3)
    assert score < 0.5
    assert score < 2 * chance + 0.05  # about what random subspaces give


@pytest.mark.parametrize("shape", SHAPES)
def test_the_hardened_split_is_exact_full_rank_and_hides_its_spectrum(shape):
    weight = weight_like(*shape)
    plain = decompose(weight, rank=4)
    hardened = decompose(weight, rank=4, mask_rank=3, generator=torch.Generator().manual_seed(1))
    assert hardened.rank == 7 and hardened.left.shape == (shape[0], 7) and hardened.right.shape == (7, shape[1])
    scale = float(weight.abs().max())
    assert float((hardened.secure_weight() + hardened.residual - weight).abs().max()) < 1e-5 * scale
    s_plain = torch.linalg.svdvals(plain.residual.double())
    s_hard = torch.linalg.svdvals(hardened.residual.double())
    s_weight = torch.linalg.svdvals(weight.double())
    assert float(s_plain[-4] / s_plain[0]) < 1e-6  # the plain residual has a 4-dimensional null space
    assert float(s_hard[-1] / s_hard[0]) > 1e-5  # the hardened one is full rank,
    assert float(s_hard[-4]) > 0.5 * float(s_weight[-1])  # its smallest values lie in the matrix's own range
    assert float(s_hard[0]) <= 1.05 * float(s_plain[0])  # and none stands out above the plain residual's


def test_the_hardened_split_needs_a_secure_part_and_room_for_the_mask():
    with pytest.raises(ConfigError):
        decompose(weight_like(8, 8), rank=0, mask_rank=2)
    with pytest.raises(ConfigError):
        decompose(weight_like(8, 8), rank=8, mask_rank=2)


@pytest.mark.parametrize("mode", ["fixed", "float"])
def test_the_hardened_weights_deployment_generates_the_unprotected_tokens(mode):
    from splitveil.edge.generate import SplitCausalLM
    from splitveil.protect.slip.client import SlipClient
    from splitveil.protect.slip.decompose import causal_lm_groups, weight_matrix
    from splitveil.protect.slip.executor import SlipExecutorService
    from splitveil.protect.slip.trusted import SlipConfig, SlipModel
    from splitveil.transport.loopback import LoopbackTransport

    model = tiny_causal_lm("llama", weight_scale=1.0)
    ids = [1, 5, 9, 3, 7, 2, 11]
    expected = SplitCausalLM(tiny_causal_lm("llama", weight_scale=1.0)).generate(ids, max_new_tokens=12, eos_token_ids=()).token_ids
    generator = torch.Generator().manual_seed(0)
    found = causal_lm_groups(model, layers=range(model.config.num_hidden_layers), include_head=True)
    parts = {group.group_id: [decompose(weight_matrix(m), rank=2, mask_rank=2, generator=generator) for m in modules]
             for group, modules in found}
    slip = SlipModel(model, SlipConfig(mode=mode, rank=2, include_head=True), decompositions=parts,
                     generator=np.random.default_rng(0))
    assert slip.secure_rank() == 4
    transport = LoopbackTransport(SlipExecutorService(slip.executor_weights(), mode=mode).handle)
    slip.attach(SlipClient(transport))
    result = SplitCausalLM(slip.model, None, transport=transport).generate(ids, max_new_tokens=12, eos_token_ids=())
    assert result.token_ids == expected


def sampled_text(model, *, sequences: int, length: int, seed: int = 0) -> torch.Tensor:
    """Token sequences [sequences, length] sampled from `model` (the 'public text' of a tiny problem)."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, model.config.vocab_size, (sequences, 1), generator=g)
    with torch.no_grad():
        for _ in range(length - 1):
            probabilities = model(tokens).logits[:, -1].softmax(-1)
            tokens = torch.cat([tokens, torch.multinomial(probabilities, 1, generator=g)], 1)
    return tokens


def tiny_theft():
    """(victim, its residual-only copy at rank 2, the secure ranks, the thief's training and held-out text)."""
    victim = tiny_causal_lm("llama", weight_scale=16.0)
    text = sampled_text(victim, sequences=96, length=24)
    residual = copy.deepcopy(victim)
    return victim, residual, residual_model_(residual, rank=2), text[:80], text[80:]


def test_fitting_only_the_block_m_on_public_text_lowers_the_residual_models_loss():
    victim, residual, ranks, train, held_out = tiny_theft()
    before = mean_loss(residual, held_out, batch=16)
    attack = NullspaceAttack(WeightsTarget(residual, ranks), seed=0).prepare()
    shapes = {name: layer.weight.shape for name, layer in attack.layers.items()}
    assert attack.unknowns() == sum((m - min(m, n) + ranks[name]) * (n - min(m, n) + ranks[name])
                                    for name, (m, n) in shapes.items())  # the block M of each matrix, no more
    assert mean_loss(attack.reconstruct(), held_out, batch=16) == pytest.approx(before, rel=1e-5)  # starts at the residual
    spec = FineTuneSpec(seq_len=24, batch=8, learning_rates=(1e-2, 1e-1), sweep_steps=5, steps_per_round=10,
                        stop=StopRule(max_epochs=4, patience=2))
    record = attack.fit(train, held_out, spec)
    after = mean_loss(attack.reconstruct(), held_out, batch=16)
    original = mean_loss(victim, held_out, batch=16)
    assert after < before - 0.1 * (before - original)  # a real part of the gap closed, not noise
    best = min(record["learning_rate_sweep"].items(), key=lambda kv: kv[1])[0]  # the rate the sweep found best
    assert record["learning_rate"] == pytest.approx(float(best), rel=1e-4) and record["steps"] >= 10


def test_full_starts_at_the_residual_scratch_throws_it_away_and_both_fit_every_weight():
    victim, residual, ranks, train, held_out = tiny_theft()
    before = mean_loss(residual, held_out, batch=16)
    full = WEIGHTS_ATTACKS.get("full")(WeightsTarget(residual, ranks), seed=0).prepare()
    scratch = WEIGHTS_ATTACKS.get("scratch")(WeightsTarget(residual, ranks), seed=0).prepare()
    weights = sum(layer.weight.numel() for layer in full.layers.values())
    assert full.unknowns() == scratch.unknowns() == weights  # every weight of every protected matrix
    assert mean_loss(full.reconstruct(), held_out, batch=16) == pytest.approx(before, rel=1e-5)
    name, layer = next(iter(scratch.layers.items()))
    assert not torch.allclose(layer.merged_weight(), layer.weight)  # the residual is not used
    spec = FineTuneSpec(seq_len=24, batch=8, learning_rates=(1e-2, 1e-1), sweep_steps=5, steps_per_round=10,
                        stop=StopRule(max_epochs=4, patience=2))
    start = mean_loss(scratch.reconstruct(), held_out, batch=16)
    full.fit(train, held_out, spec)
    scratch.fit(train, held_out, spec)
    assert mean_loss(full.reconstruct(), held_out, batch=16) < before
    assert mean_loss(scratch.reconstruct(), held_out, batch=16) < start


def test_the_attack_holds_a_copy_of_the_residual_only():
    victim = tiny_causal_lm("llama", weight_scale=1.0)
    residual = copy.deepcopy(victim)
    ranks = residual_model_(residual, rank=2)
    attack = WEIGHTS_ATTACKS.get("nullspace")(WeightsTarget(residual, ranks))
    assert attack.model is not residual
    victim_weights = {p.data_ptr() for p in victim.parameters()} | {p.data_ptr() for p in residual.parameters()}
    assert not victim_weights & {p.data_ptr() for p in attack.model.parameters()}
    name = next(iter(ranks))
    granted = dict(attack.model.named_modules())[name].weight
    assert torch.equal(granted, dict(residual.named_modules())[name].weight)


@pytest.mark.parametrize("argv, message", [(["--attack", "foo"], "unknown weights attack 'foo'"),
                                           (["--rank", "0"], "--rank must be >= 1")])
def test_the_cli_refuses_bad_flags_with_one_line(capsys, argv, message):
    from splitveil.cli.main import main

    assert main(["attack", "weights", *argv]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [(["--attacks", "nullspace,foo"], "unknown weights attack 'foo'"),
                                           (["--attacks", ","], "give at least one attack"),
                                           (["--budgets", "100"], "--budgets must be token counts of at least 640"),
                                           (["--budgets", "1e4"], "bad --budgets"),
                                           (["--rank", "0"], "--rank must be >= 1")])
def test_the_curves_cli_refuses_bad_flags_with_one_line(capsys, argv, message):
    from splitveil.cli.main import main

    assert main(["attack", "weights-curves", *argv]) == 2
    assert message in capsys.readouterr().err


def test_extraction_curves_run_every_attack_at_every_budget_on_a_real_model_folder(tmp_path, monkeypatch):
    """A tiny Llama with a character tokenizer saved as a model folder: the curves' runs split it, attack it and
    score it as on SmolLM2, each budget with its own text; a resumed run reads every finished run back."""
    import json

    from splitveil.core.records import RUN_STATE_VARIABLE
    from splitveil.experiments import weights_attack
    from splitveil.experiments.weights_attack import WeightsAttackSpec, plot_weights_curves, run_weights_curves
    from splitveil.models.tiny import save_tiny_with_tokenizer

    monkeypatch.setattr("splitveil.models.loading.cache_root", lambda: tmp_path / "cache")
    monkeypatch.setenv(RUN_STATE_VARIABLE, json.dumps({"git_sha": "c" * 40, "git_dirty": False}))
    save_tiny_with_tokenizer(tmp_path / "tiny")
    spec = WeightsAttackSpec.for_run(quick=True, model=str(tmp_path / "tiny"), rank=2)
    record = run_weights_curves(spec, ["nullspace", "scratch"], [640, 1280])
    assert [(r["attack"], r["train_tokens"]) for r in record["runs"]] == [
        ("nullspace", 640), ("nullspace", 1280), ("scratch", 640), ("scratch", 1280)]
    for attack, points in record["curves"].items():
        assert [p["train_tokens"] for p in points] == [640, 1280]
        assert all(p["perplexity_after"] > 0 for p in points)
    assert record["curves"]["scratch"][0]["unknowns"] > record["curves"]["nullspace"][0]["unknowns"]
    assert record["perplexity_original"] > 0 and record["perplexity_residual"] > 0  # (a random tiny model: no order)
    assert plot_weights_curves(record, tmp_path / "curves.png").stat().st_size > 1000

    monkeypatch.setattr(weights_attack, "run_weights_attack", lambda *a, **k: pytest.fail("a finished run ran again"))
    resumed = run_weights_curves(spec, ["nullspace", "scratch"], [640, 1280], resume=True)
    assert all(r["resumed"] for r in resumed["runs"]) and resumed["curves"] == record["curves"]


def test_slip_config_mask_rank_hardens_the_deployment_it_builds():
    """`SlipConfig(mask_rank=r)` (`slip generate --protect weights --mask-rank r`, `slip export-bundle --mask-rank r`)
    decomposes every matrix hardened: rank k + r, full-rank residuals, same tokens."""
    from splitveil.edge.generate import SplitCausalLM
    from splitveil.protect.slip.client import SlipClient
    from splitveil.protect.slip.executor import SlipExecutorService
    from splitveil.protect.slip.trusted import SlipConfig, SlipModel
    from splitveil.transport.loopback import LoopbackTransport

    ids = [1, 5, 9, 3, 7, 2, 11]
    expected = SplitCausalLM(tiny_causal_lm("llama", weight_scale=1.0)).generate(ids, max_new_tokens=8, eos_token_ids=()).token_ids
    slip = SlipModel(tiny_causal_lm("llama", weight_scale=1.0), SlipConfig(rank=2, include_head=True, mask_rank=2),
                     generator=np.random.default_rng(0))
    assert slip.secure_rank() == 4
    residual = next(iter(slip.decompositions.values()))[0].residual.double()
    values = torch.linalg.svdvals(residual)
    assert float(values[-1] / values[0]) > 1e-5  # no null space left to read the secret subspaces from
    transport = LoopbackTransport(SlipExecutorService(slip.executor_weights(), mode="fixed").handle)
    slip.attach(SlipClient(transport))
    result = SplitCausalLM(slip.model, None, transport=transport).generate(ids, max_new_tokens=8, eos_token_ids=())
    assert result.token_ids == expected
    with pytest.raises(ConfigError, match="mask-rank"):
        SlipConfig(rank=0, mask_rank=2)


def tiny_cnn_theft():
    """(a small CNN victim, its residual-only copy at rank 2, the secure ranks, the thief's labelled images and a
    held-out part): images labelled by the victim itself, so that the victim is the best the thief can do."""
    from torch import nn

    torch.manual_seed(0)
    victim = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2), nn.ReLU(),
                           nn.Flatten(), nn.Linear(8 * 3 * 3, 5)).eval()
    images = torch.randn(400, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        labels = victim(images).argmax(-1)
    residual = copy.deepcopy(victim)
    ranks = residual_model_(residual, rank=2)
    return victim, residual, ranks, (images[:320], labels[:320]), (images[320:], labels[320:])


def test_a_convolutions_subspaces_are_recovered_and_the_corrected_cnn_starts_at_the_residual():
    from splitveil.attack.weights.finetune import classifier_loss

    victim, residual, ranks, train, held_out = tiny_cnn_theft()
    assert len(ranks) == 3  # both convolutions and the linear head are protected
    attack = NullspaceAttack(WeightsTarget(residual, ranks), seed=0).prepare()
    assert set(attack.layers) == set(ranks)
    with torch.no_grad():
        assert torch.allclose(attack.reconstruct()(held_out[0]), residual(held_out[0]), atol=1e-5)
    for name, found in attack.recovered.items():  # read off the residual's null spaces, as for a linear layer
        from splitveil.protect.slip.decompose import weight_matrix

        part = decompose(weight_matrix(dict(victim.named_modules())[name]), rank=2)
        assert narrow_alignment(found, orthonormal(part.left), orthonormal(part.right.T))[0] > 0.99
    before = mean_loss(residual, held_out, batch=64, loss=classifier_loss)
    spec = FineTuneSpec(batch=32, learning_rates=(1e-2, 1e-1), sweep_steps=10, steps_per_round=20,
                        stop=StopRule(max_epochs=8, patience=2))
    record = attack.fit(train, held_out, spec, loss=classifier_loss)
    after = mean_loss(attack.reconstruct(), held_out, batch=64, loss=classifier_loss)
    assert after < 0.7 * before  # the fitted block closes a real part of the gap
    assert record["examples_seen"] == record["steps"] * 32 and "tokens_seen" not in record


def test_the_sweep_looks_past_its_edge_when_the_best_rate_is_there():
    from splitveil.attack.weights.finetune import classifier_loss

    _, residual, ranks, train, held_out = tiny_cnn_theft()
    attack = WEIGHTS_ATTACKS.get("full")(WeightsTarget(residual, ranks), seed=0).prepare()
    spec = FineTuneSpec(batch=32, learning_rates=(1e-5,), sweep_steps=5, steps_per_round=5, extend_sweep=2,
                        stop=StopRule(max_epochs=1, patience=1))
    record = attack.fit(train, held_out, spec, loss=classifier_loss)
    assert list(record["learning_rate_sweep"]) == ["1e-05", "3e-05", "9e-05"]  # 1e-5 was an edge: two more tried
    assert record["learning_rate"] == pytest.approx(9e-5)
    assert record["sweep_steps"] == 15


@pytest.mark.parametrize("argv, message", [(["--budgets", "5"], "image counts from 10 to 10000"),
                                           (["--budgets", "20000"], "image counts from 10 to 10000")])
def test_the_curves_cli_refuses_cnn_budgets_outside_the_attackers_images(capsys, argv, message):
    from splitveil.cli.main import main

    assert main(["attack", "weights-curves", "--model", "lenet", *argv]) == 2
    assert message in capsys.readouterr().err


def test_cnn_extraction_curves_on_fashion_mnist_lenet(tmp_path, monkeypatch):
    """The real path on LeNet (the victim trained once, then cached): every attack starts from a residual that
    classifies near chance and the null-space attack reads its subspaces exactly; with stolen images every attack
    beats the residual-only model; a resumed run reads every finished run back."""
    import json

    from splitveil.core.records import RUN_STATE_VARIABLE
    from splitveil.experiments import weights_cnn
    from splitveil.experiments.weights_attack import plot_weights_curves
    from splitveil.experiments.weights_cnn import CnnWeightsSpec, run_cnn_weights_curves

    monkeypatch.setattr("splitveil.models.loading.cache_root", lambda: tmp_path / "cache")
    monkeypatch.setenv(RUN_STATE_VARIABLE, json.dumps({"git_sha": "d" * 40, "git_dirty": False}))

    spec = CnnWeightsSpec(model="lenet", finetune=FineTuneSpec(batch=32, learning_rates=(1e-2, 1e-1), sweep_steps=10,
                                                               steps_per_round=20, stop=StopRule(max_epochs=6, patience=2)))
    record = run_cnn_weights_curves(spec, ["nullspace", "scratch"], [50, 200])
    assert [(r["attack"], r["stolen"]) for r in record["runs"]] == [
        ("nullspace", 50), ("nullspace", 200), ("scratch", 50), ("scratch", 200)]
    assert record["accuracy_original"] > 0.75 and record["accuracy_residual"] < 0.4
    nullspace = record["runs"][0]
    assert nullspace["subspace_alignment"] > 0.99 and nullspace["held_out_images"] == 10
    assert all(r["accuracy_after"] > record["accuracy_residual"] + 0.1 for r in record["runs"])
    assert all("attacker_converged" in r and r["attacker_epochs"] >= 1 for r in record["runs"])
    assert plot_weights_curves(record, tmp_path / "curves.png").stat().st_size > 1000

    monkeypatch.setattr(weights_cnn, "run_cnn_weights_attack", lambda *a, **k: pytest.fail("a finished run ran again"))
    resumed = run_cnn_weights_curves(spec, ["nullspace", "scratch"], [50, 200], resume=True)
    assert all(r["resumed"] for r in resumed["runs"]) and resumed["curves"] == record["curves"]
