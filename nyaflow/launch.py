"""Launching training: in this process (`launch.backend: local`), or as one multi-node SLURM job submitted
with submitit (`launch.backend: slurm`). The train rule calls `nyaflow launch-train`, which calls
`launch_train`. The preflight rule launches the allocation check (nyaflow.preflight) the same way, on the
same job shape (`launch_preflight`, `PreflightTask`): its own job name, preflight.time_min, no requeue.

local
    `nyaflow.train.train` runs in this process, on this machine: world size 1, on one GPU or the CPU (the
    demo, and the single-GPU first test). Output goes to the rule's log. A stop by SIGTERM/SIGUSR2 saves a
    checkpoint and exits with REQUEUE_EXIT_CODE (75); running the rule again resumes.

slurm
    The train rule is a local rule: it runs on the login node, where Snakemake runs, and this module
    submits ONE job of `launch.nodes` x tasks-per-node ranks (tasks per node = GPUs per node) with
    `submitit.SlurmExecutor`, using the Python that runs the launcher (`launch.python` overrides it), so the
    nodes import the same nyaflow. It then blocks: it polls the job's state (sacct, every `launch.poll_s`),
    prints each change on stderr (the Snakemake console) and in the rule's log, copies rank 0's output
    into the log, and returns 0 when the job completes, or 1 with the job's error (the failing rank's
    traceback) when it fails. Each rank runs `TrainTask.__call__`: it exports MASTER_ADDR, MASTER_PORT,
    RANK, WORLD_SIZE and LOCAL_RANK with `submitit.helpers.TorchDistributedEnvironment().export()` (all
    GPUs of the node stay visible; the trainer picks LOCAL_RANK) and calls `nyaflow.train.train`, after the
    preflight checks of nyaflow.preflight on these very nodes when preflight.every_training_run. The job
    script first sets the thread counts of OpenMP, MKL and the other BLAS libraries to
    `launch.cpus_per_task`: sbatch passes the submitting environment on, and Snakemake sets those variables
    to the local rule's threads (the login node's cores). Runs with the same thread counts are bitwise
    reproducible; runs with different BLAS thread counts differ in the last bits.

    The launcher records the job in `<submitit folder>/job.json`. If it is started again while that job
    still runs (Snakemake was killed, the login session dropped), it attaches to the job instead of
    submitting a second one that would write the same checkpoints; if the settings differ it refuses.
    On SIGINT/SIGTERM (Ctrl-C on Snakemake) it cancels the job: SLURM sends the ranks SIGTERM, they save
    if KillWait allows, and the next run resumes from the last complete checkpoint.

Requeue on timeout and preemption
    Three parties handle signals, and each has one job:

    1. SLURM sends SIGUSR2 to every rank `launch.signal_delay_s` before the time limit (submitit's
       `--signal=USR2@N`), and SIGTERM on preemption or `scancel`.
    2. The trainer (nyaflow.train.StopFlag) replaces submitit's handlers for both signals as soon as
       training starts. Any rank's flag is agreed on by all ranks (all-reduce) at the next step boundary;
       every rank saves the checkpoint and `train` raises `Preempted` on every rank.
    3. `TrainTask.__call__` catches `Preempted`. Ranks other than 0 exit with status 0 (a non-zero exit
       would let `srun --kill-on-bad-exit` kill rank 0 before it requeues). Rank 0 requeues the job with
       `scontrol requeue <SLURM_JOB_ID>` (an argument list, no shell) if SLURM_RESTART_COUNT is below
       `launch.max_requeues`, then exits without a result, as submitit's own requeue does; SLURM restarts
       the same job id, with the same pickled TrainTask, and `train` resumes from `latest`. When the budget
       is spent, rank 0 raises instead, the job fails with that message, and rerunning the rule resumes.
       If `scontrol requeue` fails (the job was cancelled, or the site's preemption requeues it itself),
       rank 0 only says so and exits: the job's own state then tells the launcher what happened.

    submitit's own USR2 handler (rank 0 calls `checkpoint()`, then requeues) stays in force only outside
    `train`'s loop, e.g. while the model loads: there no progress can be lost, `TrainTask.checkpoint`
    resubmits the same call, and it returns None (no requeue) once the same budget is spent. After `train`
    returns, the trainer's handlers stay installed, so a late signal cannot requeue a finished job. Jobs are
    submitted with `--requeue`, so sites whose default is JobRequeue=0 still allow the requeue, and a node
    failure requeues the job too. Requeued, the job keeps its id; the launcher sees REQUEUED, PENDING and
    RUNNING again and keeps waiting.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

from submitit.helpers import Checkpointable

# sacct states of a job that has not ended (submitit's list, without UNKNOWN: a job sacct does not know)
ACTIVE_STATES = {"READY", "PENDING", "RUNNING", "REQUEUED", "COMPLETING", "PREEMPTED", "SUSPENDED"}
ACTIVE_STATES |= {"CONFIGURING", "RESIZING", "REQUEUE_HOLD", "REQUEUE_FED", "SIGNALING", "STAGE_OUT"}
JOB_RECORD = "job.json"
# Snakemake sets these to the submitting rule's threads (the login node's), and sbatch passes the environment
# on: the job script sizes them for each rank's own CPUs instead (launch.setup may override them).
THREAD_VARIABLES = (
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "GOTO_NUM_THREADS",
    "VECLIB_MAXIMUM_THREADS",
    "NUMEXPR_NUM_THREADS",
)


def tasks_per_node(lc: dict) -> int:
    """Ranks per node: launch.tasks_per_node, else one per GPU (one without GPUs)."""
    return lc["tasks_per_node"] or max(1, lc["gpus_per_node"])


def job_name(config: dict, purpose: str = "train") -> str:
    """nyaflow-<purpose>-<run>, or launch.job_name (with -preflight appended for the preflight job)."""
    name = config["launch"]["job_name"]
    if name:
        return name if purpose == "train" else f"{name}-{purpose}"
    return f"nyaflow-{purpose}-{config['run']}"


def max_requeues(config: dict, purpose: str) -> int:
    """Training requeues itself up to launch.max_requeues times; the preflight never does."""
    return config["launch"]["max_requeues"] if purpose == "train" else 0


def slurm_parameters(config: dict, purpose: str = "train") -> dict:
    """The `submitit.SlurmExecutor.update_parameters` arguments for the launch section: every sbatch option
    of the training job (purpose "train") or of the preflight job on the same allocation shape (purpose
    "preflight": preflight.time_min, no requeue), in one place."""
    lc = config["launch"]
    params: dict = {
        "job_name": job_name(config, purpose),
        "nodes": lc["nodes"],
        "ntasks_per_node": tasks_per_node(lc),
        "cpus_per_task": lc["cpus_per_task"],
        "time": lc["time_min"] if purpose == "train" else config["preflight"]["time_min"],
        "signal_delay_s": lc["signal_delay_s"],
        # One log per rank: <folder>/<job id>_<rank>_log.out, stdout and stderr together.
        "stderr_to_stdout": True,
        # A crashed rank ends the job, instead of leaving the others blocked in a collective until the
        # time limit.
        "srun_args": ["--kill-on-bad-exit=1", *lc["srun_args"]],
    }
    if lc["gpus_per_node"]:
        gpus = lc["gpus_per_node"]
        params["gpus_per_node"] = f"{lc['gpu_type']}:{gpus}" if lc["gpu_type"] else gpus
    if lc["mem_gb"] is not None:
        mem = lc["mem_gb"]
        params["mem"] = "0" if mem == 0 else f"{mem:g}G" if mem == int(mem) else f"{round(mem * 1024)}M"
    for key in ("partition", "account", "qos", "constraint"):
        if lc[key]:
            params[key] = lc[key]
    if lc["exclusive"]:
        params["exclusive"] = True
    params["setup"] = [f"export {name}={lc['cpus_per_task']}" for name in THREAD_VARIABLES] + list(
        lc["setup"]
    )
    extra = {"requeue": True} if max_requeues(config, purpose) > 0 else {"no-requeue": True}
    for option in lc["sbatch_extra"]:  # "--name=value" or "--flag"
        name, sep, value = option[2:].partition("=")
        extra[name] = value if sep else True
    params["additional_parameters"] = extra
    return params


def describe(config: dict, purpose: str = "train") -> str:
    """One line for the plan and the log: the job's shape and where it goes."""
    lc = config["launch"]
    if lc["backend"] == "local":
        return "one process, world size 1 (launch.backend: local)"
    n, t, g = lc["nodes"], tasks_per_node(lc), lc["gpus_per_node"]
    parts = [
        f"one SLURM job of {n} nodes x {t} ranks = world size {n * t}",
        f"{g} GPUs per node" + (f" ({lc['gpu_type']})" if lc["gpu_type"] else "") if g else "no GPUs",
        f"{lc['cpus_per_task']} CPUs per rank",
        f"{slurm_parameters(config, purpose)['time']} min per run",
        f"up to {max_requeues(config, purpose)} requeues",
    ]
    parts += [f"{k} {lc[k]}" for k in ("partition", "account", "qos", "constraint") if lc[k]]
    return ", ".join(parts)


