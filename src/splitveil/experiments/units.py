"""Finished units of a long experiment, kept so that a run that was stopped can go on where it was (`--resume`).

A unit (one cut of an image sweep, one run of an extraction curve) is kept as JSON under
`$SPLITVEIL_CACHE/sweep-units/`, named by a hash of its kind, its settings, the commit the run started from and the
torch version. Only a clean commit's results are kept: code that differs from every commit is never reused. A resumed
unit's records are marked `"resumed": true`.
"""

from __future__ import annotations

import hashlib
import json
import os
from importlib import metadata
from pathlib import Path


def unit_path(kind: str, settings: dict) -> Path | None:
    """The file of one unit, or None when the run's code is not a clean commit."""
    from splitveil.core.records import run_git_state
    from splitveil.models.loading import cache_root

    state = run_git_state()
    if state.get("git_dirty") is not False or state.get("git_sha") in (None, "unknown"):
        return None
    key = json.dumps({"kind": kind, "settings": settings, "git_sha": state["git_sha"],
                      "torch": metadata.version("torch")}, sort_keys=True, default=str)
    return cache_root() / "sweep-units" / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.json"


def kept_unit(kind: str, settings: dict) -> list[dict] | None:
    """The records an earlier run of the same commit kept for this unit, each marked `"resumed": true`; None when
    there are none (or the file is damaged: the unit then runs again and overwrites it)."""
    path = unit_path(kind, settings)
    if path is None or not path.is_file():
        return None
    try:
        records = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(records, list) or not records or not all(isinstance(r, dict) for r in records):
        return None
    return [{**record, "resumed": True} for record in records]


def keep_unit(kind: str, settings: dict, records: list[dict]) -> None:
    """Keeps a finished unit's records (written whole or not at all); a cache that cannot be written only loses
    `--resume`."""
    path = unit_path(kind, settings)
    if path is None:
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(f".{os.getpid()}.tmp")
        partial.write_text(json.dumps(records))
        partial.replace(path)
    except OSError:
        pass


def kept_or_run(kind: str, settings: dict, run, *, resume: bool) -> dict:
    """A one-record unit (an extraction run): read back with `resume` when kept, else `run()`, its record kept
    without its per-run `environment` (the curves' record carries one)."""
    kept = kept_unit(kind, settings) if resume else None
    if kept is not None:
        return kept[0]
    record = run()
    record.pop("environment", None)
    keep_unit(kind, settings, [record])
    return record
