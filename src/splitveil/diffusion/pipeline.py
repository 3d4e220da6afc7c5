"""Text-to-image diffusion models of the Stable-Diffusion kind, built offline: tokenizer, text encoder, UNet,
scheduler and an optional VAE, as one `DiffusionModel`.

Everything here is built from configs: a word-level tokenizer made locally (no download), a small CLIP text
encoder, a `UNet2DConditionModel`, a DDIM scheduler and, for latent-space models, an `AutoencoderKL`. A model
without a VAE works in pixel space: its "latents" are the picture in [-1, 1].

`load_diffusion(name)` resolves a registered name (`fashion-mnist-diffusion`, trained here on first use and cached;
`tiny-diffusion`, `tiny-latent-diffusion`, random weights for tests) or any local diffusers-style directory with
`unet/`, `text_encoder/`, `tokenizer/`, `scheduler/` and optionally `vae/`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from splitveil.core.errors import ModelNotFoundError

#: Fashion-MNIST class names as words of a prompt ("a photo of a <class>")
FASHION_CLASSES = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot")
SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>")
#: the words the local tokenizer knows besides the class names (prompts of other words map to <unk>)
BASE_WORDS = ("a", "an", "the", "photo", "picture", "image", "drawing", "of", "my", "your", "with", "and", "in", "on",
              "black", "white", "grey", "dark", "light", "small", "large", "new", "old", "private", "secret", "red",
              "blue", "green", "striped", "plain", "leather", "wool", "cotton", "summer", "winter")
MAX_PROMPT_TOKENS = 12  # prompts are padded or cut to this many tokens (with <bos> and <eos>), as SD pads to 77


def prompt_for_class(label: int) -> str:
    return f"a photo of a {FASHION_CLASSES[int(label)]}"


def build_tokenizer(words: tuple[str, ...] | None = None, *, max_length: int = MAX_PROMPT_TOKENS):
    """A word-level fast tokenizer made locally: lower-cased, split on whitespace, <bos> ... <eos> then <pad>."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    words = words or tuple(dict.fromkeys(BASE_WORDS + tuple(w for c in FASHION_CLASSES for w in c.split())))
    vocab = {token: index for index, token in enumerate(SPECIAL_TOKENS + tuple(words))}
    core = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.post_processor = processors.TemplateProcessing(
        single="<bos> $A <eos>", special_tokens=[("<bos>", vocab["<bos>"]), ("<eos>", vocab["<eos>"])])
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                   unk_token="<unk>", model_max_length=max_length)


@dataclass
class DiffusionModel:
    """The pieces of a text-to-image pipeline, in eval mode.

    `vae` is None for a pixel-space model: then latents are the picture itself, scaled to [-1, 1].
    """

    name: str
    tokenizer: object
    text_encoder: torch.nn.Module  # a transformers CLIPTextModel: ids [B, L] -> last_hidden_state [B, L, D]
    unet: torch.nn.Module  # diffusers UNet2DConditionModel
    scheduler: object  # a diffusers scheduler (DDIM by default: deterministic steps)
    vae: torch.nn.Module | None = None
    info: dict = field(default_factory=dict)  # how it was made (training figures for a trained model)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """(channels, height, width) of one latent."""
        size = self.unet.config.sample_size
        size = (size, size) if isinstance(size, int) else tuple(size)
        return (self.unet.config.in_channels, *size)

    @property
    def max_prompt_tokens(self) -> int:
        return int(self.tokenizer.model_max_length)

    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        """Token ids [B, L], padded to the model's prompt length (as Stable Diffusion pads to 77)."""
        batch = self.tokenizer(list(prompts), padding="max_length", truncation=True, max_length=self.max_prompt_tokens,
                               return_tensors="pt")
        return batch["input_ids"]

    @torch.no_grad()
    def encode_prompt(self, prompts: list[str]) -> torch.Tensor:
        """Prompt embeddings [B, L, D]: the text encoder's last hidden state, what the UNet cross-attends to."""
        return self.text_encoder(self.tokenize(prompts)).last_hidden_state

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents [B, C, h, w] -> pictures [B, c, H, W] in [0, 1]."""
        if self.vae is not None:
            latents = self.vae.decode(latents / self.vae.config.scaling_factor).sample
        return ((latents + 1) / 2).clamp(0, 1)

    @torch.no_grad()
    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """Pictures in [0, 1] -> latents (the VAE's mean, scaled; or the picture in [-1, 1])."""
        x = images * 2 - 1
        if self.vae is None:
            return x
        return self.vae.encode(x).latent_dist.mean * self.vae.config.scaling_factor

    def save(self, directory: Path) -> None:
        """Writes a diffusers-style directory that `load_diffusion` reads back."""
        directory = Path(directory)
        for name in ("unet", "text_encoder", "tokenizer", "scheduler", "vae"):
            component = getattr(self, name)
            if component is not None:
                component.save_pretrained(directory / name)


def build_text_encoder(vocab_size: int, *, hidden: int = 64, layers: int = 2, heads: int = 4,
                       max_positions: int = MAX_PROMPT_TOKENS, seed: int = 0):
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                            num_hidden_layers=layers, num_attention_heads=heads, max_position_embeddings=max_positions,
                            pad_token_id=0, bos_token_id=1, eos_token_id=2, projection_dim=hidden)
    torch.manual_seed(seed)
    return CLIPTextModel(config).eval()


