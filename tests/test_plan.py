"""`nyaflow plan`: the full recipe's plan on 32 H100; its arithmetic from the counted FLOPs and the MFU."""

import json
import re

import pytest
from conftest import REPO

from nyaflow import bench
from nyaflow import config as config_mod
from nyaflow.cli import main as cli_main
from nyaflow.plan import format_memory, plan

XL = REPO / "config" / "nyaflow-xl.yaml"


@pytest.fixture(autouse=True)
def _no_run_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no results/<run>/data/manifest.json: the data size is the default 3.6M


def row(text: str, name: str) -> list[str]:
    """The value columns of the table row that starts with `name`."""
    line = next(line for line in text.splitlines() if line.startswith(name))
    return re.split(r"\s{2,}", line[len(name) :].strip())


def test_xl_plan_prints_images_per_s_epoch_time_and_gpu_hours(capsys):
    assert cli_main(["plan", "--configfile", str(XL), "--gpus", "32", "--gpu", "h100"]) == 0
    out = capsys.readouterr().out
    assert "32 x NVIDIA H100 SXM (989 TFLOP/s dense bf16 each), MFU 0.50" in out
    assert "forward 6.76 TFLOP, forward+backward 20.23 TFLOP" in out
    flops = bench.count_train_flops(bench.unet_config("sdxl"), 1024, 1)["train"]
    per_gpu = 989e12 * 0.5 / flops  # the arithmetic, by hand
    rate = per_gpu * 32
    assert per_gpu == pytest.approx(24.44, abs=0.01)  # DESIGN.md §5: 24.5 at 50% MFU
    assert row(out, "images/s per GPU")[0] == f"{per_gpu:.2f}"
    assert row(out, "images/s (32 GPUs)")[0] == f"{rate:.1f}"
    assert row(out, "step time (batch 256)")[0] == f"{256 / rate:.3f} s"
    assert row(out, "time per epoch")[0] == f"{3_600_000 / rate / 3600:.2f} h"  # ~1.3 h (DESIGN.md §5)
    assert row(out, "train.steps 100,000: wall time")[0] == f"{100_000 * 256 / rate / 3600:.2f} h"
    gpu_hours = 100_000 * 256 / rate / 3600 * 32
    assert row(out, "train.steps 100,000: GPU-hours")[0] == f"{gpu_hours:,.0f}"
    assert row(out, "in 48 h: epochs")[0] == f"{rate * 48 * 3600 / 3_600_000:.2f}"
    assert row(out, "in 48 h: GPU-hours")[0] == "1,536"


