"""nyaflow on a real SLURM cluster: the local test cluster of cluster/testcluster (4 emulated nodes on this
machine, partition debug, account nyaflow, accounting through slurmdbd). .ci/run brings it up; without root,
sbatch or a running cluster these tests skip and say why.

- The whole demo DAG through `snakemake --profile <cluster/slurm, sized down for the test nodes>`: every
  stage but the local rules runs as its own SLURM job, and training runs as ONE submitit job of 2 nodes x 2
  ranks (gloo on CPU, 2 fake GPUs per node) launched by the train rule from the login node.
- Requeue: that training, signalled with SIGUSR2 twice (as SLURM does before the time limit), saves,
  requeues itself once, then fails when launch.max_requeues is spent; rerunning resumes, and the final
  weights equal those of the uninterrupted DAG run bitwise.
- Rerunning one stage on the cluster (--forcerun/--until), and the dry run of the full 4 x 8 H100 plan.

Snakemake runs under `timeout -k` (it ignores SIGTERM while it polls SLURM); a run that times out is
followed by `--unlock` and the cancellation of the jobs it left.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
import yte
from conftest import REPO, free_port

BIN = Path(sys.executable).parent
PARTITION, ACCOUNT = "debug", "nyaflow"
ENV = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "NO_ALBUMENTATIONS_UPDATE": "1"}

# The demo, made small: 24 images (+ the broken rows), a 20-step VAE fit, 8 training steps on 2 x 2 ranks.
TRAIN = {
    "steps": 8,
    "micro_batch": 2,
    "val_size": 2,
    "val_sigmas": 2,
    "val_every": 1000,
    "log_every": 1,
    "checkpoint_every": 2,
    "keep_checkpoints": 10,
    "warmup_steps": 2,
}
LAUNCH = {
    "backend": "slurm",
    "nodes": 2,
    "tasks_per_node": 2,
    "gpus_per_node": 2,  # fake GPUs (scheduling only): the ranks still run on the CPU
    "cpus_per_task": 1,
    "mem_gb": 1,
    "time_min": 20,
    "partition": PARTITION,
    "account": ACCOUNT,
    "max_requeues": 1,
    "poll_s": 1,
}


def cluster_problem() -> str | None:
    """Why the SLURM tests cannot run here, or None."""
    if os.geteuid() != 0:
        return "not root: the SLURM test cluster (cluster/testcluster/up.sh) needs root"
    if shutil.which("sbatch") is None or shutil.which("sacct") is None:
        return "no sbatch/sacct: bring up the test cluster with cluster/testcluster/up.sh"
    try:
        nodes = subprocess.run(
            ["sinfo", "-h", "-N", "-p", PARTITION, "-o", "%t"], capture_output=True, text=True, timeout=30
        )
        sacct = subprocess.run(["sacct", "-n", "-X", "-j", "1"], capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        return "the test cluster does not answer: run cluster/testcluster/up.sh"
    usable = [s for s in nodes.stdout.split() if s.rstrip("*~#") in ("idle", "mix", "alloc", "comp")]
    if nodes.returncode != 0 or len(usable) < 4:
        sinfo = (nodes.stdout + nodes.stderr).strip()
        return f"test cluster not up (sinfo: {sinfo!r}): run cluster/testcluster/up.sh"
    if sacct.returncode != 0:
        return f"no SLURM accounting (sacct: {sacct.stderr.strip()!r}): run cluster/testcluster/up.sh"
    return None


@pytest.fixture(scope="module")
def cluster():
    problem = cluster_problem()
    if problem:
        pytest.skip(problem)


def sacct(
    *job_ids: str,
    fields: str = "JobID,JobName,State,NNodes,NTasks,NodeList,AllocTRES",
    duplicates: bool = False,
) -> list[dict]:
    """sacct rows (jobs and their steps) of the given jobs, as dicts; with `duplicates`, every run of a
    requeued job."""
    args = ["sacct", "-n", "-P", "--format", fields] + (["--duplicates"] if duplicates else [])
    for j in job_ids:
        args += ["-j", str(j)]
    out = subprocess.run(args, capture_output=True, text=True, check=True).stdout
    return [dict(zip(fields.split(","), line.split("|"), strict=True)) for line in out.splitlines() if line]


def jobs_in(workdir: Path) -> list[str]:
    """Ids of the queued or running jobs started from `workdir`."""
    out = subprocess.run(["squeue", "-h", "-o", "%i|%Z"], capture_output=True, text=True).stdout
    return [i for i, _, d in (line.partition("|") for line in out.splitlines()) if Path(d) == workdir]


def snakemake(workdir: Path, *args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    """The real snakemake on the project's Snakefile, in `workdir`, under `timeout -k` (Snakemake ignores
    SIGTERM while it polls SLURM). After a timeout: unlock the workdir and cancel the jobs it left."""
    cmd = [
        "timeout",
        "-k",
        "30",
        str(timeout),
        str(BIN / "snakemake"),
        "--snakefile",
        str(REPO / "workflow" / "Snakefile"),
    ]
    cmd += ["--directory", str(workdir), *args]
    result = subprocess.run(cmd, capture_output=True, text=True, env=ENV, cwd=workdir)
    if result.returncode in (124, 137):
        for job in jobs_in(workdir):
            subprocess.run(["scancel", job], check=False)
        unlock = [*cmd[4:6], "--directory", str(workdir), "--unlock"]
        subprocess.run(unlock, capture_output=True, env=ENV, cwd=workdir, check=False)
        pytest.fail(f"snakemake {' '.join(args)} timed out after {timeout} s:\n{result.stderr[-4000:]}")
    return result


def sized_down_profile(workdir: Path) -> list[str]:
    """cluster/slurm as it is (yte-rendered), with only the site values and sizes changed for the test
    cluster: partition debug, account nyaflow, jobs that fit its 8-CPU, 4000 MB nodes, and quick polling."""
    profile = yte.process_yaml((REPO / "cluster" / "slurm" / "config.yaml").read_text(), require_use_yte=True)
    profile.pop("slurm-no-account", None)
    profile["default-resources"].update(
        slurm_partition=PARTITION, slurm_account=ACCOUNT, mem_mb=500, runtime=20
    )
    for resources in profile["set-resources"].values():
        resources["slurm_partition"] = PARTITION
        resources["mem_mb"] = 800
        resources["runtime"] = 20
        if "cpus_per_task" in resources:
            resources["cpus_per_task"] = 2
    profile.update(
        {
            "jobs": 8,
            "local-cores": 2,
            "latency-wait": 10,
            "restart-times": 0,  # a failure shows at once
            "seconds-between-status-checks": 2,
            "slurm-init-seconds-before-status-checks": 2,
        }
    )
    folder = workdir / "profile"
    folder.mkdir(exist_ok=True)
    (folder / "config.yaml").write_text(yaml.safe_dump(profile, sort_keys=False))
    return ["--profile", str(folder)]


def slurm_logs(workdir: Path, rule: str) -> dict[str, Path]:
    """SLURM job id -> log file of the jobs the plugin submitted for `rule` (the profile keeps them)."""
    folder = workdir / "logs" / "slurm" / f"rule_{rule}"
    return {p.stem: p for p in folder.rglob("*.log")}


@pytest.fixture(scope="module")
def dag(cluster, tmp_path_factory):
    """The demo DAG, small, run once through the SLURM profile on the test cluster."""
    workdir = tmp_path_factory.mktemp("slurm_dag")
    shutil.copytree(REPO / "config", workdir / "config")
    overlay = {
        "run": "slurmtest",
        "data": {"demo": {"num_images": 24, "port": free_port()}},
        "model": {"vae_fit_steps": 20},
        "train": TRAIN,
        "sample": {"steps": 4, "seeds": [0, 1]},
        "launch": LAUNCH,
        # Lenient: the 4 ranks share this machine's 2 cores with the cluster's daemons and the other test
        # worker (a rank measured during a burst of its work read 5.7x slower than the others). The nodes'
        # GPUs are fake (scheduled, not there): the ranks run on the CPU.
        "preflight": {"min_fraction": 0.05, "check_gpus": False, "every_training_run": True},
    }
    (workdir / "config" / "slurm-test.yaml").write_text(yaml.safe_dump(overlay))
    profile = sized_down_profile(workdir)
    configs = ["--configfile", "config/config.yaml", "config/slurm-test.yaml"]
    t0 = time.monotonic()
    result = snakemake(workdir, *profile, *configs, timeout=1500)
    seconds = time.monotonic() - t0
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return workdir, profile + configs, result, seconds


def test_whole_dag_runs_as_slurm_jobs(dag):
    workdir, _, result, seconds = dag
    results = workdir / "results" / "slurmtest"
    assert (results / "export" / "diffusers" / "model_index.json").is_file()
    assert (results / "export" / "slurmtest.safetensors").stat().st_size > 1_000_000
    assert (results / "samples" / "grid.png").is_file()
    assert (results / "report" / "loss.png").is_file()

    # Every remote stage ran as SLURM jobs, on the test cluster's nodes, and completed.
    for rule in (
        "demo_source",
        "prefilter",
        "download",
        "preprocess",
        "manifest",
        "base_model",
        "export",
        "sample",
    ):
        logs = slurm_logs(workdir, rule)
        assert logs, f"no SLURM job for rule {rule}"
        for row in sacct(*logs):
            if "." not in row["JobID"]:
                assert row["State"] == "COMPLETED", (rule, row)
                assert re.fullmatch(r"n\d", row["NodeList"]), (rule, row)
    parts = yaml.safe_load((results / "config.yaml").read_text())["data"]["download"]["parts"]
    assert len(slurm_logs(workdir, "download")) == len(slurm_logs(workdir, "preprocess")) == parts
    # One GPU for sampling, as gres: one job, not one copy per GPU.
    (sample_job,) = slurm_logs(workdir, "sample")
    assert "gres/gpu=1" in sacct(sample_job)[0]["AllocTRES"]
    # Local rules ran on the login node: no SLURM job.
    assert not any(slurm_logs(workdir, rule) for rule in ("preflight", "train", "report"))

    # The preflight: ONE submitit job on the training job's shape, before training; every rank healthy.
    preflight_job = json.loads(
        (workdir / "logs" / "slurmtest" / "submitit-preflight" / "job.json").read_text()
    )
    row = sacct(preflight_job["job_id"])[0]
    assert row["JobName"] == "nyaflow-preflight-slurmtest" and row["State"] == "COMPLETED", row
    assert row["NNodes"] == "2" and "gres/gpu=4" in row["AllocTRES"], row
    report = json.loads((results / "preflight" / "report.json").read_text())
    assert report["ok"] and report["world_size"] == 4 and len(report["hosts"]) == 2, report
    assert (
        all(r["matmul_tflops"] > 0 and r["images_per_s"] > 0 for r in report["ranks"])
        and report["busbw_gbps"] > 0
    )

    # Training: ONE submitit job of 2 nodes x 2 ranks, world size 4, 2 (fake) GPUs per node.
    job_id = json.loads((workdir / "logs" / "slurmtest" / "submitit" / "job.json").read_text())["job_id"]
    rows = {r["JobID"]: r for r in sacct(job_id)}
    job = rows[job_id]
    assert job["JobName"] == "nyaflow-train-slurmtest" and job["State"] == "COMPLETED", job
    assert job["NNodes"] == "2" and "gres/gpu=4" in job["AllocTRES"], job
    assert rows[f"{job_id}.0"]["NTasks"] == "4", rows
    summary = json.loads((results / "train" / "summary.json").read_text())
    assert summary["world_size"] == 4 and summary["steps"] == TRAIN["steps"]
    # preflight.every_training_run: the training job checked its own nodes first, in the same processes.
    in_job = json.loads((results / "train" / "preflight" / f"{job_id}-run1" / "report.json").read_text())
    assert in_job["ok"] and in_job["world_size"] == 4 and len(in_job["hosts"]) == 2, in_job
    # The train rule streamed the job's states to Snakemake's output and rank 0's progress to its log.
    assert re.search(rf"job {job_id}: RUNNING on n\[?\d", result.stderr), result.stderr[-3000:]
    assert f"job {job_id}: COMPLETED" in result.stderr
    log = (workdir / "logs" / "slurmtest" / "train.log").read_text()
    assert f"[nyaflow train] step {TRAIN['steps']}: loss" in log
    print(f"\nwhole DAG on the test cluster: {seconds:.0f} s")


class Releaser(threading.Thread):
    """Starts a requeued job as soon as SLURM allows: a requeued job waits until its credential expires
    (~21 s here, 121 s by default); `StartTime=now` ~2 s after the requeue lets it start at once."""

    def __init__(self, folder: Path):
        super().__init__(daemon=True)
        self.folder, self.stop, self.released = folder, threading.Event(), 0

    def run(self):
        pending_since = None
        while not self.stop.wait(0.5):
            record = self.folder / "job.json"
            if not record.is_file():
                continue
            job_id = json.loads(record.read_text())["job_id"]
            out = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True)
            if out.stdout.strip() == "PENDING":
                pending_since = pending_since or time.monotonic()
                if time.monotonic() - pending_since > 2:
                    subprocess.run(["scontrol", "update", f"jobid={job_id}", "StartTime=now"], check=False)
                    self.released += 1
                    pending_since = None
            else:
                pending_since = None


def launch_train(workdir: Path, cfg: Path, out: Path, folder: Path) -> subprocess.Popen:
    results = workdir / "results" / "slurmtest"
    cmd = [str(BIN / "nyaflow"), "launch-train", "--config", str(cfg), "--base", str(results / "base_model")]
    cmd += ["--data", str(results / "data"), "--out", str(out), "--submitit-folder", str(folder)]
    cmd += ["--log", str(out.parent / "train.log")]
    return subprocess.Popen(cmd, cwd=workdir, env=ENV, stderr=subprocess.PIPE, text=True)


def losses(out: Path) -> list[int]:
    """The steps whose training loss rank 0 logged, in order (across runs: metrics.jsonl is appended)."""
    metrics = out / "metrics.jsonl"
    lines = metrics.read_text().splitlines() if metrics.exists() else []
    return [json.loads(line)["step"] for line in lines if "train/loss" in line]


def signal_after(out: Path, seen: int, folder: Path) -> None:
    """SIGUSR2 to every rank (as SLURM sends it before the time limit) once rank 0 logged a loss beyond the
    first `seen` ones, i.e. while the job runs and trains."""
    deadline = time.monotonic() + 600
    while len(losses(out)) <= seen:
        assert time.monotonic() < deadline, "training did not get that far"
        time.sleep(0.1)
    job_id = json.loads((folder / "job.json").read_text())["job_id"]
    subprocess.run(["scancel", "--signal=USR2", job_id], check=True)


def wait_for_text(path: Path, text: str, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while not (path.exists() and text in path.read_text()):
        assert time.monotonic() < deadline, f"{text!r} not in {path}"
        time.sleep(0.2)


def test_requeue_resumes_exactly_and_is_bounded(dag, tmp_path):
    """SIGUSR2 -> every rank saves -> rank 0 requeues (1 of launch.max_requeues = 1) -> the job resumes;
    SIGUSR2 again -> saved, not requeued, the rule's launcher fails with the reason; rerun -> a new job
    resumes (its launcher, killed, is replaced by one that attaches to it) and ends with bitwise the
    weights of the uninterrupted run."""
    import torch

    from nyaflow import checkpoint
    from nyaflow.export import consolidated_unet_state

    workdir = dag[0]
    results = workdir / "results" / "slurmtest"
    cfg = yaml.safe_load((results / "config.yaml").read_text())  # the DAG's training, exactly
    cfg["launch"]["job_name"] = "nyaflow-requeue-test"
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    out, folder = tmp_path / "train", tmp_path / "submitit"
    releaser = Releaser(folder)
    releaser.start()
    try:
        first = launch_train(workdir, tmp_path / "config.yaml", out, folder)
        signal_after(out, 0, folder)
        wait_for_text(tmp_path / "train.log", "requeued job")
        signal_after(out, len(losses(out)), folder)  # the requeued run resumed and trains again
        _, stderr = first.communicate(timeout=900)
        assert first.returncode == 1, stderr
        job_id = json.loads((folder / "job.json").read_text())["job_id"]
        # The launcher kept waiting through the requeue: it reported RUNNING, then REQUEUED and/or PENDING
        # (either may pass between two polls, not both: the releaser holds the job PENDING for 2 s), then
        # RUNNING again, and last FAILED ...
        states = re.findall(rf"job {job_id}: ([A-Z]+)", stderr)
        after_first_run = states[states.index("RUNNING") + 1 :]
        between = after_first_run[: after_first_run.index("RUNNING")]
        assert between and set(between) <= {"REQUEUED", "PENDING"}, states
        assert after_first_run[-1] == "FAILED", states
        # ... and SLURM ran the same job twice: the first run ended REQUEUED, the second FAILED.
        runs = [
            r["State"] for r in sacct(job_id, fields="JobID,State", duplicates=True) if r["JobID"] == job_id
        ]
        assert runs == ["REQUEUED", "FAILED"], runs
        assert "launch.max_requeues (1) requeues are spent" in stderr, stderr
        assert re.search(rf"job {job_id} failed \(FAILED", stderr), stderr
        log = (tmp_path / "train.log").read_text()
        assert log.count("[nyaflow launch] stopped by a signal") == 1 and "requeued job" in log
        assert re.search(rf"starting at step [1-9]/{TRAIN['steps']}", log), log  # the requeued run resumed
        first_stop = int(
            re.search(r"stopped by a signal at step (\d+); its checkpoint is saved; requeued", log)[1]
        )
        saved = int(checkpoint.latest_tag(out / "checkpoints")[4:])
        assert first_stop < saved < TRAIN["steps"]  # the second stop saved too, later

        # Rerun (as rerunning the train rule does): a new job resumes from the saved step. Its launcher dies
        # (SIGKILL, as when the login session drops); the next one attaches to the running job.
        (tmp_path / "train.log").unlink()
        second = launch_train(workdir, tmp_path / "config.yaml", out, folder)
        wait_for_text(tmp_path / "train.log", ": RUNNING")
        second.kill()
        second.wait()
        rerun_job = json.loads((folder / "job.json").read_text())["job_id"]
        assert rerun_job != job_id
        third = launch_train(workdir, tmp_path / "config.yaml", out, folder)
        _, stderr = third.communicate(timeout=900)
        assert third.returncode == 0, stderr
        assert f"attaching to job {rerun_job}" in stderr and f"job {rerun_job}: COMPLETED" in stderr, stderr
    finally:
        releaser.stop.set()
        for job in jobs_in(workdir):
            subprocess.run(["scancel", job], check=False)
    assert releaser.released >= 1
    assert f"starting at step {saved}/{TRAIN['steps']}" in (tmp_path / "train.log").read_text()
    # Each run of the job checked its nodes before training: the first, the requeued one, the rerun.
    checked = sorted(p.name for p in (out / "preflight").iterdir())
    assert checked == sorted([f"{job_id}-run1", f"{job_id}-run2", f"{rerun_job}-run1"]), checked

    tag = f"step{TRAIN['steps']:08d}"
    uninterrupted = consolidated_unet_state(results / "train" / "checkpoints", tag)
    requeued = consolidated_unet_state(out / "checkpoints", tag)
    assert uninterrupted.keys() == requeued.keys()
    assert all(torch.equal(uninterrupted[k], requeued[k]) for k in uninterrupted)
    a = json.loads((results / "train" / "summary.json").read_text())
    b = json.loads((out / "summary.json").read_text())
    assert a["loss"] == b["loss"] and a["val_loss"] == b["val_loss"]


def test_preflight_names_the_node_of_a_slow_rank(dag, tmp_path):
    """The preflight job of the DAG's shape (2 nodes x 2 ranks) with rank 3 made 100x slower by fault
    injection: the launcher fails, naming rank 3's node, which is one of the job's nodes and not rank 0's."""
    workdir = dag[0]
    results = workdir / "results" / "slurmtest"
    cmd = [str(BIN / "nyaflow"), "preflight", "--config", str(results / "config.yaml")]
    cmd += ["--data", str(results / "data"), "--out", str(tmp_path / "preflight")]
    cmd += ["--submitit-folder", str(tmp_path / "submitit"), "--log", str(tmp_path / "preflight.log")]
    env = {**ENV, "NYAFLOW_PREFLIGHT_SLOW_RANK": "3:100"}
    done = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 1, done.stderr[-3000:]
    report = json.loads((tmp_path / "preflight" / "report.json").read_text())
    hosts = {r["rank"]: r["host"] for r in report["ranks"]}
    assert hosts[3] != hosts[0]
    job_id = json.loads((tmp_path / "submitit" / "job.json").read_text())["job_id"]
    job = sacct(job_id)[0]
    assert job["State"] == "FAILED", job
    nodes = subprocess.run(
        ["scontrol", "show", "hostnames", job["NodeList"]], capture_output=True, text=True, check=True
    ).stdout.split()
    assert hosts[3] in nodes, (hosts, nodes)
    assert re.search(rf"job {job_id} failed \(FAILED.*rank 3 on {hosts[3]}: matmul", done.stderr), done.stderr
    assert report["problems"][0].startswith(f"rank 3 on {hosts[3]}: matmul")


