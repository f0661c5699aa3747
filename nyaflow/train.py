"""Flow-matching training of the SDXL UNet with DeepSpeed (objective and time convention: nyaflow.flow).

One process per GPU (or per CPU rank with gloo). The process group comes from the usual environment
variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT); a single process without them runs
as world size 1. The VAE is frozen; the UNet is trained, and so is each text encoder that has a learning
rate (train.text_encoder_lr, text_encoder_2_lr: one optimizer group each, under the same schedule).

Randomness is keyed, not streamed: the noise, sigmas and VAE posterior sample of micro-step k on rank r
come from a generator seeded by (seed, r, k), caption dropout and tag processing are keyed by (seed, epoch,
sample) (nyaflow.captions), and the data order is a function of k (nyaflow.loader). A run restarted from a
checkpoint therefore continues exactly as if uninterrupted: same weights, optimizer state, EMA and
validation losses, bit for bit. The logged training loss is the mean over the micro-steps since the
previous log line; its history is identical too when train.checkpoint_every is a multiple of
train.log_every (after a stop by signal, the one window around the stop averages the steps run since the
resume).

Stopping: SIGTERM or SIGUSR2 on any rank sets a flag that all ranks agree on (all-reduce) at the next
micro-step; then every rank saves a checkpoint and `train` raises Preempted (the CLI exits with
REQUEUE_EXIT_CODE, which launchers turn into a requeue). A non-finite loss on any rank skips that
micro-step on all ranks; `train.max_nonfinite` in a row stop the run with the last checkpoint intact.

Outputs in the train folder: checkpoints/ (nyaflow.checkpoint), tb/ (TensorBoard), samples/ (grids drawn
during training), metrics.jsonl (one line per logged step) and summary.json (written last).
"""

from __future__ import annotations

import json
import os
import signal
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

from nyaflow import checkpoint, flow
from nyaflow.captions import caption_dropped, train_caption
from nyaflow.ema import ShardedEMA
from nyaflow.errors import UserError
from nyaflow.loader import TrainingSet, collate, micro_batches, split_validation
from nyaflow.model import Components, encode_prompts, load_components

REQUEUE_EXIT_CODE = 75  # EX_TEMPFAIL: stopped by a signal after saving; run again to continue


class Preempted(Exception):
    """Training stopped on SIGTERM/SIGUSR2 after every rank saved a checkpoint."""


class NonFiniteLoss(RuntimeError):
    """Too many consecutive micro-steps had a non-finite loss; the last checkpoint is intact."""


def init_distributed():
    """Import DeepSpeed for this machine's accelerator and join (or create) the process group.

    With RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT set (torchrun, submitit, the tests' launcher) the group
    rendezvouses over TCP. A standalone process is world size 1 and rendezvouses through a file store, so
    it needs no port (a free port picked and then bound could be taken by another process in between).
    """
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    standalone = "WORLD_SIZE" not in os.environ
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
        os.environ.setdefault(key, value)
    import deepspeed

    # The shared-memory CPU collective op is JIT-compiled for about a minute on first use; gloo is enough.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if standalone and not dist.is_initialized():
        store = Path(tempfile.mkdtemp(prefix="nyaflow-pg-")) / "store"
        deepspeed.init_distributed(
            backend, auto_mpi_discovery=False, init_method=f"file://{store}", rank=0, world_size=1
        )
    else:
        deepspeed.init_distributed(backend)
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
        "zero_optimization": {**tc["zero_options"], "stage": tc["zero_stage"]},
        "bf16": {"enabled": bf16},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
    }


TEXT_ENCODERS = {"text_encoder": "text_encoder_lr", "text_encoder_2": "text_encoder_2_lr"}


