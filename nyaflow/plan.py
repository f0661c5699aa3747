"""`nyaflow plan`: how fast a config will train on a cluster, before it starts.

From the UNet's training FLOPs per image (counted on the meta device by nyaflow.bench, at the config's
resolution, attention backend and gradient-checkpointing setting), a GPU's dense peak rate and an MFU
(assumed, or measured by `nyaflow bench train` and read from its JSON record):

    images/s per GPU = peak FLOP/s x MFU / FLOP per image
    images/s         = images/s per GPU x GPUs                       (assumes linear scaling)
    step time        = global batch / images/s,  global batch = micro_batch x grad_accum x GPUs
    epoch            = images in the data set / images/s
    train.steps      = steps x global batch images: wall time, and GPU-hours = wall hours x GPUs
    budget           = images, epochs and steps that fit in --hours

Two columns: cached latents (the UNet step alone, what `nyaflow bench train` measures), and latents encoded
on the fly (adds the SDXL VAE encoder and text-encoder forward FLOPs at the same MFU; the VAE runs in
fp32, so the real cost is higher). `latents.cache` says which one the config trains with. The cluster
comes from the arguments, else from the config's SLURM launch section, else 4 nodes x 8 H100.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from nyaflow import bench
from nyaflow import config as config_mod
from nyaflow.errors import UserError

DEFAULT_IMAGES = 3_600_000
GIB = 2**30
# Activations kept for the backward pass per 1024^2 image (latent 128^2) of the SDXL UNet in bf16, flash
# attention (DESIGN.md section 5); they grow with the pixel count.
SDXL_ACTIVATIONS_GIB = {False: 6.8, True: 0.55}  # by train.gradient_checkpointing
SDXL_PARAMETERS = {"text_encoder": 123_060_480, "text_encoder_2": 694_659_840, "vae": 83_653_863}
DEEPSPEED_BUCKET = 500_000_000  # DeepSpeed's default reduce bucket, in elements
CUDA_RESERVE_GIB = 3.0  # CUDA context, cuBLAS/flash workspaces, allocator slack


def model_name(cfg: dict) -> str:
    """The UNet architecture of model.base: the tiny model, a local folder's own config, otherwise SDXL's
    (a hub id or single file is assumed to be an SDXL base)."""
    base = cfg["model"]["base"]
    if base == "tiny":
        return "tiny"
    path = Path(base)
    if (path / "unet" / "config.json").is_file():
        return str(path)
    return "sdxl"


def dataset_images(cfg: dict, images: int | None) -> tuple[int, str]:
    """(images per epoch, where the number comes from): --images, the run's manifest, the demo size, or
    the default of 3.6M."""
    if images:
        return images, "--images"
    manifest = Path("results") / cfg["run"] / "data" / "manifest.json"
    if manifest.is_file():
        return json.loads(manifest.read_text())["counts"]["kept"], str(manifest)
    if cfg["data"]["source"] == "demo":
        return cfg["data"]["demo"]["num_images"], "data.demo.num_images"
    return DEFAULT_IMAGES, "the default; set --images"


def cluster(cfg: dict, gpus: int | None, gpu: str | None) -> tuple[int, str]:
    """(GPUs, GPU type): the arguments, else a SLURM launch section of the config (launch.nodes x
    launch.gpus_per_node, launch.gpu_type) when it has one, else 32 x h100 (the recipe's 4 nodes x 8)."""
    launch = cfg.get("launch") or {}
    if gpus is None:
        slurm = launch.get("backend") == "slurm" and launch.get("gpus_per_node", 0) > 0
        gpus = launch["nodes"] * launch["gpus_per_node"] if slurm else 32
    if gpu is None:
        gpu = launch.get("gpu_type") if launch.get("gpu_type") in bench.PEAK_TFLOPS else "h100"
    return gpus, gpu


def memory_gib(cfg: dict, model: str, parameters: int, gpus: int) -> dict:
    """An estimate of one GPU's memory in training (GiB), as DeepSpeed 0.19's ZeRO lays it out: the trained
    modules' states from their parameter count, the ZeRO stage and the world size; the gradient reduce
    bucket(s); frozen encoders; activations from DESIGN.md's SDXL measurements (None for other models)."""
    tc, n, stage = cfg["train"], gpus, cfg["train"]["zero_stage"]
    half = 2 if tc["precision"] != "fp32" else 4
    sdxl = model == "sdxl"
    trained_te = sum(SDXL_PARAMETERS[k] for k in ("text_encoder", "text_encoder_2") if sdxl and tc[f"{k}_lr"])
    frozen_te = (
        sum(SDXL_PARAMETERS[k] for k in ("text_encoder", "text_encoder_2")) - trained_te if sdxl else 0
    )
    p = parameters + trained_te  # what the optimizer trains
    bucket = tc["zero_options"].get("reduce_bucket_size", DEEPSPEED_BUCKET)
    parts = {
        "weights (trained)": half * p,
        # ZeRO-2 reduces each gradient into the owner's fp32 partition; below it every rank holds them all.
        "gradients": 4 * p / n if stage >= 2 else half * p,
        "fp32 weights + Adam moments": 12 * p / (n if stage >= 1 else 1),
        "EMA (fp32, split across ranks)": 4 * parameters / n if tc["ema_decay"] > 0 else 0,
        "gradient reduce buckets": half * bucket * (2 if tc["zero_options"].get("overlap_comm") else 1),
    }
    if sdxl:
        parts["frozen text encoders + VAE"] = half * frozen_te + 4 * SDXL_PARAMETERS["vae"]
    parts = {k: v / GIB for k, v in parts.items()}
    activations = None
    if sdxl:
        resolution = cfg["data"]["preprocess"]["resolution"]
        per_image = SDXL_ACTIVATIONS_GIB[tc["gradient_checkpointing"]] * (resolution / 1024) ** 2
        activations = parts["activations"] = per_image * tc["micro_batch"]
    parts["CUDA context and workspaces"] = CUDA_RESERVE_GIB
    return {"parts": parts, "total": sum(parts.values()), "activations_known": activations is not None}


def plan(
    cfg: dict,
    gpus: int | None = None,
    gpu: str | None = None,
    mfu: float | None = None,
    bench_record: dict | None = None,
    hours: float = 48.0,
    images: int | None = None,
) -> dict:
    tc = cfg["train"]
    gpus, gpu = cluster(cfg, gpus, gpu)
    if gpu not in bench.PEAK_TFLOPS:
        raise UserError(f"--gpu {gpu}: unknown; one of {', '.join(bench.PEAK_TFLOPS)}")
    if gpus < 1 or hours <= 0:
        raise UserError("--gpus >= 1 and --hours > 0 are needed")
    precision = "fp32" if tc["precision"] == "fp32" else "bf16"
    peak = bench.PEAK_TFLOPS[gpu][precision] * 1e12
    notes = []
    if bench_record is not None:
        if bench_record.get("mfu") is None:
            raise UserError("the benchmark record has no MFU (a --flops-only or CPU run): pass --mfu instead")
        mfu, mfu_source = bench_record["mfu"], f"measured on {bench_record['device']}"
    elif mfu is not None:
        mfu_source = "assumed, --mfu"
    else:
        mfu, mfu_source = 0.5, "assumed, the default"
    if not 0 < mfu <= 1:
        raise UserError(f"MFU {mfu} is not in (0, 1]")
    model = model_name(cfg)
    config = bench.unet_config(model)
    resolution = cfg["data"]["preprocess"]["resolution"]
    flops = bench.count_train_flops(config, resolution, 1, tc["gradient_checkpointing"], tc["attention"])
    encode = bench.encode_flops(resolution) if model == "sdxl" else {"vae_encoder": 0, "text_encoders": 0}
    if bench_record is not None:
        mismatched = [
            f"{key} {bench_record[key]} (config: {ours})"
            for key, ours in (
                ("resolution", resolution),
                ("gradient_checkpointing", tc["gradient_checkpointing"]),
                ("attention", tc["attention"]),
                ("micro_batch", tc["micro_batch"]),
                ("precision", precision),
            )
            if bench_record.get(key) != ours
        ]
        if bench.gpu_key(bench_record["device"]) != gpu:
            mismatched.append(f"device {bench_record['device']} (plan: {gpu})")
        if mismatched:
            notes.append("the benchmark differs from this plan in: " + "; ".join(mismatched))
        notes.append(f"benchmark measured {bench_record['images_per_s_per_device']:.2f} images/s per device")
    n_images, images_source = dataset_images(cfg, images)
    global_batch = tc["micro_batch"] * tc["grad_accum"] * gpus
    train_images = tc["steps"] * global_batch
    budget_s = hours * 3600

    def column(flop_per_image: float) -> dict:
        per_gpu = peak * mfu / flop_per_image
        rate = per_gpu * gpus
        wall_s = train_images / rate
        return {
            "tflop_per_image": flop_per_image / 1e12,
            "images_per_s_per_gpu": per_gpu,
            "images_per_s": rate,
            "step_time_s": global_batch / rate,
            "epoch_s": n_images / rate,
            "train_wall_s": wall_s,
            "train_gpu_hours": wall_s / 3600 * gpus,
            "budget_images": rate * budget_s,
            "budget_epochs": rate * budget_s / n_images,
            "budget_steps": int(rate * budget_s // global_batch),
        }

    return {
        "run": cfg["run"],
        "model": model,
        "parameters": flops["parameters"],
        "resolution": resolution,
        "attention": tc["attention"],
        "gradient_checkpointing": tc["gradient_checkpointing"],
        "precision": precision,
        "gpu": gpu,
        "gpu_name": bench.PEAK_TFLOPS[gpu]["name"],
        "gpus": gpus,
        "peak_tflops": peak / 1e12,
        "mfu": mfu,
        "mfu_source": mfu_source,
        "forward_tflop_per_image": flops["forward"] / 1e12,
        "encode_tflop_per_image": {k: v / 1e12 for k, v in encode.items()},
        "images": n_images,
        "images_source": images_source,
        "global_batch": global_batch,
        "steps": tc["steps"],
        "train_images": train_images,
        "train_epochs": train_images / n_images,
        "hours": hours,
        "cached_latents": column(flops["train"]),
        "encode_on_the_fly": column(flops["train"] + sum(encode.values())) if model == "sdxl" else None,
        "latents_cached": bool((cfg.get("latents") or {}).get("cache")),
        "memory_gib": memory_gib(cfg, model, flops["parameters"], gpus),
        "gpu_memory_gib": bench.PEAK_TFLOPS[gpu]["memory_gib"],
        "notes": notes,
    }


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.3g} s"
    if seconds < 3600:
        return f"{seconds / 60:.1f} min"
    if seconds < 72 * 3600:
        return f"{seconds / 3600:.2f} h"
    return f"{seconds / 86400:.1f} days"


def format_plan(p: dict) -> str:
    """The plan as a readable table."""
    enc = p["encode_tflop_per_image"]
    ckpt = "on" if p["gradient_checkpointing"] else "off"
    head = [
        f"nyaflow plan: run {p['run']} on {p['gpus']} x {p['gpu_name']} "
        f"({p['peak_tflops']:g} TFLOP/s dense {p['precision']} each), MFU {p['mfu']:.2f} ({p['mfu_source']})",
        f"model: {p['model']} UNet, {p['parameters']:,} parameters, {p['resolution']}x{p['resolution']} px, "
        f"attention {p['attention']}, gradient checkpointing {ckpt}",
        f"FLOPs per image (meta device): UNet forward {p['forward_tflop_per_image']:.2f} TFLOP, "
        f"forward+backward {p['cached_latents']['tflop_per_image']:.2f} TFLOP"
        + (
            f"; VAE encoder {enc['vae_encoder']:.2f}, text encoders {enc['text_encoders']:.2f} TFLOP"
            if p["encode_on_the_fly"]
            else ""
        ),
        f"data: {p['images']:,} images per epoch ({p['images_source']}); global batch {p['global_batch']};"
        f" train.steps {p['steps']:,} = {p['train_images'] / 1e6:.1f}M images"
        f" = {p['train_epochs']:.2f} epochs",
        "",
    ]
    cols = [("cached latents", p["cached_latents"])]
    if p["encode_on_the_fly"]:
        cols.append(("encoded on the fly", p["encode_on_the_fly"]))
    rows = [
        ("TFLOP per image (train step)", lambda c: f"{c['tflop_per_image']:.2f}"),
        ("images/s per GPU", lambda c: f"{c['images_per_s_per_gpu']:.2f}"),
        (f"images/s ({p['gpus']} GPUs)", lambda c: f"{c['images_per_s']:.1f}"),
        (f"step time (batch {p['global_batch']})", lambda c: f"{c['step_time_s']:.3f} s"),
        ("time per epoch", lambda c: _duration(c["epoch_s"])),
        (f"train.steps {p['steps']:,}: wall time", lambda c: _duration(c["train_wall_s"])),
        (f"train.steps {p['steps']:,}: GPU-hours", lambda c: f"{c['train_gpu_hours']:,.0f}"),
        (f"in {p['hours']:g} h: epochs", lambda c: f"{c['budget_epochs']:.2f}"),
        (f"in {p['hours']:g} h: steps", lambda c: f"{c['budget_steps']:,}"),
        (f"in {p['hours']:g} h: GPU-hours", lambda c: f"{p['hours'] * p['gpus']:,.0f}"),
    ]
    width = max(len(name) for name, _ in rows) + 2
    lines = [" " * width + "".join(f"{name:>22}" for name, _ in cols)]
    for name, fmt in rows:
        lines.append(f"{name:<{width}}" + "".join(f"{fmt(c):>22}" for _, c in cols))
    tail = ["", *(f"note: {n}" for n in p["notes"])]
    if p["encode_on_the_fly"]:
        applies = "cached latents" if p["latents_cached"] else "encoded on the fly"
        tail += [
            f"note: this config trains on {'cached latents' if p['latents_cached'] else 'pixels'}"
            f" (latents.cache {str(p['latents_cached']).lower()}): the '{applies}' column applies",
            "note: 'encoded on the fly' adds the VAE encoder and text encoders at the same MFU; the VAE runs"
            " in fp32, so expect it slower than shown. 'cached latents' is the UNet step alone, as"
            " `nyaflow bench train` measures it (the text encoders' 0.5% left out)",
        ]
    tail.append("note: images/s scale linearly with GPUs here; communication is not modelled")
    return "\n".join(head + lines + tail + format_memory(p))


def format_memory(p: dict) -> list[str]:
    mem, capacity = p["memory_gib"], p["gpu_memory_gib"]
    lines = ["", f"memory per GPU (estimate, GiB; {p['gpu_name']}: {capacity:g} GiB):"]
    lines += [f"  {name:<32}{gib:>8.1f}" for name, gib in mem["parts"].items()]
    lines.append(f"  {'total':<32}{mem['total']:>8.1f}")
    if not mem["activations_known"]:
        lines.append("note: activations are not estimated for this model (measured for SDXL only)")
    elif mem["total"] > capacity:
        lines.append(
            f"WARNING: about {mem['total']:.0f} GiB needed, {capacity:g} GiB on the GPU: lower"
            " train.micro_batch (raise grad_accum to keep the global batch), or turn on"
            " train.gradient_checkpointing"
        )
    elif mem["total"] > 0.9 * capacity:
        lines.append(
            f"note: within 10% of the GPU's {capacity:g} GiB: check with `nyaflow bench train` first"
        )
    return lines


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--configfile", "--config", type=Path, required=True, help="run config (e.g. config/nyaflow-xl.yaml)"
    )
    p.add_argument("--gpus", type=int, help="GPUs (default: launch.nodes x launch.gpus_per_node, else 32)")
    p.add_argument(
        "--gpu", choices=list(bench.PEAK_TFLOPS), help="GPU type (default: launch.gpu_type, else h100)"
    )
    rate = p.add_mutually_exclusive_group()
    rate.add_argument("--mfu", type=float, help="assumed model FLOP utilisation (default 0.5)")
    rate.add_argument("--bench", type=Path, help="a `nyaflow bench train --out` record: use its measured MFU")
    p.add_argument("--hours", type=float, default=48.0, help="time budget (default 48 h)")
    p.add_argument("--images", type=int, help="images per epoch (default: the run's manifest, else 3.6M)")
    p.add_argument("--out", type=Path, help="also write the plan as JSON here")


def main(args: argparse.Namespace) -> int:
    cfg = config_mod.load(args.configfile)
    record = None
    if args.bench:
        if not args.bench.is_file():
            raise UserError(f"--bench {args.bench}: no such file")
        record = json.loads(args.bench.read_text())
    p = plan(cfg, args.gpus, args.gpu, args.mfu, record, args.hours, args.images)
    print(format_plan(p))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(p, indent=2) + "\n")
    return 0
