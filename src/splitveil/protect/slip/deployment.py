"""SLIP's deployments: the prompt deployment as a text protection, and the weights deployment.

`SlipDeployment` (text, "slip") runs the trunk's linear layers (layers A..B-1 of `--split A,B`) on one real executor
process (`splitveil slip serve` as a child process, TLS, fresh token). Each prompt is one session: the trusted side
(this process, the user's device) generates greedily; `observe` records every frame the executor receives through
the client transport's observation hook (`Transport.observe`) and hands the text attacks the view in the shape of a
split's traffic (`protect.slip.view.uplink_downlink`): the uplink is the first offloaded group's rows
(layer A's q/k/v input, fixed point under fresh uniform masks over Z_2^64, read as activations), the downlink the last
hidden-sized group's rows. The adaptive attacker is `attack.text.adaptive.SlipAdaptation`.

`strength` is the secure rank k (0: the public weights, nothing of them secret; the masks alone hide the prompt).
Perplexity of the defended model is measured with the same protocol against an in-process executor (loopback).

`SlipWeightsDeployment` (weights, "slip") describes the weights deployment (`splitveil slip generate --protect
weights`); its attacker is `splitveil attack weights`.
"""

from __future__ import annotations

import json

import torch

from splitveil.core.errors import ConfigError
from splitveil.plan.plan import Placement
from splitveil.protect.deployment import DEPLOYMENTS, PUBLIC_WEIGHTS, Deployment, Party, device
from splitveil.protect.text import DeploymentSession, Observation, TextDeployment, TextSession, heldout_perplexity


