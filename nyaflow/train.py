"""Flow-matching training of the SDXL UNet with DeepSpeed (objective and time convention: nyaflow.flow).

One process per GPU (or per CPU rank with gloo). The process group comes from the usual environment
variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT); a single process without them runs
as world size 1. VAE and text encoders are frozen; only the UNet is trained.

Randomness is keyed, not streamed: the noise, sigmas, caption dropout and VAE posterior sample of
micro-step k on rank r come from a generator seeded by (seed, r, k), and the data order is a function of
k (nyaflow.loader). A run restarted from a checkpoint therefore continues exactly as if uninterrupted.

Outputs in the train folder: checkpoints/<tag>/ (DeepSpeed) with a `latest` file, tb/ (TensorBoard),
metrics.jsonl (one line per logged step) and summary.json (written last).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import time
from pathlib import Path

import numpy as np
import torch

from nyaflow import flow
from nyaflow.loader import TrainingSet, collate, micro_batches, split_validation
from nyaflow.model import Components, encode_prompts, load_components


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed():
    """Import DeepSpeed for this machine's accelerator and join (or create) the process group."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(key, value)
    os.environ.setdefault("MASTER_PORT", str(_free_port()))
    import deepspeed

    # The shared-memory CPU collective op is JIT-compiled for about a minute on first use; gloo is enough.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    local_rank = int(os.environ["LOCAL_RANK"])
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        return deepspeed, torch.device("cuda", local_rank)
    return deepspeed, torch.device("cpu")


def keyed_generator(device: torch.device, *key: int) -> torch.Generator:
    """A generator whose stream depends only on `key` (e.g. seed, rank, micro-step)."""
    seed = int(np.random.SeedSequence(list(key)).generate_state(1, dtype=np.uint64)[0] >> 1)
    return torch.Generator(device).manual_seed(seed)


def deepspeed_config(tc: dict, bf16: bool) -> dict:
    return {
        "train_micro_batch_size_per_gpu": tc["micro_batch"],
        "gradient_accumulation_steps": tc["grad_accum"],
        "gradient_clipping": tc["grad_clip"],
        "zero_optimization": {"stage": tc["zero_stage"]},
        "bf16": {"enabled": bf16},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
    }


def unet_velocity(unet, x, sigma, embeds, pooled, time_ids, dtype):
    """The UNet's velocity prediction at noise level `sigma` ([B]), returned in fp32."""
    out = unet(
        x.to(dtype),
        flow.timesteps(sigma).to(dtype),
        encoder_hidden_states=embeds.to(dtype),
        added_cond_kwargs={"text_embeds": pooled.to(dtype), "time_ids": time_ids.to(dtype)},
    ).sample
    return out.float()