def restart_count() -> int:
    """How often SLURM has restarted (requeued) this job; 0 on its first run."""
    return int(os.environ.get("SLURM_RESTART_COUNT") or 0)


def requeue(job_id: str) -> None:
    """Put this running job back in the queue (SLURM then stops its ranks and restarts it)."""
    done = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        raise RuntimeError(f"scontrol requeue {job_id} failed: {(done.stderr or done.stdout).strip()}")


def export_distributed_env():
    """In a rank of the SLURM job: MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE and LOCAL_RANK from SLURM's
    variables (every GPU of the node stays visible: the rank picks cuda:LOCAL_RANK itself)."""
    from submitit.helpers import TorchDistributedEnvironment

    return TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)


class PreflightTask:
    """What every rank of the preflight job runs (pickled by submitit)."""

    def __init__(self, config: dict, data: Path, out: Path):
        self.config, self.data, self.out = config, Path(data), Path(out)

    def __call__(self) -> dict:
        from nyaflow.preflight import preflight

        export_distributed_env()
        return preflight(self.config, self.data, self.out)


class TrainTask(Checkpointable):
    """What every rank of the SLURM job runs (pickled by submitit; imported from nyaflow on the nodes)."""

    def __init__(self, config: dict, base: Path, data: Path, out: Path):
        self.config, self.base, self.data, self.out = config, Path(base), Path(data), Path(out)
        self.max_requeues = config["launch"]["max_requeues"]

    def __call__(self) -> dict:
        from nyaflow.train import REQUEUE_EXIT_CODE, Preempted, train

        env = export_distributed_env()
        job_id, restarts = os.environ.get("SLURM_JOB_ID", "?"), restart_count()
        if env.rank == 0:
            print(
                f"[nyaflow launch] job {job_id} run {restarts + 1}: rank 0 of {env.world_size} "
                f"({env.local_world_size} per node), master {env.master_addr}:{env.master_port}",
                flush=True,
            )
        if self.config["preflight"]["every_training_run"]:
            # These nodes, this run: a requeued job may have landed on others than the preflight rule saw.
            # PreflightFailed on rank 0 ends the job (srun --kill-on-bad-exit) before training starts.
            from nyaflow.preflight import preflight

            out = self.out / "preflight" / f"{job_id}-run{restarts + 1}"
            preflight(self.config, self.data, out, keep_group=True)  # train() goes on in its group
        try:
            return train(self.config, self.base, self.data, self.out)
        except Preempted as e:
            if env.rank != 0:
                raise SystemExit(0) from None  # rank 0 requeues (or reports); see the module docstring
            if restarts >= self.max_requeues:
                raise RuntimeError(
                    f"{e}; not requeued: launch.max_requeues ({self.max_requeues}) requeues are spent."
                    " Run the train rule again to resume from that checkpoint."
                ) from None
            try:
                requeue(job_id)
            except (RuntimeError, OSError, subprocess.SubprocessError) as err:
                # Cancelled (scancel, the launcher's Ctrl-C), or the site's preemption requeues the job
                # itself: no error result, so that the launcher goes by the job's state.
                print(f"[nyaflow launch] {e}; not requeued: {err}", flush=True)
                raise SystemExit(REQUEUE_EXIT_CODE) from None
            print(
                f"[nyaflow launch] {e}; requeued job {job_id} ({restarts + 1} of {self.max_requeues})",
                flush=True,
            )
            raise SystemExit(REQUEUE_EXIT_CODE) from None

    def checkpoint(self, *args, **kwargs):
        """submitit's USR2 handler (rank 0, outside the training loop): resubmit the same call, which resumes
        from `latest`, unless the requeue budget is spent."""
        if restart_count() >= self.max_requeues:
            return None
        return super().checkpoint(*args, **kwargs)


