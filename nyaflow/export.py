"""Export stage: a DeepSpeed checkpoint -> a diffusers folder (with a model card) and a single-file SDXL
checkpoint.

The checkpoint is `export.tag` (or `--tag`), by default the one `latest` names. The weights are
- raw (`export.weights: raw`): the trained UNet, consolidated to fp32 with DeepSpeed's own `zero_to_fp32`
  (any ZeRO stage >= 1; stage-0 checkpoints hold the whole module in the model-states file);
- EMA (`export.weights: ema`): the exponential moving average the trainer keeps when `train.ema_decay` > 0,
  fp32 tensors split across the ranks' `ema_rank<r>.safetensors` files in the checkpoint folder
  (nyaflow.ema), merged here.

Text encoders trained with the UNet (train.text_encoder_lr / text_encoder_2_lr) are in the checkpoint under
`text_encoder.` / `text_encoder_2.` (and the UNet under `unet.`); their raw weights are exported with either
choice of UNet weights (the EMA covers the UNet only). Frozen ones come from the base model.

The diffusers folder carries the base model's VAE, text encoders and tokenizers, the exported UNet, a
FlowMatchEulerDiscreteScheduler config with the inference shift (`export.shift`) and a model card
(README.md). Everything is written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel

from nyaflow import ema
from nyaflow.errors import UserError
from nyaflow.model import Components, load_components, save_components
from nyaflow.scheduler import FlowMatchEulerSDXLScheduler
from nyaflow.single_file import save_single_file

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# Rank 0's model-states file: ZeRO 0-2 name it mp_rank_00_..., ZeRO 3 zero_pp_rank_0_mp_rank_00_...
MODEL_STATES = ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt")


class ExportError(UserError):
    """The checkpoint to export is missing, is not a DeepSpeed checkpoint, or does not fit the base model."""


def checkpoint_tag(ckpt_dir: Path, tag: str | None) -> str:
    """The requested tag, or the one `latest` names; a clear error if it is missing."""
    ckpt_dir = Path(ckpt_dir)
    if not tag:
        latest = ckpt_dir / "latest"
        if not latest.is_file():
            raise ExportError(f"no checkpoint to export: {latest} does not exist (has training run?)")
        tag = latest.read_text().strip()
    if not (ckpt_dir / tag).is_dir():
        have = sorted(p.name for p in ckpt_dir.glob("step*") if p.is_dir()) if ckpt_dir.is_dir() else []
        raise ExportError(
            f"checkpoint {ckpt_dir / tag} does not exist (checkpoints there: {', '.join(have) or 'none'})"
        )
    return tag


def model_states_file(ckpt_dir: Path, tag: str) -> Path:
    folder = Path(ckpt_dir) / tag
    for name in MODEL_STATES:
        if (folder / name).is_file():
            return folder / name
    raise ExportError(f"{folder} is not a DeepSpeed checkpoint: it has no {MODEL_STATES[0]}")


def checkpoint_state(ckpt_dir: Path, tag: str) -> dict:
    """Rank 0's model-states dict: DeepSpeed's entries plus the trainer's client state (step, val_loss,
    ema_optimization_step, ...). Memory-mapped, so the module weights in it are not read unless used."""
    path = model_states_file(ckpt_dir, tag)
    try:
        return torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception as e:  # a truncated or foreign file: say which, not where in torch it failed
        raise ExportError(f"cannot read {path}: {type(e).__name__}: {e}") from e


def consolidated_state(ckpt_dir: Path, tag: str) -> dict[str, torch.Tensor]:
    """The trained module's raw fp32 weights from a DeepSpeed checkpoint (the UNet's, or TrainedModules')."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    folder = Path(ckpt_dir) / tag
    if not list(folder.glob("*optim_states.pt")):
        # ZeRO stage 0: the module's full weights are in the model-states file.
        state = checkpoint_state(ckpt_dir, tag)
        if not isinstance(state.get("module"), dict):
            raise ExportError(f"{model_states_file(ckpt_dir, tag)} holds no module weights")
        return {k: v.float() for k, v in state["module"].items()}
    model_states_file(ckpt_dir, tag)  # a clear error if this is not a DeepSpeed checkpoint at all
    try:
        return get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag)
    except Exception as e:
        raise ExportError(f"DeepSpeed cannot consolidate checkpoint {folder}: {type(e).__name__}: {e}") from e


