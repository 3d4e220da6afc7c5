"""Loading only the parts of a model a process runs: the cloud holds the trunk's weights, the device the head's and
the tail's, and the rest of the model stays on the meta device (no memory, no data). Here, above `models/`, because
it needs the plan to know which weights a part holds."""

from __future__ import annotations

from splitveil.core.errors import ModelNotFoundError
from splitveil.models.loading import resolve_model_dir
from splitveil.plan.plan import SplitPlan


def load_causal_lm_parts(name_or_path: str, cuts: tuple[int, ...], part_indices: tuple[int, ...]):
    """Builds the model with real weights only in the given parts of the plan with `cuts`; the rest stay on the
    meta device (no memory, no data). A cloud process uses this to hold only the trunk's weights.

    Returns:
        (CausalLMSplittable, SplitPlan): the splittable over the partial model and the validated plan.
    """
    import json as json_module

    import torch
    from accelerate import init_empty_weights
    from accelerate.utils import set_module_tensor_to_device
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from splitveil.models.causal_lm import CausalLMSplittable

    hf_logging.set_verbosity_error()
    model_dir = resolve_model_dir(name_or_path)
    try:
        config = AutoConfig.from_pretrained(model_dir)
        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    except (OSError, ValueError) as error:
        raise ModelNotFoundError(f"cannot build a causal LM from {model_dir}: {error}") from error
    splittable = CausalLMSplittable(model)
    plan = SplitPlan.from_cuts(tuple(cuts))
    plan.validate(splittable)
    bounds = plan.boundaries(splittable)
    wanted = {id(p) for i in part_indices for m in splittable.modules_for(bounds[i], bounds[i + 1]) for p in m.parameters()}
    names = [name for name, param in model.named_parameters(remove_duplicate=False) if id(param) in wanted]

    index_file = model_dir / "model.safetensors.index.json"
    if index_file.is_file():
        weight_map = json_module.loads(index_file.read_text())["weight_map"]
    else:
        with safe_open(str(model_dir / "model.safetensors"), "pt") as handle:
            weight_map = {key: "model.safetensors" for key in handle.keys()}
    input_name = next((n for n, p in model.named_parameters() if p is model.get_input_embeddings().weight), None)
    output_weight = getattr(model.get_output_embeddings(), "weight", None)
    sources: dict[str, str] = {}
    for name in names:
        source = name
        if source not in weight_map and output_weight is not None and name.endswith(".weight") \
                and model.get_parameter(name) is output_weight and getattr(config, "tie_word_embeddings", False):
            source = input_name  # tied LM head: stored once, as the input embedding
        if source not in weight_map:
            raise ModelNotFoundError(f"{model_dir} has no tensor {name!r}; its checkpoint layout is not supported")
        sources[name] = source
    for file_name in sorted({weight_map[source] for source in sources.values()}):
        with safe_open(str(model_dir / file_name), "pt") as handle:
            for name, source in sources.items():
                if weight_map[source] == file_name:
                    set_module_tensor_to_device(model, name, "cpu", value=handle.get_tensor(source).to(torch.float32))
    model.eval()
    return splittable, plan
