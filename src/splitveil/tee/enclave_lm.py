"""The Λ-split trunk in the trusted executor: `splitveil serve --enclave`.

The operator's process (`serve --enclave`) never holds the trunk or a hidden state in clear. It starts the trusted
executor as a child process (`splitveil partition enclave-lm`: the standard `build_cloud_service` trunk inside a
`SealedFrameService`, SIMULATED attestation) and relays TCP bytes between clients and it, optionally recording every
byte it relays (`--observe FILE`: what the operator sees). The device attests the executor and wraps its transport in
a `SealedTransport`, so `SplitCausalLM` runs unchanged: every frame of the Λ-split protocol (OPEN, hidden states,
CLOSE) travels AES-GCM-sealed inside a frame of the executor's protocol.

The hop between the relay and the executor is plain WebSocket on 127.0.0.1 on purpose: the operator then sees the
executor's protocol in clear, and everything the Λ-split sends is ciphertext inside it (with TLS to the executor it
would see TLS records instead; the sealed channel is what keeps the states from the operator either way).
"""

from __future__ import annotations

import asyncio
import struct
import time
from pathlib import Path

from splitveil.core.errors import ConfigError

OBSERVED_RECORD = struct.Struct("<cI")  # direction (b">" client to executor, b"<" back), length; then the bytes


def trunk_state(splittable, cuts: tuple[int, ...]) -> dict:
    """The weights the executor holds for the trunk of a Λ-split (layers [cuts[0], cuts[1])), named by layer."""
    start, end = splittable.boundary(cuts[0]), splittable.boundary(cuts[1])
    return {f"{i}.{name}": tensor for i, module in enumerate(splittable.modules_for(start, end))
            for name, tensor in module.state_dict().items()}


def trunk_measurement(splittable, model: str, cuts: tuple[int, ...]) -> bytes:
    from splitveil.tee.channel import measure

    return measure(trunk_state(splittable, cuts), label=f"{model} trunk {cuts[0]}..{cuts[1]}")


def build_enclave_lm_service(model: str, cuts: tuple[int, ...], *, attestation, **limits):
    """The trusted executor of an LLM trunk: `build_cloud_service` (the trunk's weights only) inside a
    `SealedFrameService`; returns (service, measurement)."""
    from splitveil.serve.build import build_cloud_service
    from splitveil.tee.executor import SealedFrameService

    if len(cuts) != 2:
        raise ConfigError("--enclave serves the trunk of a Λ-split: give --split A,B")
    inner = build_cloud_service(model, cuts, **limits)
    measurement = trunk_measurement(inner.parts[1].owner, model, cuts)  # the weights it loaded (the rest is meta)
    info = {"model": model, "cuts": list(cuts), "role": "enclave-trunk"}
    return SealedFrameService(inner, attestation=attestation, measurement=measurement, info=info,
                              max_frame_bytes=inner.max_frame_bytes), measurement


async def relay(listen_host: str, listen_port: int, target_port: int, *, observe: Path | None = None, ready=None,
                stop: asyncio.Event | None = None) -> None:
    """Forwards TCP connections on (listen_host, listen_port) to 127.0.0.1:target_port, byte for byte; with `observe`,
    appends every chunk relayed to that file (direction, length, bytes)."""
    log = open(observe, "ab") if observe is not None else None

    async def pipe(reader, writer, direction: bytes) -> None:
        try:
            while data := await reader.read(1 << 16):
                if log is not None:
                    log.write(OBSERVED_RECORD.pack(direction, len(data)) + data)
                    log.flush()
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    async def handle(client_reader, client_writer) -> None:
        try:
            executor_reader, executor_writer = await asyncio.open_connection("127.0.0.1", target_port)
        except OSError:
            client_writer.close()
            return
        await asyncio.gather(pipe(client_reader, executor_writer, b">"), pipe(executor_reader, client_writer, b"<"))

    server = await asyncio.start_server(handle, listen_host, listen_port)
    if ready is not None:
        ready(server.sockets[0].getsockname()[1])
    async with server:
        await (stop or asyncio.Event()).wait()
    if log is not None:
        log.close()


def read_observed(path: Path) -> dict[str, bytes]:
    """The relayed bytes of an `--observe` file, concatenated per direction ("up": to the executor, "down")."""
    data, streams, offset = Path(path).read_bytes(), {"up": bytearray(), "down": bytearray()}, 0
    while offset + OBSERVED_RECORD.size <= len(data):
        direction, size = OBSERVED_RECORD.unpack_from(data, offset)
        offset += OBSERVED_RECORD.size
        streams["up" if direction == b">" else "down"] += data[offset:offset + size]
        offset += size
    return {k: bytes(v) for k, v in streams.items()}


