"""Export stage: a DeepSpeed checkpoint -> a diffusers folder and a single-file SDXL checkpoint.

The UNet weights are consolidated to fp32 with DeepSpeed's own `zero_to_fp32` (any ZeRO stage >= 1; stage 0
checkpoints hold the whole module). The diffusers folder carries the base model's VAE, text encoders and
tokenizers, the trained UNet and a FlowMatchEulerDiscreteScheduler config with the inference shift.
Outputs are written under temporary names and renamed when complete.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel

from nyaflow.model import load_components, save_components
from nyaflow.scheduler import FlowMatchEulerSDXLScheduler
from nyaflow.single_file import save_single_file

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def checkpoint_tag(ckpt_dir: Path, tag: str | None) -> str:
    """The requested tag, or the one `latest` names; a clear error if it is missing."""
    ckpt_dir = Path(ckpt_dir)
    if tag is None:
        latest = ckpt_dir / "latest"
        if not latest.is_file():
            raise FileNotFoundError(f"no checkpoint to export: {latest} does not exist (has training run?)")
        tag = latest.read_text().strip()
    if not (ckpt_dir / tag).is_dir():
        raise FileNotFoundError(f"checkpoint {ckpt_dir / tag} does not exist")
    return tag


def consolidated_unet_state(ckpt_dir: Path, tag: str) -> dict[str, torch.Tensor]:
    """The UNet's fp32 weights from a DeepSpeed checkpoint."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    model_states = Path(ckpt_dir) / tag / "mp_rank_00_model_states.pt"
    if not list((Path(ckpt_dir) / tag).glob("*optim_states.pt")):
        # ZeRO stage 0: the module's full weights are in the model-states file, which we wrote ourselves.
        return torch.load(model_states, map_location="cpu", weights_only=False)["module"]
    return get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag)


def load_trained_unet(base_dir: Path, ckpt_dir: Path, tag: str) -> UNet2DConditionModel:
    unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(Path(base_dir) / "unet"))
    unet.load_state_dict(consolidated_unet_state(ckpt_dir, tag), strict=True)
    return unet


def export(
    config: dict, base_dir: Path, ckpt_dir: Path, train_summary: Path, out_dir: Path, tag: str | None = None
) -> None:
    """Write out_dir/diffusers/ and out_dir/<run>.safetensors from the chosen checkpoint."""
    tag = checkpoint_tag(ckpt_dir, tag)
    summary = json.loads(Path(train_summary).read_text())
    components = load_components(base_dir, unet=load_trained_unet(base_dir, ckpt_dir, tag))
    shift = config["export"]["shift"]
    out_dir.mkdir(parents=True, exist_ok=True)

    folder = out_dir / "diffusers"
    tmp = out_dir / "diffusers.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    save_components(components, tmp, scheduler=FlowMatchEulerSDXLScheduler(shift=shift))
    # Users load the folder without nyaflow: record the stock scheduler class that holds the config.
    index = json.loads((tmp / "model_index.json").read_text())
    index["scheduler"] = ["diffusers", "FlowMatchEulerDiscreteScheduler"]
    (tmp / "model_index.json").write_text(json.dumps(index, indent=2))
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)

    metadata = {
        "modelspec.architecture": "stable-diffusion-xl-v1-base",
        "modelspec.title": config["run"],
        "nyaflow.prediction": "flow: v = eps - x0; x_sigma = (1 - sigma) x0 + sigma eps; t = 1000 sigma",
        "nyaflow.shift": str(shift),
        "nyaflow.base_model": config["model"]["base"],
        "nyaflow.checkpoint": tag,
        "nyaflow.steps": str(summary["steps"]),
        "nyaflow.images_seen": str(summary["images_seen"]),
    }
    save_single_file(
        components, out_dir / f"{config['run']}.safetensors", DTYPES[config["export"]["dtype"]], metadata
    )
