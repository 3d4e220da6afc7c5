"""`slip` as a text defence: SLIP's prompt deployment, attacked on everything its untrusted executor received.

`SlipDeployment` (registered in `TEXT_DEFENCES`) runs the trunk's linear layers (layers A..B-1 of `--split A,B`)
on one real executor process (`splitveil slip serve` as a child process, TLS, fresh token) that logs every frame
it receives (`--log-frames`). Each prompt is one session: the trusted side (this process, the user's device)
generates greedily; `observe` reads the frames of that session back from the log and hands the text attacks the
view in the shape of a split's traffic (`protect.slip.view.uplink_downlink`): the uplink is the first offloaded
group's rows (layer A's q/k/v input, fixed point under fresh uniform masks over Z_2^64, read as activations), the
downlink the last hidden-sized group's rows. The adaptive attacker is `attack.text.adaptive.SlipAdaptation`.

`strength` is the secure rank k (0: the public weights, nothing of them secret; the masks alone hide the prompt).
Perplexity of the defended model is measured with the same protocol against an in-process executor (loopback).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

from splitveil.core.errors import ConfigError
from splitveil.experiments.text_defences import TEXT_DEFENCES, Observation, TextDeployment, TextSession


class _SlipSession(TextSession):
    def __init__(self, deployment: "SlipDeployment"):
        self.deployment = deployment
        self.depth = deployment.plan.cuts[0]

    def observe(self, prompt: str, max_new_tokens: int, *, chat: bool = False) -> Observation:
        return self.deployment.observe(prompt, max_new_tokens, chat=chat)


@TEXT_DEFENCES.register("slip")
class SlipDeployment(TextDeployment):
    """SLIP's prompt deployment: the device keeps embeddings, norms, attention, head and tail layers; the cloud (an
    executor process) multiplies one-time-masked fixed-point rows by W_residual."""

    name = "slip"
    cloud_holds = ("W_residual of the offloaded layers' linear maps (the public weights at k = 0) and their inputs "
                   "in fixed point under fresh uniform one-time masks over Z_2^64; never a mask")
    reveals_secret = False

    @classmethod
    def check(cls, strength: float, cuts: tuple[int, int]) -> None:
        if strength != int(strength):
            raise ConfigError(f"slip strength is the secure rank k (0, 1, 2 ...), got {strength:g}")
        if not 0 <= cuts[0] < cuts[1]:
            raise ConfigError(f"slip offloads layers A..B-1 of --split A,B: give A < B, got {cuts[0]},{cuts[1]}")

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.wire != "fp32":
            raise ConfigError("slip sends ring elements, not hidden states: --wire does not apply (leave it at fp32)")
        from splitveil.edge.generate import SplitCausalLM
        from splitveil.protect.slip.decompose import causal_lm_groups
        from splitveil.protect.slip.runtime import ExecutorProcess, protect_registered
        from splitveil.protect.slip.trusted import SlipConfig

        self.check(self.strength, tuple(self.plan.cuts))
        self.config = SlipConfig(mode="fixed", rank=int(self.strength), layers=tuple(self.plan.cuts))
        self.slip, _, bundle, _ = protect_registered(self.model_name, self.config)
        self.sha = json.loads((bundle / "manifest.json").read_text())["sha256"]
        self.encoder = SplitCausalLM(self.slip.model, None, tokenizer=self.tokenizer)
        clear_groups = causal_lm_groups(self.model, layers=range(*self.plan.cuts), include_head=False)
        # the clear model's first module reading a hidden-sized input (layer A's q_proj): the control's rows
        self.first_module = next(modules[0] for group, modules in clear_groups
                                 if group.in_features == self.model.config.hidden_size)
        self.runs: list[dict] = []
        self.frames_received = 0
        self._folder = tempfile.TemporaryDirectory(prefix="splitveil-slip-view-")
        self.log = Path(self._folder.name) / "frames.bin"
        self.executor = ExecutorProcess(bundle, "fixed", log_frames=self.log).__enter__()  # last: close() stops it

    def session(self) -> TextSession:
        return _SlipSession(self)

    def observe(self, prompt: str, max_new_tokens: int, *, chat: bool = False) -> Observation:
        """One session through the executor process; the view is what its log holds for that session."""
        from splitveil.protect.slip.runtime import connect_client, read_frame_log, run_generation
        from splitveil.protect.slip.view import layer_inputs, masked_view, uplink_downlink

        prompt_ids = self.encoder.encode_prompt(prompt, chat=chat)
        client, transport = connect_client(self.executor.url, token=self.executor.token, mode="fixed",
                                           residual_sha256=self.sha, groups=len(self.slip.groups),
                                           ca_file=self.executor.cert)
        try:
            result = run_generation(self.slip, self.tokenizer, client, transport, prompt, max_new_tokens=max_new_tokens,
                                    prompt_ids=prompt_ids)
            session = client.session
        finally:
            client.close()
            transport.close()
        view = [entry for entry in masked_view(read_frame_log(self.log)) if entry.session == session]
        self.frames_received += len(view)
        self.runs.append({key: result[key] for key in ("decode_tokens_per_second", "round_trips_per_decode_step",
                                                        "online_seconds", "offline_seconds", "secure_flops_share")})
        fixed_point = self.config.fixed_point
        uplink, downlink = uplink_downlink(view, self.slip.groups, hidden_size=self.model.config.hidden_size,
                                           mode="fixed", fixed_point=fixed_point)
        clear = layer_inputs(self.model, torch.tensor([prompt_ids]), self.first_module)[0]  # [T, n], before masking
        scale = 2.0**fixed_point.frac_bits_x
        clear = torch.round(clear.double() * scale) / scale  # as encoded on the device, without its mask
        return Observation(prompt_ids, result["token_ids"], uplink.float(), downlink.float(), clear_uplink=clear.float())

    def perplexity(self, token_lists: list[list[int]]) -> float | None:
        """The protected model's perplexity, every product masked and checked, against an in-process executor."""
        from splitveil.edge.generate import SplitCausalLM
        from splitveil.experiments.text_privacy import heldout_perplexity
        from splitveil.protect.slip.client import SlipClient
        from splitveil.protect.slip.executor import SlipExecutorService
        from splitveil.transport.loopback import LoopbackTransport

        service = SlipExecutorService(self.slip.executor_weights(), mode="fixed")
        self.slip.attach(SlipClient(LoopbackTransport(service.handle)))
        return heldout_perplexity(SplitCausalLM(self.slip.model, None, tokenizer=self.tokenizer), token_lists)

    def describe(self) -> dict:
        speeds = [r["decode_tokens_per_second"] for r in self.runs if r["decode_tokens_per_second"]]
        return {
            "view": "every frame the executor process received (its --log-frames file), one session per prompt; the "
                    "uplink attacked is layer A's q/k/v input rows, masked, read as activations",
            "mode": "fixed", "secure_rank": int(self.strength), "offloaded_layers": list(self.plan.cuts),
            "frames_received": self.frames_received,
            "decode_tokens_per_second": sum(speeds) / len(speeds) if speeds else None,
            "round_trips_per_decode_step": next((r["round_trips_per_decode_step"] for r in self.runs
                                                 if r["round_trips_per_decode_step"]), None),
            "offline_seconds": sum(r["offline_seconds"] for r in self.runs),
        }

    def close(self) -> None:
        executor = getattr(self, "executor", None)
        if executor is not None:
            executor.__exit__(None, None, None)
            self.executor = None
        if hasattr(self, "_folder"):
            self._folder.cleanup()


