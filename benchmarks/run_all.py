"""The CPU-side benchmarks as one ratio table (`make bench`; under 5 minutes on 2 cores).

    .venv/bin/python benchmarks/run_all.py [--steps 10] [--sampler-steps 10] [--data-images 8]

Each row times nyaflow and its baseline in the same run, alternating between them where the benchmark
has rounds, so that a busy machine slows both alike:

- training loop: nyaflow's `train()` (DeepSpeed engine, ZeRO-2, collective stop/finite checks, keyed
  generators, logging) against a bare PyTorch loop (the same fused AdamW, loss.backward, step) on the
  same tiny model, data, objective and batches (benchmarks/train_overhead.py, fewer steps; the data are
  written straight into shards here instead of being downloaded with img2dataset);
- sampler: nyaflow.sample against diffusers' StableDiffusionXLPipeline with
  FlowMatchEulerSDXLScheduler on the tiny model, same prompt, seeds and steps (benchmarks/sampler.py);
- data: every `ratio ...: <value>` line that benchmarks/data.py prints (preprocess against img2dataset's
  resize, ...), when that script exists.

torch runs on one thread: on a shared machine, two OpenMP threads fighting other processes made the tiny
model 5-8x slower here, and noisier. Ratios < 1 mean nyaflow is faster.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def make_data(folder: Path, images: int, size: int, seed: int = 0) -> Path:
    """A training data folder (manifest.json + one bucket's shard) of demo-like images and captions."""
    import numpy as np

    from nyaflow.demo_data import COLOURS, SHAPES, draw_shape
    from nyaflow.shards import ShardWriter

    rng = np.random.default_rng(seed)
    (folder / "shards").mkdir(parents=True, exist_ok=True)
    writer = ShardWriter(folder / "shards", f"{size}x{size}", 1000)
    colours = list(COLOURS)
    for i in range(images):
        shape, colour, background = SHAPES[i % 3], colours[i % len(colours)], colours[(i + 3) % len(colours)]
        buf = io.BytesIO()
        draw_shape(size, size, shape, colour, background, rng).save(buf, format="PNG")
        meta = {"original_size": [size, size], "crop_top_left": [0, 0], "target_size": [size, size]}
        caption = f"{colour} {shape}, {background} background, solo"
        writer.write(
            f"{i:06d}", {"png": buf.getvalue(), "txt": caption.encode(), "json": json.dumps(meta).encode()}
        )
    writer.close()
    shards = [{**s, "bucket": [size, size]} for s in writer.shards]
    (folder / "manifest.json").write_text(json.dumps({"shards": shards}))
    return folder


def training_loop(root: Path, steps: int, micro_batch: int, rounds: int) -> dict:
    """Seconds per step of both loops, the fastest of `rounds` interleaved rounds each."""
    from train_overhead import bare_loop, nyaflow_loop

    from nyaflow import config as nyaflow_config
    from nyaflow.demo_data import TAG_WORDS
    from nyaflow.model import build_tiny_components, save_components
    from nyaflow.train import init_distributed

    train = {"micro_batch": micro_batch, "val_size": 2, "val_sigmas": 1, "num_workers": 0}
    cfg = nyaflow_config.validate({"run": "bench", "train": train})
    data = make_data(root / "data", 32, 64)
    save_components(build_tiny_components(root / "base", TAG_WORDS), root / "base")
    init_distributed()
    bare, ours = [], []
    for r in range(rounds):
        bare.append(bare_loop(cfg, root / "base", data, steps))
        ours.append(nyaflow_loop(cfg, root / "base", data, root / f"train{r}", steps))
    return {"nyaflow": min(ours), "baseline": min(bare)}


def data_ratios(images: int) -> tuple[list[dict], list[str]]:
    """The `ratio <name>: <value>` lines of benchmarks/data.py, and its other figures as notes."""
    script = HERE / "data.py"
    if not script.is_file():
        return [], ["benchmarks/data.py is not there (yet): loader and preprocessing rows skipped"]
    result = subprocess.run(
        [sys.executable, str(script), "--images", str(images)], capture_output=True, text=True, timeout=600
    )
    if result.returncode != 0:
        return [], [f"benchmarks/data.py failed (exit {result.returncode}): {result.stderr.strip()[-300:]}"]
    rows = []
    for line in result.stdout.splitlines():
        m = re.match(r"ratio (.+?):\s*([0-9.]+)(.*)", line.strip())
        if m:
            rows.append({"name": m.group(1), "ratio": float(m.group(2)), "detail": m.group(3).strip()})
    figures = [f"data.py: {line.strip()}" for line in result.stdout.splitlines() if "/s" in line]
    return rows, [line for line in figures if not line.startswith("data.py: ratio")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10, help="timed training steps per loop and round")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds of the training loops")
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--sampler-steps", type=int, default=10)
    parser.add_argument("--sampler-rounds", type=int, default=4)
    parser.add_argument("--data-images", type=int, default=8)
    parser.add_argument("--out", type=Path, help="also write the rows as JSON")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    start = time.perf_counter()
    rows, notes = [], []

    root = Path(tempfile.mkdtemp(prefix="nyaflow-bench-"))
    t = training_loop(root, args.steps, args.micro_batch, args.rounds)
    rows.append(
        {
            "name": "training loop: nyaflow train() / bare PyTorch loop",
            "nyaflow": f"{t['nyaflow'] * 1000:.0f} ms/step",
            "baseline": f"{t['baseline'] * 1000:.0f} ms/step",
            "ratio": t["nyaflow"] / t["baseline"],
            "meaning": "time per step, nyaflow / bare (README goal <= 1.05)",
            "detail": f"tiny model, micro batch {args.micro_batch}, 64 px, {args.steps} timed steps,"
            f" fastest of {args.rounds} rounds",
        }
    )
    from sampler import measure

    s = measure(steps=args.sampler_steps, images=2, rounds=args.sampler_rounds)
    rows.append(
        {
            "name": "sampler: nyaflow.sample / diffusers SDXL pipeline",
            "nyaflow": f"{s['nyaflow_s'] * 1000:.0f} ms",
            "baseline": f"{s['diffusers_s'] * 1000:.0f} ms",
            "ratio": s["ratio"],
            "meaning": "time, nyaflow / diffusers",
            "detail": f"tiny model, {s['images']} images, {s['steps']} steps, CFG, fastest of"
            f" {args.sampler_rounds} rounds; latents differ by <= {s['max_latent_difference']:.0e}",
        }
    )
    data_rows, note = data_ratios(args.data_images)
    for r in data_rows:
        meaning = "as benchmarks/data.py prints it (images/s, nyaflow / baseline: > 1 = nyaflow faster)"
        rows.append({**r, "name": f"data: {r['name']}", "nyaflow": "", "baseline": "", "meaning": meaning})
    notes += note

    seconds = time.perf_counter() - start
    width = max(len(r["name"]) for r in rows)
    print()
    print(f"{'benchmark':<{width}}  {'nyaflow':>12}  {'baseline':>12}  {'ratio':>6}  ratio of")
    for r in rows:
        print(
            f"{r['name']:<{width}}  {r['nyaflow']:>12}  {r['baseline']:>12}  {r['ratio']:6.2f}"
            f"  {r['meaning']}"
        )
    print()
    for r in rows:
        if r["detail"]:
            print(f"- {r['name'].split(':')[0]}: {r['detail']}")
    for note in notes:
        print(f"- {note}")
    load = os.getloadavg()[0]
    print(f"- {seconds:.0f} s in all; {os.cpu_count()} cores, load average {load:.1f}; torch on 1 thread")
    if args.out:
        args.out.write_text(json.dumps({"rows": rows, "seconds": seconds, "load": load}, indent=2) + "\n")


if __name__ == "__main__":
    main()
