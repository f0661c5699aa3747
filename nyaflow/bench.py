"""`nyaflow bench train`: time nyaflow's real training step and count its FLOPs.

The step is the one `nyaflow train` runs, through the same functions: the UNet configured by
`configure_unet` (gradient checkpointing, attention backend), wrapped by `build_engine` (DeepSpeed, ZeRO,
nyaflow's optimizer and schedule), the flow loss of `latent_loss` (the part of FlowObjective.loss after the
VAE and the text encoders), the trainer's per-micro-step `agree` all-reduce, `engine.backward` and
`engine.step`. The data are cached-latent-shaped synthetic tensors made once on the device (latents,
prompt embeddings, pooled embeddings, micro-conditioning), so the figure excludes data loading and the
VAE / text-encoder forward passes (see `encode_flops` for what those add).

FLOPs are counted once per configuration with torch.utils.flop_counter on the meta device (no memory, no
weights; attention is counted there, where CPU kernels would hide it): the forward pass, and forward +
backward of the same step, with gradient checkpointing when it is on (the recomputed forward counts).
Only matrix products, convolutions and attention are counted (the counter's convention); MFU is the
counted FLOPs per second over the device's dense peak rate.

Models: `sdxl` is the real SDXL base UNet config (written out below; random weights, nothing downloaded),
`tiny` the demo's tiny SDXL-shaped UNet, or a diffusers folder (its unet/config.json).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import tempfile
import time
from datetime import UTC, datetime
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

from nyaflow.errors import UserError

if TYPE_CHECKING:
    import torch

# stabilityai/stable-diffusion-xl-base-1.0, unet/config.json (the keys that differ from diffusers' defaults).
SDXL_UNET = {
    "sample_size": 128,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [320, 640, 1280],
    "layers_per_block": 2,
    "attention_head_dim": [5, 10, 20],
    "transformer_layers_per_block": [1, 2, 10],
    "cross_attention_dim": 2048,
    "norm_num_groups": 32,
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
}
SDXL_UNET_PARAMETERS = 2_567_463_684

# stabilityai/stable-diffusion-xl-base-1.0: vae/config.json and the two text encoders' configs.
SDXL_VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 1024,
    "scaling_factor": 0.13025,
}
SDXL_TEXT_ENCODERS = (
    {  # CLIP ViT-L/14 text tower
        "vocab_size": 49408,
        "hidden_size": 768,
        "intermediate_size": 3072,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "max_position_embeddings": 77,
        "hidden_act": "quick_gelu",
        "projection_dim": 768,
    },
    {  # OpenCLIP ViT-bigG/14 text tower (with projection)
        "vocab_size": 49408,
        "hidden_size": 1280,
        "intermediate_size": 5120,
        "num_hidden_layers": 32,
        "num_attention_heads": 20,
        "max_position_embeddings": 77,
        "hidden_act": "gelu",
        "projection_dim": 1280,
    },
)

# Dense (no sparsity) peak rates per device in TFLOP/s, from the vendors' data sheets: bf16 tensor cores,
# and TF32 tensor cores for fp32 training (PyTorch's convolutions use TF32 by default); and the memory
# CUDA reports (nvidia-smi's total, GiB), which `nyaflow plan` compares its estimate with.
PEAK_TFLOPS = {
    "h100": {"bf16": 989.0, "fp32": 494.7, "name": "NVIDIA H100 SXM", "memory_gib": 79.6},
    "h100-pcie": {"bf16": 756.0, "fp32": 378.0, "name": "NVIDIA H100 PCIe", "memory_gib": 79.6},
    "h200": {"bf16": 989.0, "fp32": 494.7, "name": "NVIDIA H200", "memory_gib": 140.4},
    "a100": {"bf16": 312.0, "fp32": 156.0, "name": "NVIDIA A100", "memory_gib": 80.0},
    "l40s": {"bf16": 362.0, "fp32": 183.0, "name": "NVIDIA L40S", "memory_gib": 45.0},
}


def gpu_key(device_name: str) -> str | None:
    """The PEAK_TFLOPS key of a device name such as 'NVIDIA H100 80GB HBM3' (None when unknown)."""
    name = device_name.lower().replace(" ", "")
    if "h100" in name:
        return "h100-pcie" if "pcie" in name else "h100"
    for key in ("h200", "a100", "l40s"):
        if key in name:
            return key
    return None


def peak_tflops(key: str | None, precision: str) -> float | None:
    return PEAK_TFLOPS[key][precision] if key in PEAK_TFLOPS else None


@lru_cache
def _tiny_unet_config() -> str:
    from nyaflow.demo_data import TAG_WORDS
    from nyaflow.model import build_tiny_components

    with tempfile.TemporaryDirectory(prefix="nyaflow-tiny-") as folder:
        unet = build_tiny_components(Path(folder), TAG_WORDS, seed=0).unet
    return json.dumps(dict(unet.config))


def unet_config(model: str) -> dict:
    """The UNet config of `model`: 'sdxl', 'tiny', or a diffusers folder (or a UNet folder)."""
    if model == "sdxl":
        return dict(SDXL_UNET)
    if model == "tiny":
        return json.loads(_tiny_unet_config())
    path = Path(model)
    for candidate in (path / "unet" / "config.json", path / "config.json"):
        if candidate.is_file():
            return {k: v for k, v in json.loads(candidate.read_text()).items() if not k.startswith("_")}
    raise UserError(f"--model {model}: not 'sdxl', 'tiny', or a folder with unet/config.json")


def build_unet(config: dict, device: torch.device | str = "cpu"):
    """A randomly initialised UNet of `config`, created directly on `device` (meta: shapes only)."""
    import torch
    from diffusers import UNet2DConditionModel

    with torch.device(device):
        return UNet2DConditionModel.from_config(config)


def synthetic_batch(config: dict, batch: int, resolution: int, device, dtype=None) -> dict:
    """Cached-latent-shaped inputs of one micro batch: scaled latents [B, C, r/8, r/8], prompt embeddings
    [B, 77, cross_attention_dim], pooled embeddings [B, P] and SDXL time ids (r, r, 0, 0, r, r)."""
    import torch

    latent = resolution // 8
    pooled = config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]
    g = torch.Generator("cpu").manual_seed(0)
    dtype = dtype or torch.float32

    def randn(*shape):
        if torch.device(device).type == "meta":
            return torch.empty(shape, device="meta", dtype=dtype)
        return torch.randn(shape, generator=g).to(device, dtype)

    return {
        "latents": randn(batch, config["in_channels"], latent, latent),
        "embeds": randn(batch, 77, config["cross_attention_dim"]),
        "pooled": randn(batch, pooled),
        "time_ids": torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]] * batch).to(
            device, torch.float32
        ),
    }


def check_resolution(config: dict, resolution: int) -> None:
    factor = 8 * 2 ** (len(config["block_out_channels"]) - 1)
    if resolution % factor:
        raise UserError(f"--resolution {resolution} is not a multiple of {factor} px, as this UNet needs")


@lru_cache(maxsize=32)
def _count_train_flops(config_json: str, resolution: int, batch: int, checkpointing: bool, attention: str):
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from nyaflow.train import configure_unet, unet_velocity

    config = json.loads(config_json)
    unet = build_unet(config, "meta")
    configure_unet(unet, {"gradient_checkpointing": checkpointing, "attention": attention})
    unet.train()
    b = synthetic_batch(config, batch, resolution, "meta")
    sigma = torch.empty(batch, device="meta")
    x = b["latents"]
    with FlopCounterMode(display=False) as counter:
        v = unet_velocity(unet, x, sigma, b["embeds"], b["pooled"], b["time_ids"], torch.float32)
        forward = counter.get_total_flops()
        ((v - x) ** 2).mean().backward()
        total = counter.get_total_flops()
    return forward, total, sum(p.numel() for p in unet.parameters())


def count_train_flops(
    config: dict, resolution: int, batch: int = 1, checkpointing: bool = False, attention: str = "sdpa"
) -> dict:
    """FLOPs of one training micro-step of `batch` images on the meta device (torch.utils.flop_counter):
    {'forward', 'train' (forward + backward, recomputation included), 'parameters'}."""
    check_resolution(config, resolution)
    key = json.dumps(config, sort_keys=True)
    forward, train, params = _count_train_flops(key, resolution, batch, checkpointing, attention)
    return {"forward": forward, "train": train, "parameters": params}


@lru_cache(maxsize=8)
def encode_flops(resolution: int) -> dict:
    """Forward FLOPs per image of what the trainer runs besides the UNet when latents are not cached: the
    SDXL VAE encoder at resolution^2 and the two text encoders on 77 tokens (meta device)."""
    import torch
    from diffusers import AutoencoderKL
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with torch.device("meta"):
        vae = AutoencoderKL.from_config(SDXL_VAE)
        encoders = [
            CLIPTextModel(CLIPTextConfig(**SDXL_TEXT_ENCODERS[0])),
            CLIPTextModelWithProjection(CLIPTextConfig(**SDXL_TEXT_ENCODERS[1])),
        ]
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        vae.encode(torch.empty(1, 3, resolution, resolution, device="meta"))
        vae_flops = counter.get_total_flops()
        ids = torch.zeros(1, 77, dtype=torch.long, device="meta")
        for encoder in encoders:
            encoder(ids, output_hidden_states=True)
        text_flops = counter.get_total_flops() - vae_flops
    return {"vae_encoder": vae_flops, "text_encoders": text_flops}


def _peak_memory(device: torch.device) -> tuple[float, str]:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30, "torch.cuda.max_memory_allocated"
    # ru_maxrss is in KiB on Linux: the whole process, model and Python included
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "process peak RSS (ru_maxrss)"


def _versions() -> dict:
    import deepspeed
    import diffusers
    import torch

    return {
        "torch": torch.__version__,
        "deepspeed": deepspeed.__version__,
        "diffusers": diffusers.__version__,
    }


def bench_train(
    model: str = "tiny",
    resolution: int | None = None,
    micro_batch: int = 8,
    precision: str = "auto",
    gradient_checkpointing: bool = False,
    attention: str = "sdpa",
    compile: bool = False,
    compile_backend: str = "inductor",
    channels_last: bool = False,
    zero_stage: int = 2,
    zero_options: dict | None = None,
    warmup: int = 3,
    steps: int = 10,
    flops_only: bool = False,
    peak: float | None = None,
    seed: int = 0,
) -> dict:
    """Time `steps` training steps after `warmup` ones and return the record (see the module docstring)."""
    import torch

    config = unet_config(model)
    resolution = resolution or 8 * config["sample_size"]
    on_gpu = torch.cuda.is_available()
    if precision == "auto":
        precision = "bf16" if on_gpu else "fp32"
    if not on_gpu and not flops_only and model != "tiny":
        raise UserError(
            f"--model {model} needs a GPU (no CUDA device here): run `--model tiny` on CPU, or add"
            " --flops-only for the meta-device FLOP count alone"
        )
    flops = count_train_flops(config, resolution, micro_batch, gradient_checkpointing, attention)
    record = {
        "model": model,
        "parameters": flops["parameters"],
        "resolution": resolution,
        "latent": resolution // 8,
        "micro_batch": micro_batch,
        "precision": precision,
        "gradient_checkpointing": gradient_checkpointing,
        "attention": attention,
        "compile": compile_backend if compile else False,
        "channels_last": channels_last,
        "zero_stage": zero_stage,
        "zero_options": zero_options or {},
        "flops": {
            "counted_on": "meta device, torch.utils.flop_counter (matmul, conv, attention)",
            "forward_per_image": flops["forward"] / micro_batch,
            "train_per_image": flops["train"] / micro_batch,
            "train_per_step": flops["train"],
        },
        "flops_only": flops_only,
        "host": platform.node(),
        "time": datetime.now(UTC).isoformat(timespec="seconds"),
        "versions": _versions(),
    }
    if flops_only:
        return record

    import torch.distributed as dist

    from nyaflow import config as config_mod
    from nyaflow.train import (
        agree,
        build_engine,
        configure_unet,
        init_distributed,
        keyed_generator,
        latent_loss,
    )

    tc = config_mod.validate({"run": "bench"})["train"] | {
        "micro_batch": micro_batch,
        "grad_accum": 1,
        "zero_stage": zero_stage,
        "zero_options": zero_options or {},
        "precision": precision,
        "gradient_checkpointing": gradient_checkpointing,
        "attention": attention,
    }
    deepspeed, device = init_distributed()
    rank, world_size = dist.get_rank(), dist.get_world_size()
    bf16 = precision == "bf16"
    dtype = torch.bfloat16 if bf16 else torch.float32
    torch.manual_seed(seed)
    unet = build_unet(config, device)
    configure_unet(unet, tc)
    engine, _ = build_engine(deepspeed, unet, tc, device, bf16)
    if compile:
        engine.compile(backend=compile_backend)  # torch.compile of the UNet inside the engine
    data = synthetic_batch(config, micro_batch, resolution, device)
    if channels_last:  # the activations follow the input; ZeRO keeps the weights as views of flat buffers
        data["latents"] = data["latents"].contiguous(memory_format=torch.channels_last)

    def step(i: int) -> None:  # nyaflow train's micro-step, with grad_accum 1: one optimizer step
        generator = keyed_generator(device, seed, rank, i)
        loss = latent_loss(
            engine, data["latents"], data["embeds"], data["pooled"], data["time_ids"], tc, generator, dtype
        )
        agree(False, loss.detach())
        engine.backward(loss)
        engine.step()

    if on_gpu:
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for i in range(warmup):
        step(i)
    warmup_s = time.perf_counter() - t0
    times = []
    if on_gpu:
        events = [
            (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(steps)
        ]
        for i, (start, end) in enumerate(events):
            start.record()
            step(warmup + i)
            end.record()
        torch.cuda.synchronize(device)
        times = [start.elapsed_time(end) / 1000 for start, end in events]
    else:
        for i in range(steps):
            start = time.perf_counter()
            step(warmup + i)
            times.append(time.perf_counter() - start)
    median = statistics.median(times)
    memory, memory_measure = _peak_memory(device)
    device_name = torch.cuda.get_device_name(device) if on_gpu else f"CPU ({platform.processor() or 'cpu'})"
    key = gpu_key(device_name) if on_gpu else None
    peak_rate = peak if peak is not None else peak_tflops(key, "bf16" if bf16 else "fp32")
    achieved = flops["train"] / median / 1e12
    record |= {
        "device": device_name,
        "device_type": device.type,
        "world_size": world_size,
        "timing": "torch.cuda.Event" if on_gpu else "time.perf_counter",
        "warmup_steps": warmup,
        "steps": steps,
        "warmup_s": warmup_s,
        "step_times_s": times,
        "step_time_median_s": median,
        "images_per_s_per_device": micro_batch / median,
        "images_per_s_total": micro_batch * world_size / median,
        "achieved_tflops_per_device": achieved,
        "peak_tflops": peak_rate,
        "peak_source": "--peak-tflops" if peak is not None else (f"table: {key}" if peak_rate else None),
        "mfu": achieved / peak_rate if peak_rate else None,
        "peak_memory_gib": memory,
        "memory_measure": memory_measure,
    }
    return record


def summary(record: dict) -> str:
    """A few readable lines of a record."""
    f = record["flops"]
    on = {True: "on", False: "off"}
    lines = [
        f"model {record['model']} ({record['parameters']:,} parameters), {record['resolution']}px "
        f"(latent {record['latent']}), micro batch {record['micro_batch']}, {record['precision']}, "
        f"attention {record['attention']}, checkpointing {on[record['gradient_checkpointing']]}, "
        f"compile {record['compile'] or 'off'}, channels-last {on[record['channels_last']]}",
        f"FLOP per image: forward {f['forward_per_image'] / 1e12:.4g} TFLOP, forward+backward "
        f"{f['train_per_image'] / 1e12:.4g} TFLOP ({f['counted_on']})",
    ]
    if record["flops_only"]:
        return "\n".join(lines)
    mfu = f"{record['mfu']:.1%}" if record["mfu"] is not None else "n/a (no peak rate known: --peak-tflops)"
    lines += [
        f"device {record['device']} x {record['world_size']}: median step "
        f"{record['step_time_median_s'] * 1000:.1f} ms"
        f" over {record['steps']} steps ({record['timing']})",
        f"{record['images_per_s_per_device']:.2f} images/s per device, "
        f"{record['achieved_tflops_per_device']:.3g} TFLOP/s achieved, MFU {mfu}",
        f"peak memory {record['peak_memory_gib']:.2f} GiB ({record['memory_measure']})",
    ]
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model", default="tiny", help="sdxl (real SDXL UNet config, random weights), tiny, or a folder"
    )
    p.add_argument("--resolution", type=int, help="image side in pixels (default: the model's native size)")
    p.add_argument("--micro-batch", type=int, default=8, help="images per device per step (default 8)")
    p.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto", help="auto: bf16 on GPU")
    p.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument("--attention", choices=["sdpa", "eager"], default="sdpa")
    p.add_argument(
        "--compile", action=argparse.BooleanOptionalAction, default=False, help="torch.compile the UNet"
    )
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend (default inductor)")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument("--zero-stage", type=int, choices=[0, 1, 2, 3], default=2)
    p.add_argument(
        "--zero-options",
        type=json.loads,
        default={},
        help="more zero_optimization settings as JSON, like train.zero_options: '{\"overlap_comm\": true}'",
    )
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (default 3)")
    p.add_argument("--steps", type=int, default=10, help="timed steps (default 10)")
    p.add_argument(
        "--peak-tflops", type=float, help="the device's peak rate (default: from the table by GPU name)"
    )
    p.add_argument(
        "--flops-only", action="store_true", help="count FLOPs on the meta device only, time nothing"
    )
    p.add_argument("--out", type=Path, help="write the JSON record here")


def main(args: argparse.Namespace) -> int:
    if args.warmup < 0 or args.steps < 1 or args.micro_batch < 1:
        raise UserError("--warmup >= 0, --steps >= 1 and --micro-batch >= 1 are needed")
    if not isinstance(args.zero_options, dict):
        raise UserError(f"--zero-options must be a JSON object, not {args.zero_options!r}")
    record = bench_train(
        model=args.model,
        resolution=args.resolution,
        micro_batch=args.micro_batch,
        precision=args.precision,
        gradient_checkpointing=args.gradient_checkpointing,
        attention=args.attention,
        compile=args.compile,
        compile_backend=args.compile_backend,
        channels_last=args.channels_last,
        zero_stage=args.zero_stage,
        zero_options=args.zero_options,
        warmup=args.warmup,
        steps=args.steps,
        flops_only=args.flops_only,
        peak=args.peak_tflops,
    )
    rank = 0
    if not args.flops_only:
        import torch.distributed as dist

        rank = dist.get_rank()
    if rank == 0:
        print(summary(record), flush=True)
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            tmp = args.out.with_name(args.out.name + ".partial")
            tmp.write_text(json.dumps(record, indent=2) + "\n")
            tmp.replace(args.out)
    return 0