class FlowObjective:
    """A data batch -> the flow-matching loss (DESIGN.md §2), with the frozen VAE and text encoders."""

    def __init__(self, c: Components, tc: dict, device: torch.device, dtype: torch.dtype):
        self.c, self.tc, self.device, self.dtype = c, tc, device, dtype
        self.scale = c.vae.config.scaling_factor

    @torch.no_grad()
    def latents(self, pixels: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        dist = self.c.vae.encode(pixels.to(self.device, self.c.vae.dtype)).latent_dist
        z = dist.sample(generator) if generator is not None else dist.mean
        return z.float() * self.scale

    def loss(self, unet, batch: dict, generator: torch.Generator) -> torch.Tensor:
        tc = self.tc
        x0 = self.latents(batch["pixels"], generator)
        n = x0.shape[0]
        keep = torch.rand(n, generator=generator, device=generator.device) >= tc["caption_dropout"]
        prompts = [c if k else "" for c, k in zip(batch["caption"], keep.tolist(), strict=True)]
        embeds, pooled = encode_prompts(self.c, prompts)
        sigma = flow.sample_sigmas(n, tc["sigma_mean"], tc["sigma_std"], tc["shift"], generator, self.device)
        eps = torch.randn(x0.shape, generator=generator, device=generator.device).to(self.device)
        x = flow.noisy_latents(x0, eps, sigma)
        time_ids = batch["time_ids"].to(self.device)
        v = unet_velocity(unet, x, sigma, embeds, pooled, time_ids, self.dtype)
        return flow.flow_loss(v, x0, eps)

    @torch.no_grad()
    def validation_loss(self, unet, dataset, indices, seed: int, rank: int, world_size: int) -> float:
        """Mean loss over the held-out samples, each scored at the same evenly spaced sigmas with the same
        noise every time (keyed by sample index). Samples are spread across ranks; the sum is all-reduced."""
        k = self.tc["val_sigmas"]
        sigma = (torch.arange(k, dtype=torch.float32, device=self.device) + 0.5) / k
        total = torch.zeros(2, dtype=torch.float64, device=self.device)
        for i in indices[rank::world_size]:
            item = collate([dataset[int(i)]])
            x0 = self.latents(item["pixels"], None).expand(k, -1, -1, -1)
            eps = torch.randn(x0.shape, generator=keyed_generator(torch.device("cpu"), seed, int(i)))
            eps = eps.to(self.device)
            embeds, pooled = encode_prompts(self.c, item["caption"])
            time_ids = item["time_ids"].to(self.device).expand(k, -1)
            v = unet_velocity(
                unet,
                flow.noisy_latents(x0, eps, sigma),
                sigma,
                embeds.expand(k, -1, -1),
                pooled.expand(k, -1),
                time_ids,
                self.dtype,
            )
            per_sigma = ((v - flow.velocity_target(x0, eps)) ** 2).mean(dim=(1, 2, 3))
            total += torch.stack([per_sigma.sum().double(), torch.tensor(k, dtype=torch.float64)]).to(
                self.device
            )
        torch.distributed.all_reduce(total)
        return (total[0] / total[1]).item()


def prune_checkpoints(folder: Path, keep: int) -> None:
    tags = sorted(p for p in folder.iterdir() if p.is_dir() and p.name.startswith("step"))
    for old in tags[:-keep]:
        shutil.rmtree(old)


def train(config: dict, base_dir: Path, data_dir: Path, out_dir: Path) -> dict:
    """Train (or resume from out_dir/checkpoints/latest) for train.steps optimizer steps."""
    tc, seed = config["train"], config["seed"]
    deepspeed, device = init_distributed()
    rank, world_size = torch.distributed.get_rank(), torch.distributed.get_world_size()
    bf16 = tc["precision"] == "bf16" or (tc["precision"] == "auto" and device.type == "cuda")
    dtype = torch.bfloat16 if bf16 else torch.float32
    out_dir, ckpt_dir = Path(out_dir), Path(out_dir) / "checkpoints"

    torch.manual_seed(seed)
    c = load_components(base_dir)
    for frozen in (c.vae, c.text_encoder, c.text_encoder_2):
        frozen.requires_grad_(False).eval().to(device)
    c.vae.to(torch.float32)  # the SDXL VAE overflows in half precision
    c.text_encoder.to(dtype)
    c.text_encoder_2.to(dtype)
    unet = c.unet.train()
    optimizer = torch.optim.AdamW(
        unet.parameters(), lr=tc["lr"], weight_decay=tc["weight_decay"], fused=device.type == "cuda"
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / (tc["warmup_steps"] + 1))
    )
    engine, _, _, _ = deepspeed.initialize(
        model=unet, optimizer=optimizer, lr_scheduler=scheduler, config=deepspeed_config(tc, bf16)
    )
    objective = FlowObjective(c, tc, device, dtype)

    dataset = TrainingSet(data_dir)
    train_idx, val_idx = split_validation(len(dataset), tc["val_size"], seed)
    state = {"step": 0, "val_loss": []}
    if (ckpt_dir / "latest").is_file():
        _, client_state = engine.load_checkpoint(str(ckpt_dir))
        state = {k: client_state[k] for k in state}
    start_step = state["step"]

    writer = None
    if rank == 0:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(out_dir / "tb"))
        metrics = (out_dir / "metrics.jsonl").open("a")
        global_batch = tc["micro_batch"] * tc["grad_accum"] * world_size
        print(
            f"[nyaflow train] world size {world_size}, global batch {global_batch} "
            f"({tc['micro_batch']} x {tc['grad_accum']} accum x {world_size}), {len(train_idx)} training "
            f"samples, {len(val_idx)} held out, {'bf16' if bf16 else 'fp32'} on {device.type}, "
            f"ZeRO {tc['zero_stage']}, starting at step {start_step}/{tc['steps']}",
            flush=True,
        )

    def validate(step: int) -> None:
        loss = objective.validation_loss(engine, dataset, val_idx, seed, rank, world_size)
        state["val_loss"].append([step, loss])
        if writer:
            writer.add_scalar("val/loss", loss, step)
            print(f"[nyaflow train] step {step}: validation loss {loss:.5f}", flush=True)

    def save(step: int) -> None:
        state["step"] = step
        engine.save_checkpoint(str(ckpt_dir), tag=f"step{step:08d}", client_state=dict(state))
        if rank == 0:
            prune_checkpoints(ckpt_dir, tc["keep_checkpoints"])

    if start_step == 0:
        validate(0)
    batches = micro_batches(
        dataset,
        train_idx,
        tc["micro_batch"],
        seed,
        world_size,
        rank,
        start_step * tc["grad_accum"],
        tc["num_workers"],
    )
    step, micro = start_step, start_step * tc["grad_accum"]
    loss_sum, images, epoch = torch.zeros((), device=device), 0, 0
    t_start = t_log = time.perf_counter()
    while step < tc["steps"]:
        epoch, batch = next(batches)
        loss = objective.loss(engine, batch, keyed_generator(device, seed, rank, micro))
        engine.backward(loss)
        engine.step()
        micro += 1
        loss_sum += loss.detach()
        images += len(batch["caption"]) * world_size
        if micro % tc["grad_accum"]:
            continue
        step += 1
        if step % tc["log_every"] == 0 or step == tc["steps"]:
            torch.distributed.all_reduce(loss_sum)
            mean_loss = loss_sum.item() / (world_size * tc["log_every"] * tc["grad_accum"])
            now = time.perf_counter()
            if writer:
                rate = images / (now - t_log)
                record = {"step": step, "loss": mean_loss, "lr": scheduler.get_last_lr()[0], "epoch": epoch}
                record |= {"images_per_s": rate}
                for key, value in record.items():
                    if key != "step":
                        writer.add_scalar(f"train/{key}", value, step)
                metrics.write(json.dumps(record) + "\n")
                metrics.flush()
                print(f"[nyaflow train] step {step}: loss {mean_loss:.5f}, {rate:.1f} img/s", flush=True)
            loss_sum.zero_()
            images, t_log = 0, now
        if step % tc["val_every"] == 0 or step == tc["steps"]:
            validate(step)
        if step % tc["checkpoint_every"] == 0 or step == tc["steps"]:
            save(step)

    summary = {
        "steps": step,
        "world_size": world_size,
        "global_batch": tc["micro_batch"] * tc["grad_accum"] * world_size,
        "images_seen": step * tc["micro_batch"] * tc["grad_accum"] * world_size,
        "val_loss": state["val_loss"],
        "val_loss_first": state["val_loss"][0][1] if state["val_loss"] else math.nan,
        "val_loss_last": state["val_loss"][-1][1] if state["val_loss"] else math.nan,
        "seconds": time.perf_counter() - t_start,
    }
    torch.distributed.barrier()
    if rank == 0:
        summary["latest"] = (ckpt_dir / "latest").read_text().strip()
        writer.close()
        metrics.close()
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