class TrainedModules(torch.nn.Module):
    """The UNet and the text encoders trained with it (train.text_encoder_lr / text_encoder_2_lr), as one
    module for DeepSpeed; its forward is the UNet's. Checkpoint keys are then prefixed `unet.`,
    `text_encoder.`, `text_encoder_2.` (without trained text encoders the engine wraps the bare UNet)."""

    def __init__(self, unet, text_encoders: dict[str, torch.nn.Module]):
        super().__init__()
        self.unet = unet
        for name, module in text_encoders.items():
            self.add_module(name, module)

    def forward(self, *args, **kwargs):
        return self.unet(*args, **kwargs)


def trained_modules(c: Components, tc: dict) -> torch.nn.Module:
    """What the optimizer trains: the UNet, or TrainedModules when a text encoder has a learning rate."""
    encoders = {name: getattr(c, name) for name, key in TEXT_ENCODERS.items() if tc[key]}
    return TrainedModules(c.unet, encoders) if encoders else c.unet


def unet_of(module: torch.nn.Module):
    return module.unet if isinstance(module, TrainedModules) else module


def trained_parts(module: torch.nn.Module) -> list[str]:
    """Names of the trained parts, in optimizer-group order: "unet", then trained text encoders."""
    return ["unet"] + [name for name in TEXT_ENCODERS if hasattr(module, name)]


def param_groups(module: torch.nn.Module, tc: dict) -> list[dict]:
    """One optimizer group per trained part, each at its own peak learning rate."""
    if not isinstance(module, TrainedModules):
        return [{"params": list(module.parameters()), "lr": tc["lr"]}]
    rates = {"unet": tc["lr"]} | {name: tc[key] for name, key in TEXT_ENCODERS.items()}
    return [
        {"params": list(getattr(module, name).parameters()), "lr": rates[name]}
        for name in trained_parts(module)
    ]


def make_optimizer(params, tc: dict):
    """torch's AdamW with its fused kernel (one kernel for the whole update; under ZeRO the optimizer sees
    each group's flat fp32 partition). DeepSpeed's FusedAdam would be JIT-compiled by every rank on first
    use: nvcc on the compute nodes, and a lock in ~/.cache/torch_extensions that a build killed by a requeue
    leaves behind. `params`: parameters or groups."""
    kwargs = {"lr": tc["lr"], "betas": tuple(tc["adam_betas"]), "eps": tc["adam_eps"]}
    return torch.optim.AdamW(params, weight_decay=tc["weight_decay"], fused=True, **kwargs)


def lr_factor(step: int, tc: dict) -> float:
    """Linear warmup over train.warmup_steps, then constant or cosine decay to train.min_lr_ratio."""
    if step < tc["warmup_steps"]:
        return (step + 1) / (tc["warmup_steps"] + 1)
    if tc["schedule"] == "constant":
        return 1.0
    progress = (step - tc["warmup_steps"]) / max(1, tc["steps"] - tc["warmup_steps"])
    return tc["min_lr_ratio"] + (1 - tc["min_lr_ratio"]) * 0.5 * (1 + np.cos(np.pi * min(1.0, progress)))


def unet_velocity(unet, x, sigma, embeds, pooled, time_ids, dtype):
    """The UNet's velocity prediction at noise level `sigma` ([B]), returned in fp32. The timestep stays
    fp32 (bf16 would round 1000 * sigma to 3 significant digits); the UNet casts its embedding."""
    out = unet(
        x.to(dtype),
        flow.timesteps(sigma).float(),
        encoder_hidden_states=embeds.to(dtype),
        added_cond_kwargs={"text_embeds": pooled.to(dtype), "time_ids": time_ids.to(dtype)},
    ).sample
    return out.float()


def latent_loss(unet, x0, embeds, pooled, time_ids, tc: dict, generator: torch.Generator, dtype):
    """The flow-matching loss of latents x0 (already scaled) and prompt embeddings (caption dropout applied):
    draws sigma, then the noise, from `generator`. FlowObjective.loss ends here; `nyaflow bench train` calls
    it directly with cached-latent-shaped tensors."""
    n, device = x0.shape[0], x0.device
    sigma = flow.sample_sigmas(n, tc["sigma_mean"], tc["sigma_std"], tc["shift"], generator, device)
    eps = torch.randn(x0.shape, generator=generator, device=generator.device).to(device)
    x = flow.noisy_latents(x0, eps, sigma)
    v = unet_velocity(unet, x, sigma, embeds, pooled, time_ids, dtype)
    return flow.flow_loss(v, x0, eps)


