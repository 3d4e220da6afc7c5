"""The servers `splitveil bench fuzz --target` attacks, one module each, all judged by `harness.fuzz_core`.

| target | server | bystander (an honest client whose output must not change) |
|---|---|---|
| serve | `splitveil serve` (`fuzz_service.py`) | a Λ-split generation, tokens == unsplit |
| enclave | `serve --enclave`: the operator's relay and the trusted executor behind it (`enclave.py`) | an attested Λ-split generation through the sealed channel, tokens == unsplit |
| slip | `splitveil slip serve` on an exported residual bundle (`slip.py`) | a SLIP weights-deployment generation, tokens == its undisturbed run |
| accelerator | the accelerator process of `partition run` (`accelerator.py`) | images through the trusted executor and the accelerator, labels == the whole model's |
| edge | `splitveil edge --local`, the OpenAI-compatible HTTP front (`edge.py`, cases in `edge_cases.py`) | greedy completions over HTTP, tokens == unsplit |

Each entry gives the run (`spec -> record`), its categories and the defaults of `--model` and `--split`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

from splitveil.core.registry import Registry


@dataclass(frozen=True)
class FuzzTarget:
    module: str  # where `run(spec, progress=)` and `CATEGORIES` live
    model: str  # the default --model
    split: str  # the default --split ("" = none)
    dataset: str = ""  # the default --dataset (the accelerator's CNN)

    def _module(self):
        return importlib.import_module(self.module)

    def run(self, spec, *, progress: Callable[[int, int], None] | None = None) -> dict:
        return self._module().run(spec, progress=progress)

    def categories(self) -> Registry:
        return self._module().CATEGORIES


TARGETS: Registry[FuzzTarget] = Registry("fuzz target")
TARGETS.register("serve", FuzzTarget("splitveil.harness.fuzz_service", "smollm2-135m", "2,28"))
TARGETS.register("enclave", FuzzTarget("splitveil.harness.fuzz_targets.enclave", "smollm2-135m", "2,28"))
TARGETS.register("slip", FuzzTarget("splitveil.harness.fuzz_targets.slip", "smollm2-135m", ""))
TARGETS.register("accelerator", FuzzTarget("splitveil.harness.fuzz_targets.accelerator", "vgg", "5", "fashion-mnist"))
TARGETS.register("edge", FuzzTarget("splitveil.harness.fuzz_targets.edge", "smollm2-135m", "2,28"))
