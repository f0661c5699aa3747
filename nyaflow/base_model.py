"""Base-model stage: write the diffusers folder that training starts from.

`model.base: tiny` builds a small SDXL-shaped model offline and fits its VAE to the training images (a VAE
with random weights cannot reconstruct anything, so the demo could not learn colours through it); the
VAE's `scaling_factor` is then set to 1 / std of the latents, as for the real SDXL VAE.

Real bases (`base_kind`): a local diffusers folder is checked and linked; a Hugging Face id is fetched once
by the `fetch_base` rule into resources/hub/ (`fetch`: compute jobs never touch the network) and linked;
a single-file SDXL checkpoint (.safetensors, SGM layout) is converted with diffusers' `from_single_file`
using the configs and tokenizers of `model.base_config` (a diffusers folder or a fetched hub id).
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import torch

from nyaflow import demo_data
from nyaflow.loader import TrainingSet, collate, epoch_batches
from nyaflow.model import build_tiny_components, load_components, save_components


def fit_vae(vae, dataset: TrainingSet, steps: int, lr: float, batch_size: int, seed: int) -> list[float]:
    """Fit the VAE as an autoencoder (L1 + MSE reconstruction, small KL); returns the loss per step."""
    torch.manual_seed(seed)
    indices = np.arange(len(dataset))
    optimizer = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    losses, epoch = [], 0
    vae.train()
    while len(losses) < steps:
        for batch_ids in epoch_batches(indices, dataset.bucket_ids, batch_size, seed, epoch, 1, 0):
            x = collate([dataset[i] for i in batch_ids])["pixels"]
            posterior = vae.encode(x).latent_dist
            recon = vae.decode(posterior.sample()).sample
            loss = (recon - x).abs().mean() + ((recon - x) ** 2).mean() + 1e-6 * posterior.kl().mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            if len(losses) == steps:
                break
        epoch += 1
    vae.eval()
    with torch.no_grad():
        latents = [vae.encode(dataset[i]["pixels"][None]).latent_dist.mean for i in indices[:64]]
        std = torch.cat([z.flatten() for z in latents]).std().item()
    vae.register_to_config(scaling_factor=1.0 / std)
    return losses


# What `fetch` takes from a hub repository: the diffusers layout in full precision (no fp16 variants,
# no pickled .bin / .ckpt files, no ONNX/Flax copies).
HUB_PATTERNS = [
    "model_index.json",
    "*/*.json",
    "*/*.txt",
    "*/diffusion_pytorch_model.safetensors",
    "*/model.safetensors",
]
HUB_CONFIG_PATTERNS = ["model_index.json", "*/*.json", "*/*.txt"]


def base_kind(base: str) -> str:
    """'tiny', 'single_file' (a .safetensors file), 'hub' (an owner/name id that is not a local path) or
    'folder' (a local diffusers folder)."""
    if base == "tiny":
        return "tiny"
    if base.endswith(".safetensors"):
        return "single_file"
    if re.fullmatch(r"[\w.-]+/[\w.-]+", base) and not Path(base).exists():
        return "hub"
    if base.endswith((".ckpt", ".pt", ".bin")):
        raise ValueError(
            f"model.base={base!r}: pickled checkpoints are not loaded; convert it to .safetensors"
        )
    return "folder"


def hub_folder(repo_id: str) -> str:
    """Where a fetched hub repository lives, relative to the working directory."""
    return f"resources/hub/{repo_id.replace('/', '--')}"


def fetch(repo_id: str, out: Path, configs_only: bool = False) -> None:
    """Download a hub repository's diffusers files into `out` (complete or absent). Needs the network:
    the workflow runs it as a local rule on the login node."""
    from huggingface_hub import snapshot_download

    tmp = out.with_name(out.name + ".partial")
    snapshot_download(
        repo_id=repo_id,
        local_dir=tmp,
        allow_patterns=HUB_CONFIG_PATTERNS if configs_only else HUB_PATTERNS,
    )
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)


def link_folder(source: Path, out: Path) -> None:
    """Check that `source` is a loadable SDXL diffusers folder and link its parts into `out`."""
    load_components(source)  # fails early with a clear message if the folder is incomplete
    out.mkdir(parents=True)
    for part in source.iterdir():
        (out / part.name).symlink_to(part.resolve())


def convert_single_file(file: Path, config_folder: Path, out: Path) -> None:
    """An SGM-layout SDXL .safetensors file -> a diffusers folder, using `config_folder`'s configs."""
    from diffusers import StableDiffusionXLPipeline

    if not file.is_file():
        raise FileNotFoundError(f"model.base: {file} does not exist")
    pipe = StableDiffusionXLPipeline.from_single_file(
        str(file), config=str(config_folder), local_files_only=True
    )
    pipe.save_pretrained(out, safe_serialization=True)


def build_base_model(config: dict, out: Path, data_dir: Path | None, source: Path | None = None) -> dict:
    """Write the base model to `out` (complete or absent); returns a small report.

    `source` is the fetched hub folder (hub ids) or the config folder (single files)."""
    base = config["model"]["base"]
    kind = base_kind(base)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    report = {"base": base, "kind": kind}
    if kind == "tiny":
        if data_dir is None:
            raise ValueError("model.base=tiny fits its VAE on the training shards: pass the data folder")
        components = build_tiny_components(tmp, demo_data.TAG_WORDS, seed=config["seed"])
        losses = fit_vae(
            components.vae,
            TrainingSet(data_dir),
            config["model"]["vae_fit_steps"],
            config["model"]["vae_fit_lr"],
            batch_size=16,
            seed=config["seed"],
        )
        save_components(components, tmp)
        report |= {"vae_fit_loss_first": losses[0] if losses else None}
        report |= {"vae_fit_loss_last": losses[-1] if losses else None}
        report["vae_scaling_factor"] = components.vae.config.scaling_factor
    elif kind == "single_file":
        if source is None:
            raise ValueError("a single-file base needs model.base_config's folder (pass --source)")
        convert_single_file(Path(base), source, tmp)
    else:
        link_folder(source if kind == "hub" else Path(base), tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return report