def prompt_deployment_exposure(model_name: str, prompt: str, *, cuts: tuple[int, int], max_new_tokens: int,
                               chat: bool = True, budget: int = 4096, model=None, tokenizer=None) -> dict:
    """For the demo: `prompt` through SLIP's prompt deployment (fixed point, k = 0, the executor a child process
    logging its view), and what the adaptive exact attack reads of the user's text from that view: the same attack
    and budget as the demo's undefended line (`budget` candidates per position, the chat template's tokens tried
    first), comparing candidates in the space the cloud receives, and stopping after the first round where the
    norm's public weights prove that no token can match (`ExactInversion.output_bound`). Also the answer, its tokens and the decode speed."""
    import time

    from splitveil.attack.text.adaptive import adaptation_for
    from splitveil.attack.text.attacks import ExactInversion, chat_template_hints
    from splitveil.attack.text.target import TextTarget
    from splitveil.metrics.text import token_recovery
    from splitveil.models.causal_lm import CausalLMSplittable
    from splitveil.models.loading import load_causal_lm
    from splitveil.plan.plan import SplitPlan

    if model is None:
        model, tokenizer = load_causal_lm(model_name)
    plan = SplitPlan.lambda_split(*cuts)
    with SlipDeployment(model_name, model, tokenizer, plan, strength=0, wire="fp32") as deployment:
        seen = deployment.observe(prompt, max_new_tokens, chat=chat)
        described = deployment.describe()
    public = CausalLMSplittable(model)
    target = TextTarget(public, public.boundary(cuts[0]), public.boundary(cuts[1]))
    attack = ExactInversion(target, candidates=256, max_verified=budget, **adaptation_for("slip").attack_options("exact", target))
    n = len(seen.prompt_ids)
    hints, user = chat_template_hints(tokenizer, seen.prompt_ids) if chat else ([None] * n, slice(0, n))
    started = time.perf_counter()
    recovered = attack.reconstruct(seen.uplink[:n], hints=hints)
    seconds = time.perf_counter() - started
    return {
        "attack": f"exact inversion adapted to SLIP, at most {budget} candidates per position, stopping after the "
                  f"first round where the norm's public weights prove no token can match",
        "positions_unmatchable": sum(s["unmatchable"] for s in attack.search),
        "token_recovery": token_recovery(seen.prompt_ids[user], recovered[user]),
        "recovered_user_text": tokenizer.decode(recovered[user], skip_special_tokens=True).strip(),
        "closest_relative_distance": min(s["closest_relative"] for s in attack.search),
        "seconds": seconds,
        "token_ids": seen.generated_ids,
        "text": tokenizer.decode(seen.generated_ids, skip_special_tokens=True),
        "decode_tokens_per_second": described["decode_tokens_per_second"],
        "round_trips_per_decode_step": described["round_trips_per_decode_step"],
        "frames_received": described["frames_received"],
    }
