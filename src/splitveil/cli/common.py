"""Helpers shared by commands: thread set-up, model loading with a spinner, JSON output."""

from __future__ import annotations

import json
import re
import sys
import time
from contextlib import contextmanager

import typer
from rich.console import Console

from splitveil.core.errors import ConfigError
from splitveil.core.runtime import set_threads
from splitveil.models.loading import LoadFormat

err_console = Console(stderr=True, highlight=False)


@contextmanager
def status(message: str, *, quiet: bool = False):
    """A spinner on stderr while slow work runs (silent when stderr is not a terminal or `quiet`)."""
    if quiet or not sys.stderr.isatty():
        yield
        return
    with err_console.status(message):
        yield


class _LogLines:
    """`progress`'s stand-in for a spinner where stderr is not a terminal: each new message is one line with the
    time of day, so that a long run started in the background (output to a log file) says what it is doing. A
    counter that only advances ("splitting 12/211 matrices") gets a line at most every `every` seconds."""

    def __init__(self, message: str, every: float = 10.0):
        self.last, self.shape, self.printed, self.every = None, None, 0.0, every
        self.update(message)

    def update(self, message: str) -> None:
        shape = re.sub(r"\d+", "#", message)
        now = time.monotonic()
        if message == self.last or (shape == self.shape and now - self.printed < self.every):
            return
        self.last, self.shape, self.printed = message, shape, now
        print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


@contextmanager
def progress(message: str):
    """What a long run (hours: sweeps, calibrations, extraction curves) is doing, on stderr: a spinner on a terminal
    (`.update(text)` replaces its text), and otherwise a time-stamped line per new message, where a spinner would
    print nothing and a log would stay empty for hours."""
    if sys.stderr.isatty():
        with err_console.status(message) as spinner:
            yield spinner
    else:
        yield _LogLines(message)


def setup(threads: int) -> None:
    if threads < 1:
        raise ConfigError(f"--threads must be at least 1, got {threads}")
    set_threads(threads)


ALLOW_DIRTY_HELP = ("Run even though tracked files differ from the last commit (the records then say so); without it "
                    "a command that writes published results refuses, so every figure can be tied to a commit.")


def allow_dirty_option():
    """The `--allow-dirty` option of every command that writes published results (benchmarks, sweeps)."""
    return typer.Option(False, "--allow-dirty", help=ALLOW_DIRTY_HELP)


RESUME_HELP = ("Go on where an earlier run of the same commit and settings stopped: the units it finished "
               "(kept under the splitveil cache, clean commits only) are read back, their records marked resumed, "
               "and only the rest run. Without it every unit runs again.")


def resume_option():
    """The `--resume` option of the long runs (`attack image-sweep`, `partition`, `attack weights-curves`)."""
    return typer.Option(False, "--resume", help=RESUME_HELP)


def stamp_run(allow_dirty: bool) -> dict:
    """Ties the run's records to the code: refuses a dirty tree unless `allow_dirty` (see core.records)."""
    from splitveil.core.records import stamp_run as stamp

    return stamp(allow_dirty=allow_dirty)


def int_list(text: str, option: str, wanted: str) -> list[int]:
    """Comma-separated whole numbers given to `option`; one line naming the option and what to give when not.

    Args:
        wanted: what the numbers are, with an example, e.g. "cut indices like 1,2,4".
    """
    try:
        return [int(item) for item in text.split(",") if item.strip()]
    except ValueError:
        raise ConfigError(f"bad {option} {text!r}: give {wanted}") from None


def name_list(text: str) -> list[str]:
    """Comma-separated names given to an option (`inverse,rmle`), blanks dropped; the caller checks them."""
    return [item.strip() for item in text.split(",") if item.strip()]


def result_stem(kind: str, model: str, cuts, threads: int) -> str:
    """The file name stem of a benchmark's JSON and PNG: what ran, on which split, with how many torch threads."""
    from pathlib import Path

    split = f"_split-{'-'.join(map(str, cuts))}" if cuts else ""  # (a target that takes no split: SLIP's executor)
    return f"{kind}_{Path(model).name}{split}_cpu-{threads}thread"


