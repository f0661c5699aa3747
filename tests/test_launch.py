"""The training launcher without a cluster: the sbatch script the launch section produces, and what a rank
does when the trainer stops on a signal (requeue on rank 0, bounded; a quiet exit elsewhere). The real
cluster runs are in test_slurm.py."""

from pathlib import Path

import pytest
import yaml
from conftest import REPO, make_config
from submitit.slurm.slurm import _make_sbatch_string

from nyaflow import config as nyaflow_config
from nyaflow import launch
from nyaflow.train import REQUEUE_EXIT_CODE, Preempted


def sbatch_script(cfg: dict, tmp_path: Path) -> list[str]:
    """The job script submitit writes for this config (the same function submitit calls)."""
    params = launch.slurm_parameters(cfg)
    return _make_sbatch_string(
        command="python -m submitit.core._submit", folder=tmp_path, **params
    ).splitlines()


def test_the_xl_config_asks_for_4_nodes_of_8_gpus(tmp_path):
    cfg = nyaflow_config.load(REPO / "config" / "nyaflow-xl.yaml")
    lc = cfg["launch"]
    assert lc["backend"] == "slurm" and lc["nodes"] == 4 and lc["gpus_per_node"] == 8
    assert launch.tasks_per_node(lc) == 8  # one rank per GPU
    assert lc["cpus_per_task"] >= cfg["train"]["num_workers"] + 1
    script = sbatch_script(cfg, tmp_path)
    for line in (
        "#SBATCH --nodes=4",
        "#SBATCH --ntasks-per-node=8",
        "#SBATCH --gpus-per-node=8",
        f"#SBATCH --cpus-per-task={lc['cpus_per_task']}",
        "#SBATCH --exclusive",
        "#SBATCH --requeue",
        f"#SBATCH --signal=USR2@{lc['signal_delay_s']}",
        f"#SBATCH --time={lc['time_min']}",
        "#SBATCH --job-name=nyaflow-train-nyaflow-xl",
    ):
        assert line in script, line
    assert any(line.startswith("export NCCL_") for line in script)
    srun = next(line for line in script if line.startswith("srun "))
    assert "--kill-on-bad-exit=1" in srun
    assert "one SLURM job of 4 nodes x 8 ranks = world size 32, 8 GPUs per node" in launch.describe(cfg)


def test_every_launch_key_reaches_the_script(tmp_path):
    cfg = make_config(
        launch={
            "backend": "slurm",
            "nodes": 2,
            "gpus_per_node": 4,
            "gpu_type": "a100",
            "cpus_per_task": 6,
            "mem_gb": 1.5,
            "time_min": 90,
            "signal_delay_s": 200,
            "max_requeues": 0,
            "partition": "gpu",
            "account": "proj",
            "qos": "high",
            "constraint": "ib&a100",
            "exclusive": True,
            "sbatch_extra": ["--reservation=res1", "--mail-type=END"],
            "srun_args": ["--cpu-bind=none"],
            "setup": ["module load cuda", "export NCCL_DEBUG=INFO"],
            "job_name": "mine",
        }
    )
    script = sbatch_script(cfg, tmp_path)
    for line in (
        "#SBATCH --nodes=2",
        "#SBATCH --ntasks-per-node=4",
        "#SBATCH --gpus-per-node=a100:4",
        "#SBATCH --cpus-per-task=6",
        "#SBATCH --mem=1536M",
        "#SBATCH --time=90",
        "#SBATCH --signal=USR2@200",
        "#SBATCH --no-requeue",
        "#SBATCH --partition=gpu",
        "#SBATCH --account=proj",
        "#SBATCH --qos=high",
        "#SBATCH --constraint='ib&a100'",
        "#SBATCH --exclusive",
        "#SBATCH --reservation=res1",
        "#SBATCH --mail-type=END",
        "#SBATCH --job-name=mine",
        "module load cuda",
        "export NCCL_DEBUG=INFO",
    ):
        assert line in script, line
    # Thread pools sized for the rank's CPUs, not inherited from the Snakemake rule that submitted the job;
    # the user's setup lines come after, and win.
    setup = script[script.index("# setup") + 1 : script.index("module load cuda")]
    assert "export OMP_NUM_THREADS=6" in setup and "export MKL_NUM_THREADS=6" in setup
    srun = next(line for line in script if line.startswith("srun "))
    assert "--kill-on-bad-exit=1 --cpu-bind=none" in srun


def test_defaults_leave_site_choices_to_slurm(tmp_path):
    cfg = make_config(launch={"backend": "slurm", "gpus_per_node": 0, "mem_gb": 0})
    script = "\n".join(sbatch_script(cfg, tmp_path))
    assert "--ntasks-per-node=1" in script and "--gpus-per-node" not in script
    assert "--mem=0" in script  # all of each node's memory
    for option in ("--partition", "--account", "--qos", "--constraint", "--exclusive"):
        assert option not in script
    assert make_config(launch={"mem_gb": 640})["launch"]["mem_gb"] == 640
    assert launch.slurm_parameters(make_config(launch={"mem_gb": 640}))["mem"] == "640G"
    assert launch.tasks_per_node(make_config(launch={"gpus_per_node": 8})["launch"]) == 8


