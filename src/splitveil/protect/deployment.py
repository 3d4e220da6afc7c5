"""The one protection contract: a deployment says which parties run which parts, what each holds, whom it trusts,
and which attacker knows it.

Every protection splitveil ships is one registered `Deployment` (or a small family generated from one class): the
text cut defences and SLIP's prompt deployment (`protect/text.py`, `protect/slip/deployment.py`), the enclave trunk
(`protect/enclave.py`), the image defences (`protect/image/deployment.py`), Salted DNNs (`protect/salt.py`), SLIP's
weights deployment and TEE layer partitioning. `DEPLOYMENTS` holds them keyed by modality and name; `splitveil
protections [--json]` lists it. A deployment class carries its description as class attributes (read without building
anything); a runnable one (the text deployments) is also instantiated per run and opens one session per prompt.

Parties are named by where they run (`plan.Placement`): the user's `edge` device, an untrusted `cloud`, a `trusted`
enclave, SLIP's untrusted `executor`, a mask `dealer`. Every trust assumption a deployment makes is in its `trust`
lines, and every record and listing repeats them.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import ClassVar

from splitveil.core.errors import ConfigError
from splitveil.plan.plan import Placement

MODALITIES = ("text", "image", "output", "weights")

#: the modules whose import registers deployments (loaded on the first lookup, so that importing this one is cheap)
REGISTERING_MODULES = ("splitveil.protect.text", "splitveil.protect.slip.deployment", "splitveil.protect.enclave",
                       "splitveil.protect.image.deployment", "splitveil.protect.salt")


@dataclass(frozen=True)
class Party:
    """One party of a deployment: where it runs, what it holds, and the trust placed in it."""

    name: str  # "device", "cloud", "executor", "enclave", "operator", "accelerator", "dealer", "secure side"
    placement: Placement
    holds: str  # weights, secrets, caches, what it receives
    trust: str  # "trusted: ...", "untrusted: ..." (what it is assumed to do, and not to do)

    def to_dict(self) -> dict:
        return {"name": self.name, "placement": self.placement.value, "holds": self.holds, "trust": self.trust}


class Deployment:
    """A protection as deployed. Subclasses set the class attributes and register with `DEPLOYMENTS.register`.

    Attributes:
        name: the protection's name (unique within its modality; the same name in `--defence`/`--protect`).
        modality: "text", "image", "output" or "weights".
        summary: one sentence on what it protects and how.
        protects: what stays private ("the prompt", "the output", "the model's weights" ...).
        placement: where each part of the split runs, in order (e.g. edge, trusted, edge: the enclave trunk);
            `split_plan(cuts)` is the `SplitPlan` with these placements.
        parties: every party, device first.
        assumptions: the trust assumptions the claim rests on (non-collusion, simulated attestation ...).
        attacker: the adaptive attacker that knows this deployment: the command that runs it and the attacks.
    """

    name: ClassVar[str] = "none"
    modality: ClassVar[str] = "text"
    summary: ClassVar[str] = ""
    protects: ClassVar[str] = ""
    placement: ClassVar[tuple[Placement, ...]] = (Placement.EDGE, Placement.CLOUD, Placement.EDGE)
    parties: ClassVar[tuple[Party, ...]] = ()
    assumptions: ClassVar[tuple[str, ...]] = ()
    attacker: ClassVar[dict] = {}

    @classmethod
    def listing(cls) -> dict:
        """What `splitveil protections --json` prints for this deployment (a running deployment's own details, for
        its records, are `describe()` where it has one)."""
        return {"name": cls.name, "modality": cls.modality, "summary": cls.summary, "protects": cls.protects,
                "placement": [place.value for place in cls.placement],
                "parties": [party.to_dict() for party in cls.parties], "assumptions": list(cls.assumptions),
                "attacker": dict(cls.attacker)}

    @classmethod
    def split_plan(cls, cuts: tuple[int, ...]):
        """The `SplitPlan` of this deployment at `cuts`: which party runs which part."""
        from splitveil.plan.plan import SplitPlan

        return SplitPlan(tuple(cuts), cls.placement)


class DeploymentRegistry:
    """Deployment classes keyed by (modality, name); duplicates rejected, unknown names explained."""

    def __init__(self):
        self._items: dict[tuple[str, str], type[Deployment]] = {}
        self._loaded = False

    def register(self, cls: type[Deployment]) -> type[Deployment]:
        """Registers `cls` under its own `modality` and `name` (a class decorator)."""
        if cls.modality not in MODALITIES:
            raise ValueError(f"deployment {cls.__name__}: unknown modality {cls.modality!r}; known: {MODALITIES}")
        if not cls.parties or not cls.attacker:
            raise ValueError(f"deployment {cls.__name__} must name its parties and its attacker")
        key = (cls.modality, cls.name)
        if key in self._items:
            raise ValueError(f"{cls.modality} deployment {cls.name!r} is registered twice")
        self._items[key] = cls
        return cls

    def _load(self) -> None:
        if not self._loaded:
            self._loaded = True
            for module in REGISTERING_MODULES:
                importlib.import_module(module)

    def get(self, name: str, modality: str) -> type[Deployment]:
        """The deployment `name` of `modality`, or a ConfigError listing that modality's names."""
        self._load()
        try:
            return self._items[modality, str(name)]
        except KeyError:
            raise ConfigError(f"unknown {modality} protection {name!r}; known: {', '.join(self.names(modality))}") from None

    def names(self, modality: str | None = None) -> list[str]:
        self._load()
        return sorted({name for (kind, name) in self._items if modality is None or kind == modality})

    def all(self, modality: str | None = None) -> list[type[Deployment]]:
        """Every registered deployment (of `modality`), ordered by modality then name."""
        self._load()
        return [self._items[key] for key in sorted(self._items, key=lambda k: (MODALITIES.index(k[0]), k[1]))
                if modality is None or key[0] == modality]


DEPLOYMENTS = DeploymentRegistry()


# -- the parties most deployments share ------------------------------------------------------------------------

def device(holds: str) -> Party:
    return Party("device", Placement.EDGE, holds, "trusted: the user's own device")


def honest_cloud(holds: str, *, name: str = "cloud", placement: Placement = Placement.CLOUD) -> Party:
    return Party(name, placement, holds, "untrusted, honest-but-curious: runs its part as asked, keeps everything it "
                 "receives, and knows the public model's weights")


PUBLIC_WEIGHTS = "the cloud knows the public model's weights (an open-weights model)"
