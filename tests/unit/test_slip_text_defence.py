"""`slip` as a text defence: registered beside the cut defences, with an adaptive attacker that reads the clear
first-linear input exactly and nothing from its masked image."""

import pytest
import torch

from splitveil.core.errors import ConfigError


def test_slip_is_a_registered_text_defence_with_its_adaptive_attacker():
    from splitveil.attack.text.adaptive import ADAPTATIONS, SlipAdaptation, adaptation_for
    from splitveil.protect.cut import CUT_DEFENCES
    from splitveil.protect.deployment import DEPLOYMENTS
    from splitveil.protect.slip.deployment import SlipDeployment
    from splitveil.protect.text import deployment_for

    assert set(CUT_DEFENCES.names()) | {"none", "slip", "slip-dealer", "enclave"} == set(DEPLOYMENTS.names("text"))
    assert {deployment_for(name) for name in DEPLOYMENTS.names("text")} <= set(ADAPTATIONS)
    assert deployment_for("slip") is SlipDeployment and isinstance(adaptation_for("slip", 0), SlipAdaptation)
    assert isinstance(adaptation_for("slip-dealer", 0), SlipAdaptation)
    assert deployment_for("noise").defence_class is CUT_DEFENCES.get("noise")
    SlipDeployment.check(0, (2, 28))
    with pytest.raises(ConfigError, match="secure rank"):
        SlipDeployment.check(0.5, (2, 28))
    with pytest.raises(ConfigError, match="A < B"):
        SlipDeployment.check(0, (3, 3))
    with pytest.raises(ConfigError, match="needs the target"):
        adaptation_for("slip", 0).attack_options("exact")


def _target_and_rows(model, depth: int, tokens: list[int]):
    from splitveil.attack.text.target import TextTarget
    from splitveil.models.causal_lm import CausalLMSplittable
    from splitveil.protect.slip.decompose import causal_lm_groups
    from splitveil.protect.slip.view import layer_inputs

    public = CausalLMSplittable(model)
    target = TextTarget(public, public.boundary(depth), public.boundary(public.num_blocks))
    first = causal_lm_groups(model, layers=range(depth, depth + 1), include_head=False)[0][1][0]  # layer's q_proj
    return target, layer_inputs(model, torch.tensor([tokens]), first)[0]  # [T, n]: what SLIP masks


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_adaptive_exact_attack_reads_the_clear_view_and_gives_up_on_the_masked_one(tiny_models, family):
    """The attack is not the weak point: on the rows SLIP would send without masks it recovers every token; on the
    masked rows no candidate comes near, so it gives up after the first ranked rounds and reads nothing."""
    from splitveil.attack.text.adaptive import adaptation_for, slip_mask_augmenter
    from splitveil.attack.text.attacks import ExactInversion

    model = tiny_models[family]
    generator = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, model.config.vocab_size, (10,), generator=generator).tolist()
    target, clear = _target_and_rows(model, 1, tokens)
    options = adaptation_for("slip", 0).attack_options("exact", target)
    attack = ExactInversion(target, candidates=16, restarts=1, **options)
    assert attack.reconstruct(clear) == tokens
    masked = slip_mask_augmenter(lambda states: states, seed=1)(clear)  # encode + uniform ring masks, read back
    recovered = attack.reconstruct(masked)
    assert sum(a == b for a, b in zip(recovered, tokens)) <= 2  # vocabulary of the tiny model: chance is small
    assert all(s["closest_relative"] > 0.5 and s["unmatchable"] for s in attack.search)  # proven by the bound
    assert all(s["verified"] <= attack.candidates + 2 for s in attack.search)  # hence the first round only
    assert not any(attack.unmatchable(row) for row in clear)  # the bound never stops a search on a clear row


