"""Text protections as deployments: how a protected Λ-split runs, and what its untrusted party receives.

Every text protection is one registered `Deployment` of modality "text" (`protect.deployment.DEPLOYMENTS`):

- `none`: the plain Λ-split (head and tail on the device, the trunk in the cloud);
- every cut defence of `protect.cut` (`noise`, `permute`, `randcut`): the in-process service behind a loopback
  transport, the device applying the defence (`CutDeployment`);
- `slip`: SLIP's prompt deployment, a real untrusted executor process (`protect.slip.deployment`);
- `enclave`: the trunk in a trusted executor behind an operator's relay (`protect.enclave`).

`experiments.text_privacy.run_text_attack` opens a deployment once per run and one `session` per prompt (a fresh
secret each); a session's `observe` generates the answer and returns everything the untrusted party received
(`Observation`), recorded through the one hook every transport has (`Transport.observe`). The adaptive attacker for
each deployment class lives in `attack.text.adaptive` (`adaptation_for`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from splitveil.core.errors import ConfigError
from splitveil.protect.deployment import DEPLOYMENTS, PUBLIC_WEIGHTS, Deployment, device, honest_cloud
from splitveil.wire.frame import FrameKind, decode_frame


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

    def generate(self, prompt: str, config, *, chat: bool = False):
        """Generates like `SplitCausalLM.generate` (greedy or sampled, stop strings, chat) through this session's
        protected split: what `splitveil generate --protect NAME` runs."""
        if self.lm is None:
            raise ConfigError("this protection generates through its own command (see `splitveil protections`)")
        return self.lm.generate(prompt, config, chat=chat)

    def close(self) -> None:
        """Releases what this session holds of its own (not what its deployment holds)."""


class DeploymentSession(TextSession):
    """A session of a deployment that runs one split for all its sessions (an executor or an enclave process): it
    observes and generates through the deployment's own `observe` and `lm` (None where it has no split to lend)."""

    def __init__(self, deployment: "TextDeployment"):
        self.deployment = deployment
        self.depth = deployment.plan.cuts[0]
        self.lm = getattr(deployment, "lm", None)

    def observe(self, prompt: str, max_new_tokens: int, **options) -> Observation:
        return self.deployment.observe(prompt, max_new_tokens, **options)


class TextDeployment(Deployment):
    """How a Λ-split runs under one protection. Subclasses set what the cloud holds and whether that reveals the
    secret, check a strength before any model loads, and open sessions."""

    name = "none"
    modality = "text"
    protects = "the prompt and the answer"
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
        return observe(self.lm, prompt, max_new_tokens)

    def close(self) -> None:
        self.lm.close()  # this session's own split and its session in the in-process service


@DEPLOYMENTS.register
class CutDeployment(TextDeployment):
    """A cut defence of `protect.cut` (or none): the split in process, the device applying the defence."""

    defence_class = None
    summary = "the plain Λ-split: embeddings and the first A layers, the last layers and the LM head on the device"
    protects = "nothing: the trunk's input is the head's plain output, which the public weights invert"
    parties = (device("embeddings, layers 0..A-1, layers B.. and the LM head, the prompt, the answer"),
               honest_cloud("the public trunk (layers A..B-1) and its KV cache; receives every hidden state the head "
                            "sends and sends back the trunk's outputs"))
    assumptions = (PUBLIC_WEIGHTS,)
    attacker = {"command": "splitveil attack text", "attacks": ["nearest", "exact", "learned"],
                "adaptation": "none needed"}

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
        return heldout_perplexity(self._split(self.defence_class(self.strength) if self.defence_class else None), token_lists)


_CUT_ADAPTATIONS = {
    "noise": "knows the noise scale: widens the exact attack's tolerance to it and trains the learned readout on "
             "states it noises itself",
    "permute": "matches the permuted trunk it must hold against the public weights to recover the permutation",
    "randcut": "is told the session's depth (it must run the right layers); an eavesdropper searches every depth",
}


def _register_cut_defences() -> None:
    from splitveil.protect.cut import CUT_DEFENCES

    for name in CUT_DEFENCES:
        defence = CUT_DEFENCES.get(name)
        DEPLOYMENTS.register(type(f"{name.capitalize()}Deployment", (CutDeployment,), {
            "name": name, "defence_class": defence, "__module__": __name__,
            "summary": f"the Λ-split with the `{name}` cut defence on the device: {(defence.__doc__ or '').strip().splitlines()[0]}",
            "protects": "the prompt and the answer, as far as the defence's adaptive attacker fails",
            "parties": (device("embeddings, head and tail layers, the LM head, and the defence's per-session secret"),
                        honest_cloud(defence.cloud_holds + ("; that reveals the secret" if defence.reveals_secret else ""))),
            "assumptions": (PUBLIC_WEIGHTS,),
            "attacker": {"command": f"splitveil attack text --defence {name} --strength S",
                         "attacks": ["exact", "learned"], "adaptation": _CUT_ADAPTATIONS.get(name, "knows the defence")},
        }))


_register_cut_defences()


def deployment_for(name: str | None) -> type[TextDeployment]:
    """The text deployment `name` (a registered text protection), or the plain Λ-split for None or "none"."""
    return CutDeployment if name in (None, "none") else DEPLOYMENTS.get(name, "text")


def observe(lm, prompt: str, max_new_tokens: int) -> Observation:
    """Runs a greedy split generation and records every FORWARD frame's tensor as the cloud decoded it (through the
    transport's observation hook)."""
    uplink, downlink = [], []

    def record(frame: bytes, reply: bytes) -> None:
        request = decode_frame(frame, finite=False)
        if request.kind == FrameKind.FORWARD:
            uplink.append(request.tensor[0])
            downlink.append(decode_frame(reply, finite=False).tensor[0])

    if lm.transport is None:
        raise ConfigError("observing needs a split with a remote part (a transport to the cloud)")
    with lm.transport.observe(record):
        result = lm.generate(prompt, max_new_tokens=max_new_tokens)
    return Observation(result.prompt_ids, result.token_ids, torch.cat(uplink), torch.cat(downlink))


def heldout_perplexity(lm, token_lists: list[list[int]]) -> float:
    """Perplexity of the split model (with whatever defence it runs) over held-out token sequences."""
    from splitveil.metrics.text import mean_nll, perplexity

    total, count = 0.0, 0
    for ids in token_lists:
        nll, n = mean_nll(lm.score(ids), ids)
        total, count = total + nll, count + n
    return perplexity(total, count)
