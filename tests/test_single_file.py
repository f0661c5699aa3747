"""SGM single-file export: diffusers' own single-file reader must give back exactly what was written."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from diffusers import AutoencoderKL, StableDiffusionXLPipeline, UNet2DConditionModel
from diffusers.loaders.single_file_utils import (
    convert_ldm_clip_checkpoint,
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
    convert_open_clip_checkpoint,
    infer_diffusers_model_type,
)
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from nyaflow.bench import SDXL_UNET, SDXL_VAE
from nyaflow.model import build_tiny_components, save_components
from nyaflow.single_file import save_single_file, sgm_state_dict

MODULES = ("unet", "vae", "text_encoder", "text_encoder_2")

# The text towers of stabilityai/stable-diffusion-xl-base-1.0 (UNet and VAE: nyaflow.bench).
CLIP_L = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12}
CLIP_BIG_G = {
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_hidden_layers": 32,
    "num_attention_heads": 20,
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny SDXL-shaped model and the diffusers folder it was saved to."""
    folder = tmp_path_factory.mktemp("tiny_sdxl")
    components = build_tiny_components(folder, ["cat", "girl", "solo"], seed=0)
    save_components(components, folder)
    return folder, components


def _assert_state_dicts_equal(got: dict, want: dict, name: str) -> None:
    assert got.keys() == want.keys(), f"{name}: key sets differ: {sorted(got.keys() ^ want.keys())[:10]}"
    different = [k for k in want if got[k].dtype != want[k].dtype or not torch.equal(got[k], want[k])]
    assert not different, f"{name}: {len(different)} tensors differ, e.g. {different[:5]}"


def _load(file, folder, **kwargs) -> StableDiffusionXLPipeline:
    return StableDiffusionXLPipeline.from_single_file(
        str(file), config=str(folder), local_files_only=True, **kwargs
    )


def test_fp32_file_loads_back_exactly(tiny, tmp_path):
    folder, c = tiny
    file = tmp_path / "model.safetensors"
    save_single_file(c, file, torch.float32, {"nyaflow.step": "100"})

    assert [p.name for p in tmp_path.iterdir()] == [file.name]  # no temporary file left behind
    with safe_open(str(file), "pt") as f:
        assert f.metadata() == {"nyaflow.step": "100"}
        width = c.vae.config.block_out_channels[-1]  # the VAE's mid attention: 1x1 convolutions in SGM
        assert f.get_tensor("first_stage_model.encoder.mid.attn_1.q.weight").shape == (width, width, 1, 1)
    pipe = _load(file, folder)
    for name in MODULES:
        _assert_state_dicts_equal(getattr(pipe, name).state_dict(), getattr(c, name).state_dict(), name)


def test_bf16_file_holds_the_rounded_weights(tiny, tmp_path):
    folder, c = tiny
    file = tmp_path / "model_bf16.safetensors"
    save_single_file(c, file, torch.bfloat16, {})

    assert {t.dtype for t in load_file(file).values()} == {torch.bfloat16}
    pipe = _load(file, folder, torch_dtype=torch.bfloat16)
    for name in MODULES:
        want = {k: v.to(torch.bfloat16) for k, v in getattr(c, name).state_dict().items()}
        _assert_state_dicts_equal(getattr(pipe, name).state_dict(), want, name)


@pytest.fixture(scope="module")
def real_sdxl_on_meta():
    """The real SDXL base modules, shapes only (meta device: no memory, no weights)."""
    with torch.device("meta"):
        return (
            UNet2DConditionModel(**SDXL_UNET),
            AutoencoderKL(**SDXL_VAE),
            CLIPTextModel(CLIPTextConfig(**CLIP_L, projection_dim=768, hidden_act="quick_gelu")),
            CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_BIG_G, projection_dim=1280, hidden_act="gelu")),
        )


def _shapes(state: dict) -> dict:
    return {k: tuple(v.shape) for k, v in state.items()}