def build_unet(*, channels: int = 1, sample_size: int = 28, widths: tuple[int, ...] = (16, 32, 64),
               cross_attention_dim: int = 64, groups: int = 8, head_dim: int = 8, seed: int = 0):
    """A small `UNet2DConditionModel`: the first down block (and last up block) without attention, the others with
    cross-attention to the prompt embeddings."""
    from diffusers import UNet2DConditionModel

    n = len(widths)
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=sample_size, in_channels=channels, out_channels=channels, layers_per_block=1,
        block_out_channels=widths, norm_num_groups=groups, cross_attention_dim=cross_attention_dim,
        attention_head_dim=head_dim,
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (n - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (n - 1) + ("UpBlock2D",),
    ).eval()


def build_scheduler(*, train_steps: int = 1000):
    from diffusers import DDIMScheduler

    return DDIMScheduler(num_train_timesteps=train_steps, beta_schedule="squaredcos_cap_v2", clip_sample=True,
                         set_alpha_to_one=True, prediction_type="epsilon")


def build_vae(*, channels: int = 1, latent_channels: int = 2, seed: int = 0):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(in_channels=channels, out_channels=channels, latent_channels=latent_channels,
                         block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=4, layers_per_block=1,
                         sample_size=16).eval()


def load_directory(path: Path, *, name: str | None = None) -> DiffusionModel:
    """Reads a diffusers-style directory (what `DiffusionModel.save` writes, or a Stable-Diffusion snapshot)."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextModel

    missing = [sub for sub in ("unet", "text_encoder", "tokenizer", "scheduler") if not (path / sub).is_dir()]
    if missing:
        raise ModelNotFoundError(f"{path} is not a diffusers model directory: {missing[0]}/ is missing")
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # one-line output for --json; loading takes well under a second
    diffusers_logging.disable_progress_bar()
    try:
        unet = UNet2DConditionModel.from_pretrained(path / "unet").eval()
        text_encoder = CLIPTextModel.from_pretrained(path / "text_encoder").eval()
        tokenizer = AutoTokenizer.from_pretrained(path / "tokenizer")
        scheduler = DDIMScheduler.from_pretrained(path / "scheduler")  # DDIM: deterministic steps, any SD scheduler config
        vae = AutoencoderKL.from_pretrained(path / "vae").eval() if (path / "vae").is_dir() else None
    except (OSError, ValueError) as error:
        raise ModelNotFoundError(f"cannot load the diffusion model in {path}: {str(error).splitlines()[0]}") from None
    info = {}
    if (path / "splitveil.json").is_file():
        import json

        info = json.loads((path / "splitveil.json").read_text())
    return DiffusionModel(name or path.name, tokenizer, text_encoder, unet, scheduler, vae, info)
