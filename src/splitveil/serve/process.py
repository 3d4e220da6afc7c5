"""Starting `splitveil serve` as a child process on 127.0.0.1 (the demo, tests and benchmarks use it)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from splitveil.core.errors import TransportError
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
    Subclasses give either a library worker (`_worker_spec`: a `serve.worker` role and its spec; it reports readiness
    on a pipe, and its report is `self.report`) or a user-facing serving command (`_command_args`, whose log line says
    it listens: `ServerProcess`, the SLIP executor's `ExecutorProcess`)."""

    startup_timeout: float
    prefix = "splitveil-serve-"  # of the temporary folder
    log_name = "server.log"
    what = "the server"  # in the error when it does not start

    def _command_args(self) -> tuple[list[str], list[str], str]:
        """(arguments before --host, arguments after --token-file, the log line that says it listens)."""
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
        worker = self._worker_spec()
        if worker is not None:
            from splitveil.serve.worker import start_worker

            role, spec = worker
            try:
                self.process, self.report = start_worker(role, {
                    **spec, "host": "127.0.0.1", "port": self.port, "tls_cert": str(self.cert), "tls_key": str(self.key),
                    "token_file": str(self.token_file)}, log_path=self.log_path, timeout=self.startup_timeout)
            except BaseException:
                self._folder.cleanup()
                raise
            self._log = None
            self.startup_seconds = time.perf_counter() - self.started
            return self
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        head, tail, listening = self._command_args()
        command = [sys.executable, "-m", "splitveil.cli.main", *head, "--host", "127.0.0.1", "--port", str(self.port),
                   "--tls-cert", str(self.cert), "--tls-key", str(self.key), "--token-file", str(self.token_file),
                   *tail]
        self._log = open(self.log_path, "w")
        self.process = subprocess.Popen(command, stdout=self._log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + self.startup_timeout
        while listening not in self.log_path.read_text():
            if self.process.poll() is not None or time.monotonic() > deadline:
                tail_line = self.log_path.read_text().strip().splitlines()[-1:] or ["no output"]
                self.__exit__(None, None, None)
                raise TransportError(f"{self.what} did not start: {tail_line[0]}")
            time.sleep(0.1)
        self.startup_seconds = time.perf_counter() - self.started
        return self

    stop_grace = 10.0  # seconds between SIGTERM and SIGKILL

    def __exit__(self, *exc) -> None:
        stop_process(self.process, self.stop_grace)
        if self._log is not None:
            self._log.close()
        self._folder.cleanup()


@dataclass
class ServerProcess(ChildServer):
    """A `splitveil serve` child on 127.0.0.1 with a fresh self-signed certificate and a fresh token."""

    model: str
    cuts: tuple[int, ...]
    extra_args: list[str] = field(default_factory=list)
    startup_timeout: float = 180.0

    def _command_args(self) -> tuple[list[str], list[str], str]:
        head = ["serve", "--model", self.model, "--split", ",".join(map(str, self.cuts))]
        return head, list(self.extra_args), "splitveil serve: listening on"

    def __enter__(self) -> "ServerProcess":
        return super().__enter__()
