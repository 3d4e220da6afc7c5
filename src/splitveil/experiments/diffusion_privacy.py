"""What the cloud learns of the prompt and the picture under each diffusion placement.

For each prompt the picture is generated through the placement over loopback, with the cloud part logging what it
holds (the frames really cross the wire codec); then the attacks run on that log alone: prompt recovery on the
prompt embeddings, picture recovery on the per-step state, scored by SSIM against the device's final picture.

The picture figure, `image_ssim`, is the SSIM of the reconstruction the attacker picks by a rule that needs no true
picture (`PictureRecovery.pick_without_truth`: the last step it holds). The best step and picture chosen with the true
picture, per prompt, is reported only as `ssim_oracle_upper_bound`; `ssim_unrelated` scores the picked
reconstruction against another prompt's picture, the level an unrelated picture of this model reaches.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from splitveil.core import validate
from splitveil.core.errors import ConfigError

QUICK_PROMPTS = ("a photo of a sneaker", "a photo of a bag", "a photo of a dress")
EVALUATION_PROMPTS = QUICK_PROMPTS + ("a photo of a ankle boot", "a photo of a pullover", "a photo of a trouser",
                                      "a photo of my private striped shirt", "a picture of a black leather coat")


@dataclass(frozen=True)
class DiffusionAttackSpec:
    model: str = "fashion-mnist-diffusion"
    placement: str = "unet-split"
    head_blocks: int = 1
    steps: int = 10
    seed: int = 0
    guidance: float = 3.0
    wire: str = "fp32"
    prompts: tuple[str, ...] = EVALUATION_PROMPTS
    inversion_steps: int = 300  # Adam steps of the head inversion (unet-split)

    def __post_init__(self):
        """Refuses, with one line, what no run could do."""
        validate.at_least(self, 1, "steps", "inversion_steps", "head_blocks")
        validate.at_least(self, 0, "seed")
        if not self.prompts:
            raise ConfigError("give at least one prompt")

    @classmethod
    def quick(cls, **fields) -> "DiffusionAttackSpec":
        return cls(**{"prompts": QUICK_PROMPTS, "inversion_steps": 150, **fields})


@dataclass
class PromptOutcome:
    prompt: str
    recovered: str
    token_recovery: float  # share of the prompt's own tokens recovered at their position
    exact: bool
    ssim_latent: list[float] = field(default_factory=list)
    ssim_clean: list[float] = field(default_factory=list)
    picked_step: int | None = None  # the view the attacker picks without the true picture
    ssim_picked: float | None = None  # its SSIM against the true picture
    ssim_unrelated: float | None = None  # its SSIM against another prompt's picture (None with one prompt)


def run_diffusion_attack(spec: DiffusionAttackSpec, *, model=None, pictures_out: Path | None = None,
                         progress=None) -> dict:
    """Runs both attacks for every prompt of `spec`; returns one record (figures averaged over prompts)."""
    from splitveil.attack.diffusion import DiffusionTarget, PictureRecovery, PromptRecovery
    from splitveil.attack.diffusion.prompt import word_positions
    from splitveil.diffusion.generate import GenerationSpec, generate_image, loopback_transport
    from splitveil.diffusion.models import load_diffusion
    from splitveil.metrics.image import ssim

    from splitveil.core.records import environment

    stamp = environment()  # the code and machine as the run starts
    model = model or load_diffusion(spec.model, quiet=True)
    target = DiffusionTarget(model)
    prompt_attack = PromptRecovery(target)
    picture_attack = PictureRecovery(target, inversion_steps=spec.inversion_steps)
    outcomes, panels = [], []
    start = time.perf_counter()
    for index, prompt in enumerate(spec.prompts):
        log: list = []
        transport = loopback_transport(model, spec.placement, spec.head_blocks, log=log)
        result = generate_image(model, GenerationSpec(prompt, placement=spec.placement, steps=spec.steps, seed=spec.seed + index,
                                                      guidance=spec.guidance, wire=spec.wire, head_blocks=spec.head_blocks),
                                transport=transport)
        context = next(entry["tensor"] for entry in log if entry["kind"] == "context")
        # the prompt: the conditional row (the last) against the true ids
        recovered_ids = prompt_attack.reconstruct(context[-1:])[0]
        true_ids = model.tokenize([prompt])[0]
        words = word_positions(true_ids, model.tokenizer)
        hits = (recovered_ids == true_ids)[words]
        recovered_text = model.tokenizer.decode(recovered_ids, skip_special_tokens=True)
        outcome = PromptOutcome(prompt, recovered_text, float(hits.float().mean()) if len(hits) else 1.0,
                                bool(hits.all()) and bool(torch.equal(recovered_ids, true_ids)))
        # the picture, per step
        views = [entry for entry in log if entry["kind"] in ("latents", "uplink")]
        rebuilt = picture_attack.reconstruct({"views": views, "context": context, "guidance": spec.guidance,
                                              "steps": spec.steps, "head_blocks": spec.head_blocks})
        real = result.picture[None]
        for item in rebuilt:
            outcome.ssim_latent.append(ssim(item["latent_picture"][None], real))
            outcome.ssim_clean.append(ssim(item["clean_picture"][None], real) if item["clean_picture"] is not None else None)
        outcomes.append(outcome)
        panels.append((result.picture, rebuilt))
        if progress:
            progress(index + 1, len(spec.prompts))
    for index, (outcome, (real, rebuilt)) in enumerate(zip(outcomes, panels)):
        view, which = PictureRecovery.pick_without_truth(rebuilt)
        picked = rebuilt[view][which][None]
        outcome.picked_step, outcome.ssim_picked = rebuilt[view]["step"], ssim(picked, real[None])
        if len(panels) > 1:
            outcome.ssim_unrelated = ssim(picked, panels[(index + 1) % len(panels)][0][None])
    record = summarise(spec, outcomes, seconds=time.perf_counter() - start)
    record["environment"] = stamp
    if pictures_out is not None:
        record["pictures"] = str(save_panels(panels, [o.prompt for o in outcomes], pictures_out, spec))
    return record


def summarise(spec: DiffusionAttackSpec, outcomes: list[PromptOutcome], *, seconds: float) -> dict:
    steps = len(outcomes[0].ssim_latent)

    def mean_at(values_of, step):
        values = [values_of(o)[step] for o in outcomes if values_of(o)[step] is not None]
        return round(sum(values) / len(values), 4) if values else None

    latent = [mean_at(lambda o: o.ssim_latent, k) for k in range(steps)]
    clean = [mean_at(lambda o: o.ssim_clean, k) for k in range(steps)]
    best = [max(v for v in (a, b) if v is not None) for a, b in zip(latent, clean)]
    # hindsight: per prompt, the best of every step's two pictures, chosen with the true picture
    oracle = [max(v for v in o.ssim_latent + o.ssim_clean if v is not None) for o in outcomes]
    unrelated = [o.ssim_unrelated for o in outcomes if o.ssim_unrelated is not None]
    return {
        "kind": "diffusion-attack",
        "spec": {**asdict(spec), "prompts": list(spec.prompts)},
        "placement": spec.placement,
        "prompt_token_recovery": round(sum(o.token_recovery for o in outcomes) / len(outcomes), 4),
        "prompt_exact": round(sum(o.exact for o in outcomes) / len(outcomes), 4),
        "image_ssim": round(sum(o.ssim_picked for o in outcomes) / len(outcomes), 4),
        "image_ssim_rule": "last step, clean estimate (no true picture needed)",
        "image_ssim_step": outcomes[0].picked_step,
        "ssim_oracle_upper_bound": round(sum(oracle) / len(oracle), 4),
        "ssim_oracle_step": best.index(max(best)),  # where the mean over prompts peaks (hindsight)
        "ssim_unrelated": round(sum(unrelated) / len(unrelated), 4) if unrelated else None,
        "ssim_by_step": best,  # per step, the better of the two pictures (hindsight; for plots)
        "ssim_latent_by_step": latent,
        "ssim_clean_by_step": clean,
        "examples": [{"prompt": o.prompt, "recovered": o.recovered, "token_recovery": o.token_recovery} for o in outcomes],
        "threat_models": {"prompt": _threat("prompt"), "picture": _threat("picture")},
        "seconds": round(seconds, 2),
    }


def _threat(which: str) -> dict:
    from splitveil.attack.diffusion import PictureRecovery, PromptRecovery

    return (PromptRecovery if which == "prompt" else PictureRecovery).threat_model.to_dict()


def save_panels(panels, prompts: list[str], path: Path, spec: DiffusionAttackSpec) -> Path:
    """One row per prompt: the real picture, then the cloud's reconstruction at each step (decoded latents on top,
    the clean estimate below)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from splitveil.core.records import save_figure

    columns = 1 + len(panels[0][1])
    fig, axes = plt.subplots(2 * len(panels), columns, figsize=(1.1 * columns, 2.3 * len(panels)), squeeze=False)
    for row, (real, rebuilt) in enumerate(panels):
        for half in range(2):
            ax = axes[2 * row + half][0]
            ax.imshow(_show(real), cmap="gray", vmin=0, vmax=1)
            ax.set_title("real" if half == 0 else "", fontsize=6)
            ax.set_ylabel(("latent" if half == 0 else "x̂0") + f"\n{prompts[row][-14:]}", fontsize=5)
            for col, item in enumerate(rebuilt, start=1):
                picture = item["latent_picture"] if half == 0 else item["clean_picture"]
                ax = axes[2 * row + half][col]
                if picture is not None:
                    ax.imshow(_show(picture), cmap="gray", vmin=0, vmax=1)
                if row == 0 and half == 0:
                    ax.set_title(f"step {item['step']}", fontsize=6)
    for ax in axes.flat:
        ax.set_xticks([]), ax.set_yticks([])
    fig.suptitle(f"{spec.placement}: what the cloud rebuilds per step ({spec.wire} wire)", fontsize=8)
    return save_figure(fig, Path(path))


def _show(picture: torch.Tensor):
    array = picture.detach().permute(1, 2, 0).numpy()
    return array[:, :, 0] if array.shape[2] == 1 else array