# --- the launcher ------------------------------------------------------------------------------------------


class _Interrupted(Exception):
    pass


class _Reporter:
    """State lines go to stderr (the Snakemake console) and the log; rank 0's output to the log only."""

    def __init__(self, log: Path | None):
        if log:
            Path(log).parent.mkdir(parents=True, exist_ok=True)
        self.log = open(log, "w") if log else None  # noqa: SIM115 - closed in close()

    def say(self, message: str) -> None:
        line = f"[nyaflow launch {time.strftime('%H:%M:%S')}] {message}"
        print(line, file=sys.stderr, flush=True)
        if self.log:
            self.log.write(line + "\n")
            self.log.flush()

    def forward(self, text: str) -> None:
        if text and self.log:
            self.log.write(text)
            self.log.flush()
        elif text:
            sys.stdout.write(text)
            sys.stdout.flush()

    def close(self) -> None:
        if self.log:
            self.log.close()


class _Tail:
    """The complete lines appended to a file since the last read."""

    def __init__(self, path: Path):
        self.path, self.pos = path, 0

    def read(self, final: bool = False) -> str:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.pos)
                data = f.read()
        except FileNotFoundError:
            return ""
        end = len(data) if final else data.rfind(b"\n") + 1
        self.pos += end
        return data[:end].decode(errors="replace")