def test_plan_arithmetic_and_the_on_the_fly_column():
    cfg = config_mod.load(XL)
    p = plan(cfg, gpus=16, gpu="a100", mfu=0.4, hours=10, images=1_000_000)
    flops = bench.count_train_flops(bench.unet_config("sdxl"), 1024, 1)["train"]
    c = p["cached_latents"]
    assert c["images_per_s_per_gpu"] == pytest.approx(312e12 * 0.4 / flops)
    assert c["images_per_s"] == pytest.approx(16 * c["images_per_s_per_gpu"])
    assert p["global_batch"] == 8 * 1 * 16
    assert c["step_time_s"] == pytest.approx(128 / c["images_per_s"])
    assert c["epoch_s"] == pytest.approx(1_000_000 / c["images_per_s"])
    assert c["train_gpu_hours"] == pytest.approx(100_000 * 128 / c["images_per_s"] / 3600 * 16)
    assert c["budget_epochs"] == pytest.approx(c["images_per_s"] * 36_000 / 1_000_000)
    assert c["budget_steps"] == int(c["images_per_s"] * 36_000 // 128)
    enc = p["encode_tflop_per_image"]
    assert enc["vae_encoder"] == pytest.approx(4.88, abs=0.01) and enc["text_encoders"] == pytest.approx(
        0.11, abs=0.01
    )
    fly = p["encode_on_the_fly"]
    assert fly["tflop_per_image"] == pytest.approx(
        c["tflop_per_image"] + enc["vae_encoder"] + enc["text_encoders"]
    )
    assert fly["images_per_s"] == pytest.approx(
        c["images_per_s"] * c["tflop_per_image"] / fly["tflop_per_image"]
    )


def test_plan_uses_a_benchmark_record_and_the_run_manifest(tmp_path, capsys):
    record = {
        "device": "NVIDIA H100 80GB HBM3",
        "mfu": 0.42,
        "images_per_s_per_device": 20.5,
        "resolution": 1024,
        "gradient_checkpointing": False,
        "attention": "sdpa",
        "micro_batch": 8,
        "precision": "bf16",
    }
    (tmp_path / "bench.json").write_text(json.dumps(record))
    manifest = tmp_path / "results" / "nyaflow-xl" / "data" / "manifest.json"
    manifest.parent.mkdir(parents=True)
    manifest.write_text(json.dumps({"counts": {"kept": 2_000_000}}))
    out_json = tmp_path / "plan.json"
    assert cli_main(["plan", "--configfile", str(XL), "--bench", "bench.json", "--out", str(out_json)]) == 0
    out = capsys.readouterr().out
    assert "MFU 0.42 (measured on NVIDIA H100 80GB HBM3)" in out
    assert "2,000,000 images per epoch" in out and "differs" not in out
    p = json.loads(out_json.read_text())
    assert p["images"] == 2_000_000
    assert p["cached_latents"]["images_per_s_per_gpu"] == pytest.approx(
        989 * 0.42 / p["cached_latents"]["tflop_per_image"]
    )


def test_plan_refuses_a_record_without_mfu(tmp_path, capsys):
    (tmp_path / "bench.json").write_text(json.dumps({"device": "CPU", "mfu": None}))
    assert cli_main(["plan", "--configfile", str(XL), "--bench", str(tmp_path / "bench.json")]) == 2
    assert "no MFU" in capsys.readouterr().err


def test_plan_of_the_demo_config_counts_the_tiny_unet(capsys):
    assert cli_main(["plan", "--configfile", str(REPO / "config" / "config.yaml"), "--gpus", "1"]) == 0
    out = capsys.readouterr().out
    assert "model: tiny UNet" in out and "encoded on the fly" not in out


def test_memory_estimate_of_the_xl_recipe_fits_an_h100_and_an_unsplit_one_warns(capsys):
    cfg = config_mod.load(XL)
    p = plan(cfg, gpus=32, gpu="h100")
    parts, n, gib = p["memory_gib"]["parts"], p["parameters"], 2**30
    assert n == 2_567_463_684
    assert parts["weights (trained)"] == pytest.approx(2 * n / gib)  # bf16
    assert parts["gradients"] == pytest.approx(4 * n / 32 / gib)  # ZeRO-2: each rank's fp32 partition
    assert parts["fp32 weights + Adam moments"] == pytest.approx(12 * n / 32 / gib)
    assert parts["EMA (fp32, split across ranks)"] == pytest.approx(4 * n / 32 / gib)
    assert parts["gradient reduce buckets"] == pytest.approx(2 * 2 * 200_000_000 / gib)  # overlap_comm: two
    assert parts["activations"] == pytest.approx(8 * 6.8)  # micro batch 8 at 1024^2
    assert p["memory_gib"]["total"] == pytest.approx(sum(parts.values()))
    assert 60 < p["memory_gib"]["total"] < 0.9 * p["gpu_memory_gib"]
    assert "WARNING" not in "\n".join(format_memory(p))

    # Training text encoder 2 as well: its states join the trained ones.
    cfg["train"]["text_encoder_2_lr"] = 1e-6
    more = plan(cfg, gpus=32, gpu="h100")["memory_gib"]["parts"]
    assert more["weights (trained)"] == pytest.approx(2 * (n + 694_659_840) / gib)
    assert more["frozen text encoders + VAE"] < parts["frozen text encoders + VAE"]

    # The same job on one GPU: nothing is sharded, and it does not fit.
    assert cli_main(["plan", "--configfile", str(XL), "--gpus", "1"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"WARNING: about 1\d\d GiB needed, 79.6 GiB on the GPU: lower", out), out
