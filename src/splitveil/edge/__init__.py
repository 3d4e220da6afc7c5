"""The device side: split generation that behaves like transformers' `generate`."""

from splitveil.edge.generate import GenerationConfig, GenerationResult, SplitCausalLM

__all__ = ["GenerationConfig", "GenerationResult", "SplitCausalLM"]
