"""What the (SIMULATED) attestation measures: the code the executor process has loaded, its weights, its configuration.

A real enclave's measurement covers every page loaded into it. The equivalent for a Python process is every file of
code it runs, so `measure_process` hashes, in this canonical order:

1. a header: the protocol, the measurement format version, the Python implementation and version;
2. the executor's configuration as canonical JSON (sorted keys): what it runs (model, split or cut, role), never
   where it listens or its limits (those change availability, not what sees the data);
3. the code: for every top-level package (or single-file module) outside the standard library that the process has
   imported when it reports ready, **every** `.py` file of that package (loaded yet or not: a lazily imported module
   is covered too), plus every native library the process has mapped (`/proc/self/maps`, Linux) or imported as an
   extension module that lies in a `sys.path` entry. Each file is named by its path relative to the `sys.path` entry
   that holds it (`splitveil/serve/service.py`, `torch/lib/libtorch_cpu.so`), so two installs of the same code in
   different folders measure the same, and files are hashed in the order of those names;
4. the weights: every tensor of the executor's state, by name (sorted), dtype, shape and bytes.

Not covered, and said so in docs/tee-partition.md: the Python interpreter and its standard library (like the
operating system under a real enclave, they are the platform; their version is in the header), data files that are
not code (JSON, tokenizer files), and packages first imported after the executor reported ready.

The client computes the measurement it expects the same way, from its own code and weights: `expected_measurement`
runs the executor's own start-up in a child process (`--measure-only`), which loads exactly what the executor loads
and prints the digest instead of serving. It never asks the party it is verifying.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import sys
import sysconfig
from pathlib import Path

from splitveil.core.errors import ConfigError

FORMAT = b"splitveil-tee/measurement/2"
_CHUNK = 1 << 22


def _stdlib_dirs() -> tuple[str, ...]:
    paths = sysconfig.get_paths()
    return tuple(sorted({os.path.realpath(paths[key]) for key in ("stdlib", "platstdlib")}))


def _roots() -> list[str]:
    """The `sys.path` entries that hold third-party or project code (not the standard library), longest first."""
    stdlib = _stdlib_dirs()
    roots = set()
    for entry in sys.path:
        real = os.path.realpath(entry or os.getcwd())
        if not os.path.isdir(real):
            continue
        if any(real == s or real.startswith(s + os.sep) for s in stdlib) and "site-packages" not in real:
            continue
        roots.add(real)
    return sorted(roots, key=len, reverse=True)


def _root_of(path: str, roots: list[str]) -> str | None:
    return next((root for root in roots if path.startswith(root + os.sep)), None)


def _mapped_libraries() -> set[str]:
    """Native libraries mapped into this process (Linux); empty elsewhere."""
    try:
        lines = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return set()
    found = set()
    for line in lines:
        fields = line.split(None, 5)
        if len(fields) == 6 and fields[5].startswith("/") and re.search(r"\.so(\.|$)", fields[5]):
            found.add(os.path.realpath(fields[5]))
    return found


def loaded_code() -> list[tuple[str, str]]:
    """(canonical name, path) of every code file the measurement covers, sorted by name (see the module doc)."""
    roots = _roots()
    files: dict[str, str] = {}

    def add(path: str) -> None:
        root = _root_of(path, roots)
        if root is not None and os.path.isfile(path):
            files.setdefault(Path(os.path.relpath(path, root)).as_posix(), path)

    for name, module in list(sys.modules.items()):
        if name.startswith("__") or "." in name:
            continue
        origin = getattr(module, "__file__", None)
        if not origin:
            continue
        origin = os.path.realpath(origin)
        if _root_of(origin, roots) is None:
            continue  # the standard library, or code from outside any sys.path entry
        if os.path.basename(origin).startswith("__init__."):
            for folder, subfolders, names in os.walk(os.path.dirname(origin)):
                subfolders[:] = sorted(d for d in subfolders if d != "__pycache__")
                for file_name in names:
                    if file_name.endswith(".py"):
                        add(os.path.join(folder, file_name))
        add(origin)
    for module in list(sys.modules.values()):
        origin = getattr(module, "__file__", None) or ""
        if origin.endswith((".so", ".pyd")):
            add(os.path.realpath(origin))
    for library in _mapped_libraries():
        add(library)
    return sorted(files.items())


_DIGESTS: dict[tuple, bytes] = {}  # (path, size, mtime, inode) -> SHA-256: a process measures the same files often


def _file_digest(path: str) -> bytes:
    info = os.stat(path)
    key = (path, info.st_size, info.st_mtime_ns, info.st_ino)
    if key not in _DIGESTS:
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            while chunk := handle.read(_CHUNK):
                digest.update(chunk)
        _DIGESTS[key] = digest.digest()
    return _DIGESTS[key]


def canonical_config(config: dict) -> bytes:
    return json.dumps(config, sort_keys=True, separators=(",", ":")).encode()


def measure_process(state: dict, *, config: dict, files: list[tuple[str, str]] | None = None) -> bytes:
    """SHA-256 over the header, `config`, the loaded code (`loaded_code()` unless `files` is given) and `state`.

    Args:
        state: name -> tensor: everything the executor holds.
        config: what the executor runs (JSON-serialisable), e.g. {"role": "enclave-trunk", "model": ..., "cuts": ...}.
        files: (name, path) pairs instead of the process's loaded code (tests).
    """
    digest = hashlib.sha256(FORMAT + b"\0" + f"{platform.python_implementation()} {platform.python_version()}".encode()
                            + b"\0" + canonical_config(config) + b"\0")
    listing = os.environ.get("SPLITVEIL_MEASURE_LIST")  # a file to write the measured names and digests to
    lines = []
    for name, path in loaded_code() if files is None else sorted(files):
        if listing:
            lines.append(f"{_file_digest(path).hex()} {name}")
        digest.update(name.encode() + b"\0" + _file_digest(path))
    for name in sorted(state):
        tensor = state[name].detach().contiguous().cpu()
        digest.update(name.encode() + b"\0" + str(tensor.dtype).encode() + repr(tuple(tensor.shape)).encode())
        digest.update(tensor.numpy().tobytes() if tensor.numel() else b"")
    if listing:
        Path(listing).write_text("\n".join(lines + [f"config {canonical_config(config).decode()}"]) + "\n")
    return digest.digest()


def measure(state: dict, *, label: str, files: list[tuple[str, str]] | None = None) -> bytes:
    """The executor's measurement: the code its process has loaded, `label` (what it runs) and its weights, in the
    canonical order of `measure_process`.

    Args:
        state: name -> tensor (a state dict) of everything the executor holds.
        label: what the executor runs, e.g. "vgg fashion-mnist blocks [0, 3)".
        files: (name, path) code files instead of the process's loaded code (tests).
    """
    return measure_process(state, config={"executor": label}, files=files)


def parse_measurement(text: str) -> bytes:
    """A measurement given as 64 hex digits (`--attest MEASUREMENT`); one line naming what to give otherwise."""
    value = text.strip().lower()
    if not re.fullmatch(r"[0-9a-f]{64}", value):
        raise ConfigError(f"bad measurement {text[:80]!r}: give the 64 hex digits of a SHA-256 measurement")
    return bytes.fromhex(value)


def expected_measurement(role: str, spec: dict, *, timeout: float = 600, env: dict | None = None) -> bytes:
    """The measurement the executor worker `role` (`serve.worker`: "enclave", "enclave-lm") started with `spec`
    reports, computed here: the same start-up in a child process with `measure_only`, from this machine's code and
    weights (`env`: the child's environment, default this one's)."""
    import tempfile

    from splitveil.serve.worker import start_worker

    with tempfile.TemporaryDirectory(prefix="splitveil-measure-") as folder:
        process, report = start_worker(role, {**spec, "measure_only": True}, log_path=Path(folder) / "measure.log",
                                       timeout=timeout, env=env)
        process.wait(timeout)
    if "measurement" not in report:
        raise ConfigError(f"could not compute the expected measurement here: {report}")
    return parse_measurement(report["measurement"])


def import_executor_code() -> None:
    """Imports what every executor serves and seals with (the server, the sealed channel's primitives) before it is
    measured, so that the measurement covers that code however the executor was started."""
    import cryptography.hazmat.primitives.asymmetric.ed25519  # noqa: F401
    import cryptography.hazmat.primitives.asymmetric.x25519  # noqa: F401
    import cryptography.hazmat.primitives.ciphers.aead  # noqa: F401
    import cryptography.hazmat.primitives.kdf.hkdf  # noqa: F401
    import cryptography.hazmat.primitives.serialization  # noqa: F401
    import websockets  # noqa: F401

    import splitveil.serve.server  # noqa: F401
    import splitveil.tee.executor  # noqa: F401
    import splitveil.transport.network  # noqa: F401
