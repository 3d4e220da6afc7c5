"""Loading only the parts of a model a process runs: the cloud holds the trunk's weights, the device the head's and
the tail's, and the rest of the model stays on the meta device (no memory, no data). Here, above `models/`, because
it needs the plan to know which weights a part holds.

`partial_causal_lm` builds a model with real weights only where a predicate says so (SLIP's dealt device keeps
embeddings and norms and no linear weight); `Checkpoint` reads single tensors of a model's safetensors files by
parameter name (a tied LM head reads the input embedding), so that a matrix can be streamed and dropped.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from splitveil.core.errors import ModelNotFoundError
from splitveil.models.loading import resolve_model_dir
from splitveil.plan.plan import SplitPlan


class Checkpoint:
    """The tensors of a model folder's safetensors files, by the model's parameter names.

    Args:
        model_dir: the folder (model.safetensors, or shards with model.safetensors.index.json).
        model: the model built from its config (meta weights are fine): it names the parameters and says which
            one is the tied LM head.
    """

    def __init__(self, model_dir: Path, model):
        from safetensors import safe_open

        self.model_dir = Path(model_dir)
        index_file = self.model_dir / "model.safetensors.index.json"
        if index_file.is_file():
            self.weight_map = json.loads(index_file.read_text())["weight_map"]
        else:
            with safe_open(str(self.model_dir / "model.safetensors"), "pt") as handle:
                self.weight_map = {key: "model.safetensors" for key in handle.keys()}
        self._input_name = next((n for n, p in model.named_parameters() if p is model.get_input_embeddings().weight), None)
        self._output = getattr(model.get_output_embeddings(), "weight", None)
        self._tied = bool(getattr(model.config, "tie_word_embeddings", False))
        self._model = model

    def source(self, name: str) -> str:
        """The checkpoint's name for parameter `name`."""
        if name not in self.weight_map and self._output is not None and self._tied and name.endswith(".weight") \
                and self._model.get_parameter(name) is self._output:
            name = self._input_name  # tied LM head: stored once, as the input embedding
        if name not in self.weight_map:
            raise ModelNotFoundError(f"{self.model_dir} has no tensor {name!r}; its checkpoint layout is not supported")
        return name

    def read(self, names: list[str], dtype=None) -> dict:
        """{parameter name: tensor in `dtype` (default float32)} for `names`, reading each file once."""
        return dict(self.stream(names, dtype))

    def stream(self, names: list[str], dtype=None):
        """Yields (parameter name, tensor in `dtype`, default float32) for `names`, one tensor at a time (each file
        opened once), so that a caller who places each tensor as it comes never holds a second copy of the weights."""
        import torch
        from safetensors import safe_open

        dtype = dtype or torch.float32
        sources = {name: self.source(name) for name in names}
        for file_name in sorted({self.weight_map[source] for source in sources.values()}):
            with safe_open(str(self.model_dir / file_name), "pt") as handle:
                for name, source in sources.items():
                    if self.weight_map[source] == file_name:
                        yield name, handle.get_tensor(source).to(dtype)


def empty_causal_lm(name_or_path: str, *, load_format: str = "auto", dtype: str = "float32"):
    """(model with every weight on the meta device, its folder): the structure without the data (built in `dtype`,
    so that the buffers it computes at construction are those the model loaded in that dtype has)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from splitveil.models.precision import torch_dtype

    hf_logging.set_verbosity_error()
    weights_dtype = torch_dtype(dtype)
    model_dir = resolve_model_dir(name_or_path, load_format=load_format)
    try:
        config = AutoConfig.from_pretrained(model_dir)
        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(config, dtype=weights_dtype)
    except (OSError, ValueError) as error:
        raise ModelNotFoundError(f"cannot build a causal LM from {model_dir}: {error}") from error
    return model, model_dir


def partial_causal_lm(name_or_path: str, keep: Callable[[str], bool], *, load_format: str = "auto",
                      dtype: str = "float32", device: str = "cpu"):
    """The model with real weights only for the parameters whose names `keep` accepts, in `dtype` on `device`; the
    rest stay on the meta device (no memory). Returns (model, its folder)."""
    from accelerate.utils import set_module_tensor_to_device

    from splitveil.models.precision import move_buffers, torch_device, torch_dtype

    weights_dtype, target = torch_dtype(dtype), torch_device(device)
    model, model_dir = empty_causal_lm(name_or_path, load_format=load_format, dtype=dtype)
    names = [name for name, _ in model.named_parameters(remove_duplicate=False) if keep(name)]
    input_weight = model.get_input_embeddings().weight
    output = model.get_output_embeddings()
    tied = output is not None and output.weight is input_weight
    if tied:  # one tensor under two names: load it once, then tie the head to it again
        input_name = next(n for n, p in model.named_parameters() if p is input_weight)
        output_names = [n for n, p in model.named_parameters(remove_duplicate=False) if p is input_weight and n != input_name]
        if any(n in names for n in output_names) and input_name not in names:
            names.append(input_name)
        names = [n for n in names if n not in output_names]
    for name, tensor in Checkpoint(model_dir, model).stream(names, weights_dtype):
        set_module_tensor_to_device(model, name, target, value=tensor)
    move_buffers(model, target)
    if tied and model.get_input_embeddings().weight.device.type != "meta" and any(map(keep, output_names)):
        output.weight = model.get_input_embeddings().weight
    model.eval()
    return model, model_dir


def load_causal_lm_parts(name_or_path: str, cuts: tuple[int, ...], part_indices: tuple[int, ...], *,
                         load_format: str = "auto", dtype: str = "float32", device: str = "cpu"):
    """Builds the model with real weights only in the given parts of the plan with `cuts` (in `dtype`, on
    `device`); the rest stay on the meta device (no memory, no data). A cloud process uses this to hold only the
    trunk's weights.

    Returns:
        (CausalLMSplittable, SplitPlan): the splittable over the partial model and the validated plan.
    """
    from splitveil.models.causal_lm import CausalLMSplittable

    model, _ = empty_causal_lm(name_or_path, load_format=load_format)
    splittable = CausalLMSplittable(model)
    plan = SplitPlan.from_cuts(tuple(cuts))
    plan.validate(splittable)
    bounds = plan.boundaries(splittable)
    wanted = {id(p) for i in part_indices for m in splittable.modules_for(bounds[i], bounds[i + 1]) for p in m.parameters()}
    names = {name for name, param in model.named_parameters(remove_duplicate=False) if id(param) in wanted}
    model, _ = partial_causal_lm(name_or_path, names.__contains__, load_format=load_format, dtype=dtype, device=device)
    splittable = CausalLMSplittable(model)
    plan.validate(splittable)
    return splittable, plan
