"""Sampling: the flow Euler sampler with classifier-free guidance, and labelled grids of prompts x seeds.

It draws the same images as `StableDiffusionXLPipeline` with the exported scheduler
(nyaflow.scheduler.FlowMatchEulerSDXLScheduler) for the same prompt, negative prompt, seed, steps, guidance
and shift (tests/test_sample.py pins it):

- The initial noise of seed s is `torch.randn` of one latent from a CPU generator seeded with s, as the
  pipeline draws it with `generator=[torch.Generator().manual_seed(s), ...]` (one generator per image).
  So an image's starting noise depends only on its seed: not on its batch, nor on the device.
- The sigma grid is diffusers' (nyaflow.flow.inference_sigmas); Euler steps run in fp32.
- The unconditional branch is the negative prompt; an empty negative prompt is zero embeddings (SDXL's
  `force_zeros_for_empty_prompt`, as the pipeline does with `negative_prompt=None`).
- Guidance 1 runs the conditional branch only (the pipeline also skips the unconditional branch for
  scales below 1; nyaflow keeps it there: 0 samples unconditionally).
- Pixels are converted to 8 bit as the pipeline's image processor does.

Prompts come from `sample.prompt_file` (one per line, `prompt | negative prompt`, blank lines and `#`
comments ignored) or from `sample.prompts`. The stage writes `grid.png` with the `sample` settings, and
one more grid per value of `sample.sweep.{guidance,shift,steps}` (nyaflow.report.sample_grids names them).
"""

from __future__ import annotations

import json
import re
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from nyaflow import flow
from nyaflow.errors import UserError
from nyaflow.model import Components, encode_prompts, load_components, time_ids
from nyaflow.report import sample_grids


class SampleError(UserError):
    """Bad sampling input: a missing or empty prompt file, a prompt too long for the text encoders."""


# "prompt | negative prompt": a bar with white space before it (and after it, or at the end of the line).
_NEGATIVE_SEPARATOR = re.compile(r"\s\|(?:\s|$)")


@dataclass(frozen=True)
class Prompt:
    text: str
    negative: str = ""

    @property
    def label(self) -> str:
        return f"{self.text} | neg: {self.negative}" if self.negative else self.text


def parse_prompt(line: str, default_negative: str = "", where: str = "prompt") -> Prompt:
    """'prompt' or 'prompt | negative prompt' -> Prompt (the default negative when none is given)."""
    text, *negative = _NEGATIVE_SEPARATOR.split(line, maxsplit=1)
    text = text.strip()
    if not text:
        raise SampleError(f"{where}: no prompt before the ' | ' that starts the negative prompt")
    negative = negative[0].strip() if negative else default_negative
    return Prompt(text, negative)


def read_prompt_file(path: Path, default_negative: str = "") -> list[Prompt]:
    """One prompt per line, optionally `prompt | negative prompt`; blank lines and # comments are skipped."""
    path = Path(path)
    if not path.is_file():
        raise SampleError(f"prompt file {path} (sample.prompt_file) does not exist")
    prompts = [
        parse_prompt(line, default_negative, f"{path}, line {number}")
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if line.strip() and not line.lstrip().startswith("#")
    ]
    if not prompts:
        raise SampleError(
            f"prompt file {path} has no prompts: write one prompt per line (optionally"
            " 'prompt | negative prompt'); blank lines and lines starting with # are ignored"
        )
    return prompts


def prompts_from_config(sc: dict) -> list[Prompt]:
    """The grid rows: sample.prompt_file when set, else sample.prompts (each may carry ' | negative')."""
    if sc["prompt_file"]:
        return read_prompt_file(sc["prompt_file"], sc["negative_prompt"])
    return [
        parse_prompt(p, sc["negative_prompt"], f"sample.prompts[{i}]") for i, p in enumerate(sc["prompts"])
    ]


def check_prompt_lengths(c: Components, prompts: Sequence[Prompt]) -> None:
    """Refuse prompts that the CLIP text encoders would truncate, naming the prompt and its length."""
    texts = sorted({t for p in prompts for t in (p.text, p.negative) if t})
    for tokenizer in (c.tokenizer, c.tokenizer_2):
        limit = tokenizer.model_max_length
        lengths = tokenizer(texts, verbose=False).input_ids if texts else []
        for text, ids in zip(texts, lengths, strict=True):
            if len(ids) > limit:
                shown = text if len(text) <= 60 else text[:57] + "..."
                raise SampleError(
                    f"prompt {shown!r} is {len(ids) - 2} tokens long, more than the {limit - 2} that the"
                    " text encoders take: shorten it"
                )


def _as_prompts(prompts: Sequence[str | Prompt]) -> list[Prompt]:
    """Strings are read as config lines: 'prompt' or 'prompt | negative prompt'."""
    return [p if isinstance(p, Prompt) else parse_prompt(p) for p in prompts]