@pytest.fixture
def slurm_rank(monkeypatch):
    """Pretend to be rank `r` of a 2 x 2 SLURM job (submitit reads these variables)."""

    def become(rank: int, restarts: int = 0):
        env = {
            "SUBMITIT_EXECUTOR": "slurm",
            "SLURM_JOB_ID": "4242",
            "SLURM_NTASKS": "4",
            "SLURM_JOB_NUM_NODES": "2",
            "SLURM_NODEID": str(rank // 2),
            "SLURM_PROCID": str(rank),
            "SLURM_LOCALID": str(rank % 2),
            "SLURM_JOB_NODELIST": "n[1-2]",
            "SLURM_RESTART_COUNT": str(restarts),
        }
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
            monkeypatch.delenv(key, raising=False)

    return become


@pytest.fixture
def preempted_task(monkeypatch, tmp_path):
    """A TrainTask whose training always stops on a signal; records the requeue calls."""
    calls = {"requeue": [], "env": None}

    def fake_train(config, base, data, out):
        import os

        calls["env"] = {k: os.environ[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")}
        raise Preempted("stopped by a signal at step 3; its checkpoint is saved")

    monkeypatch.setattr("nyaflow.train.train", fake_train)
    monkeypatch.setattr(launch, "requeue", lambda job_id: calls["requeue"].append(job_id))
    cfg = make_config(launch={"backend": "slurm", "max_requeues": 2})
    return launch.TrainTask(cfg, tmp_path, tmp_path, tmp_path), calls


def test_rank0_requeues_after_the_collective_save(slurm_rank, preempted_task):
    task, calls = preempted_task
    slurm_rank(0, restarts=1)
    with pytest.raises(SystemExit) as e:
        task()
    assert e.value.code == REQUEUE_EXIT_CODE and calls["requeue"] == ["4242"]
    assert calls["env"] == {"RANK": "0", "WORLD_SIZE": "4", "LOCAL_RANK": "0", "MASTER_ADDR": "n1"}


def test_a_failed_requeue_leaves_the_outcome_to_the_job_state(
    slurm_rank, preempted_task, monkeypatch, capsys
):
    task, _ = preempted_task

    def refused(job_id):
        raise RuntimeError(f"scontrol requeue {job_id} failed: Job has already finished")

    monkeypatch.setattr(launch, "requeue", refused)
    slurm_rank(0)
    with pytest.raises(SystemExit) as e:  # no exception: submitit writes no error result
        task()
    assert e.value.code == REQUEUE_EXIT_CODE
    assert "not requeued: scontrol requeue 4242 failed" in capsys.readouterr().out


def test_other_ranks_exit_quietly_and_leave_the_requeue_to_rank0(slurm_rank, preempted_task):
    task, calls = preempted_task
    slurm_rank(3)
    with pytest.raises(SystemExit) as e:
        task()
    assert e.value.code == 0 and calls["requeue"] == []  # 0: srun --kill-on-bad-exit must not kill rank 0
    assert calls["env"]["RANK"] == "3" and calls["env"]["LOCAL_RANK"] == "1"


def test_requeues_are_bounded_by_slurm_restart_count(slurm_rank, preempted_task):
    task, calls = preempted_task
    slurm_rank(0, restarts=2)
    with pytest.raises(RuntimeError, match=r"launch.max_requeues \(2\) requeues are spent"):
        task()
    assert calls["requeue"] == []
    # submitit's own handler (outside the training loop) follows the same budget.
    assert task.checkpoint() is None
    slurm_rank(0, restarts=1)
    assert task.checkpoint() is not None


def test_every_training_run_checks_its_own_nodes_before_training(slurm_rank, preempted_task, monkeypatch):
    task, calls = preempted_task
    order = []
    monkeypatch.setattr(
        "nyaflow.preflight.preflight", lambda cfg, data, out, keep_group: order.append(("preflight", out))
    )
    import nyaflow.train

    preempted = nyaflow.train.train  # the fixture's: stops on a signal at once
    monkeypatch.setattr("nyaflow.train.train", lambda *a: (order.append(("train", None)), preempted(*a)))
    slurm_rank(0, restarts=1)
    with pytest.raises(SystemExit):
        task()
    assert order == [("train", None)]  # off by default
    order.clear()
    task.config["preflight"]["every_training_run"] = True
    with pytest.raises(SystemExit):
        task()
    assert order == [("preflight", task.out / "preflight" / "4242-run2"), ("train", None)]


def test_the_plan_describes_the_training_launch(workdir):
    from conftest import run_snakemake

    plan = run_snakemake(workdir, "-n", "--cores", "1")
    assert plan.returncode == 0, plan.stderr
    assert "train demo: one process, world size 1 (launch.backend: local)" in plan.stdout
    overlay = workdir / "config" / "slurm.yaml"
    overlay.write_text(yaml.safe_dump({"launch": {"backend": "slurm", "nodes": 2, "gpus_per_node": 4}}))
    plan = run_snakemake(workdir, "-n", "--cores", "1", "--configfile", "config/config.yaml", str(overlay))
    assert plan.returncode == 0, plan.stderr
    assert "train demo: one SLURM job of 2 nodes x 4 ranks = world size 8" in plan.stdout