def split_trained(state: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """{"unet": ..., "text_encoder": ..., ...} from a consolidated state: a TrainedModules state is split by
    its key prefixes; a bare UNet's state is all "unet"."""
    if not any(k.startswith("unet.") for k in state):
        return {"unet": state}
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        part, _, name = key.partition(".")
        parts.setdefault(part, {})[name] = value
    return parts


def consolidated_unet_state(ckpt_dir: Path, tag: str) -> dict[str, torch.Tensor]:
    """The UNet's raw fp32 weights from a DeepSpeed checkpoint."""
    return split_trained(consolidated_state(ckpt_dir, tag))["unet"]


def ema_unet_state(ckpt_dir: Path, tag: str) -> dict[str, torch.Tensor]:
    """The UNet's EMA weights (fp32): every rank's share in the checkpoint folder, merged."""
    folder = Path(ckpt_dir) / tag
    model_states_file(ckpt_dir, tag)  # a clear error if this is not a DeepSpeed checkpoint at all
    try:
        state = ema.read(folder)
    except Exception as e:  # a truncated file, or shares of two runs
        raise ExportError(f"cannot read the EMA of {folder}: {type(e).__name__}: {e}") from e
    if not state:
        raise ExportError(
            f"checkpoint {folder} has no EMA weights (no {ema.FILE.format(rank=0)}): train with"
            " train.ema_decay > 0, or export the raw weights (export.weights: raw)"
        )
    return state


def check_fits(module: torch.nn.Module, state: dict[str, torch.Tensor], what: str, part: str = "UNet"):
    """A clear error when a state dict is not one of this module (another base model, another network)."""
    expected = module.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k} {list(state[k].shape)} vs {list(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    problems = [
        f"{len(found)} {kind} (e.g. {found[0]})"
        for kind, found in (("missing keys", missing), ("unexpected keys", unexpected), ("shapes", shapes))
        if found
    ]
    if problems:
        raise ExportError(f"{what} does not fit the base model's {part}: {'; '.join(problems)}")


def holds_text_encoders(ckpt_dir: Path, tag: str) -> bool:
    """Whether the checkpoint trained text encoders, from the names of its module's weights in the
    memory-mapped model-states file (no weights are read; without names, assume it may have)."""
    module = checkpoint_state(ckpt_dir, tag).get("module")
    if not isinstance(module, dict):
        return True
    return any(key.partition(".")[0] in ("text_encoder", "text_encoder_2") for key in module)


def trained_components(base_dir: Path, ckpt_dir: Path, tag: str, weights: str = "raw") -> Components:
    """The base model's components with the checkpoint's UNet (`weights`: raw or EMA) and its trained text
    encoders, if any. The checkpoint is consolidated once, and not at all for EMA weights without trained
    text encoders (for SDXL, consolidating reads every rank's optimizer states: tens of GB)."""
    if weights not in ("raw", "ema"):
        raise ExportError(f"export.weights must be raw or ema, not {weights!r}")
    if not (Path(base_dir) / "unet" / "config.json").is_file():
        raise ExportError(f"base model {base_dir} is not a diffusers SDXL folder (no unet/config.json)")
    what = f"checkpoint {Path(ckpt_dir) / tag}"
    parts = {}
    if weights == "raw" or holds_text_encoders(ckpt_dir, tag):
        parts = split_trained(consolidated_state(ckpt_dir, tag))
    unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(Path(base_dir) / "unet"))
    state = parts["unet"] if weights == "raw" else ema_unet_state(ckpt_dir, tag)
    check_fits(unet, state, f"{what} ({weights} weights)")
    unet.load_state_dict(state, strict=True)
    c = load_components(base_dir, unet=unet)
    for name in ("text_encoder", "text_encoder_2"):
        if name in parts:
            encoder = getattr(c, name)
            check_fits(encoder, parts[name], what, name.replace("_", " "))
            encoder.load_state_dict(parts[name], strict=True)
    return c


def training_facts(ckpt_dir: Path, tag: str, summary: dict) -> dict:
    """Steps, images seen and validation losses of the exported checkpoint (its client state knows its
    step; train/summary.json knows the batch), for the metadata and the model card."""
    state = checkpoint_state(ckpt_dir, tag)
    steps = state.get("step", summary.get("steps"))
    if not isinstance(steps, int):
        steps = summary.get("steps")
    global_batch = summary.get("global_batch")
    if isinstance(steps, int) and isinstance(global_batch, int):
        images_seen = steps * global_batch
    else:
        images_seen = summary.get("images_seen")
    val = [v for v in summary.get("val_loss", []) if not isinstance(steps, int) or v[0] <= steps]
    return {
        "steps": steps,
        "images_seen": images_seen,
        "global_batch": global_batch,
        "val_loss_first": val[0] if val else None,
        "val_loss_last": val[-1] if val else None,
        "seconds": summary.get("seconds"),
    }


def _loss(entry) -> str:
    return f"{entry[1]:.4f} (step {entry[0]})" if entry else "not measured"


MODEL_CARD = """\
---
{front_matter}
---

# {run}

Stable Diffusion XL fine-tuned from {base} with **flow matching** (rectified flow, velocity
prediction) by nyaflow. It is not an epsilon-prediction model: sample it with a flow sampler and a
time shift of {shift}, as below; an ordinary SDXL sampler gives noise.

## Training

| | |
| --- | --- |
| base model | {base} |
| checkpoint | `{tag}`, {weights} |
| optimizer steps | {steps} |
| images seen | {images_seen} |
| global batch | {global_batch} |
| validation loss, first | {val_first} |
| validation loss, at this checkpoint | {val_last} |
| objective | velocity v = eps - x0 on x_sigma = (1 - sigma) x0 + sigma eps, timestep = 1000 sigma |
| inference shift | {shift} |

## Sampling with diffusers

The folder loads with `StableDiffusionXLPipeline.from_pretrained()`; its scheduler is a
`FlowMatchEulerDiscreteScheduler` with shift {shift}. The SDXL pipeline also needs `init_noise_sigma`
and `scale_model_input`, which that scheduler lacks (diffusers 0.42), so load the scheduler with
nyaflow's subclass that adds them:

```python
from diffusers import StableDiffusionXLPipeline
from nyaflow.scheduler import FlowMatchEulerSDXLScheduler

path = "results/{run}/export/diffusers"  # this folder
pipe = StableDiffusionXLPipeline.from_pretrained(
    path, scheduler=FlowMatchEulerSDXLScheduler.from_pretrained(path, subfolder="scheduler")
)
image = pipe("your prompt", num_inference_steps={sample_steps}, guidance_scale={guidance}).images[0]
```

Without nyaflow installed, define the subclass yourself; this is all there is to it:

```python
from diffusers import FlowMatchEulerDiscreteScheduler


class FlowMatchEulerSDXLScheduler(FlowMatchEulerDiscreteScheduler):
    init_noise_sigma = 1.0

    def scale_model_input(self, sample, timestep=None):
        return sample
```

## Sampling with ComfyUI

Load the single file `{run}.safetensors` (next to this folder) with **Load Checkpoint**, pass the
model through the **ModelSamplingSD3** node with **shift {shift}**, and sample with **KSampler**
(sampler `euler`, scheduler `simple`, {sample_steps} steps, cfg {guidance}). The file has the original
SDXL (SGM) key layout; its metadata says that it is a flow model and records the shift.
"""


def model_card(config: dict, tag: str, weights: str, facts: dict) -> str:
    """README.md of the diffusers folder: what was trained, and how to sample it in diffusers and ComfyUI."""
    base = config["model"]["base"]
    front_matter = ["library_name: diffusers", "pipeline_tag: text-to-image"]
    if base != "tiny":
        front_matter.append(f"base_model: {base}")
    front_matter += ["tags:"] + [f"- {t}" for t in ("stable-diffusion-xl", "flow-matching", "nyaflow")]
    return MODEL_CARD.format(
        front_matter="\n".join(front_matter),
        run=config["run"],
        base="nyaflow's tiny SDXL-shaped demo model" if base == "tiny" else f"`{base}`",
        shift=config["export"]["shift"],
        tag=tag,
        weights="EMA (exponential moving average) weights" if weights == "ema" else "raw weights",
        steps=facts["steps"],
        images_seen=facts["images_seen"],
        global_batch=facts["global_batch"],
        val_first=_loss(facts["val_loss_first"]),
        val_last=_loss(facts["val_loss_last"]),
        sample_steps=config["sample"]["steps"],
        guidance=config["sample"]["guidance"],
    )


def export(
    config: dict,
    base_dir: Path,
    ckpt_dir: Path,
    train_summary: Path,
    out_dir: Path,
    tag: str | None = None,
    weights: str | None = None,
) -> dict:
    """Write out_dir/diffusers/ (with README.md) and out_dir/<run>.safetensors from the chosen checkpoint:
    `tag` (default export.tag, then `latest`) with `weights` (default export.weights). Returns the facts
    written into the model card and metadata."""
    ec = config["export"]
    tag = checkpoint_tag(ckpt_dir, tag or ec["tag"])
    weights = weights or ec["weights"]
    summary_path = Path(train_summary)
    if not summary_path.is_file():
        raise ExportError(f"training summary {summary_path} does not exist (has training finished?)")
    summary = json.loads(summary_path.read_text())
    components = trained_components(base_dir, ckpt_dir, tag, weights)
    facts = training_facts(ckpt_dir, tag, summary)
    shift = ec["shift"]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    folder = out_dir / "diffusers"
    tmp = out_dir / "diffusers.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    save_components(components, tmp, scheduler=FlowMatchEulerSDXLScheduler(shift=shift))
    # Users load the folder without nyaflow: record the stock scheduler class that holds the config.
    index = json.loads((tmp / "model_index.json").read_text())
    index["scheduler"] = ["diffusers", "FlowMatchEulerDiscreteScheduler"]
    (tmp / "model_index.json").write_text(json.dumps(index, indent=2))
    (tmp / "README.md").write_text(model_card(config, tag, weights, facts))
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)

    metadata = {
        "modelspec.architecture": "stable-diffusion-xl-v1-base",
        "modelspec.title": config["run"],
        "nyaflow.prediction": "flow: v = eps - x0; x_sigma = (1 - sigma) x0 + sigma eps; t = 1000 sigma",
        "nyaflow.shift": str(shift),
        "nyaflow.base_model": config["model"]["base"],
        "nyaflow.checkpoint": tag,
        "nyaflow.weights": weights,
        "nyaflow.steps": str(facts["steps"]),
        "nyaflow.images_seen": str(facts["images_seen"]),
    }
    save_single_file(components, out_dir / f"{config['run']}.safetensors", DTYPES[ec["dtype"]], metadata)
    print(
        f"[nyaflow export] {ckpt_dir}/{tag} ({weights} weights, step {facts['steps']}) -> {folder} and "
        f"{out_dir / (config['run'] + '.safetensors')}",
        flush=True,
    )
    return facts
