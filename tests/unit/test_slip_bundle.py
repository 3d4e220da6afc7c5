"""SLIP's weights deployment gives the untrusted executor the residual only: `slip export-bundle` writes it to a
folder of its own, and `slip serve --bundle` refuses any folder that holds more (the owner's cache, with the
decomposition from which W_secure = U_k S_k V_k^T is formed)."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from splitveil.cli.main import main
from splitveil.core.errors import ConfigError
from splitveil.models.tiny import tiny_causal_lm
from splitveil.protect.slip.bundle import BUNDLE_FILES, check_residual_only
from splitveil.protect.slip.runtime import export_bundle
from splitveil.protect.slip.executor import build_executor_service
from splitveil.protect.slip.runtime import protect_registered, slip_cache_dir
from splitveil.protect.slip.trusted import SlipConfig

RANK = 2
CONFIG = SlipConfig(rank=RANK, include_head=True)


@pytest.fixture
def tiny_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("SPLITVEIL_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "tiny-llama"
    tiny_causal_lm("llama", weight_scale=1.0).save_pretrained(folder)
    return folder


def every_tensor(folder):
    for path in sorted(folder.rglob("*")):
        if path.suffix == ".safetensors":
            with safe_open(str(path), "pt") as tensors:
                for key in tensors.keys():
                    yield path.name, key, tensors.get_tensor(key)


def test_the_exported_bundle_holds_no_tensor_from_which_w_secure_can_be_formed(tiny_dir, tmp_path):
    manifest = export_bundle(str(tiny_dir), CONFIG, tmp_path / "bundle")
    out = tmp_path / "bundle"
    assert sorted(p.name for p in out.rglob("*")) == sorted(BUNDLE_FILES)
    slip, _, _, _ = protect_registered(str(tiny_dir), CONFIG, with_tokenizer=False)
    residuals = slip.residual_weights()
    found = list(every_tensor(out))
    assert len(found) == len(manifest["groups"]) == len(slip.groups)
    for _, key, tensor in found:
        assert tensor.dim() == 2 and min(tensor.shape) > RANK  # no factor [m, k] or [k, n]
        assert torch.equal(tensor, residuals[int(key.split(".")[1])])  # W - W_secure, nothing else
    assert all(p.rank == RANK for parts in slip.decompositions.values() for p in parts)


def test_serving_the_owners_cache_folder_is_refused(tiny_dir, tmp_path, capsys):
    export_bundle(str(tiny_dir), CONFIG, tmp_path / "bundle")
    cache = slip_cache_dir(str(tiny_dir), CONFIG)
    assert any(name.startswith("left.") for _, name, _ in every_tensor(cache))  # the factors live there
    with pytest.raises(ConfigError, match="decomposition"):
        build_executor_service(cache, mode="fixed")
    code = main(["slip", "serve", "--bundle", str(cache), "--mode", "fixed", "--host", "127.0.0.1", "--port", "0",
                 "--insecure"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "decomposition" in err and "export-bundle" in err


def test_what_the_child_executor_is_given_is_residual_only(tiny_dir):
    _, _, bundle, _ = protect_registered(str(tiny_dir), CONFIG, with_tokenizer=False)
    check_residual_only(bundle)  # what ExecutorProcess serves in slip generate, the demo and slip eval
    assert (bundle.parent / "decomposition.safetensors").is_file()


def test_a_smuggled_factor_or_file_is_refused(tiny_dir, tmp_path):
    out = tmp_path / "bundle"
    export_bundle(str(tiny_dir), CONFIG, out)
    tensors = load_file(str(out / "residual.safetensors"))
    save_file({**tensors, "group.0": tensors["group.0"][:, :RANK].contiguous()}, str(out / "residual.safetensors"))
    with pytest.raises(ConfigError, match="low-rank factor"):
        check_residual_only(out)
    save_file({**tensors, "left.0.0": torch.zeros(96, RANK)}, str(out / "residual.safetensors"))
    with pytest.raises(ConfigError, match="left.0.0"):
        check_residual_only(out)
    save_file(tensors, str(out / "residual.safetensors"))
    check_residual_only(out)
    (out / "notes.txt").write_text("hello")
    with pytest.raises(ConfigError, match="notes.txt"):
        check_residual_only(out)


def test_export_bundle_cli(tiny_dir, tmp_path, capsys):
    out = tmp_path / "bundle"
    assert main(["slip", "export-bundle", "--model", str(tiny_dir), "--out", str(out), "--rank", str(RANK), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["files"] == sorted(BUNDLE_FILES) and summary["groups"] > 0
    check_residual_only(out)
    assert main(["slip", "export-bundle", "--model", str(tiny_dir), "--out", str(out), "--rank", str(RANK)]) == 0  # again
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("x")
    assert main(["slip", "export-bundle", "--model", str(tiny_dir), "--out", str(tmp_path / "busy"), "--rank", "2"]) == 2
    assert "not an empty folder" in capsys.readouterr().err
