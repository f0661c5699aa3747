"""The trainer on the tiny model with DeepSpeed + gloo on CPU: objective, exact resume after SIGKILL,
atomic checkpoints, collective stop on SIGTERM, validation loss, non-finite guard (world sizes 1 and 2)."""

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from conftest import make_config, start_ranks

from nyaflow import checkpoint, flow
from nyaflow.train import REQUEUE_EXIT_CODE

SMALL_TRAIN = {
    "micro_batch": 2,
    "val_size": 2,
    "val_sigmas": 2,
    "log_every": 1,
    "val_every": 1000,
    "checkpoint_every": 2,
    "keep_checkpoints": 10,
    "warmup_steps": 2,
}


def launch(cfg: dict, tiny_model: Path, data_dir: Path, out: Path, world_size: int) -> list[subprocess.Popen]:
    """Start `nyaflow train` as `world_size` ranks (one process each, gloo over 127.0.0.1)."""
    args = ["train", "--base", str(tiny_model), "--data", str(data_dir), "--out", str(out)]
    return start_ranks(args, cfg, out, world_size)


def wait(procs: list[subprocess.Popen], out: Path, timeout: float = 300) -> list[int]:
    codes = [p.wait(timeout=timeout) for p in procs]
    if any(c not in (0, REQUEUE_EXIT_CODE) for c in codes):
        logs = "\n".join((out / f"rank{r}.log").read_text()[-3000:] for r in range(len(procs)))
        pytest.fail(f"ranks exited with {codes}:\n{logs}")
    return codes


def wait_for(predicate, timeout: float = 240, interval: float = 0.02):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise TimeoutError("condition not reached")


def final_state(out: Path) -> tuple[dict, dict, dict, dict]:
    """(UNet fp32 weights, optimizer state of rank 0, EMA, summary) of a finished run."""
    from nyaflow.export import consolidated_unet_state, ema_unet_state

    tag = checkpoint.latest_tag(out / "checkpoints")
    weights = consolidated_unet_state(out / "checkpoints", tag)
    optim_file = sorted((out / "checkpoints" / tag).glob("*optim_states.pt"))[0]
    optim = torch.load(optim_file, map_location="cpu", weights_only=False)["optimizer_state_dict"]
    ema = ema_unet_state(out / "checkpoints", tag)
    return weights, optim, ema, json.loads((out / "summary.json").read_text())


def assert_same(a, b, path="") -> None:
    """Bitwise equality of nested dicts / lists / tensors."""
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), path
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            assert_same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{path}[{i}]")
    elif hasattr(a, "__dict__"):  # e.g. DeepSpeed's loss-scaler object
        assert_same(vars(a), vars(b), path)
    else:
        assert a == b, path


@pytest.mark.parametrize("world_size", [1, 2])
def test_resume_after_sigkill_is_bitwise_identical(tiny_model, demo_data, tmp_path, world_size):
    _, data_dir, _, _ = demo_data
    cfg = make_config(train={**SMALL_TRAIN, "steps": 7, "ema_decay": 0.9})
    wait(launch(cfg, tiny_model, data_dir, tmp_path / "full", world_size), tmp_path / "full")

    killed = tmp_path / "killed"
    procs = launch(cfg, tiny_model, data_dir, killed, world_size)
    wait_for(lambda: checkpoint.latest_tag(killed / "checkpoints") == "step00000004")
    for p in procs:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
    assert not (killed / "summary.json").exists()
    wait(launch(cfg, tiny_model, data_dir, killed, world_size), killed)

    w_full, o_full, ema_full, s_full = final_state(tmp_path / "full")
    w_kill, o_kill, ema_kill, s_kill = final_state(killed)
    assert_same(w_full, w_kill, "unet")
    assert_same(o_full, o_kill, "optimizer")
    assert_same(ema_full, ema_kill, "ema")  # every rank's share, resumed from its own file
    assert ema_full.keys() == w_full.keys() and any(not torch.equal(ema_full[k], w_full[k]) for k in w_full)
    shares = list((tmp_path / "full" / "checkpoints" / "step00000007").glob("ema_rank*.safetensors"))
    assert len(shares) == world_size
    assert s_full["loss"] == s_kill["loss"] and len(s_full["loss"]) == 7
    assert s_full["val_loss"] == s_kill["val_loss"]
    assert s_full["checkpoint"] == s_kill["checkpoint"] == "step00000007"


