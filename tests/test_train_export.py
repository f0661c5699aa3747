"""DeepSpeed flow-matching training on the tiny model (gloo on CPU), checkpoints, resume and export."""

import json

import torch
from conftest import make_config
from diffusers import StableDiffusionXLPipeline
from safetensors import safe_open


def test_deepspeed_steps_lower_the_loss_on_a_fixed_batch(tiny_model, demo_data):
    from nyaflow.loader import TrainingSet, collate
    from nyaflow.model import load_components
    from nyaflow.train import FlowObjective, deepspeed_config, init_distributed, keyed_generator

    _, data_dir, _, _ = demo_data
    cfg = make_config(train={"caption_dropout": 0.0, "lr": 1e-3, "warmup_steps": 0})
    deepspeed, device = init_distributed()
    c = load_components(tiny_model)
    engine, *_ = deepspeed.initialize(
        model=c.unet,
        optimizer=torch.optim.AdamW(c.unet.parameters(), lr=1e-3),
        config=deepspeed_config(cfg["train"], bf16=False),
    )
    objective = FlowObjective(c, cfg["train"], device, torch.float32)
    ds = TrainingSet(data_dir)
    bucket0 = [i for i in range(len(ds)) if ds.bucket_ids[i] == ds.bucket_ids[0]][:4]
    batch = collate([ds[i] for i in bucket0])

    def loss():
        return objective.loss(engine, batch, keyed_generator(device, 0, 0, 0))

    with torch.no_grad():
        before = loss().item()
    for _ in range(5):
        step_loss = loss()
        engine.backward(step_loss)
        engine.step()
    with torch.no_grad():
        after = loss().item()
    assert after < 0.8 * before


def test_train_resume_export_and_single_file(tiny_model, demo_data, tmp_path):
    """Train 4 steps with a checkpoint at 2, resume a second run from step 2, and compare: the final
    weights must be identical. Then export and load both outputs with diffusers."""
    from nyaflow.export import consolidated_unet_state, export
    from nyaflow.train import train

    cfg, data_dir, _, _ = demo_data
    cfg = make_config(
        train={
            "steps": 4,
            "micro_batch": 4,
            "val_size": 2,
            "val_sigmas": 2,
            "checkpoint_every": 2,
            "log_every": 1,
            "keep_checkpoints": 5,
        },
        export={"dtype": "fp32"},
    )
    full = train(cfg, tiny_model, data_dir, tmp_path / "full")
    assert full["steps"] == 4 and full["images_seen"] == 16
    assert (tmp_path / "full" / "checkpoints" / "latest").read_text().strip() == "step00000004"
    assert (
        json.loads((tmp_path / "full" / "summary.json").read_text())["val_loss_last"] == full["val_loss_last"]
    )

    # A run stopped after step 2 (its step-2 checkpoint copied) resumes and must end bit-identical.
    import shutil

    part = tmp_path / "resumed" / "checkpoints"
    shutil.copytree(tmp_path / "full" / "checkpoints" / "step00000002", part / "step00000002")
    (part / "latest").write_text("step00000002")
    resumed = train(cfg, tiny_model, data_dir, tmp_path / "resumed")
    a = consolidated_unet_state(tmp_path / "full" / "checkpoints", "step00000004")
    b = consolidated_unet_state(part, "step00000004")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["val_loss_last"] == full["val_loss_last"]

    export(
        cfg,
        tiny_model,
        tmp_path / "full" / "checkpoints",
        tmp_path / "full" / "summary.json",
        tmp_path / "export",
    )
    pipe = StableDiffusionXLPipeline.from_pretrained(tmp_path / "export" / "diffusers", local_files_only=True)
    assert type(pipe.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    assert pipe.scheduler.config.shift == 3.0
    exported = pipe.unet.state_dict()
    assert all(torch.equal(exported[k], a[k]) for k in a)
    single = tmp_path / "export" / "test.safetensors"
    with safe_open(single, "pt") as f:
        meta = f.metadata()
    assert meta["nyaflow.shift"] == "3.0" and meta["nyaflow.steps"] == "4"
    from_file = StableDiffusionXLPipeline.from_single_file(
        str(single), config=str(tmp_path / "export" / "diffusers"), local_files_only=True
    )
    unet_sd = from_file.unet.state_dict()
    assert unet_sd.keys() == exported.keys() and all(torch.equal(unet_sd[k], exported[k]) for k in exported)