def launch_train(
    config: dict, base: Path, data: Path, out: Path, folder: Path, log: Path | None = None
) -> int:
    """Train as launch.backend says; returns the exit status for `nyaflow launch-train`."""
    if config["launch"]["backend"] == "local":
        return train_here(config, base, data, out, log)
    base, data, out = Path(base).resolve(), Path(data).resolve(), Path(out).resolve()

    def done(s: dict) -> str:
        return f"{s['steps']} steps, world size {s['world_size']}, checkpoint {s['checkpoint']}"

    return _run_slurm(config, "train", TrainTask(config, base, data, out), folder, log, done)


def launch_preflight(config: dict, data: Path, out: Path, folder: Path, log: Path | None = None) -> int:
    """The preflight (nyaflow.preflight) on the training job's shape, as launch.backend says; returns the
    exit status for `nyaflow preflight`: 0 healthy, 1 failed (the report names the slow nodes)."""
    if config["launch"]["backend"] == "local":
        from nyaflow.preflight import PreflightFailed, preflight

        _output_to(log)
        try:
            preflight(config, data, out)
        except PreflightFailed as e:
            print(f"nyaflow preflight: {e}", file=sys.stderr)
            return 1
        return 0
    data, out = Path(data).resolve(), Path(out).resolve()

    def done(report: dict) -> str:
        return f"{report['world_size']} ranks on {', '.join(report['hosts'])}: healthy"

    return _run_slurm(config, "preflight", PreflightTask(config, data, out), folder, log, done)


def _output_to(log: Path | None) -> None:
    """Send this process's stdout and stderr (file descriptors 1 and 2: DeepSpeed's and torch's output
    included) to the rule's log."""
    if log:
        Path(log).parent.mkdir(parents=True, exist_ok=True)
        sys.stdout.flush()
        sys.stderr.flush()
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)


def train_here(config: dict, base: Path, data: Path, out: Path, log: Path | None = None) -> int:
    """`nyaflow.train.train` in this process (output to `log` when given); the exit status: 0, 75 stopped by
    a signal after saving (run again to continue), 1 too many non-finite losses."""
    from nyaflow.train import REQUEUE_EXIT_CODE, NonFiniteLoss, Preempted, train

    _output_to(log)
    try:
        train(config, base, data, out)
    except Preempted as e:
        print(f"nyaflow train: {e}; run again to continue (exit status {REQUEUE_EXIT_CODE})", file=sys.stderr)
        return REQUEUE_EXIT_CODE
    except NonFiniteLoss as e:
        print(f"nyaflow train: {e}", file=sys.stderr)
        return 1
    return 0


