"""The attack base class, threat models, and the capability objects that enforce them (every modality).

An attack declares its `ThreatModel`. A `Target` lists what a scenario offers an attacker (the victim's parts,
query access, auxiliary data); `Target.grant(threat, attack)` checks that it offers everything the threat model
names and hands back a `Capabilities` object holding only that, each piece a private copy:

- granted weights: a fresh module built from copies of exactly the granted segments' weights (`private_copy`);
  every other weight of the model is a shape on the meta device, with no data;
- query access: a `SealedQuery`, which runs a private copy of the queried part in a separate process; the
  attacker's process keeps a pipe to it and nothing else, so no attribute, closure or bound method leads to the
  part or its weights;
- the attacker's own auxiliary data, and the shapes every party knows.

An attack object keeps the capabilities only, never the target, so nothing the threat model withholds (the
victim's live parts and their caches, the other side's weights) is reachable from it. In-process Python cannot
hide an object from `gc` or from module globals; what this guarantees is that no door opens from what the attack
is handed, which `tests/unit/test_threat_models.py` checks by walking the object graph and by cheating attacks.
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass
from typing import ClassVar

from splitveil.core.errors import ConfigError


@dataclass(frozen=True)
class ThreatModel:
    """What an attacker holds. Attacks state theirs; a target that cannot give it fails at construction."""

    observes: str  # what the attacker sees: "uplink" (states after the head), "downlink" (states before the tail)
    knows_head_weights: bool = False  # the layers before the cut (a cloud serving a public model knows them)
    knows_tail_weights: bool = False  # the layers after the trunk
    auxiliary_data: bool = False  # data of its own, disjoint from the victim's
    knows_defence: bool = False  # the defence's mechanism and public parameters (adaptive attacker)
    queries_edge: bool = False  # may run chosen inputs through the edge part and read the features (black box)
    knows_cloud_weights: bool = False  # the part after the cut of a two-way edge|cloud split
    description: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


class Capabilities:
    """What an attack holds: the public facts of its target plus what its threat model grants; everything else is
    None. Read-only."""

    def __init__(self, **fields):
        for name, value in fields.items():
            object.__setattr__(self, name, value)

    def __setattr__(self, name, value):
        raise AttributeError(f"capabilities are read-only (tried to set {name!r})")

    def __repr__(self) -> str:
        held = ", ".join(f"{k}={'yes' if v is not None else 'no'}" for k, v in vars(self).items())
        return f"Capabilities({held})"


class Target(ABC):
    """Everything a scenario offers an attacker. Subclasses set `offers` and implement `offered` and `copy_of`."""

    #: ThreatModel flag -> (capability field, how an error names it). Flags not listed grant nothing from the target.
    offers: ClassVar[dict[str, tuple[str, str]]] = {}
    #: what an attacker may observe of this target ("uplink", "downlink")
    observable: ClassVar[tuple[str, ...]] = ("uplink",)

    @abstractmethod
    def offered(self, field: str) -> bool:
        """Whether this target gives the capability `field` at all."""

    @abstractmethod
    def copy_of(self, field: str):
        """A private copy of the capability `field`: nothing in it leads back to the victim's objects."""

    def public(self) -> dict:
        """What every attacker knows of the target (shapes); copied into every grant."""
        return {}

    def grant(self, threat: ThreatModel, attack: str) -> Capabilities:
        """Capabilities holding exactly what `threat` declares; ConfigError naming what the target cannot give."""
        wanted = [(field, what) for flag, (field, what) in self.offers.items() if getattr(threat, flag)]
        missing = [what for field, what in wanted if not self.offered(field)]
        if threat.observes not in self.observable:
            missing.insert(0, f"a view of the {threat.observes}")
        if missing:
            raise ConfigError(f"the {attack} attack needs {' and '.join(missing)}, which this target does not give")
        granted = {field: None for field, _ in self.offers.values()}
        granted.update({field: self.copy_of(field) for field, _ in wanted})
        return Capabilities(**self.public(), **granted)


class Attack(ABC):
    """One verb: `reconstruct` what the observed tensors leak."""

    name: str = "attack"
    threat_model: ThreatModel
    #: a learned attack's training, phase name -> `attack.training.Convergence` (set when it trains; {}: learns nothing)
    phases: dict = {}

    @abstractmethod
    def reconstruct(self, observed):
        """Returns the attacker's reconstruction of the private input (or output) behind `observed`."""

    def training_record(self) -> dict:
        """How long its learned parts trained and whether they converged (`attacker_epochs`, `attacker_val_loss`,
        `attacker_converged`, per phase under `attacker_phases`); {} for an attack that learns nothing."""
        from splitveil.attack.training import combined_record

        return combined_record(self.phases)


