"""Library workers: the processes splitveil starts for itself (the TEE partition's accelerator and trusted executor,
the enclave trunk's executor) run `python -m splitveil.serve.worker SPEC`, never a CLI command.

SPEC is one JSON object: `role` (a key of `ROLES`), `ready_fd` (a pipe's write end the parent passed down) and the
role's own fields. The worker reports once on that pipe, as one JSON line: `{"ready": true, ...}` with its address
and whatever the role adds (its measurement), or `{"error": "one line"}` when it cannot start (it then exits 2). With
`"measure_only": true` an executor role reports `{"measurement": HEX}` and exits: what a client expects, computed from
this machine's code and weights. The worker's log (its stdout and stderr) goes to a file the parent names; nothing is
parsed from it.

Parent side: `start_worker(role, spec, log_path=...)` -> (the process, its ready report).
"""

from __future__ import annotations

import importlib
import json
import os
import select
import subprocess
import sys
import time
from pathlib import Path

from splitveil.core.errors import ConfigError, SplitveilError

#: role -> "module:function"; the function takes (spec: dict, ready: callable(dict)) and serves until stopped
ROLES = {
    "accelerator": "splitveil.tee.worker:accelerator",
    "enclave": "splitveil.tee.worker:enclave",
    "enclave-lm": "splitveil.tee.worker:enclave_lm",
}


READY_FD_HELP = ("Write one JSON line (url, and the certificate's fingerprint or the executor's measurement) to this "
                 "inherited file descriptor once listening, then close it: for a supervisor that starts this server.")


def ready_writer(fd: int | None):
    """`report(dict)`: writes the one JSON ready line to `fd` and closes it (nothing when `fd` is None; only once)."""
    done = [fd is None]

    def report(info: dict) -> None:
        if not done[0]:
            done[0] = True
            try:
                os.write(fd, (json.dumps(info) + "\n").encode())
            finally:
                os.close(fd)

    return report


def start_command(arguments: list[str], *, log_path: Path, timeout: float = 600, env: dict | None = None,
                  what: str = "the server"):
    """Starts a splitveil serving command (`python -m splitveil.cli.main ARGUMENTS --ready-fd N`) with its output in
    `log_path`; returns (the process, its ready report) once it reports, or raises ConfigError with the last line of
    its log."""
    return _launch(lambda fd: [sys.executable, "-m", "splitveil.cli.main", *arguments, "--ready-fd", str(fd)],
                   log_path=log_path, timeout=timeout, env=env, what=what)


def start_worker(role: str, spec: dict, *, log_path: Path, timeout: float = 600, env: dict | None = None):
    """Starts the worker `role` with `spec` (JSON-ready), its output in `log_path` (a file: a pipe nobody drains would
    block it); returns (the process, its ready report) once it reports, or raises ConfigError with its error or the
    last line of its log. A measure-only worker has exited (or is exiting) when this returns."""
    if role not in ROLES:
        raise ConfigError(f"unknown worker role {role!r}; known: {', '.join(sorted(ROLES))}")
    return _launch(lambda fd: [sys.executable, "-m", "splitveil.serve.worker",
                               json.dumps({**spec, "role": role, "ready_fd": fd})],
                   log_path=log_path, timeout=timeout, env=env, what=f"the {role} worker")


def _launch(argv, *, log_path: Path, timeout: float, env: dict | None, what: str):
    """Runs `argv(write_end)` with a ready pipe's write end inherited; waits for its one JSON line."""
    read_end, write_end = os.pipe()
    environment = {**(os.environ if env is None else env), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
                   "PYTHONUNBUFFERED": "1"}
    try:
        with open(log_path, "w") as log:
            process = subprocess.Popen(argv(write_end), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                       pass_fds=(write_end,), env=environment)
    finally:
        os.close(write_end)
    try:
        report = _read_report(read_end, process, timeout)
    finally:
        os.close(read_end)
    if report is None or "error" in report:
        if process.poll() is None:
            process.kill()
            process.wait(5)
        raise ConfigError(f"{what} did not start: {report['error'] if report else _last_line(log_path)}")
    return process, report


def _read_report(fd: int, process: subprocess.Popen, timeout: float) -> dict | None:
    """The one JSON line the worker writes on `fd`; None when it closes the pipe (or dies) without one."""
    deadline, data = time.monotonic() + timeout, b""
    while b"\n" not in data:
        left = deadline - time.monotonic()
        if left <= 0:
            return {"error": f"no ready report within {timeout:g} s"}
        readable, _, _ = select.select([fd], [], [], min(left, 1.0))
        if not readable:
            if process.poll() is not None:
                return None
            continue
        chunk = os.read(fd, 65536)
        if not chunk:
            return None
        data += chunk
    try:
        return json.loads(data.split(b"\n", 1)[0])
    except ValueError:
        return {"error": "an unreadable ready report"}


def _last_line(path: Path) -> str:
    try:
        lines = Path(path).read_text(errors="replace").strip().splitlines()
    except OSError:
        lines = []
    return lines[-1] if lines else "no output"


def main(argv: list[str]) -> int:
    """The worker process: runs the role of the spec in argv[0], reporting on its ready pipe."""
    spec = json.loads(argv[0])
    ready = ready_writer(spec.pop("ready_fd"))
    try:
        module, function = ROLES[spec.pop("role")].split(":")
        getattr(importlib.import_module(module), function)(spec, ready)
        return 0
    except SplitveilError as error:
        print(f"splitveil worker: error: {error}", file=sys.stderr, flush=True)
        ready({"error": str(error)})
        return 2
    finally:
        ready({"error": "the worker ended before it was ready"})  # closes the pipe if nothing was reported


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