def _submission_key(purpose: str, task) -> str:
    """What identifies a submission: the purpose and the task's settings (its config and paths)."""
    text = json.dumps([purpose, vars(task)], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _state(job) -> tuple[str, str]:
    info = job.get_info(mode="force")  # one sacct call
    return info.get("State") or "UNKNOWN", info.get("NodeList") or ""


def _run_slurm(config: dict, purpose: str, task, folder: Path, log: Path | None, done) -> int:
    """Submit `task` (writing to task.out) as one job of the launch section's shape (or attach to the one
    submitted earlier for the same task settings), wait for it, and report `done(rank 0's result)` when it
    completes."""
    import submitit

    folder = Path(folder).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    lc = config["launch"]
    n_tasks = lc["nodes"] * tasks_per_node(lc)
    key = _submission_key(purpose, task)
    record = folder / JOB_RECORD
    reporter = _Reporter(log)
    job = None

    def interrupt(signum, frame):
        raise _Interrupted(signal.Signals(signum).name)

    previous = {s: signal.signal(s, interrupt) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        if record.is_file():
            old = json.loads(record.read_text())
            old_job = submitit.SlurmJob(folder=folder, job_id=old["job_id"], tasks=range(old["tasks"]))
            state, _ = _state(old_job)
            if state.split()[0] in ACTIVE_STATES:
                if old["key"] != key:
                    reporter.say(
                        f"job {old['job_id']} of an earlier launch with other settings is still {state}"
                        f" and writes to {task.out}: cancel it (scancel {old['job_id']}) or wait for it,"
                        " then rerun"
                    )
                    return 1
                reporter.say(f"attaching to job {old['job_id']} ({state}), submitted earlier for this run")
                job = old_job
        if job is None:
            executor = submitit.SlurmExecutor(
                folder=folder,
                max_num_timeout=max_requeues(config, purpose),
                python=lc["python"] or shlex.quote(sys.executable),
            )
            executor.update_parameters(**slurm_parameters(config, purpose))
            job = executor.submit(task)
            tmp = record.with_suffix(".tmp")
            tmp.write_text(json.dumps({"job_id": job.job_id, "tasks": n_tasks, "key": key}))
            tmp.replace(record)
            reporter.say(f"submitted job {job.job_id}: {describe(config, purpose)}")
        reporter.say(f"rank logs: {folder}/{job.job_id}_<rank>_log.out; rank 0's output follows in this log")
        return _wait(job, n_tasks, lc["poll_s"], reporter, done)
    except _Interrupted as e:
        if job is not None:
            job.cancel(check=False)
            resume = "; its ranks save a checkpoint if SLURM's KillWait allows, and the next run resumes from"
            resume += " the last complete one"
            reporter.say(f"{e}: cancelled job {job.job_id}" + (resume if purpose == "train" else ""))
        return 130
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        reporter.close()


def _wait(job, n_tasks: int, poll_s: float, reporter: _Reporter, done) -> int:
    """Block until the job ends, reporting its state changes; then its result or error."""
    from submitit.core.utils import FailedJobError, UncompletedJobError

    rank0 = _Tail(job.task(0).paths.stdout)
    pickles = [job.task(t).paths.result_pickle for t in range(n_tasks)]
    last, returned_at = None, None
    while True:
        state, nodes = _state(job)
        if (state, nodes) != last and state != "UNKNOWN":  # UNKNOWN: sacct does not know the job yet
            where = f" on {nodes}" if nodes not in ("", "None assigned") else ""
            reporter.say(f"job {job.job_id}: {state}{where}")
            last = (state, nodes)
        reporter.forward(rank0.read())
        if state != "UNKNOWN" and state.split()[0] not in ACTIVE_STATES:
            break
        # Every rank returned, or rank 0 failed: the job is ending. Give sacct a minute to say so.
        if returned_at is None and (all(p.exists() for p in pickles) or _failed(pickles[0])):
            returned_at = time.monotonic()
        if returned_at is not None and time.monotonic() - returned_at > 60:
            break
        time.sleep(poll_s if returned_at is None else min(poll_s, 2))
    reporter.forward(rank0.read(final=True))
    try:
        summaries = job.results()
    except (FailedJobError, UncompletedJobError) as e:
        if state.split()[0] in ACTIVE_STATES:
            job.cancel(check=False)
        if reporter.log:
            reporter.log.write(f"{e}\n")
        reporter.say(f"job {job.job_id} failed ({state}): {_last_line(str(e))}")
        return 1
    reporter.say(f"job {job.job_id} {state}: {done(summaries[0])}")
    return 0


def _failed(pickle: Path) -> bool:
    if not pickle.exists():
        return False
    from submitit.core.utils import pickle_load

    try:
        return pickle_load(pickle)[0] == "error"
    except Exception:  # being written
        return False


def _last_line(text: str) -> str:
    """The exception line of a traceback (the most telling line of a job's error)."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not set(ln.strip()) <= {"-"}]
    for ln in reversed(lines):
        if not ln.startswith(("You can check", "or at paths", "- /")):
            return ln
    return lines[-1] if lines else text
