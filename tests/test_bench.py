"""`nyaflow bench train`: the FLOP count (SDXL against DESIGN.md §5, the tiny UNet against a hand count), the
benchmark run on the tiny model through the trainer's code path, and the refusal of SDXL on a CPU."""

import json
import os
import subprocess
import sys
import time

import pytest
import torch

from nyaflow import bench
from nyaflow.cli import main as cli_main

# DESIGN.md §5: torch.utils.flop_counter on the meta device, SDXL UNet, one 1024x1024 image (latent 128x128).
SDXL_FORWARD = 6.76e12
SDXL_TRAIN = 20.23e12
SDXL_TRAIN_CHECKPOINTED = 25.44e12


def test_sdxl_flops_match_design_and_take_seconds():
    config = bench.unet_config("sdxl")
    start = time.perf_counter()
    flops = bench.count_train_flops(config, 1024, batch=1)
    seconds = time.perf_counter() - start
    assert flops["parameters"] == bench.SDXL_UNET_PARAMETERS == 2_567_463_684
    assert flops["train"] == pytest.approx(20.2e12, rel=0.02)  # the figure, +-2%
    assert flops["train"] == pytest.approx(SDXL_TRAIN, rel=1e-3)
    assert flops["forward"] == pytest.approx(SDXL_FORWARD, rel=1e-3)
    assert seconds < 120  # meta device: no memory, no arithmetic (about 5-20 s on 2 busy cores)


@pytest.mark.slow
def test_sdxl_flops_with_checkpointing_and_batch():
    config = bench.unet_config("sdxl")
    checkpointed = bench.count_train_flops(config, 1024, batch=1, checkpointing=True)
    assert checkpointed["train"] == pytest.approx(SDXL_TRAIN_CHECKPOINTED, rel=1e-3)
    assert checkpointed["forward"] == pytest.approx(SDXL_FORWARD, rel=1e-3)
    tiny = bench.unet_config("tiny")
    assert (
        bench.count_train_flops(tiny, 128, batch=4)["train"]
        == 4 * bench.count_train_flops(tiny, 128)["train"]
    )


