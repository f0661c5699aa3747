"""Preflight: a short job on the training job's allocation shape that checks the allocation before training.

The preflight rule runs it through the same launch as training (nyaflow/launch.py): in this process with
`launch.backend: local`, or as one SLURM job of launch.nodes x tasks-per-node ranks with submitit. Every rank
measures, in this order:

1. device: with launch.gpus_per_node > 0 (and preflight.check_gpus), that it sees a GPU for its LOCAL_RANK;
2. matmul rate (TFLOP/s): a square matmul (8192, bf16 on GPU; 512, fp32 on CPU), the median of repeated
   timings (CUDA events on GPU); 2 n^3 FLOPs per product;
3. all-reduce bus bandwidth (GB/s) across all ranks (NCCL on GPU, gloo on CPU), as nccl-tests defines it:
   bytes / time x 2 (n - 1) / n, the median of repeated all-reduces of one fp32 buffer (256 MB on GPU,
   8 MB on CPU);
4. data read rate (images/s and MB/s): reading and decoding its share (every world-size-th sample) of the
   first preflight.read_samples training samples, as the training loader does.

CPU ranks share their node's cores, so on the CPU the ranks measure 2. and 4. one after the other (a rank
then measures itself, not its neighbours' load); GPUs are independent and measure at the same time, under
the load training puts on the node.

Rank 0 gathers every rank's figures, writes report.json and report.html, and judges them: a rank whose
matmul or read rate is below preflight.min_fraction of the expected rate fails the preflight, and so does
a bus bandwidth below that fraction of its expected rate. The expected matmul and read rates are
preflight.expected_matmul_tflops / expected_read_images_per_s when set, else the median over all ranks (a
slow GPU or node stands out among its peers); the bus bandwidth is checked only against a set
preflight.expected_busbw_gbps. A failure raises PreflightFailed naming each slow rank's node, so that the
job fails with it (and training never starts on that allocation): exclude the node (sbatch_extra
[--exclude=<node>]) and run again.

Fault injection, to test that a slow rank is caught: NYAFLOW_PREFLIGHT_SLOW_RANK=<rank>:<factor> makes that
rank do each timed matmul and each sample read `factor` times, like a GPU or file system that much slower.
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

MATMUL_SIZE = {"cuda": 8192, "cpu": 512}
ALLREDUCE_MB = {"cuda": 256, "cpu": 8}
REPEATS = 5
SLOW_RANK_VARIABLE = "NYAFLOW_PREFLIGHT_SLOW_RANK"


class PreflightFailed(RuntimeError):
    """A rank or the interconnect is below its expected rate; the message names the nodes."""


def slowdown(rank: int) -> int:
    """How many times this rank repeats each timed piece of work (1 unless NYAFLOW_PREFLIGHT_SLOW_RANK names
    it)."""
    value = os.environ.get(SLOW_RANK_VARIABLE, "")
    if not value:
        return 1
    slow_rank, _, factor = value.partition(":")
    return int(factor or 4) if int(slow_rank) == rank else 1


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_seconds(work, device: torch.device, repeats: int = REPEATS) -> float:
    """Median wall time of `work()` over `repeats` runs after one warm-up run, device work included."""
    work()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            work()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            work()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def matmul_tflops(device: torch.device, repeat: int = 1) -> float:
    """Achieved TFLOP/s of one n x n matmul (bf16 on GPU, fp32 on CPU), done `repeat` times per timing."""
    n = MATMUL_SIZE[device.type]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    generator = torch.Generator(device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=generator)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=generator)
    out = torch.empty(n, n, device=device, dtype=dtype)

    def work():
        for _ in range(repeat):
            torch.matmul(a, b, out=out)

    return 2 * n**3 / _median_seconds(work, device) / 1e12


def allreduce_busbw_gbps(device: torch.device) -> float | None:
    """All-reduce bus bandwidth in GB/s over all ranks (None for one rank: nothing crosses a link)."""
    world = dist.get_world_size()
    if world == 1:
        return None
    buffer = torch.ones(ALLREDUCE_MB[device.type] * 2**20 // 4, dtype=torch.float32, device=device)

    def work():
        dist.all_reduce(buffer)
        _sync(device)

    seconds = _median_seconds(work, device)
    return buffer.numel() * 4 / seconds * 2 * (world - 1) / world / 1e9


def read_rate(data_dir: Path, read_samples: int, rank: int, world: int, repeat: int = 1) -> dict:
    """This rank's share of the first `read_samples` training samples, read and decoded as the loader
    does: {samples, images_per_s, mb_per_s}."""
    from nyaflow.loader import TrainingSet

    dataset = TrainingSet(data_dir)
    mine = range(rank, min(read_samples, len(dataset)), world)
    if mine:
        dataset[mine[0]]  # warm-up: the first decode loads the image codecs
    t0 = time.perf_counter()
    for i in mine:
        for _ in range(repeat):
            dataset[i]
    seconds = max(time.perf_counter() - t0, 1e-9)
    # Bytes read, counted after the timing (reading a sample's raw bytes again would double the timed I/O).
    size = sum(
        len(v)
        for i in mine
        for v in dataset.shards[dataset.locations[i][0]][dataset.locations[i][1]].values()
    )
    return {
        "samples": len(mine),
        "images_per_s": len(mine) / seconds,
        "mb_per_s": size / seconds / 1e6,
    }


def join_process_group() -> torch.device:
    """Join the job's process group (RANK, WORLD_SIZE, MASTER_ADDR/PORT from the launcher), or make a
    one-rank group through a file store when run alone; returns this rank's device."""
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if "WORLD_SIZE" in os.environ:
        dist.init_process_group(backend)
    else:
        store = Path(tempfile.mkdtemp(prefix="nyaflow-pg-")) / "store"
        dist.init_process_group(backend, init_method=f"file://{store}", rank=0, world_size=1)
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        return device
    return torch.device("cpu")


