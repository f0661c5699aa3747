"""SDXL components: load them, build a tiny SDXL-shaped model offline, encode prompts, build time ids.

Conventions (as the SDXL pipeline in diffusers):
- prompt embeddings = concat(text_encoder.hidden_states[-2], text_encoder_2.hidden_states[-2]) on the last
  dimension; pooled embeddings = text_encoder_2's projected `text_embeds`.
- An empty prompt (caption dropout, unconditional guidance branch) is encoded as zeros, as SDXL's
  `force_zeros_for_empty_prompt` does.
- time ids per image = (original_h, original_w, crop_top, crop_left, target_h, target_w), in pixels.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
)

COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")


@dataclass
class Components:
    """The parts of an SDXL pipeline that training and sampling use."""

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    text_encoder_2: CLIPTextModelWithProjection
    tokenizer: CLIPTokenizer
    tokenizer_2: CLIPTokenizer

    @property
    def vae_scale(self) -> int:
        """Pixels per latent cell (8 for SDXL)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)


def load_components(path: str | Path, unet: UNet2DConditionModel | None = None) -> Components:
    """Load a diffusers-layout SDXL folder (local only: compute jobs never touch the network)."""
    path = Path(path)
    if not (path / "model_index.json").is_file():
        raise FileNotFoundError(f"{path} is not a diffusers model folder (no model_index.json)")
    kw = {"local_files_only": True}
    return Components(
        unet=unet or UNet2DConditionModel.from_pretrained(path / "unet", **kw),
        vae=AutoencoderKL.from_pretrained(path / "vae", **kw),
        text_encoder=CLIPTextModel.from_pretrained(path / "text_encoder", **kw),
        text_encoder_2=CLIPTextModelWithProjection.from_pretrained(path / "text_encoder_2", **kw),
        tokenizer=CLIPTokenizer.from_pretrained(path / "tokenizer", **kw),
        tokenizer_2=CLIPTokenizer.from_pretrained(path / "tokenizer_2", **kw),
    )