def test_resume_with_another_world_size_fails_clearly(tiny_model, demo_data, tmp_path):
    _, data_dir, _, _ = demo_data
    cfg = make_config(train={**SMALL_TRAIN, "steps": 2})
    wait(launch(cfg, tiny_model, data_dir, tmp_path, 1), tmp_path)
    cfg["train"]["steps"] = 4
    procs = launch(cfg, tiny_model, data_dir, tmp_path, 2)
    assert [p.wait(timeout=300) for p in procs] != [0, 0]
    assert "was written by 1 ranks and this run has 2" in (tmp_path / "rank0.log").read_text()


def test_kill_during_checkpoint_writing_leaves_latest_loadable(tiny_model, demo_data, tmp_path):
    _, data_dir, _, _ = demo_data
    cfg = make_config(train={**SMALL_TRAIN, "steps": 12, "checkpoint_every": 1, "keep_checkpoints": 2})
    folder = tmp_path / "checkpoints"
    procs = launch(cfg, tiny_model, data_dir, tmp_path, 1)
    # Kill the moment a checkpoint is being written (its .partial folder exists) after the first complete one.
    wait_for(
        lambda: checkpoint.latest_tag(folder) is not None and any(folder.glob("step*.partial")),
        interval=0.001,
    )
    os.killpg(procs[0].pid, signal.SIGKILL)
    procs[0].wait()
    tag = checkpoint.latest_tag(folder)
    assert (folder / tag / "mp_rank_00_model_states.pt").is_file()
    wait(launch(cfg, tiny_model, data_dir, tmp_path, 1), tmp_path)
    assert checkpoint.latest_tag(folder) == "step00000012"
    assert not list(folder.glob("*.partial"))
    assert len(list(folder.glob("step*"))) == 2  # keep_checkpoints


def test_sigterm_on_one_rank_stops_all_ranks_with_a_checkpoint(tiny_model, demo_data, tmp_path):
    _, data_dir, _, _ = demo_data
    cfg = make_config(train={**SMALL_TRAIN, "steps": 10_000, "checkpoint_every": 10_000})
    procs = launch(cfg, tiny_model, data_dir, tmp_path, 2)
    metrics = tmp_path / "metrics.jsonl"
    wait_for(lambda: metrics.exists() and metrics.read_text().count("train/loss") >= 2)
    procs[1].send_signal(signal.SIGTERM)
    assert [p.wait(timeout=120) for p in procs] == [REQUEUE_EXIT_CODE, REQUEUE_EXIT_CODE]
    tag = checkpoint.latest_tag(tmp_path / "checkpoints")
    assert tag is not None and int(tag[4:]) >= 2
    assert "stopped by a signal" in (tmp_path / "rank0.log").read_text()


# --- in-process tests (world size 1) -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def objective(tiny_model, demo_data):
    from nyaflow.loader import TrainingSet, split_validation
    from nyaflow.model import load_components
    from nyaflow.train import FlowObjective, init_distributed

    _, data_dir, _, _ = demo_data
    cfg = make_config(train={"caption_dropout": 0.0, "val_sigmas": 4})
    _, device = init_distributed()
    c = load_components(tiny_model)
    ds = TrainingSet(data_dir)
    return FlowObjective(c, cfg["train"], device, torch.float32), c, ds, split_validation(len(ds), 4, 0)[1]


