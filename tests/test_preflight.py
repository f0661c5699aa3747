"""The preflight: the verdict on gathered figures, and real runs of 1 and 2 CPU ranks over gloo, one of them
made slow by fault injection (NYAFLOW_PREFLIGHT_SLOW_RANK). The SLURM run (2 nodes x 2 ranks) is in
test_slurm.py."""

import json
import subprocess
from pathlib import Path

from conftest import make_config, start_ranks

from nyaflow.preflight import judge


def rank_row(rank: int, host: str, matmul: float = 1.0, read: float = 100.0, samples: int = 8) -> dict:
    return {
        "rank": rank,
        "local_rank": rank % 2,
        "host": host,
        "device": "cpu",
        "gpus_visible": 2,
        "matmul_tflops": matmul,
        "samples": samples,
        "images_per_s": read,
        "mb_per_s": read / 10,
        "busbw_gbps": 40.0,
    }


def healthy_rows() -> list[dict]:
    return [rank_row(r, f"n{1 + r // 2}", matmul=1.0 + 0.05 * r, read=100.0 - r) for r in range(4)]


def test_a_healthy_allocation_has_no_problems():
    assert judge(healthy_rows(), make_config()) == []


def test_a_slow_gpu_or_file_system_is_named_with_its_node():
    rows = healthy_rows()
    rows[3]["matmul_tflops"] = 0.5  # median of 1.0, 1.05, 1.1, 0.5: 1.025; floor 0.7 x 1.025 = 0.7175
    rows[2]["images_per_s"] = 60.0  # median of 100, 99, 60, 97: 98; floor 68.6
    assert judge(rows, make_config()) == [
        "rank 3 on n2: matmul 0.5 TFLOP/s is below 0.7 x 1.02 TFLOP/s (the median of all ranks)",
        "rank 2 on n2: data read 60 images/s is below 0.7 x 98 images/s (the median of all ranks)",
    ]
    rows[3]["matmul_tflops"] = 0.72  # just above the floor
    assert len(judge(rows, make_config())) == 1


def test_expected_rates_and_fraction_come_from_the_config():
    rows = healthy_rows()
    config = make_config(preflight={"expected_matmul_tflops": 2.16, "min_fraction": 0.5})
    # Ranks 0 and 1 (1.0, 1.05 TFLOP/s) are below 0.5 x 2.16 = 1.08; ranks 2 and 3 (1.1, 1.15) are not.
    assert [p.split(":")[0] for p in judge(rows, config)] == ["rank 0 on n1", "rank 1 on n1"]
    slow_link = make_config(preflight={"expected_busbw_gbps": 100.0})
    (problem,) = judge(rows, slow_link)
    assert problem.startswith("all-reduce bus bandwidth 40 GB/s across n1, n2 is below 0.7 x 100 GB/s")


def test_a_rank_without_its_gpu_is_named():
    rows = healthy_rows()
    rows[1]["gpus_visible"] = 1  # local rank 1 needs two visible GPUs
    config = make_config(launch={"backend": "slurm", "gpus_per_node": 2})
    assert judge(rows, config) == [
        "rank 1 on n1: no GPU for local rank 1 (1 visible, launch.gpus_per_node is 2)"
    ]
    # A local run (world size 1 on this machine) does not ask for GPUs, nor a check_gpus: false one.
    assert judge(rows, make_config()) == []
    unchecked = make_config(launch={"backend": "slurm", "gpus_per_node": 2}, preflight={"check_gpus": False})
    assert judge(rows, unchecked) == []


def test_ranks_without_samples_to_read_are_not_judged_on_reading():
    rows = healthy_rows()
    rows[3] |= {"samples": 0, "images_per_s": 0.0}
    assert judge(rows, make_config()) == []


def run_ranks(
    cfg: dict, data: Path, out: Path, world_size: int, slow: str = ""
) -> list[subprocess.CompletedProcess]:
    """`nyaflow preflight` as `world_size` ranks over gloo on 127.0.0.1 (launch.backend: local); returns
    each rank's exit code and output."""
    args = ["preflight", "--data", str(data), "--out", str(out), "--submitit-folder", str(out / "submitit")]
    procs = start_ranks(args, cfg, out, world_size, {"NYAFLOW_PREFLIGHT_SLOW_RANK": slow} if slow else None)
    codes = [p.wait(timeout=300) for p in procs]
    logs = [(out / f"rank{rank}.log").read_text() for rank in range(world_size)]
    return [subprocess.CompletedProcess(p.args, c, log) for p, c, log in zip(procs, codes, logs, strict=True)]


def test_two_ranks_measure_and_report(demo_data, tmp_path):
    _, data, manifest, _ = demo_data
    # Lenient (0.05 of the median): a healthy pair of ranks must pass on a busy test machine too.
    cfg = make_config(preflight={"read_samples": 20, "min_fraction": 0.05})
    ranks = run_ranks(cfg, data, tmp_path, 2)
    assert [r.returncode for r in ranks] == [0, 0], ranks[0].stdout[-3000:] + ranks[1].stdout[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["ok"] and report["world_size"] == 2 and report["problems"] == []
    assert [r["rank"] for r in report["ranks"]] == [0, 1]
    assert [r["samples"] for r in report["ranks"]] == [10, 10]  # every other one of the first 20
    assert all(
        r["matmul_tflops"] > 0 and r["images_per_s"] > 0 and r["mb_per_s"] > 0 for r in report["ranks"]
    )
    assert report["busbw_gbps"] > 0
    assert "healthy" in (tmp_path / "report.html").read_text()
    assert "2 ranks on" in ranks[0].stdout and "healthy" in ranks[0].stdout


def test_an_injected_slow_rank_fails_the_preflight_by_name(demo_data, tmp_path):
    import socket

    _, data, _, _ = demo_data
    ranks = run_ranks(make_config(), data, tmp_path, 2, slow="1:100")
    assert ranks[0].returncode == 1, ranks[0].stdout[-3000:]
    host = socket.gethostname()
    assert f"preflight failed: rank 1 on {host}: matmul" in ranks[0].stdout
    assert f"rank 1 on {host}: data read" in ranks[0].stdout
    report = json.loads((tmp_path / "report.json").read_text())
    assert not report["ok"] and all("rank 1 " in p for p in report["problems"])
    fast, slow = report["ranks"]
    assert slow["matmul_tflops"] < 0.5 * fast["matmul_tflops"]
