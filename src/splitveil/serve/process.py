"""Starting `splitveil serve` as a child process on 127.0.0.1 (the demo, tests and benchmarks use it)."""

from __future__ import annotations

import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from splitveil.serve.auth import new_token, write_token
from splitveil.transport.tls import fingerprint_pem, generate_self_signed


def stop_process(process: subprocess.Popen, grace: float = 10.0) -> None:
    """Stop a child: SIGTERM, then SIGKILL when it has not exited within `grace` seconds (the only way our children
    are stopped, so each gets the same chance to close its sessions and logs)."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(grace)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class ChildServer:
    """A splitveil server as a child process on 127.0.0.1 with a fresh self-signed certificate and a fresh token.
    Subclasses give either a library worker (`_worker_spec`: a `serve.worker` role and its spec) or a user-facing
    serving command (`_command_args`: `ServerProcess`, the SLIP executor's `ExecutorProcess`, run as users run them);
    either reports readiness as one JSON line on a pipe (`--ready-fd`), kept as `self.report`."""

    startup_timeout: float
    prefix = "splitveil-serve-"  # of the temporary folder
    log_name = "server.log"
    what = "the server"  # in the error when it does not start

    def _command_args(self) -> tuple[list[str], list[str]]:
        """(the command and arguments before the address, certificate and token flags; arguments after them)."""
        raise NotImplementedError

    def _worker_spec(self) -> tuple[str, dict] | None:
        """(the `serve.worker` role, its spec without the address, certificate and token), or None to run
        `_command_args` instead."""
        return None

    def __enter__(self):
        self._folder = tempfile.TemporaryDirectory(prefix=self.prefix)
        folder = Path(self._folder.name)
        self.cert, self.key, self.token_file = folder / "cert.pem", folder / "key.pem", folder / "token"
        generate_self_signed(self.cert, self.key)
        self.token = new_token()
        write_token(self.token_file, self.token)
        self.fingerprint = fingerprint_pem(self.cert)
        self.port = free_port()
        self.url = f"wss://127.0.0.1:{self.port}"
        self.log_path = folder / self.log_name
        self.started = time.perf_counter()
        common = {"host": "127.0.0.1", "port": self.port, "tls_cert": str(self.cert), "tls_key": str(self.key),
                  "token_file": str(self.token_file)}
        worker = self._worker_spec()
        try:
            if worker is not None:
                from splitveil.serve.worker import start_worker

                role, spec = worker
                self.process, self.report = start_worker(role, {**spec, **common}, log_path=self.log_path,
                                                         timeout=self.startup_timeout)
            else:
                from splitveil.serve.worker import start_command

                head, tail = self._command_args()
                flags = [arg for key, value in common.items() for arg in (f"--{key.replace('_', '-')}", str(value))]
                self.process, self.report = start_command([*head, *flags, *tail], log_path=self.log_path,
                                                          timeout=self.startup_timeout, what=self.what)
        except BaseException:
            self._folder.cleanup()
            raise
        self.startup_seconds = time.perf_counter() - self.started
        return self

    stop_grace = 10.0  # seconds between SIGTERM and SIGKILL

    def __exit__(self, *exc) -> None:
        stop_process(self.process, self.stop_grace)
        self._folder.cleanup()


@dataclass
class ServerProcess(ChildServer):
    """A `splitveil serve` child on 127.0.0.1 with a fresh self-signed certificate and a fresh token."""

    model: str
    cuts: tuple[int, ...]
    extra_args: list[str] = field(default_factory=list)
    startup_timeout: float = 180.0

    def _command_args(self) -> tuple[list[str], list[str]]:
        head = ["serve", "--model", self.model, "--split", ",".join(map(str, self.cuts))]
        return head, list(self.extra_args)

    def __enter__(self) -> "ServerProcess":
        if "--ray" in self.extra_args:
            # stopping Ray (raylets, GCS, every replica) takes seconds, and more than 10 on a loaded 2-core machine
            self.stop_grace = 60.0
        return super().__enter__()