def test_objective_matches_a_hand_computation(objective):
    from nyaflow.loader import collate
    from nyaflow.model import encode_prompts, time_ids

    obj, c, ds, _ = objective
    same_bucket = [i for i in range(len(ds)) if ds.bucket_ids[i] == ds.bucket_ids[0]][:3]
    batch = collate([ds[i] for i in same_bucket])
    loss = obj.loss(c.unet, batch, torch.Generator().manual_seed(5))

    # By hand, drawing from the generator in the same order: VAE posterior, sigma, noise.
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        x0 = c.vae.encode(batch["pixels"]).latent_dist.sample(g) * c.vae.config.scaling_factor
        sigma = torch.sigmoid(torch.randn(3, generator=g))  # logit-normal(0, 1), shift 1
        eps = torch.randn(x0.shape, generator=g)
        s = sigma[:, None, None, None]
        x = (1 - s) * x0 + s * eps
        embeds, pooled = encode_prompts(c, batch["caption"])
        ids = time_ids(batch["time_ids"][:, :2], batch["time_ids"][:, 2:4], batch["time_ids"][:, 4:])
        v = c.unet(x, sigma * 1000, embeds, added_cond_kwargs={"text_embeds": pooled, "time_ids": ids}).sample
        expected = ((v - (eps - x0)) ** 2).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)


def test_validation_loss_is_identical_across_evaluations(objective):
    obj, c, ds, val_idx = objective
    first = obj.validation_loss(c.unet, ds, val_idx, seed=0)
    second = obj.validation_loss(c.unet, ds, val_idx, seed=0)
    assert first == second
    assert obj.validation_loss(c.unet, ds, val_idx, seed=1) != first  # the noise is keyed by the seed


def test_lr_schedule():
    from nyaflow.train import lr_factor

    tc = {"warmup_steps": 4, "steps": 104, "schedule": "cosine", "min_lr_ratio": 0.1}
    assert lr_factor(0, tc) == pytest.approx(0.2)
    assert lr_factor(3, tc) == pytest.approx(0.8)
    assert lr_factor(4, tc) == pytest.approx(1.0)
    assert lr_factor(54, tc) == pytest.approx(0.55)
    assert lr_factor(104, tc) == pytest.approx(0.1)
    assert lr_factor(50, {**tc, "schedule": "constant"}) == 1.0


def test_nonfinite_losses_are_skipped_counted_and_bounded(tiny_model, demo_data, tmp_path, monkeypatch):
    from nyaflow import train as train_mod

    _, data_dir, _, _ = demo_data
    real_loss = train_mod.FlowObjective.loss
    calls = {"n": 0}

    def sometimes_nan(self, unet, batch, generator):
        calls["n"] += 1
        loss = real_loss(self, unet, batch, generator)
        return loss * float("nan") if calls["n"] in (2, 4) else loss

    monkeypatch.setattr(train_mod.FlowObjective, "loss", sometimes_nan)
    cfg = make_config(
        train={**SMALL_TRAIN, "steps": 4, "max_nonfinite": 2, "sample_every": 2},
        sample={"prompts": ["red circle, blue background | green"], "seeds": [3], "steps": 2},
    )
    summary = train_mod.train(cfg, tiny_model, data_dir, tmp_path / "a")
    assert summary["nonfinite_skipped"] == 2 and summary["steps"] == 4
    grids = sorted(p.name for p in (tmp_path / "a" / "samples").iterdir())
    assert grids == ["step00000002.png", "step00000004.png"]  # samples drawn during training
    assert all(torch.isfinite(torch.tensor(loss)) for _, loss in summary["loss"])

    monkeypatch.setattr(train_mod.FlowObjective, "loss", lambda *a: real_loss(*a) * float("nan"))
    cfg["train"]["steps"] = 6
    with pytest.raises(train_mod.NonFiniteLoss, match="2 micro-steps in a row"):
        train_mod.train(cfg, tiny_model, data_dir, tmp_path / "a")
    assert checkpoint.latest_tag(tmp_path / "a" / "checkpoints") == "step00000004"


def test_inference_grid_is_decreasing_from_noise_to_data():
    sigmas = flow.inference_sigmas(8, 3.0)
    assert sigmas[0] == 1.0 and sigmas[-1] == 0.0 and torch.all(sigmas[1:] < sigmas[:-1])