@DEPLOYMENTS.register
class SlipDeployment(TextDeployment):
    """SLIP's prompt deployment: the device keeps embeddings, norms, attention, head and tail layers; the cloud (an
    executor process) multiplies one-time-masked fixed-point rows by W_residual."""

    name = "slip"
    cloud_holds = ("W_residual of the offloaded layers' linear maps (the public weights at k = 0) and their inputs "
                   "in fixed point under fresh uniform one-time masks over Z_2^64; never a mask")
    reveals_secret = False
    summary = ("SLIP's prompt deployment: the linear layers of layers A..B-1 computed by an untrusted executor on "
               "one-time-masked fixed-point inputs; everything non-linear, the masks and their terms on the device")
    protects = "the prompt and the answer (and, at k > 0, the secure part of the weights)"
    placement = (Placement.EDGE, Placement.EXECUTOR, Placement.EDGE)  # the trunk's linear maps; the rest stays home
    parties = (device("embeddings, norms, attention, layers outside A..B-1, the LM head, the KV cache, every mask "
                      "and every mask term W r (today it loads every weight to compute them)"),
               Party("executor", Placement.EXECUTOR, cloud_holds,
                     "untrusted, honest-but-curious: computes what it is asked (every reply checked with Freivalds' "
                     "test), keeps every frame it receives, and knows the public weights"))
    assumptions = (PUBLIC_WEIGHTS, "masks are drawn fresh per use from the OS's CSPRNG and never leave the device")
    attacker = {"command": "splitveil attack text --defence slip", "attacks": ["exact", "learned"],
                "adaptation": "compares candidates after the first offloaded layer's public input norm, in fixed "
                              "point; trains its readout on views it masks itself; stops a search the norm's "
                              "public weights prove unmatchable"}

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
        self.executor = ExecutorProcess(bundle, "fixed").__enter__()  # last: close() stops it

    def session(self) -> TextSession:
        return DeploymentSession(self)

    def observe(self, prompt: str, max_new_tokens: int, *, chat: bool = False) -> Observation:
        """One session through the executor process; the view is every frame the executor received in it."""
        from splitveil.protect.slip.runtime import connect_client, run_generation
        from splitveil.protect.slip.view import layer_inputs, masked_view, uplink_downlink

        prompt_ids = self.encoder.encode_prompt(prompt, chat=chat)
        client, transport = connect_client(self.executor.url, token=self.executor.token, mode="fixed",
                                           residual_sha256=self.sha, groups=len(self.slip.groups),
                                           ca_file=self.executor.cert)
        frames: list[bytes] = []
        try:
            with transport.observe(lambda frame, reply: frames.append(frame)):
                result = run_generation(self.slip, self.tokenizer, client, transport, prompt,
                                        max_new_tokens=max_new_tokens, prompt_ids=prompt_ids)
        finally:
            client.close()
            transport.close()
        view = masked_view(frames)
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
        from splitveil.protect.slip.client import SlipClient
        from splitveil.protect.slip.executor import SlipExecutorService
        from splitveil.transport.loopback import LoopbackTransport

        service = SlipExecutorService(self.slip.executor_weights(), mode="fixed")
        self.slip.attach(SlipClient(LoopbackTransport(service.handle)))
        return heldout_perplexity(SplitCausalLM(self.slip.model, None, tokenizer=self.tokenizer), token_lists)

    def describe(self) -> dict:
        speeds = [r["decode_tokens_per_second"] for r in self.runs if r["decode_tokens_per_second"]]
        return {
            "view": "every frame the executor process received (recorded through the transport's observation "
                    "hook), one session per prompt; the "
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


class _DealtGenerator:
    """`SplitCausalLM.generate` through a `DealtDevice`: one session with executor and dealer per generation."""

    def __init__(self, device):
        self.device = device
        self.plan = device.runner.plan

    def generate(self, prompt, config, *, chat: bool = False):
        return self.device.generate(prompt, config, chat=chat)[0]


NON_COLLUSION = ("non-collusion: the mask dealer and the executor do not collude (together they would unmask every "
                 "input); each alone learns nothing of the prompt but its length")


@DEPLOYMENTS.register
class SlipDealerDeployment(SlipDeployment):
    """SLIP's prompt deployment with a mask dealer (`protect.slip.dealt`): the device holds no linear weight of the
    offloaded layers or of the LM head, draws each session's masks from a seed, and takes their terms W r from a
    dealer process; the executor process computes W (x + r). Every layer's linear maps and the head are offloaded
    (`--split A,B` as for slip; strength must be 0: the dealer serves the public weights)."""

    name = "slip-dealer"
    cloud_holds = ("the public weights and every offloaded linear map's input in fixed point, under masks drawn from "
                   "ChaCha20 keyed by a per-session seed it never sees (computational hiding)")
    summary = ("SLIP's prompt deployment with a mask dealer: the device keeps embeddings, norms, attention and the "
               "KV cache and no linear weight; the executor multiplies masked rows, a second server deals the masks' "
               "terms W r ahead of use")
    protects = "the prompt and the answer"
    placement = (Placement.EDGE, Placement.EXECUTOR, Placement.EDGE)
    parties = (device("embeddings, norms, attention, the KV cache, each session's mask seed and the Freivalds keys (s W "
                      "of the public weights, computed once); no linear weight of layers A..B-1 or of the LM head"),
               Party("executor", Placement.EXECUTOR, cloud_holds,
                     "untrusted, honest-but-curious: keeps every frame it receives, knows the public weights; every "
                     "unmasked product is checked with Freivalds' test"),
               Party("dealer", Placement.DEALER, "the public weights, each session's mask seed, and how many rows of "
                     "each group the device asks for (the prompt's length); nothing derived from the prompt's content",
                     "untrusted for the prompt; must not collude with the executor; its terms are checked like the "
                     "executor's replies"))
    assumptions = (PUBLIC_WEIGHTS, NON_COLLUSION)
    attacker = {"command": "splitveil attack text --defence slip-dealer", "attacks": ["exact", "learned", "nearest"],
                "adaptation": "as for slip: the executor's rows read as fixed-point activations after the first "
                              "offloaded layer's public input norm; the dealer's view (seed, row counts) holds no "
                              "prompt-dependent frame (tested byte for byte)"}

    @classmethod
    def check(cls, strength: float, cuts: tuple[int, int]) -> None:
        if strength != 0:
            raise ConfigError("slip-dealer deals for the public weights: it has no secure rank (strength 0)")
        SlipDeployment.check(strength, cuts)

    def __init__(self, model_name: str, model, tokenizer, plan, *, strength: float, wire: str):
        TextDeployment.__init__(self, model_name, model, tokenizer, plan, strength=strength, wire=wire)
        if self.wire != "fp32":
            raise ConfigError("slip-dealer sends ring elements, not hidden states: --wire does not apply (leave it at fp32)")
        from splitveil.protect.slip.dealt import DealtDevice
        from splitveil.protect.slip.decompose import causal_lm_groups
        from splitveil.protect.slip.trusted import SlipConfig

        self.check(self.strength, tuple(self.plan.cuts))
        self.config = SlipConfig(mode="fixed", rank=0, layers=tuple(self.plan.cuts), include_head=True)
        clear_groups = causal_lm_groups(self.model, layers=range(*self.plan.cuts), include_head=False)
        self.first_module = next(modules[0] for group, modules in clear_groups
                                 if group.in_features == self.model.config.hidden_size)
        self.runs: list[dict] = []
        self.frames_received = 0
        self.dealer_frames = 0
        self.device = DealtDevice(model_name, self.config).__enter__()  # last: close() stops its processes
        self.slip = self.device.slip
        if self.device.config.fuse:  # the first fused group reads layer A's residual stream, before its norm
            self.first_module = self.model.model.layers[self.plan.cuts[0]].input_layernorm
        self.encoder = self.device.runner
        self.lm = _DealtGenerator(self.device)  # what `generate --protect slip-dealer` generates through

    @property
    def fused(self) -> bool:
        """Whether the device sends fused groups (the first group's rows are then the residual stream, unnormed)."""
        return bool(self.device.config.fuse)

    def observe(self, prompt: str, max_new_tokens: int, *, chat: bool = False) -> Observation:
        """One session; the view is every frame the executor received in it."""
        from splitveil.edge.generate import GenerationConfig
        from splitveil.protect.slip.view import layer_inputs, masked_view, uplink_downlink

        prompt_ids = self.encoder.encode_prompt(prompt, chat=chat)
        frames: list[bytes] = []
        dealer_before = self.device.dealer_transport.stats.round_trips
        with self.device.transport.observe(lambda frame, reply: frames.append(frame)):
            result, figures = self.device.generate(prompt_ids, GenerationConfig(max_new_tokens=max_new_tokens))
        self.dealer_frames += self.device.dealer_transport.stats.round_trips - dealer_before
        view = masked_view(frames)
        self.frames_received += len(view)
        self.runs.append({"decode_tokens_per_second": result.decode_tokens / result.decode_seconds
                          if result.decode_tokens and result.decode_seconds > 0 else None,
                          "cpu_seconds_per_decode_token": result.cpu_seconds_decode / result.decode_tokens
                          if result.decode_tokens else None,
                          "round_trips_per_decode_step": figures["round_trips_per_decode_step"]})
        fixed_point = self.config.fixed_point
        uplink, downlink = uplink_downlink(view, self.slip.groups, hidden_size=self.model.config.hidden_size,
                                           mode="fixed", fixed_point=fixed_point)
        clear = layer_inputs(self.model, torch.tensor([prompt_ids]), self.first_module)[0]
        scale = 2.0**fixed_point.frac_bits_x
        clear = torch.round(clear.double() * scale) / scale
        return Observation(prompt_ids, result.token_ids, uplink.float(), downlink.float(), clear_uplink=clear.float())

    def perplexity(self, token_lists: list[list[int]]) -> float | None:
        """The protected model's perplexity through the executor and the dealer, every product checked."""
        return heldout_perplexity(self.device.runner, token_lists)

    def describe(self) -> dict:
        from splitveil.models.footprint import resident_weight_bytes

        def mean(key):
            values = [r[key] for r in self.runs if r[key]]
            return sum(values) / len(values) if values else None

        return {
            "view": "every frame the executor process received (through the transport's observation hook), one "
                    "session per prompt; the uplink attacked is the rows of the first group (layer A's q/k/v input, or with "
                    "fused groups its residual stream before the norm), masked, read as activations",
            "dealer_view": "per session: an OPEN frame with the seed, then row counts per group (the prompt's length "
                           "and the number of decode steps); no frame derived from the prompt's content",
            "mode": "fixed", "secure_rank": 0, "offloaded_layers": list(self.plan.cuts), "head": "masked",
            "frames_received": self.frames_received, "dealer_frames_received": self.dealer_frames,
            "decode_tokens_per_second": mean("decode_tokens_per_second"),
            "device_cpu_seconds_per_decode_token": mean("cpu_seconds_per_decode_token"),
            "round_trips_per_decode_step": mean("round_trips_per_decode_step"),
            "weight_bytes_resident": resident_weight_bytes(self.device.model),
            "fused": self.device.config.fuse,
            "trust": NON_COLLUSION,
        }

    def close(self) -> None:
        device = getattr(self, "device", None)
        if device is not None:
            device.close()
            self.device = None


@DEPLOYMENTS.register
class SlipWeightsDeployment(Deployment):
    """SLIP's weights deployment (`splitveil slip generate --protect weights`): described here; run by `slip`."""

    name = "slip"
    modality = "weights"
    summary = ("SLIP's weights deployment: each linear weight split W = W_secure (top-k SVD, kept by the trusted side) "
               "+ W_residual (sent to the untrusted executor), inputs masked so the executor learns nothing of them")
    protects = "the model's weights (the secure part of every matrix)"
    placement = (Placement.TRUSTED, Placement.EXECUTOR)  # per matrix: W_secure trusted, W_residual on the executor
    parties = (Party("secure side", Placement.TRUSTED, "W_secure = U_k S_k V_k^T of every protected matrix (or, "
                     "hardened, a secret rank k + r term), embeddings, norms, the masks", "trusted: the model owner's "
                     "device or enclave"),
               Party("executor", Placement.EXECUTOR, "W_residual of every protected matrix (the residual bundle) and "
                     "masked inputs", "untrusted: may steal the residual bundle and fine-tune it on data of its own"))
    assumptions = ("the executor never sees W_secure or a mask", "a thief has public text (or stolen labelled "
                   "images) of its own")
    attacker = {"command": "splitveil attack weights --attack nullspace|lowrank|full|scratch [--hardened]",
                "attacks": ["nullspace", "lowrank", "full", "scratch"],
                "adaptation": "reads the secret subspaces off the residual's null spaces and fits only the block left"}
