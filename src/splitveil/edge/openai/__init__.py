"""The OpenAI-compatible HTTP front of the device (`splitveil edge`): chat and text completions through the split."""

from splitveil.edge.openai.app import EdgeSettings, build_app

__all__ = ["EdgeSettings", "build_app"]