def test_mask_augmenter_models_the_wire():
    from splitveil.attack.text.adaptive import slip_mask_augmenter

    states = torch.randn(64, 8)
    augment = slip_mask_augmenter(lambda x: x, seed=0)
    first, second = augment(states), augment(states)
    assert first.shape == states.shape and not torch.equal(first, second)  # a fresh mask every call
    assert float(first.abs().median()) > 2.0**40  # uniform over Z_2^64, read at 2^-16: ~2^46 in magnitude


def test_learned_readout_trained_on_masked_views_reads_at_chance(tiny_models):
    from splitveil.attack.text.adaptive import adaptation_for, slip_mask_augmenter
    from splitveil.attack.text.learned import LearnedInversion
    from splitveil.attack.training import StopRule

    model = tiny_models["llama"]
    generator = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    corpus = [torch.randint(0, vocab, (24,), generator=generator).tolist() for _ in range(20)]
    tokens = torch.randint(0, vocab, (40,), generator=generator).tolist()
    target, clear = _target_and_rows(model, 1, tokens)
    readout = LearnedInversion(target, corpus, stop=StopRule(patience=3, max_epochs=30),
                               **adaptation_for("slip", 0).attack_options("learned", target))
    masked = slip_mask_augmenter(lambda x: x, seed=5)(clear)
    hits = sum(a == b for a, b in zip(readout.reconstruct(masked), tokens))
    assert hits <= 4  # 40 positions, chance 40 / vocab


def test_generate_protect_prompt_refuses_bad_combinations(capsys):
    from splitveil.cli.main import main

    cases = [
        (["--protect", "prompt", "--no-split"], "give --split A,B"),
        (["--protect", "prompt"], "give --split A,B"),
        (["--protect", "weights", "--split", "2,28"], "slip generate --protect weights"),
        (["--protect", "prompt", "--split", "2,28", "--wire", "fp16"], "--wire does not apply"),
        (["--protect", "prompt", "--split", "2,28", "--sample"], "decodes greedily"),
        (["--protect", "prompt", "--split", "2,28", "--stop", "x"], "decodes greedily"),
        (["--protect", "prompt", "--split", "2,28", "--insecure"], "drop --insecure"),
        (["--protect", "prompt", "--split", "2,28", "--pin", "ab"], "go with --server"),
        (["--protect", "prompt", "--split", "4"], "two cuts"),
        (["--protect", "prompt", "--split", "2,99"], "does not fit"),
    ]
    for args, message in cases:
        assert main(["generate", "--prompt", "hi", *args]) == 2, args
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, (args, err)


def test_attack_text_checks_the_slip_strength_before_loading(capsys):
    from splitveil.cli.main import main

    assert main(["attack", "text", "--defence", "slip", "--strength", "0.5"]) == 2
    assert "secure rank" in capsys.readouterr().err
    assert main(["attack", "text-sweep", "--depths", "", "--defences", "slip:1.5", "--allow-dirty"]) == 2
    assert "secure rank" in capsys.readouterr().err


def test_the_fused_attacker_bounds_the_residual_stream_from_public_weights():
    """`residual_stream_bound` (what the exact attack against fused slip-dealer groups stops on) holds for real
    text at every depth, and is far below what a masked row reads as."""
    import torch

    from splitveil.attack.text.adaptive import residual_stream_bound
    from splitveil.attack.text.target import TextTarget
    from splitveil.models.causal_lm import CausalLMSplittable
    from splitveil.models.loading import load_causal_lm

    model, tokenizer = load_causal_lm("smollm2-135m")
    public = CausalLMSplittable(model)
    ids = tokenizer("My SSN is 078-05-1120, I live at 14 Elm Street, and the quick brown fox naps.",
                    return_tensors="pt")["input_ids"]
    with torch.no_grad():
        states = model(ids, output_hidden_states=True).hidden_states
    for depth in (0, 1, 3):
        bound = residual_stream_bound(TextTarget(public, public.boundary(depth), public.boundary(28)))
        assert float(states[depth][0].norm(dim=-1).max()) <= bound < 1e12
