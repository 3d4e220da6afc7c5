"""Where a part computes and in which precision: `--device cpu|cuda|cuda:N|auto` and `--dtype float32|bfloat16|float16`.

A process holds its parts' weights in one dtype on one device; everything that crosses a cut is converted there:
the wire codecs encode whatever dtype a part produced (a float32 wire carries bf16 and fp16 values exactly), and a
part casts what it receives to its own dtype and device (`CausalLMPart.forward`). So the device may keep its head
and tail in float32 on a CPU while the cloud holds the trunk in bf16 on a GPU; and a split whose parts all share one
dtype gives the tokens of the unsplit model in that dtype (the values crossing the cut are restored bit for bit).

SLIP's ring arithmetic is exact integer arithmetic and stays in int64 / float64 limbs whatever `--dtype` says.
"""

from __future__ import annotations

from splitveil.core.errors import ConfigError

#: the names `--dtype` takes, in the order the help lists them
DTYPE_NAMES = ("float32", "bfloat16", "float16")
DEVICE_HELP = ("Where this process computes: cpu (default), cuda, cuda:N, or auto (cuda when a GPU is visible, "
               "else cpu).")
DTYPE_HELP = ("Precision of the weights this process holds and of what they compute: float32 (default, exact against "
              "the float32 model), bfloat16 or float16 (exact against the unsplit model in the same dtype). The wire "
              "converts at each cut; --wire bf16 carries bfloat16 states exactly in half the bytes.")


def torch_dtype(name: str):
    """The torch dtype `name` names (float32, bfloat16, float16; also fp32, bf16, fp16); one-line ConfigError else."""
    import torch

    aliases = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16", "float": "float32"}
    key = aliases.get(str(name).lower(), str(name).lower())
    if key not in DTYPE_NAMES:
        raise ConfigError(f"unknown dtype {name!r}: use one of {', '.join(DTYPE_NAMES)}")
    return getattr(torch, key)


def dtype_name(dtype) -> str:
    """'float32', 'bfloat16' or 'float16' for a torch dtype (what records and server info report)."""
    return str(dtype).removeprefix("torch.")


def torch_device(name: str | None):
    """The torch device `name` names: cpu, cuda, cuda:N, or auto (the first GPU when CUDA sees one, else the CPU).

    Raises a one-line ConfigError for anything else, and for a CUDA device this machine does not have (rather than
    failing later, inside the first forward)."""
    import torch

    text = (name or "cpu").strip().lower()
    if text == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise ConfigError(f"unknown device {name!r}: use cpu, cuda, cuda:N or auto") from None
    if device.type == "cpu":
        return torch.device("cpu")
    if device.type != "cuda":
        raise ConfigError(f"unsupported device {name!r}: use cpu, cuda, cuda:N or auto")
    if not torch.cuda.is_available():
        raise ConfigError(f"--device {text}: this machine has no CUDA GPU (torch sees none); use --device cpu or auto")
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"--device {text}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def module_placement(modules) -> tuple:
    """(device, dtype) of the first floating-point weight of `modules` that holds data (meta weights skipped), or
    (cpu, float32) when none does. What a part casts its inputs to."""
    import torch

    for module in modules:
        for parameter in module.parameters():
            if parameter.device.type != "meta" and parameter.is_floating_point():
                return parameter.device, parameter.dtype
    return torch.device("cpu"), torch.float32


def move_buffers(model, device) -> None:
    """Moves every buffer that holds data (rotary frequencies, ...) to `device`; meta buffers stay. The loaders place
    weights one by one, so the buffers a model computes at construction would otherwise stay on the CPU."""
    for module in model.modules():
        for name, buffer in list(module._buffers.items()):
            if buffer is not None and buffer.device.type != "meta" and buffer.device != device:
                module._buffers[name] = buffer.to(device)
