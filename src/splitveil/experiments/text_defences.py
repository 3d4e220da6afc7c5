"""Text defences as the text attacks meet them: how a defended Λ-split runs, and what its cloud receives.

`TEXT_DEFENCES` maps a defence name to a `TextDeployment` class. `run_text_attack` opens the deployment once per
run and one `session` per prompt (a fresh secret each); a session's `observe` generates the answer and returns
everything the cloud received (`Observation`). The adaptive attacker for each name lives in
`attack.text.adaptive` (`adaptation_for`).

- every cut defence of `protect.cut` (`noise`, `permute`, `randcut`): the in-process service behind a loopback
  transport, the frames recorded as the cloud decodes them (`CutDeployment`);
- `slip`: SLIP's prompt deployment, a real untrusted executor process that logs every frame it receives
  (`experiments.slip_text.SlipDeployment`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from splitveil.core.registry import Registry

TEXT_DEFENCES: Registry = Registry("defence")


@dataclass
class Observation:
    prompt_ids: list[int]
    generated_ids: list[int]
    uplink: torch.Tensor  # [positions, H] every state the cloud received, in order
    downlink: torch.Tensor  # [positions, H] every state the cloud sent back (or, for slip, received last)
    clear_uplink: torch.Tensor | None = None  # [positions, H] what the cloud would have read without the defence's
    # hiding (a control: the same attack on it shows the attack is not the weak point); None when not measured


class TextSession:
    """One prompt's session of a deployment (its own secret). `lm` and `defence` are what the adaptive attacker of
    a cut defence inspects (the split as the cloud runs it); None where there is nothing to inspect."""

    depth: int  # the head depth whose output (or its masked image) the cloud receives
    lm = None
    defence = None

    def observe(self, prompt: str, max_new_tokens: int) -> Observation:
        raise NotImplementedError


class TextDeployment:
    """How a Λ-split runs under one defence. Subclasses set what the cloud holds and whether that reveals the
    secret, check a strength before any model loads, and open sessions."""

    name = "none"
    cloud_holds = "the public trunk"
    reveals_secret = False

    def __init__(self, model_name: str, model, tokenizer, plan, *, strength: float, wire: str):
        self.model_name, self.model, self.tokenizer, self.plan = model_name, model, tokenizer, plan
        self.strength, self.wire = strength, wire

    @classmethod
    def check(cls, strength: float, cuts: tuple[int, int]) -> None:
        """Raises ConfigError for a strength or cuts this defence cannot run with."""

    def session(self) -> TextSession:
        raise NotImplementedError

    def perplexity(self, token_lists: list[list[int]]) -> float | None:
        """Perplexity of the defended model over held-out token sequences (None when not measured)."""
        return None

    def describe(self) -> dict:
        """What the record's `defence` entry adds for this deployment (its view, its attacker's budget ...)."""
        return {}

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _CutSession(TextSession):
    def __init__(self, lm, defence):
        self.lm, self.defence = lm, defence
        self.depth = next(iter(lm.service.parts.values())).first_layer  # where the cloud's part starts

    def observe(self, prompt: str, max_new_tokens: int) -> Observation:
        from splitveil.experiments.text_privacy import observe

        return observe(self.lm, prompt, max_new_tokens)


class CutDeployment(TextDeployment):
    """A cut defence of `protect.cut` (or none): the split in process, the device applying the defence."""

    defence_class = None

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.defence_class is not None:
            self.cloud_holds = self.defence_class.cloud_holds
            self.reveals_secret = self.defence_class.reveals_secret

    @classmethod
    def check(cls, strength: float, cuts: tuple[int, int]) -> None:
        from splitveil.plan.plan import SplitPlan

        defence = cls.defence_class(strength)
        if hasattr(defence, "session_plan"):
            defence.session_plan(SplitPlan.lambda_split(*cuts))

    def _split(self, defence):
        from splitveil.edge.generate import SplitCausalLM

        return SplitCausalLM(self.model, self.plan, tokenizer=self.tokenizer, wire=self.wire, defence=defence)

    def session(self) -> TextSession:
        defence = self.defence_class(self.strength) if self.defence_class else None  # this session's own key
        return _CutSession(self._split(defence), defence)

    def perplexity(self, token_lists: list[list[int]]) -> float | None:
        from splitveil.experiments.text_privacy import heldout_perplexity

        return heldout_perplexity(self._split(self.defence_class(self.strength) if self.defence_class else None), token_lists)


def _register_cut_defences() -> None:
    from splitveil.protect.cut import CUT_DEFENCES

    for name in CUT_DEFENCES:
        TEXT_DEFENCES.register(name, type(f"{name.capitalize()}Deployment", (CutDeployment,),
                                          {"name": name, "defence_class": CUT_DEFENCES.get(name)}))


_register_cut_defences()
from splitveil.experiments import slip_text  # noqa: E402,F401  (registers slip)


def deployment_for(name: str | None):
    """The deployment class for `name` (a registered defence) or the undefended split for None."""
    return CutDeployment if name is None else TEXT_DEFENCES.get(name)
