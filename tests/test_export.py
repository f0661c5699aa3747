"""Export: raw or EMA weights, a chosen checkpoint, the model card, and clear messages for a missing or wrong
checkpoint. The checkpoints here are written by hand in DeepSpeed's stage-0 layout (the module's weights and
the client state in mp_rank_00_model_states.pt), so no training runs; tests/test_train_export.py exports
real ZeRO checkpoints."""

import json
import re

import pytest
import torch
from conftest import make_config
from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
from safetensors import safe_open
from safetensors.torch import save_file

from nyaflow.cli import main as cli_main
from nyaflow.export import ExportError, checkpoint_tag, export


@pytest.fixture(scope="module")
def unet_state(tiny_model):
    unet = UNet2DConditionModel.from_pretrained(tiny_model / "unet", local_files_only=True)
    return {k: v.clone() for k, v in unet.state_dict().items()}


def write_checkpoint(folder, tag, module, step, ema=None, latest=True):
    """A checkpoint as DeepSpeed writes it at ZeRO stage 0, with nyaflow's client state, and the EMA as two
    ranks' shares (nyaflow.ema)."""
    (folder / tag).mkdir(parents=True)
    state = {"module": module, "step": step, "val_loss": [[0, 1.0], [step, 0.25], [step + 10, 0.2]]}
    torch.save(state, folder / tag / "mp_rank_00_model_states.pt")
    if ema is not None:
        names = sorted(ema)
        for rank in (0, 1):
            share = {n: ema[n].contiguous() for n in names[rank::2]}
            save_file(share, folder / tag / f"ema_rank{rank:03d}.safetensors")
    if latest:
        (folder / "latest").write_text(tag)


def shifted(state, by):
    return {k: v + by for k, v in state.items()}


@pytest.fixture
def run(tmp_path, unet_state):
    """A train folder with two checkpoints (step 4 raw only; step 8 with EMA weights) and a summary."""
    ckpt = tmp_path / "train" / "checkpoints"
    write_checkpoint(ckpt, "step00000004", shifted(unet_state, 0.01), 4, latest=False)
    write_checkpoint(ckpt, "step00000008", shifted(unet_state, 0.02), 8, ema=shifted(unet_state, 0.03))
    summary = {
        "steps": 18,
        "global_batch": 6,
        "images_seen": 108,
        "val_loss": [[0, 1.0], [8, 0.25], [18, 0.2]],
        "val_loss_first": 1.0,
        "val_loss_last": 0.2,
    }
    (tmp_path / "train" / "summary.json").write_text(json.dumps(summary))
    return tmp_path, ckpt


def exported_unet(out):
    return UNet2DConditionModel.from_pretrained(
        out / "diffusers" / "unet", local_files_only=True
    ).state_dict()