class FlowObjective:
    """A data batch -> the flow-matching loss (DESIGN.md §2), with the frozen VAE and text encoders."""

    def __init__(self, c: Components, tc: dict, device: torch.device, dtype: torch.dtype):
        self.c, self.tc, self.device, self.dtype = c, tc, device, dtype
        self.scale = c.vae.config.scaling_factor

    @torch.no_grad()
    def latents(self, batch: dict, generator: torch.Generator | None) -> torch.Tensor:
        """x0: a posterior sample (its mean when `generator` is None) times the VAE scaling factor, from the
        cached posterior parameters or by encoding the pixels."""
        if "latents" in batch:
            latents = batch["latents"].to(self.device, non_blocking=True).float()
            dist_ = DiagonalGaussianDistribution(latents)
        else:
            pixels = batch["pixels"].to(self.device, non_blocking=True).to(self.c.vae.dtype)
            dist_ = self.c.vae.encode(pixels).latent_dist
        z = dist_.sample(generator) if generator is not None else dist_.mean
        return z.float() * self.scale

    def loss(self, unet, batch: dict, generator: torch.Generator) -> torch.Tensor:
        """The loss of a batch whose captions are final (caption dropout applied: "" = the empty prompt).
        Host-to-device copies do not wait: the loader pins its batches on GPU machines."""
        embeds, pooled = encode_prompts(self.c, batch["caption"])
        x0 = self.latents(batch, generator)
        time_ids = batch["time_ids"].to(self.device, non_blocking=True)
        return latent_loss(unet, x0, embeds, pooled, time_ids, self.tc, generator, self.dtype)

    @torch.no_grad()
    def validation_loss(self, unet, dataset, indices, seed: int) -> float:
        """Mean loss over the held-out samples, each scored at the same evenly spaced sigmas with the same
        noise every time (keyed by sample index). Samples are spread across ranks; the sum is all-reduced."""
        k = self.tc["val_sigmas"]
        sigma = (torch.arange(k, dtype=torch.float32, device=self.device) + 0.5) / k
        total = torch.zeros(2, dtype=torch.float64, device=self.device)
        for i in indices[dist.get_rank() :: dist.get_world_size()]:
            item = collate([dataset[int(i)]])
            x0 = self.latents(item, None).expand(k, -1, -1, -1)
            eps = torch.randn(x0.shape, generator=keyed_generator(torch.device("cpu"), seed, int(i)))
            eps = eps.to(self.device)
            embeds, pooled = encode_prompts(self.c, item["caption"])
            x = flow.noisy_latents(x0, eps, sigma)
            ids = item["time_ids"].to(self.device).expand(k, -1)
            v = unet_velocity(unet, x, sigma, embeds.expand(k, -1, -1), pooled.expand(k, -1), ids, self.dtype)
            per_sigma = ((v - flow.velocity_target(x0, eps)) ** 2).mean(dim=(1, 2, 3))
            total[0] += per_sigma.sum().double()
            total[1] += k
        dist.all_reduce(total)
        return (total[0] / total[1]).item()


class StopFlag:
    """Set by SIGTERM/SIGUSR2 on this rank."""

    def __init__(self):
        self.requested = False
        for sig in (signal.SIGTERM, signal.SIGUSR2):
            signal.signal(sig, self._set)

    def _set(self, signum, frame):
        self.requested = True


def agree(stop_requested: bool, loss: torch.Tensor) -> tuple[bool, bool]:
    """One all-reduce per micro-step: (any rank asked to stop, the loss is finite on every rank)."""
    flags = torch.stack(
        [torch.tensor(float(stop_requested), device=loss.device), (~torch.isfinite(loss)).float()]
    )
    dist.all_reduce(flags)
    return flags[0].item() > 0, flags[1].item() == 0