def hand_count(unet, batch: int, resolution: int) -> tuple[int, int]:
    """(forward, forward + backward) FLOPs of the UNet computed by hand from its layers' shapes.

    Forward hooks record each layer's input and output shapes on the meta device; the arithmetic is ours:
    a linear layer mapping [M, K] to [M, N] costs 2 M N K; a convolution 2 B Ho Wo Cout (Cin / groups) kh kw;
    attention 2 B Lq Lk D for Q K^T plus the same for P V (D = all heads' width). Backward: each linear or
    convolution computes its weight gradient (the forward's cost again) and, when its input needs a gradient,
    the input gradient (again the same); attention's backward is two forwards (dQ, dK, dV and dP). These are
    the only operations torch's counter counts (matmul, conv, attention); norms, activations and
    elementwise work are left out by both. What this checks: the counter and our meta-device procedure
    against independent arithmetic over the real layers. It does not check the shapes themselves: the
    hooks read them from the model.
    """
    from diffusers.models.attention_processor import Attention

    from nyaflow.train import unet_velocity

    forward, backward = [0], [0]

    def linear(module, args, out):
        x = args[0]
        m, k, n = x.numel() // x.shape[-1], module.in_features, module.out_features
        flops = 2 * m * n * k
        forward[0] += flops
        backward[0] += flops * (1 + x.requires_grad)

    def conv(module, args, out):
        x = args[0]
        b, c_out, h_out, w_out = out.shape
        kh, kw = module.kernel_size
        flops = 2 * b * h_out * w_out * c_out * (module.in_channels // module.groups) * kh * kw
        forward[0] += flops
        backward[0] += flops * (1 + x.requires_grad)

    def attention(module, args, kwargs, out):
        hidden = args[0] if args else kwargs["hidden_states"]
        context = kwargs.get("encoder_hidden_states")
        b, lq = hidden.shape[0], hidden.shape[1]
        lk = context.shape[1] if context is not None else lq
        flops = 2 * 2 * b * lq * lk * module.to_q.out_features
        forward[0] += flops
        backward[0] += 2 * flops

    config = bench.unet_config("tiny")
    unet = bench.build_unet(config, "meta")
    for module in unet.modules():
        if isinstance(module, torch.nn.Linear):
            module.register_forward_hook(linear)
        elif isinstance(module, torch.nn.Conv2d):
            module.register_forward_hook(conv)
        elif isinstance(module, Attention):
            module.register_forward_hook(attention, with_kwargs=True)
    unet.train()
    b = bench.synthetic_batch(config, batch, resolution, "meta")
    sigma = torch.empty(batch, device="meta")
    unet_velocity(unet, b["latents"], sigma, b["embeds"], b["pooled"], b["time_ids"], torch.float32)
    return forward[0], forward[0] + backward[0]


@pytest.mark.parametrize("batch,resolution", [(1, 128), (3, 256)])
def test_tiny_flops_match_hand_count(batch, resolution):
    config = bench.unet_config("tiny")
    counted = bench.count_train_flops(config, resolution, batch=batch)
    forward, train = hand_count(bench.build_unet(config, "meta"), batch, resolution)
    assert counted["forward"] == forward
    assert counted["train"] == train
    assert 2.9 * forward < train < 3 * forward  # backward ~2x forward, less the inputs that need no gradient


def test_tiny_first_layers_by_hand():
    """A fully written-out hand count of two layers of the tiny UNet (no shapes read from the model)."""
    from torch.utils.flop_counter import FlopCounterMode

    config = bench.unet_config("tiny")
    unet = bench.build_unet(config, "meta")
    b, latent = 2, 16  # 128 px
    x = torch.empty(b, 4, latent, latent, device="meta")
    with FlopCounterMode(display=False) as counter:
        unet.conv_in(x)  # 3x3 conv, 4 -> 32 channels, padding 1
    assert counter.get_total_flops() == 2 * b * latent * latent * 32 * 4 * 3 * 3
    t = torch.empty(b, 32, device="meta")
    with FlopCounterMode(display=False) as counter:
        unet.time_embedding(t)  # linear 32 -> 128, SiLU, linear 128 -> 128
    assert counter.get_total_flops() == 2 * b * 32 * 128 + 2 * b * 128 * 128


def test_attention_is_counted_alike_for_sdpa_and_eager():
    config = bench.unet_config("tiny")
    sdpa = bench.count_train_flops(config, 128, batch=2, attention="sdpa")
    eager = bench.count_train_flops(config, 128, batch=2, attention="eager")
    assert sdpa == eager


def run_cli(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # a tiny model: one thread is faster on a shared machine
    cmd = [sys.executable, "-m", "nyaflow.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


def test_bench_train_tiny_runs_the_training_step(tmp_path):
    out = tmp_path / "bench.json"
    args = ["bench", "train", "--model", "tiny", "--resolution", "64", "--micro-batch", "2", "--warmup", "1"]
    result = run_cli(*args, "--steps", "2", "--peak-tflops", "1.0", "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads(out.read_text())
    for key in (
        "step_time_median_s",
        "images_per_s_per_device",
        "achieved_tflops_per_device",
        "mfu",
        "peak_memory_gib",
        "device",
        "flops",
        "step_times_s",
    ):
        assert key in record, key
    assert record["model"] == "tiny" and record["device_type"] == "cpu" and record["world_size"] == 1
    assert record["resolution"] == 64 and record["latent"] == 8
    assert record["zero_stage"] == 2 and record["precision"] == "fp32" and len(record["step_times_s"]) == 2
    assert record["images_per_s_per_device"] == pytest.approx(2 / record["step_time_median_s"])
    flops = bench.count_train_flops(bench.unet_config("tiny"), 64, batch=2)
    assert record["flops"]["train_per_step"] == flops["train"]
    achieved = flops["train"] / record["step_time_median_s"] / 1e12
    assert record["achieved_tflops_per_device"] == pytest.approx(achieved)
    assert record["mfu"] == pytest.approx(achieved / 1.0)
    assert "images/s per device" in result.stdout


def test_bench_train_steps_through_the_trainer(monkeypatch):
    """The benchmark's step calls the trainer's own functions (not a copy of them), in this process."""
    import nyaflow.train as train

    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "DS_ACCELERATOR"):
        monkeypatch.delenv(key, raising=False)  # init_distributed sets them; restored afterwards
    calls, engines = [], []
    for name in ("build_engine", "latent_loss", "agree", "configure_unet"):
        original = getattr(train, name)

        def spy(*a, _name=name, _original=original, **kw):
            calls.append(_name)
            result = _original(*a, **kw)
            if _name == "build_engine":
                engines.append(result[0])
            return result

        monkeypatch.setattr(train, name, spy)
    zero_options = {"reduce_bucket_size": 12345}
    record = bench.bench_train("tiny", micro_batch=1, warmup=0, steps=1, zero_options=zero_options)
    assert record["steps"] == 1 and record["zero_options"] == zero_options
    assert calls.count("build_engine") == 1 and calls.count("latent_loss") == 1 and calls.count("agree") == 1
    assert engines[0].zero_reduce_bucket_size() == 12345  # train.zero_options reached DeepSpeed


def test_bench_train_sdxl_refuses_on_cpu(capsys):
    status = cli_main(["bench", "train", "--model", "sdxl"])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2
    assert err[-1].startswith("nyaflow bench: --model sdxl needs a GPU") and "--flops-only" in err[-1]


def test_bench_train_sdxl_flops_only(tmp_path, capsys):
    out = tmp_path / "sdxl.json"
    args = ["bench", "train", "--model", "sdxl", "--resolution", "1024", "--micro-batch", "1", "--flops-only"]
    assert cli_main([*args, "--out", str(out)]) == 0
    record = json.loads(out.read_text())
    assert record["flops_only"] and "step_time_median_s" not in record
    assert record["flops"]["train_per_image"] == pytest.approx(20.2e12, rel=0.02)
    assert "forward+backward 20.23 TFLOP" in capsys.readouterr().out
