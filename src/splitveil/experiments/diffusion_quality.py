"""Sample quality of a Fashion-MNIST diffusion model: our Fashion-MNIST classifier's accuracy on generated pictures.

The scorer is a LeNet trained (and cached) on the 60,000 training images; its accuracy on the 10,000 test images is
reported beside its accuracy on the generated ones, "a photo of a <class>" labelled <class>.
"""

from __future__ import annotations

import time

import torch


def scorer(*, quiet: bool = True):
    """(classifier, its accuracy on the Fashion-MNIST test file)."""
    from splitveil.data.images import load_dataset
    from splitveil.models.vision_zoo import build_vision_model
    from splitveil.train.classifier import TrainConfig, accuracy, cached_classifier, predict

    data = load_dataset("fashion-mnist")
    train_images, train_labels = data.images[:60000], data.labels[:60000]
    model, _ = cached_classifier(lambda: build_vision_model("lenet", (1, 28, 28), 10), train_images, train_labels,
                                 TrainConfig(epochs=2, seed=0), quiet=quiet,
                                 key_fields={"dataset": "fashion-mnist", "model": "lenet-diffusion-scorer", "train": 60000})
    return model, accuracy(predict(model, data.images[60000:]), data.labels[60000:])


@torch.no_grad()
def sample_batch(model, prompts: list[str], *, steps: int, seed: int, guidance: float) -> torch.Tensor:
    """Unsplit pictures [B, c, H, W] for `prompts` in one batch (the same loop as `generate_image`, batched)."""
    from splitveil.diffusion.sampling import denoise_step, fresh_scheduler, initial_latents, prompt_context, unet_noise

    scheduler = fresh_scheduler(model, steps)
    context = prompt_context(model, prompts, guidance)
    latents = initial_latents(model, len(prompts), seed, scheduler)
    predict = unet_noise(model, context)
    for t in scheduler.timesteps:
        latents, _ = denoise_step(predict, scheduler, latents, t, guidance)
    return model.decode(latents)


def sample_quality(model, *, per_class: int = 20, steps: int = 10, guidance: float = 3.0, seed: int = 0,
                   batch: int = 50) -> dict:
    """The scorer's accuracy on `per_class` generated pictures of each of the 10 classes."""
    from splitveil.diffusion.pipeline import FASHION_CLASSES, prompt_for_class
    from splitveil.train.classifier import predict

    classifier, test_accuracy = scorer()
    labels = torch.arange(10).repeat_interleave(per_class)
    start = time.perf_counter()
    pictures = torch.cat([sample_batch(model, [prompt_for_class(int(c)) for c in labels[i:i + batch]], steps=steps,
                                       seed=seed + i, guidance=guidance) for i in range(0, len(labels), batch)])
    predicted = predict(classifier, pictures).argmax(-1)
    per_class_accuracy = {FASHION_CLASSES[c]: round(float((predicted[labels == c] == c).float().mean()), 3) for c in range(10)}
    return {"kind": "diffusion-sample-quality", "model": model.name, "generated": len(labels), "steps": steps,
            "guidance": guidance, "seed": seed, "scorer": "lenet (trained on the 60k Fashion-MNIST train images)",
            "scorer_test_accuracy": round(test_accuracy, 4),
            "generated_accuracy": round(float((predicted == labels).float().mean()), 4),
            "per_class_accuracy": per_class_accuracy, "sampling_seconds": round(time.perf_counter() - start, 2),
            "model_info": {k: v for k, v in model.info.items() if not k.startswith("_")}}
