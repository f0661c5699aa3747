"""Base-model stage: write the diffusers folder that training starts from.

`model.base: tiny` builds a small SDXL-shaped model offline and fits its VAE to the training images (a VAE
with random weights cannot reconstruct anything, so the demo could not learn colours through it); the
VAE's `scaling_factor` is then set to 1 / std of the latents, as for the real SDXL VAE. A local diffusers
folder is checked and linked instead.
"""

from __future__ import annotations

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


def build_base_model(config: dict, out: Path, data_dir: Path | None) -> dict:
    """Write the base model to `out` (complete or absent); returns a small report."""
    base = config["model"]["base"]
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    if base == "tiny":
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
        report = {"base": "tiny", "vae_fit_loss_first": losses[0] if losses else None}
        report |= {"vae_fit_loss_last": losses[-1] if losses else None}
        report["vae_scaling_factor"] = components.vae.config.scaling_factor
    else:
        path = Path(base)
        if not path.is_dir():
            raise NotImplementedError(
                f"model.base={base!r}: only 'tiny' and local diffusers folders are supported so far"
            )
        load_components(path)  # fails early with a clear message if the folder is incomplete
        tmp.mkdir(parents=True)
        for part in path.iterdir():
            (tmp / part.name).symlink_to(part.resolve())
        report = {"base": str(path.resolve())}
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return report