def test_stop_right_after_resume_keeps_the_checkpoint_it_resumed_from(
    tiny_model, demo_data, tmp_path, monkeypatch
):
    """A signal at the first step boundary after a resume: `latest` already holds that state, so the save is
    skipped rather than deleting and rewriting the one complete checkpoint (a kill in between would leave
    `latest` naming nothing)."""
    from nyaflow import train as train_mod

    _, data_dir, _, _ = demo_data
    cfg = make_config(train={**SMALL_TRAIN, "steps": 2})
    train_mod.train(cfg, tiny_model, data_dir, tmp_path)
    folder = tmp_path / "checkpoints"
    before = (folder / "step00000002").stat().st_ino

    monkeypatch.setattr(train_mod.StopFlag, "__init__", lambda self: setattr(self, "requested", True))
    cfg["train"]["steps"] = 4
    with pytest.raises(train_mod.Preempted, match="at step 2"):
        train_mod.train(cfg, tiny_model, data_dir, tmp_path)
    assert checkpoint.latest_tag(folder) == "step00000002"
    assert (folder / "step00000002").stat().st_ino == before
    assert [p.name for p in folder.glob("step*")] == ["step00000002"]


def test_resume_with_another_data_order_is_refused_and_more_steps_extend(tiny_model, demo_data, tmp_path):
    from nyaflow import train as train_mod
    from nyaflow.errors import UserError

    _, data_dir, _, _ = demo_data
    cfg = make_config(train={**SMALL_TRAIN, "steps": 2})
    train_mod.train(cfg, tiny_model, data_dir, tmp_path)
    changed = make_config(train={**SMALL_TRAIN, "steps": 4, "micro_batch": 3})
    with pytest.raises(UserError, match=r"train\.micro_batch 2 -> 3"):
        train_mod.train(changed, tiny_model, data_dir, tmp_path)
    cfg["train"] |= {"steps": 3, "lr": 2e-4}  # not part of the data order: the run extends
    assert train_mod.train(cfg, tiny_model, data_dir, tmp_path)["steps"] == 3


def test_ema_shadow_is_fp32_and_follows_bf16_weights():
    """At decay 0.9999 an update moves the average by 1e-4 of its distance to the weights: a bf16 shadow
    would round every such update away. The fp32 shadow tracks the float64 reference."""
    from nyaflow.ema import ShardedEMA

    torch.manual_seed(0)
    module = torch.nn.Linear(8, 8)
    ema = ShardedEMA(module, 0.9999, rank=0, world_size=1, device=torch.device("cpu"))
    ema.model.optimization_step = 10**6  # past diffusers' decay warm-up: the decay is 0.9999 from here on
    start = [shadow.clone() for shadow in ema.model.shadow_params]
    module.bfloat16()
    reference = [shadow.double() for shadow in start]  # the fp32 weights before the cast
    for _ in range(50):
        with torch.no_grad():
            for p in module.parameters():
                p.add_(0.25)
        ema.step(module)
        reference = [r - 1e-4 * (r - p.double()) for r, p in zip(reference, module.parameters(), strict=True)]
    for shadow, first, ref in zip(ema.model.shadow_params, start, reference, strict=True):
        assert shadow.dtype == torch.float32
        assert (shadow - first).abs().min() > 0.02  # it moved (by ~1e-4 x 0.25 x (1 + ... + 50) = 0.032)
        torch.testing.assert_close(shadow.double(), ref, rtol=0, atol=1e-5)  # by the right amount


def test_zero_options_pass_through_to_deepspeed_with_the_stage_from_zero_stage():
    from nyaflow.train import deepspeed_config

    options = {"overlap_comm": True, "reduce_bucket_size": 123}
    tc = make_config(train={"zero_stage": 2, "zero_options": options})["train"]
    assert deepspeed_config(tc, bf16=False)["zero_optimization"] == {**options, "stage": 2}


def test_ema_shares_partition_the_unet_evenly(tiny_model):
    from diffusers import UNet2DConditionModel

    from nyaflow import ema

    unet = UNet2DConditionModel.from_pretrained(tiny_model / "unet", local_files_only=True)
    sizes = {name: p.numel() for name, p in unet.named_parameters()}
    shares = [ema.share(unet, rank, 3) for rank in range(3)]
    assert sorted(n for s in shares for n in s) == sorted(sizes)  # every parameter once
    loads = [sum(sizes[n] for n in s) for s in shares]
    assert max(loads) - min(loads) <= max(sizes.values())  # balanced to within one tensor
    assert shares == [ema.share(unet, rank, 3) for rank in range(3)]  # the same on every call