LOAD_FORMAT_HELP = ("Where the weights come from. auto: the real model (a shipped model or a local directory). dummy: "
                    "random weights of a registered shape (llama-1b, llama-8b), generated once and cached, so cost "
                    "benchmarks can run at sizes where offloading matters; for cost benchmarks only, never for privacy "
                    "figures.")


def load_format_option():
    """The `--load-format auto|dummy` option of every command that loads a model by name.

    Use it as `load_format: LoadFormat = load_format_option()` and pass the value on to `load_model` (or to
    `splitveil.models.loading`'s `load_format=` arguments).
    """
    return typer.Option(LoadFormat.AUTO, "--load-format", case_sensitive=False, help=LOAD_FORMAT_HELP)


def device_option():
    """`--device cpu|cuda|cuda:N|auto` of every command that runs a model part (`models/precision.py`)."""
    from splitveil.models.precision import DEVICE_HELP

    return typer.Option("cpu", "--device", help=DEVICE_HELP)


def dtype_option():
    """`--dtype float32|bfloat16|float16` of every command that runs a model part (`models/precision.py`)."""
    from splitveil.models.precision import DTYPE_HELP

    return typer.Option("float32", "--dtype", help=DTYPE_HELP)


def check_precision(device: str, dtype: str) -> None:
    """Validates --device and --dtype before anything loads (one-line ConfigError, exit 2)."""
    from splitveil.models.precision import torch_device, torch_dtype

    torch_dtype(dtype)
    torch_device(device)


def load_model(name: str, *, quiet: bool = False, load_format: str | LoadFormat = LoadFormat.AUTO,
               dtype: str = "float32", device: str = "cpu"):
    """Loads `name` (registered model, local directory or, with `load_format="dummy"`, a dummy shape generated on
    first use) with its tokenizer, in `dtype` on `device`, with a spinner."""
    from splitveil.models.loading import load_causal_lm

    with status(f"loading {name} ...", quiet=quiet):
        return load_causal_lm(name, load_format=load_format, dtype=dtype, device=device)


def print_json(data: dict) -> None:
    sys.stdout.write(json.dumps(data) + "\n")
    sys.stdout.flush()


def connect_server(server: str, *, model: str, plan, token_file, ca, pin, wire: str, insecure: bool,
                   attest: str | None, attest_key, quiet: bool = False, load_format: str = "auto",
                   dtype: str = "float32", device: str = "cpu"):
    """The client side of a split served at `server` (`generate --server`, `edge --server`): reads the token, and
    with `--attest` computes (or takes the pinned) expected measurement before anything is sent."""
    from splitveil.edge.generate import SplitCausalLM
    from splitveil.serve.auth import read_token
    from splitveil.serve.build import default_token_file

    token = read_token(token_file or default_token_file())
    attestation = expected = None
    if attest is not None:
        from splitveil.tee.enclave_lm import client_attestation

        with status("computing the expected measurement from this machine's code and weights ...", quiet=quiet):
            attestation, expected = client_attestation(attest, attest_key, model, plan.cuts if plan else None)
    with status(f"connecting to {server} ...", quiet=quiet):
        return SplitCausalLM.connect(server, token=token, model=model, plan=plan, ca_file=ca, pin_sha256=pin,
                                     wire=wire, insecure=insecure, attestation=attestation,
                                     expected_measurement=expected, load_format=load_format, dtype=dtype,
                                     device=device)


def attest_option():
    """`--attest [MEASUREMENT]` of the clients of `serve --enclave` (`generate`, `edge`)."""
    return typer.Option(None, "--attest", metavar="[MEASUREMENT]", help="The server is a trusted executor (`serve "
                        "--enclave`): attest it and seal every frame to it. Alone, the expected measurement is "
                        "computed here from this machine's code and weights (needs --split); with 64 hex digits, that "
                        "value is pinned. A server that does not prove it gets nothing.")


def attest_key_option():
    """`--attest-key FILE`, the attestation verification key of `--attest`."""
    return typer.Option(None, "--attest-key", help="With --attest: the attestation verification key (a public key "
                        "file, or the SIMULATED key file of `serve --enclave --attestation-key`, of which only the "
                        "public half is used).")