def test_rerun_one_stage_on_the_cluster(dag):
    workdir, args, _, _ = dag
    grid = workdir / "results" / "slurmtest" / "samples" / "grid.png"
    training_job = (workdir / "logs" / "slurmtest" / "submitit" / "job.json").read_text()
    before, logs_before = grid.stat().st_mtime_ns, set((workdir / "logs" / "slurm").rglob("*.log"))
    result = snakemake(workdir, *args, "--forcerun", "sample", "--until", "sample", timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert grid.stat().st_mtime_ns > before
    # One new SLURM job, for sample, on one GPU; nothing else ran (no other job, no training job).
    (new,) = set((workdir / "logs" / "slurm").rglob("*.log")) - logs_before
    assert new.parent.name == "rule_sample"
    assert sacct(new.stem)[0]["State"] == "COMPLETED" and "gres/gpu=1" in sacct(new.stem)[0]["AllocTRES"]
    assert (workdir / "logs" / "slurmtest" / "submitit" / "job.json").read_text() == training_job


def test_dry_run_of_the_full_recipe_plans_4_x_8_h100(cluster, tmp_path):
    """The real profile, unchanged, with config/nyaflow-xl.yaml: the whole plan, nothing submitted. The URL
    table is the user's; an empty placeholder stands in for it (a dry run does not read it)."""
    shutil.copytree(REPO / "config", tmp_path / "config")
    xl = yaml.safe_load((REPO / "config" / "nyaflow-xl.yaml").read_text())
    table = tmp_path / xl["data"]["table"]
    table.parent.mkdir(parents=True)
    table.touch()
    result = snakemake(
        tmp_path,
        "-n",
        "--profile",
        str(REPO / "cluster" / "slurm"),
        "--configfile",
        "config/nyaflow-xl.yaml",
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    plan = result.stdout + result.stderr
    for rule in (
        "prefilter",
        "download",
        "preprocess",
        "fetch_base",
        "base_model",
        "train",
        "export",
        "sample",
    ):
        assert re.search(rf"^{rule}\s+\d+$", plan, re.M), rule
    assert "one SLURM job of 4 nodes x 8 ranks = world size 32, 8 GPUs per node" in plan
    assert not jobs_in(tmp_path) and not (tmp_path / "logs" / "slurm").exists()
