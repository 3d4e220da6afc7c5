"""Dummy-weight models: the tiny shape generates once, deterministically, loads with transformers and runs; names
are refused with one clear line; the big shapes have their real models' parameter counts (on the meta device)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors import safe_open

from splitveil.core.errors import ConfigError
from splitveil.core.registry import Registry
from splitveil.models import dummy
from splitveil.models.dummy import DUMMY_SHAPES, MARKER_FILE, dummy_config, dummy_parameter_count, is_dummy
from splitveil.models.loading import LoadFormat, load_causal_lm, resolve_model_dir


@pytest.fixture(scope="module")
def smollm2_dir():
    """The real SmolLM2 folder (its tokenizer is every dummy shape's), resolved before any test moves the cache."""
    return resolve_model_dir("smollm2-135m")


def use_cache(monkeypatch, root, smollm2_dir):
    """Points SPLITVEIL_CACHE at `root`, with SmolLM2's converted folder linked in so nothing is converted again."""
    (root / "models").mkdir(parents=True)
    (root / "models" / "smollm2-135m").symlink_to(smollm2_dir, target_is_directory=True)
    monkeypatch.setenv("SPLITVEIL_CACHE", str(root))


def every_tensor(folder) -> dict[str, torch.Tensor]:
    tensors = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), "pt") as handle:
            tensors.update({key: handle.get_tensor(key) for key in handle.keys()})
    return tensors


@pytest.fixture
def tiny_dir(tmp_path, monkeypatch, smollm2_dir):
    use_cache(monkeypatch, tmp_path / "cache", smollm2_dir)
    return resolve_model_dir("llama-tiny", load_format="dummy")


def test_the_tiny_shape_generates_a_marked_model_folder(tiny_dir, tmp_path):
    assert tiny_dir == tmp_path / "cache" / "dummy" / "llama-tiny"
    for name in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "README.md"):
        assert (tiny_dir / name).is_file(), name
    marker = json.loads((tiny_dir / MARKER_FILE).read_text())
    assert marker["dummy"] is True and marker["shape"] == "llama-tiny"
    assert "cost figures only" in (tiny_dir / "README.md").read_text()
    assert json.loads((tiny_dir / "config.json").read_text())["splitveil_dummy"] == "llama-tiny"
    assert not list(tiny_dir.parent.glob(".llama-tiny.tmp*"))  # the staging folder was renamed into place
    tensors = every_tensor(tiny_dir)
    assert torch.equal(tensors["model.norm.weight"], torch.ones(64))
    assert abs(tensors["model.embed_tokens.weight"].std().item() - 0.02) < 1e-3
    assert "lm_head.weight" in tensors  # llama-tiny is untied
    # a second call finds the folder and writes nothing
    before = (tiny_dir / "model.safetensors").stat().st_mtime_ns
    assert resolve_model_dir("llama-tiny", load_format="dummy") == tiny_dir
    assert (tiny_dir / "model.safetensors").stat().st_mtime_ns == before


def test_two_generations_in_two_caches_are_identical(tmp_path, monkeypatch, smollm2_dir):
    folders = []
    for root in ("a", "b"):
        use_cache(monkeypatch, tmp_path / root, smollm2_dir)
        folders.append(resolve_model_dir("llama-tiny", load_format="dummy"))
    first, second = (every_tensor(folder) for folder in folders)
    assert first.keys() == second.keys() and len(first) == 2 * 9 + 3
    for name in first:
        assert torch.equal(first[name], second[name]), name
    assert (folders[0] / "config.json").read_bytes() == (folders[1] / "config.json").read_bytes()


