"""Latent caching: encode the training shards once with the frozen VAE, so that training skips the VAE.

A cached sample keeps the caption (`txt`) and micro-conditioning (`json`) of its training sample and
replaces the image by `latent.npy`: the VAE posterior's parameters (mean and log-variance, 2 x C channels,
float16, unscaled), so that the trainer still draws a fresh posterior sample each time, as it would from
the image. The shards are split into `parts` by index (shard i goes to part i % parts); each part is one
job (a GPU job on SLURM) writing `part-<p>/<shard>.tar`; `gather` then writes the latent manifest, the same
shape as the data manifest with `shards_dir: "."`, which `nyaflow.loader.TrainingSet` reads like any other.
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from nyaflow.loader import TrainingSet
from nyaflow.model import load_components
from nyaflow.shards import ShardWriter, TarIndex, rename_shard

LATENT_EXT = "latent.npy"


def part_shards(manifest: dict, part: int, parts: int) -> list[dict]:
    return [entry for i, entry in enumerate(manifest["shards"]) if i % parts == part]


def encode_to_npy(params: torch.Tensor) -> bytes:
    buf = io.BytesIO()
    np.save(buf, params.to(torch.float16).cpu().numpy(), allow_pickle=False)
    return buf.getvalue()


@torch.no_grad()
def cache_part(base_dir: Path, data_dir: Path, out: Path, part: int, parts: int, batch_size: int) -> int:
    """Encode part `part` of `parts` of the training shards into `out` (complete or absent); returns the
    number of samples encoded."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    vae = load_components(base_dir).vae.to(device, torch.float32).eval()  # the SDXL VAE needs fp32
    manifest = json.loads((Path(data_dir) / "manifest.json").read_text())
    root = Path(data_dir) / manifest.get("shards_dir", "shards")
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    done = 0
    for entry in tqdm(
        part_shards(manifest, part, parts), desc=f"latents part {part}", unit="shard", disable=None
    ):
        shard = TarIndex(root / entry["path"])
        if len(shard) != entry["count"]:
            raise ValueError(
                f"{entry['path']} holds {len(shard)} samples, the manifest says {entry['count']}"
            )
        target = tmp / entry["path"]
        target.parent.mkdir(parents=True, exist_ok=True)
        writer = ShardWriter(target.parent, target.stem, max_count=entry["count"])
        for start in range(0, len(shard), batch_size):
            raws = [shard[i] for i in range(start, min(start + batch_size, len(shard)))]
            pixels = torch.stack([TrainingSet.decode_pixels(raw) for raw in raws]).to(device)
            params = vae.encode(pixels).latent_dist.parameters
            for key, raw, p in zip(shard.keys[start : start + len(raws)], raws, params, strict=True):
                writer.write(key, {LATENT_EXT: encode_to_npy(p), "txt": raw["txt"], "json": raw["json"]})
        writer.close()
        rename_shard(target.parent / writer.shards[0]["path"], target)
        done += entry["count"]
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return done


def gather(data_dir: Path, out_dir: Path, parts: int) -> dict:
    """Write out_dir/manifest.json for the cached parts (after checking each shard is complete)."""
    manifest = json.loads((Path(data_dir) / "manifest.json").read_text())
    shards = []
    for part in range(parts):
        for entry in part_shards(manifest, part, parts):
            path = f"part-{part}/{entry['path']}"
            if len(TarIndex(Path(out_dir) / path)) != entry["count"]:
                raise ValueError(f"latent shard {path} is incomplete: rerun its cache_latents job")
            shards.append({**entry, "path": path})
    cached = {**manifest, "shards": shards, "shards_dir": ".", "latents": True}
    (Path(out_dir) / "manifest.json").write_text(json.dumps(cached, indent=2))
    return cached