def test_export_ema_weights_with_model_card(tiny_model, run, unet_state, monkeypatch):
    tmp_path, ckpt = run
    cfg = make_config(export={"dtype": "fp32", "weights": "ema"}, sample={"steps": 20, "guidance": 4.5})
    out = tmp_path / "export"

    def not_needed(*args):
        raise AssertionError("EMA weights without trained text encoders need no consolidation")

    monkeypatch.setattr("nyaflow.export.consolidated_state", not_needed)
    facts = export(cfg, tiny_model, ckpt, tmp_path / "train" / "summary.json", out)
    ema = shifted(unet_state, 0.03)
    got = exported_unet(out)
    assert got.keys() == ema.keys() and all(torch.equal(got[k], ema[k]) for k in ema)
    # Facts of the exported checkpoint (step 8), not of the end of training (step 18).
    assert facts["steps"] == 8 and facts["images_seen"] == 48
    with safe_open(out / "test.safetensors", "pt") as f:
        meta = f.metadata()
    assert meta["nyaflow.weights"] == "ema" and meta["nyaflow.checkpoint"] == "step00000008"
    assert meta["nyaflow.steps"] == "8" and meta["nyaflow.images_seen"] == "48"
    assert meta["nyaflow.shift"] == "3.0" and "v = eps - x0" in meta["nyaflow.prediction"]

    card = (out / "diffusers" / "README.md").read_text()
    for fact in (
        "library_name: diffusers",
        "`step00000008`, EMA",
        "| optimizer steps | 8 |",
        "| images seen | 48 |",
        "| validation loss, first | 1.0000 (step 0) |",
        "| validation loss, at this checkpoint | 0.2500 (step 8) |",
        "**ModelSamplingSD3** node with **shift 3.0**",
        "test.safetensors",
    ):
        assert fact in card, fact
    # The card's diffusers snippet works as written (with this folder's path and fewer steps).
    code = re.search(r"```python\n(.*?)```", card, re.S).group(1)
    assert "num_inference_steps=20, guidance_scale=4.5" in code
    code = code.replace('"results/test/export/diffusers"', repr(str(out / "diffusers")))
    code = code.replace("num_inference_steps=20", "num_inference_steps=2, output_type='latent'")
    namespace = {}
    exec(code, namespace)
    assert type(namespace["pipe"].scheduler).__name__ == "FlowMatchEulerSDXLScheduler"
    assert namespace["pipe"].scheduler.config.shift == 3.0
    assert namespace["image"].shape == (4, 16, 16)
    # The folder itself names the stock diffusers scheduler: it loads without nyaflow.
    pipe = StableDiffusionXLPipeline.from_pretrained(out / "diffusers", local_files_only=True)
    assert type(pipe.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    assert not list(out.glob("*.partial")) and not list(out.glob(".*.tmp"))


def test_export_raw_weights_of_a_chosen_step(tiny_model, run, unet_state):
    tmp_path, ckpt = run
    cfg = make_config(export={"dtype": "fp32", "tag": "step00000004"})
    facts = export(cfg, tiny_model, ckpt, tmp_path / "train" / "summary.json", tmp_path / "export")
    raw = shifted(unet_state, 0.01)
    got = exported_unet(tmp_path / "export")
    assert all(torch.equal(got[k], raw[k]) for k in raw)
    assert facts["steps"] == 4 and facts["val_loss_last"] == [0, 1.0]
    assert "`step00000004`, raw weights" in (tmp_path / "export" / "diffusers" / "README.md").read_text()


def test_export_ema_unet_with_a_trained_text_encoder(tiny_model, tmp_path, unet_state):
    """A TrainedModules checkpoint (keys unet.*, text_encoder.*): EMA UNet, raw trained text encoder 1,
    text encoder 2 from the base model."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    encoder = CLIPTextModel.from_pretrained(tiny_model / "text_encoder", local_files_only=True).state_dict()
    trained_encoder = shifted(encoder, 0.05)
    module = {f"unet.{k}": v for k, v in shifted(unet_state, 0.02).items()}
    module |= {f"text_encoder.{k}": v for k, v in trained_encoder.items()}
    ckpt = tmp_path / "train" / "checkpoints"
    write_checkpoint(ckpt, "step00000008", module, 8, ema=shifted(unet_state, 0.03))
    (tmp_path / "train" / "summary.json").write_text(json.dumps({"steps": 8, "global_batch": 6}))
    cfg = make_config(export={"dtype": "fp32", "weights": "ema"})
    export(cfg, tiny_model, ckpt, tmp_path / "train" / "summary.json", tmp_path / "export")
    pipe = StableDiffusionXLPipeline.from_pretrained(tmp_path / "export" / "diffusers", local_files_only=True)
    ema, got = shifted(unet_state, 0.03), pipe.unet.state_dict()
    assert got.keys() == ema.keys() and all(torch.equal(got[k], ema[k]) for k in ema)
    got = pipe.text_encoder.state_dict()
    assert all(torch.equal(got[k], trained_encoder[k]) for k in trained_encoder)
    base = CLIPTextModelWithProjection.from_pretrained(tiny_model / "text_encoder_2", local_files_only=True)
    base = base.state_dict()
    got = pipe.text_encoder_2.state_dict()
    assert all(torch.equal(got[k], base[k]) for k in base)


def test_missing_or_wrong_checkpoints_get_clear_messages(tiny_model, run, unet_state):
    tmp_path, ckpt = run
    summary = tmp_path / "train" / "summary.json"

    def fails(message, **kw):
        with pytest.raises(ExportError, match=message):
            export(make_config(export=kw.pop("export", {})), tiny_model, **kw)

    fails(
        "has no EMA weights",
        ckpt_dir=ckpt,
        export={"weights": "ema", "tag": "step00000004"},
        train_summary=summary,
        out_dir=tmp_path / "x",
    )
    fails(
        r"step00000099 does not exist \(checkpoints there: step00000004, step00000008\)",
        ckpt_dir=ckpt,
        export={"tag": "step00000099"},
        train_summary=summary,
        out_dir=tmp_path / "x",
    )
    fails(
        "latest does not exist", ckpt_dir=tmp_path / "nowhere", train_summary=summary, out_dir=tmp_path / "x"
    )
    (ckpt / "step00000012").mkdir()
    fails(
        "is not a DeepSpeed checkpoint",
        ckpt_dir=ckpt,
        export={"tag": "step00000012"},
        train_summary=summary,
        out_dir=tmp_path / "x",
    )
    # A checkpoint of another network: the keys and shapes are named.
    other = tmp_path / "other"
    broken = dict(unet_state)
    broken.pop("conv_in.bias")
    broken["conv_in.weight"] = torch.zeros(7, 4, 3, 3)
    broken["extra.weight"] = torch.zeros(1)
    write_checkpoint(other, "step00000002", broken, 2)
    fails(
        r"does not fit the base model's UNet: 1 missing keys \(e.g. conv_in.bias\); 1 unexpected keys "
        r"\(e.g. extra.weight\); 1 shapes \(e.g. conv_in.weight \[7, 4, 3, 3\] vs \[32, 4, 3, 3\]\)",
        ckpt_dir=other,
        train_summary=summary,
        out_dir=tmp_path / "x",
    )
    # A truncated model-states file.
    (other / "step00000003").mkdir()
    (other / "step00000003" / "mp_rank_00_model_states.pt").write_bytes(b"PK\x03\x04 not really")
    fails(
        "cannot read",
        ckpt_dir=other,
        export={"tag": "step00000003"},
        train_summary=summary,
        out_dir=tmp_path / "x",
    )
    assert not (tmp_path / "x" / "diffusers").exists()
    with pytest.raises(ExportError, match="has training run"):
        checkpoint_tag(tmp_path / "empty", None)


def test_cli_export_errors_are_one_line(tiny_model, run, tmp_path, capsys):
    import yaml

    _, ckpt = run
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(make_config(export={"weights": "ema", "tag": "step00000004"})))
    status = cli_main(
        ["export", "--config", str(config), "--base", str(tiny_model), "--checkpoints", str(ckpt),
         "--train-summary", str(tmp_path / "train" / "summary.json"), "--out", str(tmp_path / "x")]
    )  # fmt: skip
    err = capsys.readouterr().err
    assert status == 2 and "Traceback" not in err
    assert err.splitlines()[-1].startswith("nyaflow export: checkpoint ") and "has no EMA" in err
