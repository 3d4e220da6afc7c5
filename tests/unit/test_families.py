"""Split == unsplit for families whose layers differ by type (sliding window / full attention, rotary base per type).

transformers picks each layer's mask and rotary embedding from `config.layer_types[i]`; a part that starts at layer
f must use the types of layers f.., not 0... Prompts are longer than the window (4) and decoding goes well past it,
so a wrong mask, a wrong rotary base or a wrong cache type changes the states (the tiny weights are scaled up, so
every state depends on the whole context it attends to).
"""

import pytest
import torch

from splitveil.edge.generate import SplitCausalLM
from splitveil.models.causal_lm import CausalLMSplittable
from splitveil.models.tiny import LAYER_TYPED_FAMILIES, TINY_WINDOW
from splitveil.plan.plan import SplitPlan, apply

PROMPT_LENGTH = 24
NEW_TOKENS = 20
ALL_CUTS = [(c,) for c in range(5)] + [(a, b) for a in range(5) for b in range(a + 1, 5)]


def _prompt(seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 101, (1, PROMPT_LENGTH), generator=torch.Generator().manual_seed(seed))


@torch.inference_mode()
def _reference(model, prompt: torch.Tensor) -> tuple[list[int], torch.Tensor]:
    """Greedy tokens recomputing the whole sequence without a cache, and the logits of prompt + those tokens."""
    ids = prompt
    for _ in range(NEW_TOKENS):
        ids = torch.cat([ids, model(ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids[0, prompt.shape[1]:].tolist(), model(ids).logits


@pytest.fixture(scope="module")
def references(tiny_models):
    return {family: _reference(tiny_models[family], _prompt()) for family in LAYER_TYPED_FAMILIES}


@torch.inference_mode()
def _split_logits(model, cuts: tuple[int, ...], ids: torch.Tensor) -> torch.Tensor:
    """Logits [1, T, V] of `ids` through the parts of `cuts`: the prompt at once, then one position per step."""
    parts = apply(CausalLMSplittable(model), SplitPlan.from_cuts(cuts))
    chunks = [ids[:, :PROMPT_LENGTH]] + [ids[:, t : t + 1] for t in range(PROMPT_LENGTH, ids.shape[1])]
    logits = []
    for chunk in chunks:
        x = chunk
        for part in parts:
            x = part(x)
        logits.append(x)
    return torch.cat(logits, dim=1)


def test_the_tiny_families_really_mix_layer_types(tiny_models):
    for family in LAYER_TYPED_FAMILIES:
        config = tiny_models[family].config
        types = getattr(config, "layer_types", None) or ["sliding_attention"] * config.num_hidden_layers
        assert "sliding_attention" in types and config.sliding_window == TINY_WINDOW, family
        assert PROMPT_LENGTH > 4 * TINY_WINDOW


@pytest.mark.parametrize("family", LAYER_TYPED_FAMILIES)
def test_reference_is_not_degenerate(references, family):
    assert len(set(references[family][0])) >= 8


@pytest.mark.parametrize("family", LAYER_TYPED_FAMILIES)
def test_prefill_and_decode_logits_equal_unsplit_at_every_cut(tiny_models, references, family):
    tokens, unsplit = references[family]
    ids = torch.cat([_prompt(), torch.tensor([tokens])], dim=1)
    for cuts in ALL_CUTS:
        split = _split_logits(tiny_models[family], cuts, ids)
        torch.testing.assert_close(split, unsplit, rtol=1e-4, atol=1e-4, msg=lambda m: f"cuts {cuts}: {m}")


@pytest.mark.parametrize("family", LAYER_TYPED_FAMILIES)
def test_greedy_tokens_equal_unsplit_for_every_cut_pair(tiny_models, references, family):
    tokens, unsplit = references[family]
    model = tiny_models[family]
    for head_end in range(5):
        for tail_start in range(head_end + 1, 5):
            split = SplitCausalLM(model, SplitPlan.lambda_split(head_end, tail_start), wire="fp32")
            result = split.generate(_prompt(), max_new_tokens=NEW_TOKENS, eos_token_ids=())
            assert result.token_ids == tokens, (head_end, tail_start)
            logits = split.forward_logits(_prompt())
            torch.testing.assert_close(logits, unsplit[:, :PROMPT_LENGTH], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", LAYER_TYPED_FAMILIES)
def test_part_caches_get_the_layer_types_of_their_own_layers(tiny_models, family):
    from transformers import DynamicCache

    model = tiny_models[family]
    whole = DynamicCache(config=model.config).is_sliding
    for cuts in [(1, 3), (2, 3), (3,)]:
        for part in apply(CausalLMSplittable(model), SplitPlan.from_cuts(cuts)):
            if part.num_layers:
                assert part.cache.is_sliding == whole[part.first_layer : part.first_layer + part.num_layers]


def test_each_view_carries_its_own_slice_of_the_per_layer_lists(tiny_models):
    model = tiny_models["gemma3"]
    whole = list(model.config.layer_types)
    for part in apply(CausalLMSplittable(model), SplitPlan.from_cuts((1, 3))):
        if part.num_layers:
            assert part._view.config.layer_types == whole[part.first_layer : part.first_layer + part.num_layers]
            assert part._view.config.num_hidden_layers == part.num_layers
    assert model.config.layer_types == whole and model.config.num_hidden_layers == 4  # the model is untouched