def configure_unet(unet, tc: dict) -> None:
    if tc["gradient_checkpointing"]:
        unet.enable_gradient_checkpointing()
    if tc["attention"] == "eager":
        from diffusers.models.attention_processor import AttnProcessor

        unet.set_attn_processor(AttnProcessor())
    else:
        from diffusers.models.attention_processor import AttnProcessor2_0

        unet.set_attn_processor(AttnProcessor2_0())  # torch scaled_dot_product_attention (flash on GPU)


def build_engine(deepspeed, module, tc: dict, device: torch.device, bf16: bool):
    """(engine, lr scheduler): the UNet (or TrainedModules) in training mode wrapped by DeepSpeed with
    nyaflow's optimizer and learning-rate schedule. `train` and `nyaflow bench train` both build it here."""
    module = module.train()
    optimizer = make_optimizer(param_groups(module, tc), tc)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, tc))
    engine, _, _, _ = deepspeed.initialize(
        model=module, optimizer=optimizer, lr_scheduler=scheduler, config=deepspeed_config(tc, bf16)
    )
    return engine, scheduler


def train(config: dict, base_dir: Path, data_dir: Path, out_dir: Path) -> dict:
    """Train, or resume from out_dir/checkpoints/latest, until train.steps optimizer steps are done."""
    tc, seed = config["train"], config["seed"]
    deepspeed, device = init_distributed()
    rank, world_size = dist.get_rank(), dist.get_world_size()
    bf16 = tc["precision"] == "bf16" or (tc["precision"] == "auto" and device.type == "cuda")
    dtype = torch.bfloat16 if bf16 else torch.float32
    out_dir = Path(out_dir)
    ckpt_dir = out_dir / "checkpoints"

    # Model: frozen VAE (fp32: the SDXL VAE overflows in half precision); trained UNet; text encoders
    # frozen unless they have a learning rate (then DeepSpeed trains them with the UNet).
    torch.manual_seed(seed)
    c = load_components(base_dir)
    c.vae.requires_grad_(False).eval().to(device)
    for name, key in TEXT_ENCODERS.items():
        if not tc[key]:
            getattr(c, name).requires_grad_(False).eval()
        getattr(c, name).to(device, dtype)
    configure_unet(c.unet, tc)
    # This rank's share of the EMA (nyaflow.ema), taken from the fp32 weights before DeepSpeed casts them.
    ema = ShardedEMA(c.unet, tc["ema_decay"], rank, world_size, device) if tc["ema_decay"] > 0 else None
    engine, scheduler = build_engine(deepspeed, trained_modules(c, tc), tc, device, bf16)
    unet = unet_of(engine.module)
    objective = FlowObjective(c, tc, device, dtype)

    dataset = TrainingSet(data_dir)
    train_idx, val_idx = split_validation(len(dataset), tc["val_size"], seed)
    state = {"step": 0, "micro_step": 0, "world_size": world_size, "loss": [], "val_loss": [], "nonfinite": 0}
    # What the data position (micro-step -> batches) depends on, besides the world size.
    data_order = {"seed": seed, "train.micro_batch": tc["micro_batch"], "train.val_size": tc["val_size"]}
    data_order["samples"] = len(dataset)
    client_state = checkpoint.load(engine, ckpt_dir, data_order)
    if client_state is not None:
        state = {k: client_state[k] for k in state}
        if ema is not None:
            resume_ema(ema, unet, ckpt_dir, client_state, device)

    writer, metrics = None, None
    if rank == 0:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(out_dir / "tb"))
        metrics = (out_dir / "metrics.jsonl").open("a")
        print(
            f"[nyaflow train] world size {world_size}, global batch "
            f"{tc['micro_batch'] * tc['grad_accum'] * world_size} ({tc['micro_batch']} x {tc['grad_accum']} "
            f"accumulation x {world_size} ranks), {len(train_idx)} training and {len(val_idx)} held-out "
            f"samples, "
            f"{'bf16' if bf16 else 'fp32'} on {device.type}, ZeRO {tc['zero_stage']}, "
            f"starting at step {state['step']}/{tc['steps']}",
            flush=True,
        )
    wandb_run = None
    if rank == 0 and tc["wandb_project"]:
        import wandb

        wandb_run = wandb.init(project=tc["wandb_project"], name=config["run"], config=config, resume="allow")

    def log(step: int, values: dict) -> None:
        if rank != 0:
            return
        for key, value in values.items():
            writer.add_scalar(key, value, step)
        metrics.write(json.dumps({"step": step, **values}) + "\n")
        metrics.flush()
        if wandb_run:
            wandb_run.log(values, step=step)

    def validate(step: int) -> None:
        loss = objective.validation_loss(engine, dataset, val_idx, seed)
        state["val_loss"].append([step, loss])
        log(step, {"val/loss": loss})
        if rank == 0:
            print(f"[nyaflow train] step {step}: validation loss {loss:.5f}", flush=True)

    def save() -> None:
        extra = {"ema_optimization_step": ema.optimization_step} if ema is not None else {}
        checkpoint.save(
            engine,
            ckpt_dir,
            state["step"],
            {**state, **extra},
            tc["keep_checkpoints"],
            data_order,
            write_rank_files=ema.save if ema is not None else None,
        )

    if state["step"] == 0:
        validate(0)
    stop = StopFlag()
    batches = micro_batches(
        dataset, train_idx, tc["micro_batch"], seed, world_size, rank, state["micro_step"], tc["num_workers"]
    )
    # loss_sum / window_size: the mean micro-step loss since the last log line (kept on the device: no sync)
    loss_sum, window_size, images = torch.zeros((), device=device), 0, 0
    consecutive_bad, in_window = 0, 0
    t_start = t_log = time.perf_counter()
    while state["step"] < tc["steps"]:
        epoch, batch = next(batches)
        batch["caption"] = [  # caption dropout, tag shuffle and dropout, keyed by (seed, epoch, sample)
            ""
            if caption_dropped(seed, epoch, int(i), tc["caption_dropout"])
            else train_caption(text, config["data"]["captions"], seed, epoch, int(i))
            for text, i in zip(batch["caption"], batch["index"], strict=True)
        ]
        loss = objective.loss(engine, batch, keyed_generator(device, seed, rank, state["micro_step"]))
        stop_requested, finite = agree(stop.requested, loss.detach())
        if stop_requested and in_window == 0:  # only between optimizer steps, so that resuming is exact
            save()
            raise Preempted(f"stopped by a signal at step {state['step']}; its checkpoint is saved")
        state["micro_step"] += 1
        if not finite:
            state["nonfinite"] += 1
            consecutive_bad += 1
            log(state["step"], {"train/nonfinite_total": state["nonfinite"]})
            if consecutive_bad >= tc["max_nonfinite"]:
                raise NonFiniteLoss(
                    f"{consecutive_bad} micro-steps in a row had a non-finite loss at step {state['step']};"
                    f" the last checkpoint ({checkpoint.latest_tag(ckpt_dir)}) is intact"
                )
            continue
        consecutive_bad = 0
        engine.backward(loss)
        engine.step()
        loss_sum += loss.detach()
        window_size += 1
        images += len(batch["caption"]) * world_size
        in_window = (in_window + 1) % tc["grad_accum"]
        if in_window:
            continue
        state["step"] += 1
        step = state["step"]
        if ema is not None:
            ema.step(unet)
        if step % tc["log_every"] == 0 or step == tc["steps"]:
            dist.all_reduce(loss_sum)
            mean_loss = loss_sum.item() / (world_size * window_size)
            state["loss"].append([step, mean_loss])
            now = time.perf_counter()
            grad_norm = engine.get_global_grad_norm()
            rate = images / (now - t_log)
            lrs = dict(zip(trained_parts(engine.module), scheduler.get_last_lr(), strict=True))
            log(
                step,
                {
                    "train/loss": mean_loss,
                    "train/lr": lrs.pop("unet"),
                    **{f"train/lr_{name}": lr for name, lr in lrs.items()},
                    "train/grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
                    "train/images_per_s": rate,
                    "train/images_seen": step * tc["micro_batch"] * tc["grad_accum"] * world_size,
                    "train/epoch": epoch,
                },
            )
            if rank == 0:
                print(f"[nyaflow train] step {step}: loss {mean_loss:.5f}, {rate:.1f} img/s", flush=True)
            loss_sum.zero_()
            window_size, images, t_log = 0, 0, now
        if step % tc["val_every"] == 0 or step == tc["steps"]:
            validate(step)
        if tc["sample_every"] and (step % tc["sample_every"] == 0 or step == tc["steps"]) and rank == 0:
            write_training_samples(c, unet, config, out_dir / "samples", step, writer)
        if step % tc["checkpoint_every"] == 0 or step == tc["steps"]:
            save()

    summary = {
        "steps": state["step"],
        "world_size": world_size,
        "global_batch": tc["micro_batch"] * tc["grad_accum"] * world_size,
        "images_seen": state["step"] * tc["micro_batch"] * tc["grad_accum"] * world_size,
        "loss": state["loss"],
        "val_loss": state["val_loss"],
        "val_loss_first": state["val_loss"][0][1],
        "val_loss_last": state["val_loss"][-1][1],
        "nonfinite_skipped": state["nonfinite"],
        "seconds_this_session": time.perf_counter() - t_start,
        "checkpoint": checkpoint.latest_tag(ckpt_dir),
    }
    if rank == 0:
        writer.close()
        metrics.close()
        if wandb_run:
            wandb_run.finish()
        tmp = out_dir / "summary.json.tmp"
        tmp.write_text(json.dumps(summary, indent=2))
        tmp.replace(out_dir / "summary.json")
    dist.barrier()
    return summary


