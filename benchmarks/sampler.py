"""Sampler speed: nyaflow's flow Euler sampler (`nyaflow.sample.sample_latents`) against diffusers'
`StableDiffusionXLPipeline` with `nyaflow.scheduler.FlowMatchEulerSDXLScheduler`, on the same tiny model,
prompt, seeds, steps, guidance and shift, both returning latents (no VAE decode). Rounds alternate between
the two so that machine noise hits both alike; the fastest round of each counts. Also prints how far apart
their latents are (they should agree to ~1e-6: tests/test_sample.py).

    .venv/bin/python benchmarks/sampler.py [--steps 20] [--images 4] [--rounds 3]

Builds the tiny model in a temporary folder (offline).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch


def measure(steps: int = 20, images: int = 4, rounds: int = 3, size: int = 64, guidance: float = 4.0) -> dict:
    from diffusers import StableDiffusionXLPipeline

    from nyaflow.demo_data import TAG_WORDS
    from nyaflow.model import build_tiny_components, load_components, save_components
    from nyaflow.sample import sample_latents
    from nyaflow.scheduler import FlowMatchEulerSDXLScheduler

    folder = Path(tempfile.mkdtemp(prefix="nyaflow-bench-sampler-"))
    save_components(build_tiny_components(folder, TAG_WORDS, seed=0), folder)
    c = load_components(folder)
    scheduler = FlowMatchEulerSDXLScheduler.from_pretrained(folder, subfolder="scheduler", shift=3.0)
    pipe = StableDiffusionXLPipeline.from_pretrained(folder, scheduler=scheduler, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    prompt, seeds = "red circle, blue background, solo", list(range(images))

    def ours():
        return sample_latents(c, [prompt], seeds, steps, guidance, 3.0, size, size, batch_size=images)

    def theirs():
        return pipe(
            prompt,
            num_inference_steps=steps,
            guidance_scale=guidance,
            height=size,
            width=size,
            num_images_per_prompt=images,
            generator=[torch.Generator().manual_seed(s) for s in seeds],
            output_type="latent",
        ).images

    ours(), theirs()  # warm up
    times = {"nyaflow": [], "diffusers": []}
    for _ in range(rounds):
        for name, fn in (("nyaflow", ours), ("diffusers", theirs)):
            start = time.perf_counter()
            latents = fn()
            times[name].append(time.perf_counter() - start)
            if name == "nyaflow":
                mine = latents
            else:
                difference = (mine - latents).abs().max().item()
    best = {name: min(t) for name, t in times.items()}
    return {
        "nyaflow_s": best["nyaflow"],
        "diffusers_s": best["diffusers"],
        "ratio": best["nyaflow"] / best["diffusers"],
        "max_latent_difference": difference,
        "steps": steps,
        "images": images,
        "size": size,
        "guidance": guidance,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    r = measure(args.steps, args.images, args.rounds)
    print(f"nyaflow sample_latents      : {r['nyaflow_s'] * 1000:8.1f} ms")
    print(f"diffusers SDXL pipeline     : {r['diffusers_s'] * 1000:8.1f} ms")
    print(
        f"ratio nyaflow / diffusers   : {r['ratio']:8.3f}  ({r['images']} images, {r['steps']} steps, "
        f"{r['size']} px, guidance {r['guidance']:g}; latents differ by at most"
        f" {r['max_latent_difference']:.1e})"
    )


if __name__ == "__main__":
    main()
