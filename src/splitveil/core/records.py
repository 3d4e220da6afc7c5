"""What every result records about where and how it was produced."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

from splitveil.core.errors import ConfigError


RUN_STATE_VARIABLE = "SPLITVEIL_RUN_GIT_STATE"  # the git state stamped at a run's start, inherited by workers


CODE_ROOT = Path(__file__).resolve().parent  # the git state of the checkout this code was imported from


def _git(*args: str, root: Path = CODE_ROOT) -> subprocess.CompletedProcess | None:
    try:
        out = subprocess.run(["git", *args], capture_output=True, timeout=10, cwd=root)
    except (OSError, subprocess.SubprocessError):
        return None
    return out if out.returncode == 0 else None


def git_sha(root: Path = CODE_ROOT) -> str:
    out = _git("rev-parse", "HEAD", root=root)
    return out.stdout.decode().strip() if out is not None and out.stdout.strip() else "unknown"


def git_state(root: Path = CODE_ROOT) -> dict:
    """Which code is running: the commit, whether tracked files differ from it, and a hash of the difference.

    `git_dirty` follows `git status --porcelain --untracked-files=no` (untracked files do not change the code that
    ran unless imported, and results written by a run are untracked until committed); `git_diff_sha256` is the
    SHA-256 of `git diff HEAD` when dirty, else None. Outside a git checkout all three are unknown (None).
    """
    sha = git_sha(root)
    status = _git("status", "--porcelain", "--untracked-files=no", root=root)
    if sha == "unknown" or status is None:
        return {"git_sha": sha, "git_dirty": None, "git_diff_sha256": None}
    dirty = bool(status.stdout.strip())
    diff = _git("diff", "HEAD", root=root) if dirty else None
    digest = hashlib.sha256(diff.stdout).hexdigest() if diff is not None else None
    return {"git_sha": sha, "git_dirty": dirty, "git_diff_sha256": digest}


def stamp_run(*, allow_dirty: bool, root: Path = CODE_ROOT) -> dict:
    """Takes the git state at the start of a run whose results are published (benchmarks, sweeps).

    Refuses a dirty tree unless `allow_dirty`, which the records then carry. The state is kept in the environment
    so that every record of the run, worker processes included, is stamped with the code the run started from.
    """
    state = git_state(root)
    if state["git_dirty"] and not allow_dirty:
        raise ConfigError("the working tree has uncommitted changes, so the results could not be tied to a commit: "
                          "commit first, or pass --allow-dirty (the records then say so)")
    state["allow_dirty"] = bool(allow_dirty)
    os.environ[RUN_STATE_VARIABLE] = json.dumps(state)
    return state


def run_git_state() -> dict:
    """The state stamped at this run's start (`stamp_run`), or the state now when no run was stamped."""
    stamped = os.environ.get(RUN_STATE_VARIABLE)
    if stamped:
        try:
            return json.loads(stamped)
        except ValueError:
            pass
    return {**git_state(), "allow_dirty": False}


def environment() -> dict:
    """Library versions, machine, thread settings and the code's git state: enough to tell where a figure came from.

    Call it when a run starts: the git state is the one stamped by `stamp_run` (else read now).
    """
    import torch

    versions = {}
    for name in ("splitveil", "torch", "transformers", "numpy"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {
        **run_git_state(),
        "versions": versions,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def write_json(path: Path, data: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path


def write_records(records: list[dict], out_dir, stem: str) -> tuple[Path, Path]:
    """Writes `records` as `<out_dir>/<stem>.jsonl` (the start of every experiment report); returns (out_dir, that
    file). No records, or a folder that cannot be made, is a ConfigError."""
    if not records:
        raise ConfigError("no records to report")
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ConfigError(f"cannot write to --out {out_dir}: {error.strerror or error}") from None
    jsonl = out_dir / f"{stem}.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in records))
    return out_dir, jsonl


def save_figure(fig, path: Path) -> Path:
    """Writes a matplotlib figure as a PNG (folders made as needed) and closes it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