def initial_noise(shape: Sequence[int], seed: int) -> torch.Tensor:
    """The starting latent of `seed`: [1, *shape] fp32 from a CPU generator, as the diffusers pipeline."""
    return torch.randn((1, *shape), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def sample_latents(
    c: Components,
    prompts: Sequence[str | Prompt],
    seeds: Sequence[int],
    steps: int,
    guidance: float,
    shift: float,
    height: int,
    width: int,
    batch_size: int = 8,
) -> torch.Tensor:
    """Final latents (fp32, as the pipeline's output_type="latent"), one per (prompt, seed), prompt-major:
    [len(prompts) * len(seeds), C, height / f, width / f]. The UNet runs in its own dtype (bf16 on GPU)."""
    prompts = _as_prompts(prompts)
    f = c.vae_scale * 2 ** (len(c.unet.config.block_out_channels) - 1)
    if height % f or width % f:
        raise SampleError(f"sample size {height}x{width} is not a multiple of {f} px, as this model needs")
    device, dtype = c.unet.device, c.unet.dtype
    shape = (c.unet.config.in_channels, height // c.vae_scale, width // c.vae_scale)
    cond, cond_pooled = encode_prompts(c, [p.text for p in prompts])
    negatives = sorted({p.negative for p in prompts})
    uncond, uncond_pooled = encode_prompts(c, negatives)  # "" -> zeros
    neg_of = [negatives.index(p.negative) for p in prompts]
    ids = time_ids([[height, width]], [[0, 0]], [[height, width]]).to(device, dtype)
    sigmas = flow.inference_sigmas(steps, shift).to(device)
    guide = guidance != 1.0
    jobs = [(i, seed) for i in range(len(prompts)) for seed in seeds]
    latents = []
    for start in range(0, len(jobs), batch_size):
        chunk = jobs[start : start + batch_size]
        n = len(chunk)
        rows = torch.tensor([i for i, _ in chunk], device=cond.device)
        neg_rows = torch.tensor([neg_of[i] for i, _ in chunk], device=cond.device)
        embeds, pooled = cond[rows], cond_pooled[rows]
        if guide:  # one UNet call on [uncond; cond], as the pipeline batches it
            embeds = torch.cat([uncond[neg_rows], embeds])
            pooled = torch.cat([uncond_pooled[neg_rows], pooled])
        embeds, pooled = embeds.to(device, dtype), pooled.to(device, dtype)
        cond_kwargs = {"text_embeds": pooled, "time_ids": ids.expand(len(embeds), -1)}

        def velocity(x, sigma, embeds=embeds, cond_kwargs=cond_kwargs, n=n):
            x_in = torch.cat([x, x]) if guide else x
            # fp32 timesteps, as the pipeline passes them: bf16 would round 1000 sigma to a multiple of 4
            t = flow.timesteps(sigma).expand(len(x_in)).to(device, torch.float32)
            v = c.unet(x_in.to(dtype), t, embeds, added_cond_kwargs=cond_kwargs).sample.float()
            return flow.guided(v[:n], v[n:], guidance) if guide else v

        noise = torch.cat([initial_noise(shape, seed) for _, seed in chunk]).to(device)
        latents.append(flow.euler_sample(velocity, noise, sigmas))
    return torch.cat(latents)


@torch.no_grad()
def decode(c: Components, latents: torch.Tensor, batch_size: int = 8) -> list[Image.Image]:
    """VAE-decode latents to 8-bit RGB images, rounding as diffusers' VaeImageProcessor does."""
    images = []
    for chunk in latents.split(batch_size):
        z = (chunk / c.vae.config.scaling_factor).to(c.vae.device, c.vae.dtype)
        pixels = (c.vae.decode(z).sample.float() / 2 + 0.5).clamp(0, 1)
        array = (pixels.permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)
        images.extend(Image.fromarray(img) for img in array)
    return images


def sample(
    c: Components,
    prompts: Sequence[str | Prompt],
    seeds: Sequence[int],
    steps: int,
    guidance: float,
    shift: float,
    height: int,
    width: int,
    batch_size: int = 8,
) -> list[list[Image.Image]]:
    """Images [prompt][seed] as PIL images. A prompt is a Prompt, or a string read like a line of a prompt
    file ('prompt | negative prompt')."""
    latents = sample_latents(c, prompts, seeds, steps, guidance, shift, height, width, batch_size)
    images = decode(c, latents, batch_size)
    n = len(seeds)
    return [images[i : i + n] for i in range(0, len(images), n)]


def labelled_grid(
    images: list[list[Image.Image]], row_labels: list[str], col_labels: list[str], corner: str = ""
) -> Image.Image:
    """A grid with one row per row label (written on the left) and one column per column label (on top);
    `corner` goes in the top-left corner (the settings). Small images are enlarged (nearest neighbour) to
    cells of at least 128 px. Size: (200 + columns * cell width, 20 + rows * cell height)."""
    if len(images) != len(row_labels) or any(len(row) != len(col_labels) for row in images):
        raise ValueError("labelled_grid: one row of images per row label, one image per column label")
    h, w = images[0][0].height, images[0][0].width
    zoom = max(1, -(-128 // min(h, w)))
    ch, cw = h * zoom, w * zoom
    font = ImageFont.load_default()
    label_w, label_h, pad = 200, 20, 4
    grid = Image.new("RGB", (label_w + cw * len(col_labels), label_h + ch * len(row_labels)), "white")
    draw = ImageDraw.Draw(grid)
    draw.text((pad, pad), corner, fill="dimgray", font=font)
    for j, label in enumerate(col_labels):
        draw.text((label_w + j * cw + pad, pad), label, fill="black", font=font)
    for i, label in enumerate(row_labels):
        wrapped = "\n".join(textwrap.wrap(label, 30)[: max(1, ch // 14)])
        draw.multiline_text((pad, label_h + i * ch + pad), wrapped, fill="black", font=font)
        for j, img in enumerate(images[i]):
            grid.paste(img.resize((cw, ch), Image.Resampling.NEAREST), (label_w + j * cw, label_h + i * ch))
    return grid


def settings_label(steps: int, guidance: float, shift: float) -> str:
    return f"cfg {guidance:g}, shift {shift:g}, {steps} steps"


def colour_share(image: Image.Image, palette: dict[str, tuple[int, int, int]], colour: str) -> float:
    """Fraction of pixels whose nearest palette colour (RGB distance) is `colour`."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32).reshape(-1, 3)
    names = list(palette)
    centres = np.array([palette[n] for n in names], dtype=np.float32)
    nearest = np.argmin(((pixels[:, None, :] - centres[None]) ** 2).sum(-1), axis=1)
    return float(np.mean(nearest == names.index(colour)))


def named_colours(prompts: Sequence[Prompt]) -> list[str | None]:
    """Demo prompts name a background colour ('... , blue background'): that colour per prompt, or None."""
    from nyaflow.demo_data import background_colour

    return [background_colour(p.text) for p in prompts]


def colour_match(rows: list[list[Image.Image]], colours: Sequence[str | None]) -> float | None:
    """Mean share of pixels showing the background colour each row's prompt names (rows naming none are
    skipped); None when no row names one."""
    from nyaflow.demo_data import COLOURS

    shares = [
        colour_share(img, COLOURS, colour)
        for row, colour in zip(rows, colours, strict=True)
        if colour
        for img in row
    ]
    return float(np.mean(shares)) if shares else None


def load_model(model_dir: Path, device: torch.device) -> Components:
    """The exported diffusers folder on `device`: the UNet in bf16 on GPU, fp32 on CPU; VAE and text
    encoders in fp32."""
    try:
        c = load_components(model_dir)
    except FileNotFoundError as e:
        raise SampleError(f"cannot sample: {e}") from e
    if device.type == "cuda":
        c.unet.to(device, torch.bfloat16)
        for part in (c.vae, c.text_encoder, c.text_encoder_2):
            part.to(device)
    return c


def _save_atomic(image: Image.Image, path: Path) -> None:
    tmp = path.with_name(f"{path.stem}.partial{path.suffix}")
    image.save(tmp)
    tmp.replace(path)


def sample_stage(cfg: dict, model_dir: Path, out_dir: Path, base_dir: Path | None = None) -> dict:
    """Write out_dir/grid.png (prompts x seeds), one grid per sweep value, and out_dir/scores.json (the demo
    colour score of the trained model, and of the untrained base model when base_dir is given)."""
    sc = cfg["sample"]
    prompts = prompts_from_config(sc)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    c = load_model(model_dir, device)
    check_prompt_lengths(c, prompts)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    main = {k: sc[k] for k in ("steps", "guidance", "shift")}
    row_labels = [p.label for p in prompts]
    col_labels = [f"seed {s}" for s in sc["seeds"]]

    def draw(c: Components, settings: dict, prompts: list[Prompt]) -> list[list[Image.Image]]:
        return sample(
            c,
            prompts,
            sc["seeds"],
            settings["steps"],
            settings["guidance"],
            settings["shift"],
            sc["height"],
            sc["width"],
            sc["batch_size"],
        )

    main_rows = []
    for name, overrides in sample_grids(sc).items():
        settings = main | overrides
        images = draw(c, settings, prompts)
        main_rows = images if name == "grid.png" else main_rows
        grid = labelled_grid(images, row_labels, col_labels, settings_label(**settings))
        _save_atomic(grid, out_dir / name)
        print(f"[nyaflow sample] {out_dir / name}: {settings_label(**settings)}", flush=True)

    colours = named_colours(prompts)
    scores = {"colour_match_trained": colour_match(main_rows, colours)}
    if base_dir is not None:
        from diffusers import UNet2DConditionModel

        unet = UNet2DConditionModel.from_pretrained(Path(base_dir) / "unet", local_files_only=True)
        c.unet = unet.to(device, c.unet.dtype) if device.type == "cuda" else unet
        named = [(p, colour) for p, colour in zip(prompts, colours, strict=True) if colour]
        base_rows = draw(c, main, [p for p, _ in named]) if named else []
        scores["colour_match_untrained"] = colour_match(base_rows, [colour for _, colour in named])
    tmp = out_dir / "scores.partial.json"
    tmp.write_text(json.dumps(scores, indent=2))
    tmp.replace(out_dir / "scores.json")
    return scores
