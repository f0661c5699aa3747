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
    """Train 4 steps (UNet and text encoder 2) with a checkpoint at 2, resume a second run from step 2, and
    compare: the final weights must be identical. Then export and load both outputs with diffusers."""
    from nyaflow.export import consolidated_state, export, split_trained
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
            "text_encoder_2_lr": 1e-4,
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
    full_state = consolidated_state(tmp_path / "full" / "checkpoints", "step00000004")
    b = consolidated_state(part, "step00000004")
    assert full_state.keys() == b.keys() and all(torch.equal(full_state[k], b[k]) for k in full_state)
    a, te2 = (split_trained(full_state)[part] for part in ("unet", "text_encoder_2"))
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
    assert all(torch.equal(v, te2[k]) for k, v in pipe.text_encoder_2.state_dict().items())
    single = tmp_path / "export" / "test.safetensors"
    with safe_open(single, "pt") as f:
        meta = f.metadata()
    assert meta["nyaflow.shift"] == "3.0" and meta["nyaflow.steps"] == "4"
    from_file = StableDiffusionXLPipeline.from_single_file(
        str(single), config=str(tmp_path / "export" / "diffusers"), local_files_only=True
    )
    unet_sd = from_file.unet.state_dict()
    assert unet_sd.keys() == exported.keys() and all(torch.equal(unet_sd[k], exported[k]) for k in exported)


def test_text_encoder_trains_at_its_own_rate_and_is_exported(tiny_model, demo_data, tmp_path):
    """train.text_encoder_lr trains text encoder 1 with the UNet, in its own optimizer group (its lr is
    logged apart); text encoder 2 stays frozen. The checkpoint holds both trained parts, and the export
    writes the trained encoder (the frozen one is the base model's) and the trained UNet."""
    from nyaflow.export import consolidated_state, export, split_trained
    from nyaflow.model import load_components
    from nyaflow.train import train

    _, data_dir, _, _ = demo_data
    train_cfg = {"steps": 3, "micro_batch": 4, "val_size": 2, "val_sigmas": 2, "warmup_steps": 0}
    cfg = make_config(
        train={**train_cfg, "caption_dropout": 0.0, "text_encoder_lr": 1e-3, "weight_decay": 0.0},
        export={"dtype": "fp32"},
    )
    train(cfg, tiny_model, data_dir, tmp_path / "train")
    logged = [json.loads(line) for line in (tmp_path / "train" / "metrics.jsonl").read_text().splitlines()]
    lrs = [(m["train/lr"], m["train/lr_text_encoder"]) for m in logged if "train/lr" in m]
    assert lrs and all(lr == (cfg["train"]["lr"], 1e-3) for lr in lrs)  # constant schedule, no warmup
    assert not any("train/lr_text_encoder_2" in m for m in logged)
    parts = split_trained(consolidated_state(tmp_path / "train" / "checkpoints", "step00000003"))
    assert sorted(parts) == ["text_encoder", "unet"]
    base = load_components(tiny_model)
    te_base = base.text_encoder.state_dict()
    changed = [k for k in te_base if not torch.equal(te_base[k], parts["text_encoder"][k])]
    # Without weight decay only a gradient moves a weight: most of text encoder 1's must get one through
    # the prompt embeddings (SDXL uses its penultimate hidden states: its last layer and norm get none).
    assert len(changed) > len(te_base) // 2
    unet_base = base.unet.state_dict()
    assert any(not torch.equal(unet_base[k], parts["unet"][k]) for k in unet_base)

    export(
        cfg,
        tiny_model,
        tmp_path / "train" / "checkpoints",
        tmp_path / "train" / "summary.json",
        tmp_path / "out",
    )
    exported = load_components(tmp_path / "out" / "diffusers")
    te1, te2 = exported.text_encoder.state_dict(), exported.text_encoder_2.state_dict()
    assert all(torch.equal(te1[k], parts["text_encoder"][k]) for k in te1)
    te2_base = base.text_encoder_2.state_dict()
    assert all(torch.equal(te2[k], te2_base[k]) for k in te2)
    unet = exported.unet.state_dict()
    assert all(torch.equal(unet[k], parts["unet"][k]) for k in unet)


def test_each_trained_part_has_its_own_learning_rate(tmp_path):
    from nyaflow.demo_data import TAG_WORDS
    from nyaflow.model import build_tiny_components
    from nyaflow.train import param_groups, trained_modules

    c = build_tiny_components(tmp_path, TAG_WORDS, seed=0)
    tc = make_config(train={"lr": 1e-4, "text_encoder_lr": 2e-5, "text_encoder_2_lr": 3e-6})["train"]
    groups = param_groups(trained_modules(c, tc), tc)
    assert [g["lr"] for g in groups] == [1e-4, 2e-5, 3e-6]
    assert [sum(p.numel() for p in g["params"]) for g in groups] == [
        sum(p.numel() for p in m.parameters()) for m in (c.unet, c.text_encoder, c.text_encoder_2)
    ]
    frozen = make_config()["train"]
    assert trained_modules(c, frozen) is c.unet and [g["lr"] for g in param_groups(c.unet, frozen)] == [
        frozen["lr"]
    ]
