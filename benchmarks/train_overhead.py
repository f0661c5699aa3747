"""Training-loop overhead: nyaflow's `train()` (DeepSpeed engine, ZeRO-2, collective stop/finite checks,
keyed generators, logging) against a bare PyTorch loop (the same fused AdamW, loss.backward, step) on the
same tiny model, data loader, objective and batches. Prints seconds per step and the ratio (goal <= 1.05).

    .venv/bin/python benchmarks/train_overhead.py [--steps 60]

Builds its own demo data and tiny model in a temporary folder (offline; images served from 127.0.0.1).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from nyaflow import config as nyaflow_config
from nyaflow.demo_data import TAG_WORDS, make_demo_source
from nyaflow.download import download
from nyaflow.loader import TrainingSet, micro_batches, split_validation
from nyaflow.model import build_tiny_components, load_components, save_components
from nyaflow.preprocess import preprocess
from nyaflow.train import FlowObjective, init_distributed, keyed_generator, make_optimizer, train


def bare_loop(cfg: dict, base: Path, data: Path, steps: int) -> float:
    """Seconds per step of a plain PyTorch loop on the same batches and objective (after 5 warm-up steps)."""
    tc, seed = cfg["train"], cfg["seed"]
    c = load_components(base)
    for frozen in (c.vae, c.text_encoder, c.text_encoder_2):
        frozen.requires_grad_(False).eval()
    optimizer = make_optimizer(c.unet.parameters(), tc)  # the trainer's optimizer (fused AdamW): not overhead
    objective = FlowObjective(c, tc, torch.device("cpu"), torch.float32)
    ds = TrainingSet(data)
    train_idx, _ = split_validation(len(ds), tc["val_size"], seed)
    batches = micro_batches(ds, train_idx, tc["micro_batch"], seed, 1, 0, 0, 0)
    for step in range(steps + 5):
        if step == 5:
            start = time.perf_counter()
        _, batch = next(batches)
        loss = objective.loss(c.unet, batch, keyed_generator(torch.device("cpu"), seed, 0, step))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(c.unet.parameters(), tc["grad_clip"])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return (time.perf_counter() - start) / steps


def nyaflow_loop(cfg: dict, base: Path, data: Path, out: Path, steps: int) -> float:
    """Seconds per step of `train()`, from its own throughput log (the first logging window is warm-up)."""
    cfg = {**cfg, "train": {**cfg["train"], "steps": steps + 5, "log_every": 5}}
    cfg["train"] |= {"val_every": 10**6, "checkpoint_every": 10**6}
    train(cfg, base, data, out)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rates = [r["train/images_per_s"] for r in records if "train/images_per_s" in r][1:]
    return cfg["train"]["micro_batch"] / (sum(rates) / len(rates))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(2)
    root = Path(tempfile.mkdtemp(prefix="nyaflow-bench-"))
    cfg = nyaflow_config.validate({"run": "bench", "data": {"demo": {"num_images": 96, "port": 18765}}})
    make_demo_source(root / "src", 96, 64, 18765, seed=0)
    download(cfg, root / "src" / "urls.parquet", root / "download", serve_dir=root / "src" / "images")
    preprocess(cfg, root / "src" / "urls.parquet", root / "download", root / "data")
    save_components(build_tiny_components(root / "base", TAG_WORDS), root / "base")
    init_distributed()

    bare, ours = [], []
    for r in range(args.rounds):  # interleaved rounds, so that machine noise hits both loops alike
        bare.append(bare_loop(cfg, root / "base", root / "data", args.steps))
        ours.append(nyaflow_loop(cfg, root / "base", root / "data", root / f"train{r}", args.steps))
    b, o = min(bare), min(ours)
    print(f"bare PyTorch loop : {b * 1000:7.1f} ms/step")
    print(f"nyaflow train()   : {o * 1000:7.1f} ms/step")
    print(f"overhead ratio    : {o / b:7.3f}  (nyaflow / bare, micro batch {cfg['train']['micro_batch']})")


if __name__ == "__main__":
    main()
