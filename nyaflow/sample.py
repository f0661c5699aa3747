"""Sampling: the flow Euler sampler with classifier-free guidance, and labelled grids of prompts x seeds.

The initial noise of seed s is `torch.randn` of the latent shape from a CPU generator seeded with s, as
`StableDiffusionXLPipeline(generator=torch.Generator().manual_seed(s))` draws it; the sigma grid is diffusers'
(nyaflow.flow.inference_sigmas). The unconditional branch uses the empty prompt (zero embeddings).
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from nyaflow import flow
from nyaflow.model import Components, encode_prompts, load_components, time_ids


@torch.no_grad()
def sample(
    c: Components,
    prompts: list[str],
    seeds: list[int],
    steps: int,
    guidance: float,
    shift: float,
    height: int,
    width: int,
) -> list[list[Image.Image]]:
    """Images [prompt][seed] as PIL images."""
    device, dtype = c.unet.device, c.unet.dtype
    f = c.vae_scale
    shape = (c.unet.config.in_channels, height // f, width // f)
    noise = torch.cat([torch.randn((1, *shape), generator=torch.Generator().manual_seed(s)) for s in seeds])
    cond, pooled = encode_prompts(c, prompts)
    uncond, uncond_pooled = encode_prompts(c, [""])
    ids = time_ids([[height, width]], [[0, 0]], [[height, width]]).to(device)
    sigmas = flow.inference_sigmas(steps, shift)
    rows = []
    for p in range(len(prompts)):
        n = len(seeds)
        embeds = torch.cat([uncond.expand(n, -1, -1), cond[p : p + 1].expand(n, -1, -1)]).to(dtype)
        text_embeds = torch.cat([uncond_pooled.expand(n, -1), pooled[p : p + 1].expand(n, -1)]).to(dtype)
        cond_kwargs = {"text_embeds": text_embeds, "time_ids": ids.expand(2 * n, -1).to(dtype)}

        def velocity(x, sigma, embeds=embeds, cond_kwargs=cond_kwargs, n=n):
            t = flow.timesteps(sigma).expand(2 * n).to(device, dtype)
            v = c.unet(torch.cat([x, x]).to(dtype), t, embeds, added_cond_kwargs=cond_kwargs).sample.float()
            return flow.guided(v[:n], v[n:], guidance)

        latents = flow.euler_sample(velocity, noise.to(device), sigmas.to(device))
        pixels = c.vae.decode((latents / c.vae.config.scaling_factor).to(c.vae.dtype)).sample
        pixels = ((pixels.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
        rows.append([Image.fromarray(img) for img in pixels])
    return rows


def labelled_grid(
    images: list[list[Image.Image]], row_labels: list[str], col_labels: list[str]
) -> Image.Image:
    """A grid with one row per row label (written on the left) and one column per column label (on top).
    Small images are enlarged (nearest neighbour) to cells of at least 128 px."""
    h, w = images[0][0].height, images[0][0].width
    zoom = max(1, -(-128 // min(h, w)))
    ch, cw = h * zoom, w * zoom
    font = ImageFont.load_default()
    label_w, label_h, pad = 200, 20, 4
    grid = Image.new("RGB", (label_w + cw * len(col_labels), label_h + ch * len(row_labels)), "white")
    draw = ImageDraw.Draw(grid)
    for j, label in enumerate(col_labels):
        draw.text((label_w + j * cw + pad, pad), label, fill="black", font=font)
    for i, label in enumerate(row_labels):
        wrapped = "\n".join(textwrap.wrap(label, 30)[: max(1, ch // 14)])
        draw.multiline_text((pad, label_h + i * ch + pad), wrapped, fill="black", font=font)
        for j, img in enumerate(images[i]):
            grid.paste(img.resize((cw, ch), Image.Resampling.NEAREST), (label_w + j * cw, label_h + i * ch))
    return grid


def colour_share(image: Image.Image, palette: dict[str, tuple[int, int, int]], colour: str) -> float:
    """Fraction of pixels whose nearest palette colour (RGB distance) is `colour`."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32).reshape(-1, 3)
    names = list(palette)
    centres = np.array([palette[n] for n in names], dtype=np.float32)
    nearest = np.argmin(((pixels[:, None, :] - centres[None]) ** 2).sum(-1), axis=1)
    return float(np.mean(nearest == names.index(colour)))


def prompt_colour_match(c: Components, cfg: dict) -> float | None:
    """Demo prompts name a background colour ('... , blue background'): the mean share of pixels of that
    colour over the sample grid, or None if no prompt names one."""
    from nyaflow.demo_data import COLOURS, background_colour

    sc = cfg["sample"]
    named = [(p, background_colour(p)) for p in sc["prompts"]]
    named = [(p, colour) for p, colour in named if colour]
    if not named:
        return None
    rows = sample(
        c,
        [p for p, _ in named],
        sc["seeds"],
        sc["steps"],
        sc["guidance"],
        sc["shift"],
        sc["height"],
        sc["width"],
    )
    return float(
        np.mean(
            [
                colour_share(img, COLOURS, colour)
                for (_, colour), row in zip(named, rows, strict=True)
                for img in row
            ]
        )
    )


def sample_stage(cfg: dict, model_dir: Path, out_dir: Path, base_dir: Path | None = None) -> dict:
    """Write out_dir/grid.png (prompts x seeds) and out_dir/scores.json; returns the scores."""
    sc = cfg["sample"]
    c = load_components(model_dir)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    c.unet.to(device, torch.bfloat16 if device.type == "cuda" else torch.float32)
    for part in (c.vae, c.text_encoder, c.text_encoder_2):
        part.to(device)
    images = sample(
        c, sc["prompts"], sc["seeds"], sc["steps"], sc["guidance"], sc["shift"], sc["height"], sc["width"]
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    grid = labelled_grid(images, sc["prompts"], [f"seed {s}" for s in sc["seeds"]])
    grid.save(out_dir / "grid.partial.png")
    (out_dir / "grid.partial.png").replace(out_dir / "grid.png")
    scores = {"colour_match_trained": prompt_colour_match(c, cfg)}
    if base_dir is not None:
        c.unet = load_components(base_dir).unet.to(device, c.unet.dtype)
        scores["colour_match_untrained"] = prompt_colour_match(c, cfg)
    (out_dir / "scores.json").write_text(json.dumps(scores, indent=2))
    return scores