def node_name() -> str:
    """The node's name as SLURM knows it (what sbatch --exclude takes), else the host name."""
    return os.environ.get("SLURMD_NODENAME") or socket.gethostname()


def measure_rank(config: dict, data_dir: Path, device: torch.device) -> dict:
    """This rank's row of the report (every rank calls it; collective)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    repeat = slowdown(rank)
    row = {
        "rank": rank,
        "local_rank": local_rank,
        "host": node_name(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "gpus_visible": torch.cuda.device_count(),
    }
    one_at_a_time = device.type == "cpu"
    for turn in range(world if one_at_a_time else 1):
        if one_at_a_time:
            dist.barrier()
        if not one_at_a_time or turn == rank:
            row["matmul_tflops"] = matmul_tflops(device, repeat)
            row |= read_rate(data_dir, config["preflight"]["read_samples"], rank, world, repeat)
    dist.barrier()
    row["busbw_gbps"] = allreduce_busbw_gbps(device)
    return row


def judge(rows: list[dict], config: dict) -> list[str]:
    """The problems found in the gathered rows (empty: the allocation is healthy)."""
    pc = config["preflight"]
    gpus = config["launch"]["gpus_per_node"] if config["launch"]["backend"] == "slurm" else 0
    gpus = gpus if pc["check_gpus"] else 0
    fraction = pc["min_fraction"]
    problems = [
        f"rank {r['rank']} on {r['host']}: no GPU for local rank {r['local_rank']} "
        f"({r['gpus_visible']} visible, launch.gpus_per_node is {gpus})"
        for r in rows
        if gpus and r["gpus_visible"] <= r["local_rank"]
    ]
    for key, name, unit, expected_key in (
        ("matmul_tflops", "matmul", "TFLOP/s", "expected_matmul_tflops"),
        ("images_per_s", "data read", "images/s", "expected_read_images_per_s"),
    ):
        # A rank with no sample to read (more ranks than preflight.read_samples) has no read rate.
        measured = [r for r in rows if key == "matmul_tflops" or r["samples"]]
        if not measured:
            continue
        expected = pc[expected_key] or statistics.median(r[key] for r in measured)
        source = f"preflight.{expected_key}" if pc[expected_key] else "the median of all ranks"
        for r in measured:
            if r[key] < fraction * expected:
                problems.append(
                    f"rank {r['rank']} on {r['host']}: {name} {r[key]:.3g} {unit} is below {fraction:g} x "
                    f"{expected:.3g} {unit} ({source})"
                )
    busbw, expected = rows[0]["busbw_gbps"], pc["expected_busbw_gbps"]
    if busbw is not None and expected and busbw < fraction * expected:
        hosts = sorted({r["host"] for r in rows})
        problems.append(
            f"all-reduce bus bandwidth {busbw:.3g} GB/s across {', '.join(hosts)} is below {fraction:g} x "
            f"{expected:g} GB/s (preflight.expected_busbw_gbps): check the interconnect (NCCL_DEBUG=INFO)"
        )
    return problems


def report_html(report: dict) -> str:
    from nyaflow.report import html_page, html_table

    header = ["rank", "host", "device", "matmul TFLOP/s", "read images/s", "read MB/s"]
    rows = [
        [r["rank"], r["host"], r["device"], r["matmul_tflops"], r["images_per_s"], r["mb_per_s"]]
        for r in report["ranks"]
    ]
    verdict = "healthy" if report["ok"] else "FAILED"
    body = [
        f"<p>{report['world_size']} ranks on {len(report['hosts'])} nodes: {verdict}. All-reduce bus "
        f"bandwidth: {report['busbw_gbps'] if report['busbw_gbps'] is not None else '-'} GB/s.</p>",
        *(f"<p>{problem}</p>" for problem in report["problems"]),
        html_table(header, rows),
    ]
    return html_page(f"Preflight of run {report['run']}", body)


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f"{path.name}.partial")
    tmp.write_text(text)
    tmp.replace(path)


def preflight(config: dict, data_dir: Path, out_dir: Path, keep_group: bool = False) -> dict:
    """Run on every rank of the job: measure, gather, and on rank 0 write out_dir/report.{json,html} and
    raise PreflightFailed if the allocation is not healthy. Returns the report. With `keep_group` the
    process group stays for what runs next in the same ranks (training: made once, not twice on one
    port)."""
    device = join_process_group()
    try:
        row = measure_rank(config, Path(data_dir), device)
        rows = [None] * dist.get_world_size()
        dist.all_gather_object(rows, row)
    finally:
        if not keep_group:
            dist.destroy_process_group()
    problems = judge(rows, config)
    report = {
        "run": config["run"],
        "ok": not problems,
        "problems": problems,
        "world_size": len(rows),
        "hosts": sorted({r["host"] for r in rows}),
        "busbw_gbps": rows[0]["busbw_gbps"],
        "ranks": rows,
    }
    if row["rank"] == 0:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        write_atomic(out_dir / "report.html", report_html(report))
        write_atomic(out_dir / "report.json", json.dumps(report, indent=2))
        for r in rows:
            print(
                f"[nyaflow preflight] rank {r['rank']} on {r['host']} ({r['device']}): matmul "
                f"{r['matmul_tflops']:.3g} TFLOP/s, read {r['images_per_s']:.3g} images/s",
                flush=True,
            )
        busbw = report["busbw_gbps"]
        busbw = f"{busbw:.3g} GB/s" if busbw is not None else "- (one rank)"
        print(f"[nyaflow preflight] all-reduce bus bandwidth: {busbw}", flush=True)
        if problems:
            raise PreflightFailed("preflight failed: " + "; ".join(problems))
        print(f"[nyaflow preflight] {len(rows)} ranks on {', '.join(report['hosts'])}: healthy", flush=True)
    return report