def private_copy(module, granted, *, zeroed=()):
    """A deep copy of `module` in which only the parameters in `granted` keep their values (copied); every other
    parameter becomes a meta tensor of the same shape (no data), so the copy runs the granted layers and nothing
    else. Buffers (running statistics, rotary tables) are copied: they belong to the layers that hold them or are
    derived from the public configuration.

    Args:
        module: the victim's model (an nn.Module); not modified.
        granted: the parameters the attacker is granted (tensors of `module`).
        zeroed: withheld parameters that the granted part's forward computes with but whose result it discards
            (e.g. GPT-2's position embeddings before a mid-model part): zeros of their shape instead of meta.
    """
    import torch

    keep, zeros = {id(p) for p in granted}, {id(p) for p in zeroed}
    memo: dict = {}
    for parameter in module.parameters():
        if id(parameter) in keep:
            continue
        device = "cpu" if id(parameter) in zeros else "meta"
        memo[id(parameter)] = torch.nn.Parameter(torch.zeros(parameter.shape, dtype=parameter.dtype, device=device),
                                                 requires_grad=parameter.requires_grad)
    return copy.deepcopy(module, memo)


class SealedQuery:
    """Black-box access to a module: inputs -> outputs, computed in a separate process on a private copy.

    The attacker's process holds the child's handle and pipes, never the module: the copy is pickled, written to the
    child and dropped here. Calls run without gradients, in batches of `batch_size`, with this process's torch
    thread count (so results equal an in-process forward of the same weights). The child is a plain
    `python -c` process (no multiprocessing bootstrap, so scripts need no `__main__` guard); it exits when this
    object is closed or collected, or when this process ends (its input closes).
    """

    def __init__(self, module, *, batch_size: int = 256):
        import os
        import pickle
        import subprocess
        import sys
        import weakref

        import torch

        code = "from splitveil.attack.base import _serve_queries; _serve_queries()"
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}  # imports as here
        process = subprocess.Popen([sys.executable, "-c", code, str(torch.get_num_threads())],
                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
        self._process, self.batch_size = process, batch_size
        self._finalizer = weakref.finalize(self, _stop_queries, process)
        try:
            _send(process.stdin, pickle.dumps(module, protocol=pickle.HIGHEST_PROTOCOL))
            del module
            status = _receive(process.stdout)
        except (OSError, EOFError) as error:
            status = f"the process ended ({error})".encode()
        if status != b"ready":
            self.close()
            raise ConfigError(f"the sealed query process could not load its module: {status.decode(errors='replace')}")

    def __call__(self, inputs):
        import pickle

        import torch

        outputs = []
        for start in range(0, len(inputs), self.batch_size):
            batch = inputs[start:start + self.batch_size].detach().contiguous()
            _send(self._process.stdin, pickle.dumps(batch, protocol=pickle.HIGHEST_PROTOCOL))
            reply = pickle.loads(_receive(self._process.stdout))
            if isinstance(reply, str):
                raise RuntimeError(f"the sealed query failed: {reply}")
            outputs.append(reply)
        return torch.cat(outputs) if outputs else torch.empty(0)

    def close(self) -> None:
        self._finalizer()


def _send(stream, payload: bytes) -> None:
    stream.write(len(payload).to_bytes(8, "little"))
    stream.write(payload)
    stream.flush()


def _receive(stream) -> bytes:
    header = stream.read(8)
    if len(header) < 8:
        raise EOFError("the sealed query process closed its output")
    size = int.from_bytes(header, "little")
    data = stream.read(size)
    if len(data) < size:
        raise EOFError("the sealed query process closed its output")
    return data


def _serve_queries() -> None:  # the child process: `python -c ... THREADS`, module and inputs on stdin
    import pickle
    import sys

    import torch

    from splitveil.core.runtime import exit_with_parent

    torch.set_num_threads(int(sys.argv[1]))
    exit_with_parent()
    source, sink = sys.stdin.buffer, sys.stdout.buffer
    sys.stdout = sys.stderr  # stray prints must not corrupt the replies
    try:
        module = pickle.loads(_receive(source))
    except Exception as error:  # noqa: BLE001  reported to the parent, which raises
        _send(sink, f"{type(error).__name__}: {error}".encode())
        return
    _send(sink, b"ready")
    while True:
        try:
            data = _receive(source)
        except EOFError:
            return
        try:
            with torch.no_grad():
                reply = module(pickle.loads(data))
        except Exception as error:  # noqa: BLE001
            reply = f"{type(error).__name__}: {error}"
        _send(sink, pickle.dumps(reply, protocol=pickle.HIGHEST_PROTOCOL))


def _stop_queries(process) -> None:
    for stream in (process.stdin, process.stdout):
        try:
            stream.close()
        except OSError:
            pass
    try:
        process.wait(timeout=5)
    except Exception:  # noqa: BLE001  a child that does not stop on EOF is killed
        process.kill()
        process.wait()
