"""The trusted-execution deployments: the Λ-split trunk in an enclave (`enclave`, text) and TEE layer partitioning of
a CNN (`tee-partition`, image).

`EnclaveDeployment` runs `serve --enclave` as a child process (`EnclaveOperator`: the operator's relay and, below
it, the trusted executor) and the device's head and tail here, over a `SealedTransport` attested against the
measurement this machine computes. What the untrusted operator receives is every byte it relays: the sealed
channel's outer frames, recorded through the outer transport's observation hook. The text attacks read those bytes
as the attacker best can (`observed_as_states`: every aligned run of float32 values of the hidden size) and, as the
control, the same attack reads the head's clear output for the same prompt. The attestation is SIMULATED (a key in a
file stands in for the CPU vendor's); every record says so.
"""

from __future__ import annotations

from splitveil.core.errors import ConfigError
from splitveil.plan.plan import Placement
from splitveil.protect.deployment import DEPLOYMENTS, PUBLIC_WEIGHTS, Deployment, Party, device, honest_cloud
from splitveil.protect.text import DeploymentSession, Observation, TextDeployment, TextSession, heldout_perplexity

SIMULATED_ATTESTATION = ("attestation is SIMULATED: an Ed25519 key in a file stands in for the CPU vendor's, and the "
                         "executor is an ordinary process (no hardware isolation)")


@DEPLOYMENTS.register
class EnclaveDeployment(TextDeployment):
    """The trunk in a trusted executor hosted by an untrusted operator that only relays ciphertext."""

    name = "enclave"
    cloud_holds = ("ciphertext only: the operator relays AES-GCM-sealed frames to the trusted executor it hosts (the "
                   "executor holds the public trunk and sees the states in clear)")
    reveals_secret = False
    summary = ("the Λ-split's trunk in a trusted executor (`serve --enclave`): the device attests it and seals every "
               "frame to it; the operator's process only relays bytes")
    protects = "the prompt and the answer, from the operator (not from the executor, which is trusted)"
    placement = (Placement.EDGE, Placement.TRUSTED, Placement.EDGE)
    parties = (device("embeddings, head and tail layers, the LM head, the channel's session keys"),
               Party("enclave", Placement.TRUSTED, "the public trunk (layers A..B-1), its KV cache, the hidden states "
                     "in clear, the channel's session keys", "trusted through attestation of the code and weights it "
                     "loaded (SIMULATED)"),
               honest_cloud("no weights and no key: it hosts the enclave and relays every sealed byte between it and "
                            "the device (it sees their sizes and timing)", name="operator"))
    assumptions = (SIMULATED_ATTESTATION, "the enclave's memory is invisible to the operator (not enforced here)",
                   PUBLIC_WEIGHTS)
    attacker = {"command": "splitveil attack text --defence enclave", "attacks": ["exact", "learned"],
                "adaptation": "reads every relayed byte as float32 rows of the hidden size (the attacker's best "
                              "reading of ciphertext); the same attack on the head's clear output is the control"}

    @classmethod
    def check(cls, strength: float, cuts: tuple[int, int]) -> None:
        if strength != 0:
            raise ConfigError(f"the enclave deployment has no strength (it seals every frame): drop --strength "
                              f"{strength:g}")
        if not 0 < cuts[0] < cuts[1]:
            raise ConfigError(f"the enclave serves the trunk of --split A,B with 0 < A < B, got {cuts[0]},{cuts[1]}")

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        from splitveil.edge.generate import SplitCausalLM
        from splitveil.tee.enclave_lm import EnclaveOperator

        from splitveil.models.causal_lm import CausalLMSplittable

        self.check(self.strength, tuple(self.plan.cuts))
        self.bytes_up = self.bytes_down = 0
        public = CausalLMSplittable(self.model)
        self.clear_head = public.make_part(0, public.boundary(self.plan.cuts[0]))  # the control's head, here
        self.operator = EnclaveOperator(self.model_name, tuple(self.plan.cuts)).__enter__()
        try:
            self.lm = SplitCausalLM(self.model, self.split_plan(self.plan.cuts), tokenizer=self.tokenizer,
                                    wire=self.wire, transport=self.operator.transport())  # the trunk: trusted
        except BaseException:
            self.operator.__exit__(None, None, None)
            raise

    def session(self) -> TextSession:
        return DeploymentSession(self)  # the split over the sealed transport: `generate` runs through it

    def observe(self, prompt: str, max_new_tokens: int) -> Observation:
        """One generation through the operator; the view is every byte the operator relayed for it."""
        import torch

        from splitveil.tee.enclave_lm import observed_as_states

        up, down = bytearray(), bytearray()

        def record(frame: bytes, reply: bytes) -> None:
            up.extend(frame)
            down.extend(reply)

        with self.lm.transport.outer.observe(record):
            result = self.lm.generate(prompt, max_new_tokens=max_new_tokens)
        self.bytes_up, self.bytes_down = self.bytes_up + len(up), self.bytes_down + len(down)
        hidden = self.model.config.hidden_size
        self.clear_head.reset()
        with torch.inference_mode():
            clear = self.clear_head(torch.tensor([result.prompt_ids]))[0].float()  # the control: a plain split's uplink
        return Observation(result.prompt_ids, result.token_ids, observed_as_states(bytes(up), hidden),
                           observed_as_states(bytes(down), hidden), clear_uplink=clear)

    def perplexity(self, token_lists: list[list[int]]) -> float | None:
        return heldout_perplexity(self.lm, token_lists)

    def describe(self) -> dict:
        from splitveil.tee.channel import SIMULATED

        return {"view": "every byte the operator relayed (the sealed channel's outer frames), read as float32 rows of "
                        "the hidden size", "attestation": SIMULATED, "assumptions": list(self.assumptions),
                "measurement": self.operator.measurement.hex(), "bytes_relayed_up": self.bytes_up,
                "bytes_relayed_down": self.bytes_down}

    def close(self) -> None:
        lm, operator = getattr(self, "lm", None), getattr(self, "operator", None)
        if lm is not None:
            lm.close()
            self.lm = None
        if operator is not None:
            operator.__exit__(None, None, None)
            self.operator = None


@DEPLOYMENTS.register
class TeePartitionDeployment(Deployment):
    """TEE layer partitioning of a CNN (`splitveil partition`): described here, run by `partition run`."""

    name = "tee-partition"
    modality = "image"
    summary = ("the first p blocks of a CNN in a trusted executor, the rest on an untrusted accelerator; p chosen as "
               "the smallest cut where the strongest reconstruction attack's SSIM falls below tau")
    protects = "the input image, from the accelerator and its operator"
    placement = (Placement.TRUSTED, Placement.CLOUD)
    parties = (device("the image; seals it to the enclave"),
               Party("enclave", Placement.TRUSTED, "blocks 0..p-1 and the image in clear",
                     "trusted through attestation (SIMULATED)"),
               honest_cloud("blocks p.. of the model (the cloud owns the whole model) and the feature map at cut p",
                            name="accelerator"))
    assumptions = (SIMULATED_ATTESTATION, "the accelerator's owner knows the whole model, the enclave's part included")
    attacker = {"command": "splitveil partition --dataset D --model M",
                "attacks": ["cgan", "inverse", "rmle"], "adaptation": "white-box (rMLE with the enclave part's "
                "weights) and learned attackers trained to convergence at every cut; MINE and InfoNCE bounds"}
