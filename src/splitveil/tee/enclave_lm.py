"""The Λ-split trunk in the trusted executor: `splitveil serve --enclave`.

The operator's process (`serve --enclave`) never holds the trunk or a hidden state in clear. It starts the trusted
executor as a child process (the `enclave-lm` library worker of `tee.worker`: the standard `build_cloud_service` trunk inside a
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
from pathlib import Path

from splitveil.core.errors import ConfigError

OBSERVED_RECORD = struct.Struct("<cI")
LOCAL = "local"  # `--attest` alone: the client computes the expected measurement from its own code and weights  # direction (b">" client to executor, b"<" back), length; then the bytes


def trunk_state(splittable, cuts: tuple[int, ...]) -> dict:
    """The weights the executor holds for the trunk of a Λ-split (layers [cuts[0], cuts[1])), named by layer."""
    start, end = splittable.boundary(cuts[0]), splittable.boundary(cuts[1])
    return {f"{i}.{name}": tensor for i, module in enumerate(splittable.modules_for(start, end))
            for name, tensor in module.state_dict().items()}


def trunk_measurement(splittable, model: str, cuts: tuple[int, ...]) -> bytes:
    """The measurement of an executor holding the trunk of `splittable`: this process's loaded code, what it runs and
    the trunk's weights (`tee.measure`)."""
    from splitveil.tee.measure import measure_process

    config = {"role": "enclave-trunk", "model": Path(model).name, "cuts": list(cuts)}
    return measure_process(trunk_state(splittable, cuts), config=config)


def measured_trunk(model: str, cuts: tuple[int, ...], **limits):
    """(the trunk's `PartService`, the executor's measurement): what the executor builds before it serves, and what a
    `--measure-only` run builds to compute the value a client expects (the same start-up, so the same code loaded)."""
    from splitveil.serve.build import build_cloud_service
    from splitveil.tee.measure import import_executor_code

    if len(cuts) != 2:
        raise ConfigError("--enclave serves the trunk of a Λ-split: give --split A,B")
    inner = build_cloud_service(model, cuts, **limits)
    import_executor_code()
    return inner, trunk_measurement(inner.parts[1].owner, model, cuts)  # the weights it loaded (the rest is meta)


def build_enclave_lm_service(model: str, cuts: tuple[int, ...], *, attestation, **limits):
    """The trusted executor of an LLM trunk: `build_cloud_service` (the trunk's weights only) inside a
    `SealedFrameService`; returns (service, measurement)."""
    from splitveil.tee.executor import SealedFrameService

    inner, measurement = measured_trunk(model, cuts, **limits)
    info = {"model": model, "cuts": list(cuts), "role": "enclave-trunk"}
    return SealedFrameService(inner, attestation=attestation, measurement=measurement, info=info,
                              max_frame_bytes=inner.max_frame_bytes), measurement


def expected_trunk_measurement(model: str, cuts: tuple[int, ...]) -> bytes:
    """The measurement a client expects from `serve --enclave --model M --split A,B`, computed from this machine's
    code and weights (a measure-only run of the executor worker's start-up; never read from the server)."""
    from splitveil.tee.measure import expected_measurement

    return expected_measurement("enclave-lm", {"model": model, "cuts": list(cuts)})