def encode_prompts(c: Components, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (prompt_embeds [B, 77, D1+D2], pooled [B, P]) for `prompts`; empty prompts give zeros.

    Differentiable: a text encoder that is trained (requires_grad) gets its gradient through the loss;
    frozen encoders record no graph. Inference callers run it under torch.no_grad()."""
    device = c.text_encoder.device
    hidden = []
    pooled = None
    for tokenizer, encoder in ((c.tokenizer, c.text_encoder), (c.tokenizer_2, c.text_encoder_2)):
        ids = tokenizer(
            prompts,
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(device)
        out = encoder(ids, output_hidden_states=True)
        hidden.append(out.hidden_states[-2])
        pooled = out.text_embeds if hasattr(out, "text_embeds") else pooled
    embeds = torch.cat(hidden, dim=-1)
    empty = torch.tensor([p == "" for p in prompts], device=device)
    embeds = torch.where(empty[:, None, None], torch.zeros_like(embeds), embeds)
    pooled = torch.where(empty[:, None], torch.zeros_like(pooled), pooled)
    return embeds, pooled


def time_ids(original_hw, crop_top_left, target_hw) -> torch.Tensor:
    """SDXL micro-conditioning for a batch: each argument is a [B, 2] sequence of (y, x) pixel pairs."""
    return torch.cat(
        [
            torch.as_tensor(a, dtype=torch.float32).reshape(-1, 2)
            for a in (original_hw, crop_top_left, target_hw)
        ],
        dim=1,
    )


# --- the tiny SDXL-shaped model (demo and tests) ---------------------------------------------------------

# Sizes follow the real model's rules that diffusers' single-file loader relies on: the two text encoders
# differ in width (it tells them apart by the position-embedding width) and text_encoder_2's projection_dim
# equals its hidden size (it splits OpenCLIP's fused in_proj by text_projection's first dimension).
TINY = {
    "text_encoder_hidden": 32,
    "text_encoder_2_hidden": 64,
    "unet_channels": [32, 64, 64],
    "addition_time_embed_dim": 8,
    "vae_channels": [16, 32, 32],
    "latent_channels": 4,
}


def _byte_unicode() -> dict[int, str]:
    """GPT-2 / CLIP byte-to-unicode table: every byte maps to a printable character."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


def write_tiny_tokenizer(folder: Path, words: list[str]) -> CLIPTokenizer:
    """Write a CLIP BPE vocabulary that has every byte plus whole-word tokens for `words`.

    Any text tokenizes (byte fallback); the listed words become single tokens, built by left-to-right merges.
    """
    folder.mkdir(parents=True, exist_ok=True)
    chars = list(_byte_unicode().values())
    vocab = chars + [c + "</w>" for c in chars]
    merges: list[str] = []
    for word in sorted({w.lower() for w in words if len(w) > 1}):
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        merged = symbols[0]
        for s in symbols[1:]:
            merge = f"{merged} {s}"
            merged += s
            if merge not in merges:
                merges.append(merge)
                vocab.append(merged)
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    seen: dict[str, int] = {}
    for token in vocab:
        seen.setdefault(token, len(seen))
    (folder / "vocab.json").write_text(json.dumps(seen))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    tokenizer = CLIPTokenizer(
        str(folder / "vocab.json"), str(folder / "merges.txt"), pad_token="<|endoftext|>"
    )
    tokenizer.model_max_length = 77
    tokenizer.save_pretrained(folder)
    return tokenizer


def build_tiny_components(folder: Path, words: list[str], seed: int = 0) -> Components:
    """Build a randomly initialised, SDXL-shaped model whose tokenizers know `words` (offline)."""
    torch.manual_seed(seed)
    tok = write_tiny_tokenizer(folder / "tokenizer", words)
    tok_2 = write_tiny_tokenizer(folder / "tokenizer_2", words)
    h1, h2 = TINY["text_encoder_hidden"], TINY["text_encoder_2_hidden"]

    def clip_config(hidden: int, act: str) -> CLIPTextConfig:
        return CLIPTextConfig(
            vocab_size=len(tok),
            hidden_size=hidden,
            intermediate_size=4 * hidden,
            num_hidden_layers=3,
            num_attention_heads=4,
            max_position_embeddings=77,
            projection_dim=hidden,
            hidden_act=act,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )

    text_encoder = CLIPTextModel(clip_config(h1, "quick_gelu"))
    text_encoder_2 = CLIPTextModelWithProjection(clip_config(h2, "gelu"))
    ch = TINY["unet_channels"]
    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=TINY["latent_channels"],
        out_channels=TINY["latent_channels"],
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=tuple(ch),
        layers_per_block=1,
        attention_head_dim=(2, 4, 4),
        transformer_layers_per_block=(1, 1, 1),
        cross_attention_dim=h1 + h2,
        norm_num_groups=8,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=TINY["addition_time_embed_dim"],
        projection_class_embeddings_input_dim=6 * TINY["addition_time_embed_dim"] + h2,
    )
    vc = TINY["vae_channels"]
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(vc),
        up_block_types=("UpDecoderBlock2D",) * len(vc),
        block_out_channels=tuple(vc),
        layers_per_block=1,
        latent_channels=TINY["latent_channels"],
        norm_num_groups=8,
        sample_size=64,
    )
    return Components(unet, vae, text_encoder, text_encoder_2, tok, tok_2)


def save_components(c: Components, folder: Path, scheduler=None) -> None:
    """Write a diffusers folder that `StableDiffusionXLPipeline.from_pretrained` loads."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline(
        vae=c.vae,
        text_encoder=c.text_encoder,
        text_encoder_2=c.text_encoder_2,
        tokenizer=c.tokenizer,
        tokenizer_2=c.tokenizer_2,
        unet=c.unet,
        scheduler=scheduler or FlowMatchEulerDiscreteScheduler(),
    )
    pipe.save_pretrained(folder, safe_serialization=True)