def observed_as_states(stream: bytes, hidden_size: int, *, plausible_only: bool = False):
    """The attacker's reading of relayed bytes as hidden states: every aligned run of `hidden_size` float32 values,
    non-finite values set to 0 and magnitudes clipped to 1e4 [N, hidden_size]; with `plausible_only`, only the rows
    that needed neither (what a plaintext uplink would give). Ciphertext gives rows of noise."""
    import numpy as np
    import torch

    usable = len(stream) // 4 * 4
    values = np.frombuffer(stream[:usable], dtype="<f4")
    rows = values[: len(values) // hidden_size * hidden_size].reshape(-1, hidden_size)
    if plausible_only:
        keep = np.isfinite(rows).all(1) & (np.abs(np.nan_to_num(rows)) < 1e4).all(1)
        return torch.from_numpy(rows[keep].copy())
    return torch.from_numpy(np.clip(np.nan_to_num(rows, nan=0.0, posinf=0.0, neginf=0.0), -1e4, 1e4).copy())


class EnclaveOperator:
    """`serve --enclave` as a child process on 127.0.0.1 (for benchmarks and tests): the operator's relay and, below
    it, the trusted executor. `url` is the relay's ws:// address; `measurement` what the executor reports."""

    def __init__(self, model: str, cuts: tuple[int, ...], *, observe: Path | None = None, startup_timeout: float = 300):
        self.model, self.cuts, self.observe, self.startup_timeout = model, tuple(cuts), observe, startup_timeout

    def __enter__(self) -> "EnclaveOperator":
        import os
        import subprocess
        import sys
        import tempfile

        from splitveil.serve.auth import new_token, write_token
        from splitveil.serve.process import free_port
        from splitveil.tee.channel import AttestationKey

        self._folder = tempfile.TemporaryDirectory(prefix="splitveil-enclave-lm-")
        folder = Path(self._folder.name)
        self.key = AttestationKey.generate()  # SIMULATED: stands in for the CPU vendor's key
        self.key_file = self.key.write_private(folder / "attestation.key")
        self.attestation = AttestationKey.from_public_bytes(self.key.public_bytes())
        self.token = new_token()
        write_token(folder / "token", self.token)
        self.port = free_port()
        self.url = f"ws://127.0.0.1:{self.port}"
        command = [sys.executable, "-m", "splitveil.cli.main", "serve", "--enclave", "--model", self.model, "--split",
                   ",".join(map(str, self.cuts)), "--host", "127.0.0.1", "--port", str(self.port), "--insecure",
                   "--token-file", str(folder / "token"), "--attestation-key", str(self.key_file),
                   *(["--observe", str(self.observe)] if self.observe else [])]
        self.log_path = folder / "operator.log"
        self._log = open(self.log_path, "w")
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        self.process = subprocess.Popen(command, stdout=self._log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + self.startup_timeout
        while "splitveil serve --enclave: relaying on" not in self.log_path.read_text():
            if self.process.poll() is not None or time.monotonic() > deadline:
                tail = self.log_path.read_text().strip().splitlines()[-1:] or ["no output"]
                self.__exit__()
                raise ConfigError(f"serve --enclave did not start: {tail[0]}")
            time.sleep(0.2)
        for line in self.log_path.read_text().splitlines():
            if "measurement" in line:
                self.measurement = bytes.fromhex(line.rsplit(" ", 1)[-1])
        return self

    def transport(self):
        from splitveil.tee.executor import SealedTransport
        from splitveil.transport.network import WebSocketTransport

        outer = WebSocketTransport(self.url, token=self.token, timeout=300)
        return SealedTransport(outer, attestation=self.attestation, expected_measurement=self.measurement)

    def __exit__(self, *exc) -> None:
        import subprocess

        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        self._log.close()
        self._folder.cleanup()


def serve_enclave(*, model: str, cuts: tuple[int, ...], host: str, port: int, token_file: Path | None,
                  attestation_key: Path | None, observe: Path | None, insecure: bool, tls_cert=None, tls_key=None,
                  threads: int = 1, limits: dict | None = None) -> None:
    """`splitveil serve --enclave`: start the trusted executor (child) and relay to it until stopped."""
    import os
    import signal
    import subprocess
    import sys
    import tempfile

    import typer

    from splitveil.serve.build import token_for_server
    from splitveil.serve.process import free_port
    from splitveil.tee.channel import SIMULATED, AttestationKey

    if tls_cert or tls_key or not insecure:
        raise ConfigError("serve --enclave relays plain WebSockets on loopback (the hidden states are sealed to the "
                          "attested executor); give --insecure and a loopback --host")
    if len(cuts) != 2:
        raise ConfigError("--enclave serves the trunk of a Λ-split: give --split A,B")
    _, token_path = token_for_server(token_file)
    folder = tempfile.TemporaryDirectory(prefix="splitveil-enclave-")
    if attestation_key is None:
        attestation_key = AttestationKey.generate().write_private(Path(folder.name) / "attestation.key")
        typer.echo(f"splitveil serve --enclave: {SIMULATED}: fresh key, public half "
                   f"{AttestationKey.from_private_bytes(attestation_key.read_bytes()).public_bytes().hex()}")
    inner_port = free_port()
    command = [sys.executable, "-m", "splitveil.cli.main", "partition", "enclave-lm", "--model", model, "--split",
               ",".join(map(str, cuts)), "--port", str(inner_port), "--token-file", str(token_path),
               "--attestation-key", str(attestation_key), "--threads", str(threads),
               *[arg for key, value in (limits or {}).items() if value is not None for arg in (f"--{key}", str(value))]]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True)
    measurement = None
    for line in child.stdout:
        if "measurement" in line:
            measurement = line.rsplit(" ", 1)[-1].strip()
        if "listening on" in line:
            break
    if child.poll() is not None or measurement is None:
        folder.cleanup()
        raise ConfigError(f"the trusted executor did not start (exit {child.poll()})")
    typer.echo(f"splitveil serve --enclave: trusted executor pid {child.pid} ({SIMULATED}); {model} trunk "
               f"{cuts[0]}..{cuts[1]} measurement {measurement}")

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await relay(host, port, inner_port, observe=observe, stop=stop, ready=lambda p: typer.echo(
            f"splitveil serve --enclave: token file {token_path}\n"
            f"splitveil serve --enclave: relaying on ws://{host}:{p} (this process sees only sealed frames)"))

    try:
        asyncio.run(main())
    except OSError as error:
        raise ConfigError(f"cannot listen on {host}:{port}: {error.strerror or error}") from None
    finally:
        child.terminate()
        try:
            child.wait(20)
        except subprocess.TimeoutExpired:
            child.kill()
        folder.cleanup()
    typer.echo("splitveil serve --enclave: stopped")