def test_real_sdxl_layout_round_trips_through_diffusers_reader(real_sdxl_on_meta):
    unet, vae, te, te2 = real_sdxl_on_meta
    ckpt = sgm_state_dict(unet, vae, te, te2)

    assert infer_diffusers_model_type(ckpt) == "xl_base"
    expected = {
        "model.diffusion_model.input_blocks.4.1.transformer_blocks.1.attn1.to_q.weight": (640, 640),
        "model.diffusion_model.input_blocks.7.1.transformer_blocks.9.attn2.to_k.weight": (1280, 2048),
        "model.diffusion_model.input_blocks.3.0.op.weight": (320, 320, 3, 3),
        "model.diffusion_model.label_emb.0.0.weight": (1280, 2816),
        "model.diffusion_model.output_blocks.2.2.conv.weight": (1280, 1280, 3, 3),
        "model.diffusion_model.output_blocks.5.2.conv.weight": (640, 640, 3, 3),
        "model.diffusion_model.output_blocks.8.0.skip_connection.weight": (320, 640, 1, 1),
        "model.diffusion_model.middle_block.1.proj_in.weight": (1280, 1280),
        "model.diffusion_model.middle_block.2.emb_layers.1.weight": (1280, 1280),
        "model.diffusion_model.out.2.weight": (4, 320, 3, 3),
        "conditioner.embedders.0.transformer.text_model.encoder.layers.11.mlp.fc2.weight": (768, 3072),
        "conditioner.embedders.0.transformer.text_model.embeddings.position_embedding.weight": (77, 768),
        "conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj_weight": (3840, 1280),
        "conditioner.embedders.1.model.transformer.resblocks.0.mlp.c_fc.weight": (5120, 1280),
        "conditioner.embedders.1.model.positional_embedding": (77, 1280),
        "conditioner.embedders.1.model.text_projection": (1280, 1280),
        "conditioner.embedders.1.model.ln_final.weight": (1280,),
        "first_stage_model.encoder.down.3.block.1.conv2.weight": (512, 512, 3, 3),
        "first_stage_model.decoder.up.0.block.0.nin_shortcut.weight": (128, 256, 1, 1),
        "first_stage_model.decoder.up.3.upsample.conv.weight": (512, 512, 3, 3),
        "first_stage_model.decoder.mid.attn_1.proj_out.weight": (512, 512, 1, 1),
        "first_stage_model.post_quant_conv.weight": (4, 4, 1, 1),
    }
    assert {k: tuple(ckpt[k].shape) for k in expected if k in ckpt} == expected
    fused_away = 4 * te2.config.num_hidden_layers  # q/k/v weight and bias: 6 tensors become in_proj's 2
    assert len(ckpt) == sum(len(m.state_dict()) for m in real_sdxl_on_meta) - fused_away
    unet_keys = [k for k in ckpt if k.startswith("model.diffusion_model.")]
    assert len(unet_keys) == len(unet.state_dict()) == 1680

    # diffusers' reader turns every written key back into exactly the original diffusers key, same shape
    assert _shapes(convert_ldm_unet_checkpoint(ckpt, dict(unet.config))) == _shapes(unet.state_dict())
    assert _shapes(convert_ldm_vae_checkpoint(ckpt, dict(vae.config))) == _shapes(vae.state_dict())
    clip_l = {k.removeprefix("text_model."): v for k, v in convert_ldm_clip_checkpoint(ckpt).items()}
    assert _shapes(clip_l) == _shapes(te.state_dict())
    open_clip = convert_open_clip_checkpoint(te2, ckpt, prefix="conditioner.embedders.1.model.")
    assert _shapes(open_clip) == _shapes(te2.state_dict())


def _without_text_time(c):
    config = {**c.unet.config, "addition_embed_type": None}
    return dataclasses.replace(c, unet=UNet2DConditionModel.from_config(config)), "text_time"


def _swapped_text_encoders(c):
    return dataclasses.replace(
        c, text_encoder=c.text_encoder_2, text_encoder_2=c.text_encoder
    ), "CLIPTextModel"


def _same_width_text_encoders(c):
    config = CLIPTextConfig(**{**c.text_encoder.config.to_dict(), "hidden_size": 64, "projection_dim": 64})
    return dataclasses.replace(c, text_encoder=CLIPTextModel(config)), "same width"


def _text_encoder_as_vae(c):
    return dataclasses.replace(c, vae=c.text_encoder), "AutoencoderKL"


@pytest.mark.parametrize(
    "break_it", [_without_text_time, _swapped_text_encoders, _same_width_text_encoders, _text_encoder_as_vae]
)
def test_not_sdxl_shaped_is_refused_and_nothing_is_written(tiny, tmp_path, break_it):
    broken, problem = break_it(tiny[1])
    with pytest.raises(ValueError, match=problem):
        save_single_file(broken, tmp_path / "model.safetensors", torch.float32, {})
    assert list(tmp_path.iterdir()) == []


def test_metadata_must_be_strings(tiny, tmp_path):
    with pytest.raises(ValueError, match="metadata"):
        save_single_file(tiny[1], tmp_path / "model.safetensors", torch.float32, {"step": 100})
    assert list(tmp_path.iterdir()) == []
