"""Export a diffusers SDXL model as one original-layout (SGM) `.safetensors` file.

The file has the key layout of Stability AI's `sd_xl_base_1.0.safetensors` ("generative-models"), which
ComfyUI, A1111/Forge and `StableDiffusionXLPipeline.from_single_file` load:

- `model.diffusion_model.`: the UNet. `time_embed.{0,2}`, `label_emb.0.{0,2}` (the text_time add
  embedding), `input_blocks.N.{0,1}` (resnet, transformer; `input_blocks.N.0.op` is a downsampler),
  `middle_block.{0,1,2}`, `output_blocks.N.{0,1,2}` (resnet, transformer, upsampler `.conv`), `out.{0,2}`.
  Resnets name their layers `in_layers.{0,2}`, `emb_layers.1`, `out_layers.{0,3}`, `skip_connection`;
  transformers keep diffusers' names.
- `conditioner.embedders.0.transformer.text_model.`: text_encoder (CLIP ViT-L), in Hugging Face layout.
- `conditioner.embedders.1.model.`: text_encoder_2 (OpenCLIP ViT-bigG): `token_embedding.weight`,
  `positional_embedding`, `transformer.resblocks.N.{ln_1,attn,ln_2,mlp.c_fc,mlp.c_proj}` with q/k/v fused
  into `attn.in_proj_weight`/`in_proj_bias`, `ln_final`, `text_projection` stored [width, projection] (the
  transpose of the Linear weight).
- `first_stage_model.`: the VAE. `encoder.down.I.block.J`, `encoder.down.I.downsample.conv`,
  `decoder.up.I.block.J` (up levels numbered from the lowest resolution, the reverse of diffusers' order),
  `{encoder,decoder}.mid.{block_1,attn_1,block_2}`, `norm_out`, `quant_conv`, `post_quant_conv`; the mid
  attention's q/k/v/proj_out are 1x1 convolutions, [C, C, 1, 1].

The mapping is the inverse of diffusers' reader (`diffusers.loaders.single_file_utils`). Every parameter is
mapped or the export fails with a ValueError: nothing is dropped silently. Keys that SDXL inference does not
use (`position_ids` buffers, OpenCLIP's `logit_scale`) are not written.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import NamedTuple

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTextModelWithProjection

from nyaflow.model import Components

UNET_PREFIX = "model.diffusion_model."
TEXT_ENCODER_PREFIX = "conditioner.embedders.0.transformer."
TEXT_ENCODER_2_PREFIX = "conditioner.embedders.1.model."
VAE_PREFIX = "first_stage_model."

Transform = Callable[[torch.Tensor], torch.Tensor]


class _Rule(NamedTuple):
    """Diffusers module path `src` (a whole key, or "" for every key) goes to SGM path `dst`.

    `renames` rename the start of the path below `src` (longest match wins); `transform` reshapes values.
    """

    src: str
    dst: str
    renames: Mapping[str, str] = {}
    transform: Transform | None = None


_UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_VAE_RESNET = {"conv_shortcut": "nin_shortcut"}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_OPENCLIP_LAYER = {
    "self_attn": "attn",  # out_proj keeps its name; q/k/v are fused into in_proj_* first
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}
_UNET_FIXED = [
    _Rule("time_embedding.linear_1", "time_embed.0"),
    _Rule("time_embedding.linear_2", "time_embed.2"),
    _Rule("add_embedding.linear_1", "label_emb.0.0"),
    _Rule("add_embedding.linear_2", "label_emb.0.2"),
    _Rule("conv_in", "input_blocks.0.0"),
    _Rule("conv_norm_out", "out.0"),
    _Rule("conv_out", "out.2"),
    _Rule("mid_block.resnets.0", "middle_block.0", _UNET_RESNET),
    _Rule("mid_block.attentions.0", "middle_block.1"),
    _Rule("mid_block.resnets.1", "middle_block.2", _UNET_RESNET),
]
_VAE_FIXED = [
    *(
        _Rule(f"{part}.{name}", f"{part}.{name}")
        for part in ("encoder", "decoder")
        for name in ("conv_in", "conv_out")
    ),
    _Rule("encoder.conv_norm_out", "encoder.norm_out"),
    _Rule("decoder.conv_norm_out", "decoder.norm_out"),
    _Rule("quant_conv", "quant_conv"),
    _Rule("post_quant_conv", "post_quant_conv"),
]
_SKIPPED_SUFFIXES = ("position_ids",)  # buffers, not weights; loaders rebuild them


def _linear_to_conv(t: torch.Tensor) -> torch.Tensor:
    return t[:, :, None, None] if t.ndim == 2 else t


def _transpose(t: torch.Tensor) -> torch.Tensor:
    return t.T


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(f"not an SDXL-shaped model: {message}")


def _convert(state_dict: Mapping[str, torch.Tensor], rules: list[_Rule], prefix: str, what: str) -> dict:
    """Rename every key of `state_dict` by `rules` (the longest matching `src` wins) under `prefix`."""
    rules = sorted(rules, key=lambda r: len(r.src), reverse=True)
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if key.endswith(_SKIPPED_SUFFIXES):
            continue
        rule = next((r for r in rules if r.src in ("", key) or key.startswith(r.src + ".")), None)
        if rule is None:
            raise ValueError(f"{what}: no SDXL single-file name for parameter {key!r}")
        tail = key[len(rule.src) :].removeprefix(".") if rule.src else key
        old = max((r for r in rule.renames if tail == r or tail.startswith(r + ".")), key=len, default=None)
        if old is not None:
            tail = rule.renames[old] + tail[len(old) :]
        name = prefix + ".".join(part for part in (rule.dst, tail) if part)
        if name in out:
            raise ValueError(f"{what}: two parameters map to {name!r}")
        value = value.detach()
        out[name] = rule.transform(value) if rule.transform else value
    return out


def _layers_per_block(config) -> int:
    layers = config.layers_per_block
    _require(isinstance(layers, int), f"layers_per_block must be one number, not {layers!r}")
    return layers


def _unet_rules(config) -> list[_Rule]:
    """Rules for `UNet2DConditionModel`: SGM numbers its blocks flat, `layers_per_block + 1` per level."""
    _require(
        config.addition_embed_type == "text_time",
        f"the UNet needs addition_embed_type='text_time' (SDXL's size/crop conditioning), "
        f"not {config.addition_embed_type!r}",
    )
    _require(config.class_embed_type is None, f"the UNet has class_embed_type={config.class_embed_type!r}")
    _require(
        config.mid_block_type == "UNetMidBlock2DCrossAttn",
        f"the UNet mid block is {config.mid_block_type!r}, not UNetMidBlock2DCrossAttn",
    )
    down, up = list(config.down_block_types), list(config.up_block_types)
    _require(
        set(down) <= {"DownBlock2D", "CrossAttnDownBlock2D"}
        and set(up) <= {"UpBlock2D", "CrossAttnUpBlock2D"},
        f"unsupported UNet block types {down} / {up}",
    )
    _require(len(down) == len(up) == len(config.block_out_channels), "UNet block lists differ in length")
    per_level = _layers_per_block(config) + 1
    rules = list(_UNET_FIXED)
    for i in range(len(down)):
        for j in range(per_level - 1):
            block = f"input_blocks.{1 + i * per_level + j}"
            rules += [
                _Rule(f"down_blocks.{i}.resnets.{j}", f"{block}.0", _UNET_RESNET),
                _Rule(f"down_blocks.{i}.attentions.{j}", f"{block}.1"),
            ]
        rules.append(
            _Rule(f"down_blocks.{i}.downsamplers.0.conv", f"input_blocks.{(i + 1) * per_level}.0.op")
        )
    for i, block_type in enumerate(up):
        for j in range(per_level):
            block = f"output_blocks.{i * per_level + j}"
            rules += [
                _Rule(f"up_blocks.{i}.resnets.{j}", f"{block}.0", _UNET_RESNET),
                _Rule(f"up_blocks.{i}.attentions.{j}", f"{block}.1"),
            ]
        upsampler = 2 if block_type.startswith("CrossAttn") else 1  # after the transformer, if there is one
        rules.append(
            _Rule(
                f"up_blocks.{i}.upsamplers.0.conv",
                f"output_blocks.{(i + 1) * per_level - 1}.{upsampler}.conv",
            )
        )
    return rules


def _vae_rules(config) -> list[_Rule]:
    """Rules for `AutoencoderKL`: decoder levels are numbered the other way round in SGM."""
    down, up = list(config.down_block_types), list(config.up_block_types)
    _require(
        set(down) == {"DownEncoderBlock2D"} and set(up) == {"UpDecoderBlock2D"} and len(down) == len(up),
        f"unsupported VAE block types {down} / {up}",
    )
    _require(getattr(config, "mid_block_add_attention", True), "the VAE mid block has no attention")
    levels, layers = len(down), _layers_per_block(config)
    rules = list(_VAE_FIXED)
    for part in ("encoder", "decoder"):
        rules += [
            _Rule(f"{part}.mid_block.resnets.0", f"{part}.mid.block_1", _VAE_RESNET),
            _Rule(f"{part}.mid_block.attentions.0", f"{part}.mid.attn_1", _VAE_ATTENTION, _linear_to_conv),
            _Rule(f"{part}.mid_block.resnets.1", f"{part}.mid.block_2", _VAE_RESNET),
        ]
    for i in range(levels):
        rules += [
            _Rule(f"encoder.down_blocks.{i}.resnets.{j}", f"encoder.down.{i}.block.{j}", _VAE_RESNET)
            for j in range(layers)
        ]
        rules.append(
            _Rule(f"encoder.down_blocks.{i}.downsamplers.0.conv", f"encoder.down.{i}.downsample.conv")
        )
        sgm = levels - 1 - i
        rules += [
            _Rule(f"decoder.up_blocks.{i}.resnets.{j}", f"decoder.up.{sgm}.block.{j}", _VAE_RESNET)
            for j in range(layers + 1)
        ]
        rules.append(_Rule(f"decoder.up_blocks.{i}.upsamplers.0.conv", f"decoder.up.{sgm}.upsample.conv"))
    return rules


def _openclip_state_dict(text_encoder_2: CLIPTextModelWithProjection) -> dict[str, torch.Tensor]:
    """text_encoder_2 in OpenCLIP layout (without prefix): q/k/v fused, text_projection transposed."""
    state = dict(text_encoder_2.state_dict())
    for n in range(text_encoder_2.config.num_hidden_layers):
        attn = f"text_model.encoder.layers.{n}.self_attn"
        for param in ("weight", "bias"):
            qkv = [state.pop(f"{attn}.{p}_proj.{param}") for p in "qkv"]
            state[f"{attn}.in_proj_{param}"] = torch.cat(qkv, dim=0)
    rules = [
        _Rule("text_model.embeddings.token_embedding", "token_embedding"),
        _Rule("text_model.embeddings.position_embedding.weight", "positional_embedding"),
        _Rule("text_model.final_layer_norm", "ln_final"),
        _Rule("text_projection.weight", "text_projection", transform=_transpose),
        *(
            _Rule(f"text_model.encoder.layers.{n}", f"transformer.resblocks.{n}", _OPENCLIP_LAYER)
            for n in range(text_encoder_2.config.num_hidden_layers)
        ),
    ]
    return _convert(state, rules, TEXT_ENCODER_2_PREFIX, "text_encoder_2")


def _check_types(unet, vae, text_encoder, text_encoder_2) -> None:
    for name, module, cls in (
        ("unet", unet, UNet2DConditionModel),
        ("vae", vae, AutoencoderKL),
        ("text_encoder", text_encoder, CLIPTextModel),
        ("text_encoder_2", text_encoder_2, CLIPTextModelWithProjection),
    ):
        _require(type(module) is cls, f"{name} must be a {cls.__name__}, got {type(module).__name__}")


def _check_widths(unet, text_encoder, text_encoder_2) -> None:
    h1, h2 = text_encoder.config.hidden_size, text_encoder_2.config.hidden_size
    # diffusers tells the two encoders apart by the width of their position embeddings (768 vs 1280 in SDXL)
    _require(
        h1 != h2,
        f"text_encoder and text_encoder_2 have the same width ({h1}); loaders cannot tell them apart",
    )
    _require(
        unet.config.cross_attention_dim == h1 + h2,
        f"UNet cross_attention_dim {unet.config.cross_attention_dim} != text encoder widths {h1} + {h2}",
    )
    pooled = 6 * (unet.config.addition_time_embed_dim or 0) + text_encoder_2.config.projection_dim
    _require(
        unet.config.projection_class_embeddings_input_dim == pooled,
        f"UNet projection_class_embeddings_input_dim {unet.config.projection_class_embeddings_input_dim} != "
        f"6 * addition_time_embed_dim + text_encoder_2 projection_dim = {pooled}",
    )


def sgm_state_dict(
    unet: UNet2DConditionModel,
    vae: AutoencoderKL,
    text_encoder: CLIPTextModel,
    text_encoder_2: CLIPTextModelWithProjection,
) -> dict[str, torch.Tensor]:
    """The four SDXL modules as one state dict in SGM single-file layout (see the module docstring).

    Values are detached views of the modules' parameters where possible: copy them before changing them.
    Raises ValueError if a component is not SDXL-shaped.
    """
    _check_types(unet, vae, text_encoder, text_encoder_2)
    unet_rules = _unet_rules(unet.config)
    _check_widths(unet, text_encoder, text_encoder_2)
    clip_l = [_Rule("", "text_model"), _Rule("text_model", "text_model")]  # transformers >= 5.6 has no prefix
    return {
        **_convert(unet.state_dict(), unet_rules, UNET_PREFIX, "unet"),
        **_convert(text_encoder.state_dict(), clip_l, TEXT_ENCODER_PREFIX, "text_encoder"),
        **_openclip_state_dict(text_encoder_2),
        **_convert(vae.state_dict(), _vae_rules(vae.config), VAE_PREFIX, "vae"),
    }


def save_single_file(
    components: Components, path: str | Path, dtype: torch.dtype, metadata: dict[str, str]
) -> None:
    """Write `components` as one SGM-layout `.safetensors` file, every tensor cast to `dtype`.

    The file appears atomically: it is written under a temporary name in the same folder, then renamed.
    `metadata` goes into the safetensors header (string keys and values only).
    """
    from safetensors.torch import save_file

    bad = {k: v for k, v in metadata.items() if not (isinstance(k, str) and isinstance(v, str))}
    if bad:
        raise ValueError(f"safetensors metadata must map str to str, got {bad!r}")
    c = components
    state = sgm_state_dict(c.unet, c.vae, c.text_encoder, c.text_encoder_2)
    tensors = {k: v.to(device="cpu", dtype=dtype).contiguous() for k, v in state.items()}
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")  # same folder: os.replace is atomic
    try:
        save_file(tensors, str(tmp), metadata=dict(metadata))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