def client_attestation(attest: str, key_file: Path | None, model: str, cuts: tuple[int, ...] | None):
    """(the verification key, the expected measurement) of an attested client (`generate/edge --server URL --attest`).

    Args:
        attest: "local" to compute the expected measurement here from this machine's code and weights, or the 64 hex
            digits of a measurement to pin.
        key_file: the attestation verification key: a public key file, or the SIMULATED key file itself, of which
            only the public half is read.
    """
    from splitveil.tee.channel import read_attestation_key
    from splitveil.tee.measure import parse_measurement

    if key_file is None:
        raise ConfigError("--attest needs --attest-key FILE: the attestation key's public half (or the SIMULATED key "
                          "file given to `serve --enclave --attestation-key`)")
    key = read_attestation_key(key_file, private=False)
    if attest != LOCAL:
        return key, parse_measurement(attest)
    if cuts is None or len(cuts) != 2:
        raise ConfigError("--attest computes the measurement of the trunk it expects: give --split A,B")
    return key, expected_trunk_measurement(model, cuts)


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
    it, the trusted executor. `url` is the relay's ws:// address; `measurement` the value the client expects, computed
    here from this machine's code and weights (`expected_trunk_measurement`) unless `expected_measurement` pins it;
    never read from what the operator prints."""

    def __init__(self, model: str, cuts: tuple[int, ...], *, observe: Path | None = None, startup_timeout: float = 300,
                 expected_measurement: bytes | None = None):
        self.model, self.cuts, self.observe, self.startup_timeout = model, tuple(cuts), observe, startup_timeout
        self.measurement = expected_measurement

    def __enter__(self) -> "EnclaveOperator":
        import tempfile

        from splitveil.serve.auth import new_token, write_token
        from splitveil.serve.process import free_port
        from splitveil.serve.worker import start_command
        from splitveil.tee.channel import AttestationKey

        if self.measurement is None:
            self.measurement = expected_trunk_measurement(self.model, self.cuts)
        self._folder = tempfile.TemporaryDirectory(prefix="splitveil-enclave-lm-")
        folder = Path(self._folder.name)
        self.key = AttestationKey.generate()  # SIMULATED: stands in for the CPU vendor's key
        self.key_file = self.key.write_private(folder / "attestation.key")
        self.attestation = AttestationKey.from_public_bytes(self.key.public_bytes())
        self.token = new_token()
        write_token(folder / "token", self.token)
        self.port = free_port()
        self.url = f"ws://127.0.0.1:{self.port}"
        self.log_path = folder / "operator.log"
        try:
            self.process, self.report = start_command(
                ["serve", "--enclave", "--model", self.model, "--split", ",".join(map(str, self.cuts)), "--host",
                 "127.0.0.1", "--port", str(self.port), "--insecure", "--token-file", str(folder / "token"),
                 "--attestation-key", str(self.key_file), *(["--observe", str(self.observe)] if self.observe else [])],
                log_path=self.log_path, timeout=self.startup_timeout, what="serve --enclave")
        except BaseException:
            self._folder.cleanup()
            raise
        self.executor_log = Path(self.report["executor_log"])  # the trusted executor's own log (a file, never a pipe)
        return self

    def transport(self):
        from splitveil.tee.executor import SealedTransport
        from splitveil.transport.network import WebSocketTransport

        outer = WebSocketTransport(self.url, token=self.token, timeout=300)
        return SealedTransport(outer, attestation=self.attestation, expected_measurement=self.measurement)

    def __exit__(self, *exc) -> None:
        from splitveil.serve.process import stop_process

        stop_process(self.process, 20)
        self._folder.cleanup()


def attestation_key_file(path: Path | None, folder: Path) -> tuple[Path, bool]:
    """(the SIMULATED attestation key file the executor signs with, whether it was created now): `path` as given, or
    created there when it does not exist (mode 0600, its public half beside it as `path.pub`), or a fresh key in
    `folder` when no path is given."""
    from splitveil.tee.channel import AttestationKey, read_attestation_key

    if path is not None and path.exists():
        read_attestation_key(path, private=True)  # a clear error now rather than in the child
        return path, False
    target = path if path is not None else folder / "attestation.key"
    if not target.parent.is_dir():
        raise ConfigError(f"cannot create the attestation key {target}: no folder {target.parent}")
    key = AttestationKey.generate()
    key.write_private(target)
    Path(f"{target}.pub").write_bytes(key.public_pem())
    return target, True


def serve_enclave(*, model: str, cuts: tuple[int, ...], host: str, port: int, token_file: Path | None,
                  attestation_key: Path | None, observe: Path | None, insecure: bool, tls_cert=None, tls_key=None,
                  threads: int = 1, max_sessions: int = 16, max_tokens: int | None = None, announce=None,
                  report=None) -> None:
    """`splitveil serve --enclave`: start the trusted executor (child) and relay to it until stopped."""
    import signal
    import tempfile

    from splitveil.serve.build import token_for_server
    from splitveil.serve.process import free_port, stop_process
    from splitveil.serve.worker import start_worker
    from splitveil.tee.channel import SIMULATED, read_attestation_key
    from splitveil.transport.network import is_loopback

    announce = announce or (lambda line: print(line, flush=True))
    if tls_cert or tls_key or not insecure:
        raise ConfigError("serve --enclave relays plain WebSockets on loopback (the hidden states are sealed to the "
                          "attested executor); give --insecure and a loopback --host")
    if not is_loopback(host):
        raise ConfigError(f"refusing plaintext on the non-loopback address {host}: serve --enclave relays on loopback "
                          "only (put a TLS proxy in front of it to reach it from elsewhere)")
    if len(cuts) != 2:
        raise ConfigError("--enclave serves the trunk of a Λ-split: give --split A,B")
    _, token_path = token_for_server(token_file)
    folder = tempfile.TemporaryDirectory(prefix="splitveil-enclave-")
    try:
        key_path, created = attestation_key_file(attestation_key, Path(folder.name))
        public = read_attestation_key(key_path, private=False).public_bytes().hex()
        announce(f"splitveil serve --enclave: {SIMULATED}: {'new' if created else 'given'} key {key_path}"
                 f"{' (mode 0600)' if created else ''}, public half {public}")
        inner_port = free_port()
        log_path = Path(folder.name) / "executor.log"  # a file, never a pipe: a pipe nobody drains blocks the executor
        child, started = start_worker("enclave-lm", {
            "model": model, "cuts": list(cuts), "port": inner_port, "token_file": str(token_path),
            "attestation_key": str(key_path), "threads": threads, "max_sessions": max_sessions,
            "max_tokens": max_tokens}, log_path=log_path)
        measurement = started["measurement"]
    except BaseException:
        folder.cleanup()
        raise
    announce(f"splitveil serve --enclave: trusted executor pid {child.pid} ({SIMULATED}); {model} trunk "
             f"{cuts[0]}..{cuts[1]} reports measurement {measurement} (clients compute the value they expect "
             f"themselves); its log: {log_path}")

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        def listening(bound_port: int) -> None:
            announce(f"splitveil serve --enclave: token file {token_path}\n"
                     f"splitveil serve --enclave: relaying on ws://{host}:{bound_port} (this process sees only sealed "
                     "frames)")
            if report is not None:  # the one JSON ready line of `--ready-fd`
                report({"ready": True, "url": f"ws://{host}:{bound_port}", "port": bound_port,
                        "measurement": measurement, "executor_log": str(log_path)})

        await relay(host, port, inner_port, observe=observe, stop=stop, ready=listening)

    try:
        asyncio.run(main())
    except OSError as error:
        raise ConfigError(f"cannot listen on {host}:{port}: {error.strerror or error}") from None
    finally:
        stop_process(child, 20)
        folder.cleanup()
    announce("splitveil serve --enclave: stopped")