def test_the_tiny_shape_loads_with_transformers_and_runs(tiny_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    loaded, tokenizer = load_causal_lm("llama-tiny", load_format="dummy")
    assert tokenizer.eos_token_id == loaded.config.eos_token_id == 2
    ids = tokenizer("The cloud runs the trunk.", return_tensors="pt").input_ids  # [1, seq]
    assert int(ids.max()) < 49152
    with torch.no_grad():
        logits = model(ids).logits  # [1, seq, vocab]
        again = loaded(ids).logits
    assert logits.shape == (1, ids.shape[1], 49152) and torch.isfinite(logits).all()
    assert torch.equal(logits, again)


def test_load_model_of_the_cli_passes_the_load_format(tiny_dir):
    from splitveil.cli.common import load_model

    model, tokenizer = load_model("llama-tiny", quiet=True, load_format=LoadFormat.DUMMY)
    assert is_dummy(model.config.name_or_path) and tokenizer is not None


def test_the_load_format_option_parses_auto_and_dummy():
    import typer
    from typer.testing import CliRunner

    from splitveil.cli.common import load_format_option

    app = typer.Typer()

    @app.command()
    def show(load_format: LoadFormat = load_format_option()):
        print(load_format.value)

    runner = CliRunner()
    assert runner.invoke(app, []).output.strip() == "auto"
    assert runner.invoke(app, ["--load-format", "dummy"]).output.strip() == "dummy"
    refused = runner.invoke(app, ["--load-format", "fake"])
    assert refused.exit_code == 2
    help_text = load_format_option().help
    assert "llama-1b, llama-8b" in help_text and "never for privacy figures" in help_text


@pytest.mark.parametrize("tied", [False, True])
def test_several_shards_and_tied_embeddings_load_like_one_file(tmp_path, monkeypatch, smollm2_dir, tied):
    from transformers import AutoModelForCausalLM

    shape = DUMMY_SHAPES.get("llama-tiny")
    shapes = Registry("dummy shape")
    shapes.register("llama-tiny", dataclasses.replace(shape, config={**shape.config, "tie_word_embeddings": tied}))
    monkeypatch.setattr(dummy, "DUMMY_SHAPES", shapes)
    whole = dummy.write_dummy_model("llama-tiny", tmp_path / "whole", tokenizer_dir=smollm2_dir)
    monkeypatch.setattr(dummy, "MAX_SHARD_BYTES", 1 << 20)  # 1 MiB: the 12.6 MB embedding gets a shard of its own
    sharded = dummy.write_dummy_model("llama-tiny", tmp_path / "sharded", tokenizer_dir=smollm2_dir)
    assert len(list(sharded.glob("model-*-of-*.safetensors"))) >= 2
    assert (sharded / "model.safetensors.index.json").is_file()
    models = [AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32) for folder in (whole, sharded)]
    states = [model.state_dict() for model in models]
    assert states[0].keys() == states[1].keys()
    for name in states[0]:
        assert torch.equal(states[0][name], states[1][name]), name
    head, embedding = states[0]["lm_head.weight"], states[0]["model.embed_tokens.weight"]
    assert torch.equal(head, embedding) == tied
    assert ("lm_head.weight" in every_tensor(whole)) != tied


def test_is_dummy_tells_dummy_models_from_real_ones(tiny_dir, smollm2_dir, tmp_path):
    assert is_dummy("llama-1b") and is_dummy("llama-8b") and is_dummy("llama-tiny")
    assert is_dummy(tiny_dir) and is_dummy(str(tiny_dir))
    assert not is_dummy("smollm2-135m") and not is_dummy(smollm2_dir)
    assert not is_dummy(tmp_path / "missing") and not is_dummy("")


def test_a_dummy_shape_without_the_dummy_format_is_refused():
    message = "llama-1b has no real weights here: pass --load-format dummy (random weights, for cost figures only)"
    with pytest.raises(ConfigError) as caught:
        resolve_model_dir("llama-1b")
    assert caught.value.message == message
    with pytest.raises(ConfigError, match="llama-8b has no real weights here: pass --load-format dummy"):
        load_causal_lm("llama-8b")


def test_the_dummy_format_for_a_name_that_is_not_a_dummy_shape_is_refused():
    with pytest.raises(ConfigError) as caught:
        resolve_model_dir("smollm2-135m", load_format="dummy")
    assert caught.value.message == ("'smollm2-135m' is not a dummy shape: --load-format dummy takes one of "
                                    "llama-1b, llama-8b, llama-tiny")
    with pytest.raises(ConfigError, match="unknown load format 'safetensors': use one of auto, dummy"):
        resolve_model_dir("smollm2-135m", load_format="safetensors")


@pytest.mark.parametrize(("name", "parameters", "tied"), [("llama-1b", 1_235_814_400, True),
                                                           ("llama-8b", 8_030_261_248, False)])
def test_the_big_shapes_have_their_real_models_parameter_counts(name, parameters, tied):
    from transformers import AutoModelForCausalLM

    config = dummy_config(name)
    with torch.device("meta"):  # no memory, no weights
        model = AutoModelForCausalLM.from_config(config)
    assert sum(parameter.numel() for parameter in model.parameters()) == parameters == dummy_parameter_count(name)
    assert config.tie_word_embeddings == tied and config.vocab_size == 128256 and config.num_key_value_heads == 8
    assert config.rope_parameters["rope_theta"] == 500000.0
