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
    """A splitveil serving command as a child process on 127.0.0.1 with a fresh self-signed certificate and a
    fresh token; waits until its log says it listens. Subclasses give the command (`ServerProcess`, the SLIP
    executor's `ExecutorProcess`)."""

    startup_timeout: float
    prefix = "splitveil-serve-"  # of the temporary folder
    log_name = "server.log"
    what = "the server"  # in the error when it does not start

    def _command_args(self) -> tuple[list[str], list[str], str]:
        """(arguments before --host, arguments after --token-file, the log line that says it listens)."""
        raise NotImplementedError

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
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        head, tail, listening = self._command_args()
        command = [sys.executable, "-m", "splitveil.cli.main", *head, "--host", "127.0.0.1", "--port", str(self.port),
                   "--tls-cert", str(self.cert), "--tls-key", str(self.key), "--token-file", str(self.token_file),
                   *tail]
        self.log_path = folder / self.log_name
        self._log = open(self.log_path, "w")
        self.started = time.perf_counter()
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