@torch.no_grad()
def resume_ema(ema: ShardedEMA, unet, ckpt_dir: Path, client_state: dict, device) -> None:
    """Every rank loads its EMA share from the resumed checkpoint; if the checkpoint has none (trained
    without EMA), all restart the average from the resumed weights. Some shares but not all: refused."""
    resumed = ckpt_dir / checkpoint.latest_tag(ckpt_dir)
    loaded = ema.load(resumed, client_state.get("ema_optimization_step", 0))
    count = torch.tensor(float(loaded), device=device)
    dist.all_reduce(count)
    if 0 < count.item() < dist.get_world_size():
        raise UserError(
            f"{resumed} holds the EMA shares of {int(count.item())} of {dist.get_world_size()} ranks"
        )
    if count.item() == 0:
        ema.restart_from(unet)
        if dist.get_rank() == 0:
            print(f"[nyaflow train] {resumed} has no EMA: it starts from these weights", flush=True)


@torch.no_grad()
def write_training_samples(c: Components, unet, config: dict, folder: Path, step: int, writer) -> None:
    """Rank 0: a small grid of the configured prompts and seeds, to samples/step<N>.png and TensorBoard."""
    from nyaflow.sample import labelled_grid, prompts_from_config, sample

    sc = config["sample"]
    prompts = prompts_from_config(sc)
    was_training = unet.training
    unet.eval()
    parts = Components(unet, c.vae, c.text_encoder, c.text_encoder_2, c.tokenizer, c.tokenizer_2)
    settings = (sc["steps"], sc["guidance"], sc["shift"], sc["height"], sc["width"], sc["batch_size"])
    images = sample(parts, prompts, sc["seeds"], *settings)
    unet.train(was_training)
    grid = labelled_grid(images, [p.label for p in prompts], [f"seed {s}" for s in sc["seeds"]])
    folder.mkdir(parents=True, exist_ok=True)
    grid.save(folder / f"step{step:08d}.png")
    writer.add_image("samples", np.asarray(grid), step, dataformats="HWC")
