"""The picture rebuilt from what the cloud holds at each denoising step.

- `reference`: the cloud holds the latents x_t of every step (and the final ones, which it computes): it decodes
  them with the public decoder.
- `unet-split`: the cloud holds the head's output h_t = head(x_t, t) of every step. It inverts the head with its
  copy of the public head weights (gradient descent on ||head(x) - h_t||², from zeros), then decodes x̂_t.

For either, the cloud can also run its copy of the whole public UNet on x_t (it has the prompt embeddings and the
guidance scale) and take the scheduler's estimate of the clean latents, x̂_0 = (x_t - sqrt(1-ᾱ_t) ε̂) / sqrt(ᾱ_t):
early in the schedule that is far closer to the final picture than the noisy x_t. Both are returned per step.

The attacker does not have the true picture, so it cannot pick the step (or the picture) that looks most like it:
`pick_without_truth` is its rule, fixed in advance. It takes the last step it holds and, there, the clean estimate
(at the last step of a deterministic DDIM schedule that estimate is the picture the device computes from those
latents); the reference cloud's final latents when it computed them. The best step chosen with the true picture is
only an upper bound on what any such rule achieves.
"""

from __future__ import annotations

import torch

from splitveil.attack.base import Attack, Target, ThreatModel
from splitveil.diffusion.sampling import fresh_scheduler, uses_guidance
from splitveil.diffusion.unet_split import UNetCarry, UNetSplittable


class PictureRecovery(Attack):
    name = "picture"
    threat_model = ThreatModel(observes="uplink", knows_head_weights=True, knows_tail_weights=True,
                               description="The cloud keeps what it receives or computes each step (reference: the "
                                           "latents; unet-split: the head's output) and decodes it with copies of the "
                                           "public weights (head inverted by gradient descent, then the decoder).")

    def __init__(self, target: Target, *, inversion_steps: int = 300, lr: float = 0.05):
        held = target.grant(self.threat_model, self.name)
        self.model = held.public_model
        for module in (self.model.unet, self.model.text_encoder, self.model.vae):
            if module is not None:
                module.requires_grad_(False)
        self.inversion_steps = inversion_steps
        self.lr = lr

    def invert_head(self, observed: torch.Tensor, t: torch.Tensor, context: torch.Tensor, head_blocks: int) -> torch.Tensor:
        """x̂ [1, C, h, w] with head(x̂ twice for guidance rows) ≈ `observed` [R, c, H, W]."""
        splittable = UNetSplittable(self.model.unet)
        cuts = splittable.cuts_for(head_blocks)
        head = splittable.make_part(0, splittable.boundary(cuts[0]))
        rows = observed.shape[0]
        estimate = torch.zeros(1, *self.model.latent_shape, requires_grad=True)
        optimiser = torch.optim.Adam([estimate], lr=self.lr)
        for _ in range(self.inversion_steps):
            optimiser.zero_grad()
            carry = UNetCarry(estimate.expand(rows, *estimate.shape[1:]), t, context)
            for index in range(head.start, head.end):  # with gradients (the part's forward runs without)
                carry = splittable.run_segment(index, carry)
            loss = (carry.sample - observed).pow(2).mean()
            loss.backward()
            optimiser.step()
        return estimate.detach()

    @torch.no_grad()
    def clean_estimate(self, latents: torch.Tensor, t: torch.Tensor, context: torch.Tensor, guidance: float,
                       steps: int) -> torch.Tensor:
        """The scheduler's estimate of the clean latents from x_t, through the public UNet."""
        scheduler = fresh_scheduler(self.model, steps)
        model_input = torch.cat([latents, latents]) if uses_guidance(guidance) else latents
        noise = self.model.unet(model_input, t, encoder_hidden_states=context).sample
        if uses_guidance(guidance):
            unconditional, conditional = noise.chunk(2)
            noise = unconditional + guidance * (conditional - unconditional)
        return scheduler.step(noise, t, latents).pred_original_sample

    @staticmethod
    def pick_without_truth(rebuilt: list[dict]) -> tuple[int, str]:
        """The attacker's rule, applied to `reconstruct`'s output without the true picture: (index into `rebuilt`,
        "clean_picture" or "latent_picture"): the last view, its clean estimate where it has one."""
        index = len(rebuilt) - 1
        return index, "clean_picture" if rebuilt[index]["clean_picture"] is not None else "latent_picture"

    def reconstruct(self, observed: dict) -> list[dict]:
        """`observed`: {"views": the cloud's per-step entries ({"kind": "latents" | "uplink", "step", "t", "tensor"}),
        "context": the prompt embeddings it received, "guidance", "steps", "head_blocks"}. Returns per view
        {"step", "latent_picture", "clean_picture"} (pictures [c, H, W] in [0, 1]; clean_picture None after the
        last step, where the latents are final)."""
        context, guidance, steps = observed["context"], observed["guidance"], observed["steps"]
        out = []
        for view in observed["views"]:
            t = torch.tensor(view["t"]) if view.get("t") is not None else None
            if view["kind"] == "uplink":
                latents = self.invert_head(view["tensor"], t, context, observed["head_blocks"])
            else:
                latents = view["tensor"][:1]
            clean = self.clean_estimate(latents, t, context, guidance, steps) if t is not None else None
            out.append({"step": view["step"], "latent_picture": self.model.decode(latents)[0],
                        "clean_picture": self.model.decode(clean)[0] if clean is not None else None})
        return out
