"""Batched decode steps (`forward_batched_step`): equal to single steps, and each session's cache owns its memory.

Sessions have different lengths, some shorter and some longer than the sliding window of the layer-typed
families, and decode past it. The trunk and the tail (layers + LM head) run batched, the head per session, as the
service runs them; tokens must equal greedy decoding without any cache, states must equal single steps.
"""

import gc
import weakref

import pytest
import torch

from splitveil.core.errors import ConfigError
from splitveil.models.causal_lm import CausalLMSplittable, forward_batched_step
from splitveil.models.kv_cache import MIN_SPARE
from splitveil.models.tiny import TINY_FAMILIES
from splitveil.plan.plan import SplitPlan, apply

PROMPT_LENGTHS = (2, 5, 9, 23)  # around the tiny window of 4
STEPS = 12


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)  # the random hidden states of each test do not depend on the tests run before it


def _prompts() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(5)
    return [torch.randint(3, 101, (1, n), generator=generator) for n in PROMPT_LENGTHS]


@torch.inference_mode()
def _reference_tokens(model, prompt: torch.Tensor) -> list[int]:
    ids = prompt
    for _ in range(STEPS + 1):
        ids = torch.cat([ids, model(ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids[0, prompt.shape[1]:].tolist()


def _sessions(model, cuts=(1, 3)):
    splittable = CausalLMSplittable(model)
    return [apply(splittable, SplitPlan.from_cuts(cuts)) for _ in PROMPT_LENGTHS]


@pytest.fixture(params=["per-row", "padded"])
def attention(request, monkeypatch):
    """Runs a test with each way `ragged_attention` computes rows: one call per row, or one padded call."""
    from splitveil.models import kv_cache

    monkeypatch.setattr(kv_cache, "PADDED_ROW_BYTES", 0 if request.param == "per-row" else 2**40)
    return request.param


@torch.inference_mode()
@pytest.mark.parametrize("family", TINY_FAMILIES.names())
def test_batched_steps_equal_single_steps_and_unsplit_tokens(tiny_models, family, attention):
    model = tiny_models[family]
    single, batched = _sessions(model), _sessions(model)
    tokens = []
    for prompt, s_parts, b_parts in zip(_prompts(), single, batched):
        logits = s_parts[2](s_parts[1](s_parts[0](prompt)))
        torch.testing.assert_close(b_parts[2](b_parts[1](b_parts[0](prompt))), logits, rtol=0, atol=0)
        tokens.append([int(logits[0, -1].argmax())])
    for _ in range(STEPS):
        ids = torch.tensor([[t[-1]] for t in tokens])  # the device's heads (lanes) take token ids, batched too
        heads = forward_batched_step([parts[0] for parts in batched], ids)
        trunk_out = forward_batched_step([parts[1] for parts in batched], heads)
        logits = forward_batched_step([parts[2] for parts in batched], trunk_out)
        for row, (parts, t) in enumerate(zip(single, tokens)):
            single_head = parts[0](torch.tensor([[t[-1]]]))
            torch.testing.assert_close(heads[row : row + 1], single_head, rtol=1e-4, atol=1e-4)
            single_trunk = parts[1](single_head)
            # float32 sums in another order (one padded attention call for the batch, per-row kernels): within 1e-4
            # (1.7e-5 measured on this CPU for padded Llama); the tokens below must be identical
            torch.testing.assert_close(trunk_out[row : row + 1], single_trunk, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(logits[row : row + 1], parts[2](single_trunk), rtol=1e-4, atol=1e-4)
        for row, t in enumerate(tokens):
            t.append(int(logits[row, -1].argmax()))
    for prompt, t, parts in zip(_prompts(), tokens, batched):
        assert t == _reference_tokens(model, prompt)
        assert parts[1].seq_len == parts[1].cache.get_seq_length() == prompt.shape[1] + STEPS


def _bytes_per_position(part) -> int:
    layer = part.cache.layers[0]
    return part.num_layers * 2 * layer.keys.shape[1] * layer.keys.shape[3] * layer.keys.element_size()


@torch.inference_mode()
def test_each_session_keeps_memory_for_its_own_length_only(tiny_models):
    trunk = apply(CausalLMSplittable(tiny_models["llama"]), SplitPlan.from_cuts((1, 3)))[1]
    lengths = [200, 3, 3, 3, 3, 3]
    sessions = [trunk.clone() for _ in lengths]
    for part, length in zip(sessions, lengths):
        part(torch.randn(1, length, 32))
    for _ in range(40):
        forward_batched_step(sessions, torch.randn(len(sessions), 1, 32))
    per_position = _bytes_per_position(sessions[0])
    for part in sessions:
        assert per_position * part.seq_len <= part.state_bytes() <= per_position * (1.5 * part.seq_len + MIN_SPARE)
    longest = max(part.seq_len for part in sessions)
    assert sum(p.state_bytes() for p in sessions) < per_position * len(sessions) * longest / 2  # not B x Lmax
    pointers = [{t.untyped_storage().data_ptr() for layer in p.cache.layers for t in (layer.keys, layer.values)}
                for p in sessions]
    assert sum(map(len, pointers)) == len(set().union(*pointers))  # no storage shared between sessions

    buffer = weakref.ref(sessions[0].cache.layers[0]._key_buffer)
    del sessions[0], part
    gc.collect()
    assert buffer() is None  # closing a session frees its memory, whatever it was batched with


@torch.inference_mode()
def test_steps_append_in_place_with_geometric_growth(tiny_models):
    trunk = apply(CausalLMSplittable(tiny_models["qwen2"]), SplitPlan.from_cuts((1, 3)))[1].clone()
    trunk(torch.randn(1, 10, 32))
    buffers = set()
    for _ in range(200):
        trunk(torch.randn(1, 1, 32))
        buffers.add(trunk.cache.layers[0]._key_buffer.untyped_storage().data_ptr())
    assert len(buffers) <= 10  # 210 positions in a handful of buffers, not one copy per step
    assert trunk.state_bytes() <= _bytes_per_position(trunk) * (1.5 * 210 + MIN_SPARE)


@torch.inference_mode()
def test_sliding_layers_keep_only_their_window(tiny_models, attention):
    trunk = apply(CausalLMSplittable(tiny_models["mistral-swa"]), SplitPlan.from_cuts((1, 3)))[1]
    sessions = [trunk.clone(), trunk.clone()]
    sessions[0](torch.randn(1, 300, 32))
    sessions[1](torch.randn(1, 2, 32))
    for _ in range(50):
        forward_batched_step(sessions, torch.randn(2, 1, 32))
    window = trunk.cache.layers[0].sliding_window
    for part in sessions:
        assert all(layer.keys.shape[-2] == window - 1 for layer in part.cache.layers)
        assert part.state_bytes() <= _bytes_per_position(part) * 2 * (window + MIN_SPARE)
        assert part.cache.get_seq_length() == part.seq_len


@torch.inference_mode()
def test_a_failed_batched_step_changes_no_session(tiny_models):
    model = tiny_models["gemma3"]
    trunk = apply(CausalLMSplittable(model), SplitPlan.from_cuts((1, 3)))[1]
    sessions = [trunk.clone() for _ in range(3)]
    for part, length in zip(sessions, (3, 8, 20)):
        part(torch.randn(1, length, 32))
    before = [[(layer.keys.clone(), layer.cumulative_length) for layer in p.cache.layers] for p in sessions]

    def fail(*args, **kwargs):
        raise RuntimeError("boom")

    hook = CausalLMSplittable(model).layers[2].mlp.register_forward_pre_hook(fail)  # the trunk's last layer
    try:
        with pytest.raises(RuntimeError, match="boom"):
            forward_batched_step(sessions, torch.randn(3, 1, 32))
    finally:
        hook.remove()
    for part, layers, length in zip(sessions, before, (3, 8, 20)):
        assert part.seq_len == length
        for layer, (keys, cumulative) in zip(part.cache.layers, layers):
            assert torch.equal(layer.keys, keys) and layer.cumulative_length == cumulative


def test_batched_steps_refuse_mismatched_parts(tiny_models):
    splittable = CausalLMSplittable(tiny_models["llama"])
    head, trunk, _ = apply(splittable, SplitPlan.from_cuts((1, 3)))
    with pytest.raises(ConfigError, match="holding the embedding takes \\[B, 1\\] token ids"):
        forward_batched_step([head, head.clone()], torch.randn(2, 1, 32))
    other = apply(splittable, SplitPlan.from_cuts((1, 2)))[1]
    with pytest.raises(ConfigError, match="same model and segments"):
        forward_batched_step([trunk, other], torch.randn(2, 1, 32))
    with pytest.raises(ConfigError, match=r"\[2, 1, \.\.\.\] inputs"):
        forward_batched_step([trunk, trunk.clone()], torch.randn(2, 3, 32))


@torch.inference_mode()
def test_fork_forward_leaves_the_cache_and_matches_a_real_step(tiny_models):
    """The candidates' fork of a sliding-window head keeps the prefix's positions and window (attacks use it)."""
    head = apply(CausalLMSplittable(tiny_models["gemma2"]), SplitPlan.from_cuts((2,)))[0]
    prompt = torch.randint(3, 101, (1, 11), generator=torch.Generator().manual_seed(2))
    head(prompt)
    before = head.state_bytes()
    forked = head.fork_forward(head.input_embeddings[torch.tensor([5, 17, 40])].unsqueeze(1))
    assert head.seq_len == 11 and head.state_bytes() == before
    real = head.clone()
    real(prompt)
    torch.testing.assert_close(forked[1:2], real(torch.tensor([[17]])), rtol=1e-4, atol=1e-4)


@torch.inference_mode()
def test_batched_steps_are_checked_once_against_single_steps(tiny_models):
    from splitveil.models.causal_lm import _agrees_with_single_steps

    splittable = CausalLMSplittable(tiny_models["olmo3"])
    trunk = apply(splittable, SplitPlan.from_cuts((1, 3)))[1]
    sessions = [trunk.clone() for _ in range(3)]
    for part, length in zip(sessions, (2, 6, 13)):
        part(torch.randn(1, length, 32))
    hidden = torch.randn(3, 1, 32)
    copies = [part.clone() for part in sessions]
    for copy, part in zip(copies, sessions):
        copy.cache, copy.seq_len = part.cache.forked(1), part.seq_len
    single = torch.cat([copy(hidden[row : row + 1]) for row, copy in enumerate(copies)])
    assert _agrees_with_single_steps(sessions, hidden, single)
    assert not _agrees_with_single_steps(sessions, hidden, single + 1e-2)

    assert splittable.batch_verdicts == {}
    torch.testing.assert_close(forward_batched_step(sessions, hidden), single, rtol=1e-4, atol=1e-4)
    assert splittable.batch_verdicts == {(trunk.start, trunk.end): True}

    splittable.batch_verdicts[(trunk.start, trunk.end)] = False  # as if this family computed something else
    lengths = [p.seq_len for p in sessions]
    with pytest.raises(ConfigError, match="differ from single steps"):
        forward_batched_step(sessions, hidden)
    assert [p.seq_len for p in sessions] == lengths


@torch.inference_mode()
def test_the_benchmark_baseline_computes_the_same_steps(tiny_models, attention):
    """The gathering algorithm kept as the benchmark's baseline gives the same states (so its timings compare)."""
    from splitveil.experiments.bench_batched import BatchedBenchSpec, _make_sessions, gather_batched_step

    trunk = apply(CausalLMSplittable(tiny_models["llama"]), SplitPlan.from_cuts((1, 3)))[1]
    spec = BatchedBenchSpec(min_length=3, max_length=17)
    old, new = _make_sessions(trunk, 4, spec, "gather"), _make_sessions(trunk, 4, spec, "buffered")
    for _ in range(5):
        hidden = torch.randn(4, 1, 32)
        expected = forward_batched_step(new, hidden)
        torch.testing.assert_close(gather_batched_step(old, hidden), expected, rtol=1e-4, atol=1e-4)
    first, last = (part.cache.layers[0].keys.untyped_storage().data_ptr() for part in (old[0], old[3]))
    assert first == last  # the defect it is kept to measure: sessions share one batch tensor
