"""Helpers shared by commands: thread set-up, model loading with a spinner, JSON output."""

from __future__ import annotations

import json
import sys
from contextlib import contextmanager

from rich.console import Console

from splitveil.core.errors import ConfigError
from splitveil.core.runtime import set_threads

err_console = Console(stderr=True, highlight=False)


@contextmanager
def status(message: str, *, quiet: bool = False):
    """A spinner on stderr while slow work runs (silent when stderr is not a terminal or `quiet`)."""
    if quiet or not sys.stderr.isatty():
        yield
        return
    with err_console.status(message):
        yield


def setup(threads: int) -> None:
    if threads < 1:
        raise ConfigError(f"--threads must be at least 1, got {threads}")
    set_threads(threads)


def load_model(name: str, *, quiet: bool = False):
    """Loads `name` (registered model or local directory) with its tokenizer, with a spinner."""
    from splitveil.models.loading import load_causal_lm

    with status(f"loading {name} ...", quiet=quiet):
        return load_causal_lm(name)


def print_json(data: dict) -> None:
    sys.stdout.write(json.dumps(data) + "\n")
    sys.stdout.flush()
