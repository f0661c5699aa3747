"""Shared fixtures: the repository paths, a validated config, a tiny model and a small downloaded data set.

Everything is built by the tests themselves, offline; images are served from 127.0.0.1 only.
"""

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from nyaflow import config as nyaflow_config

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# The longest test files, started first (`make test` runs two workers, a file each at a time): the SLURM
# tests wait on the test cluster most of their time, the demo DAG trains.
FIRST = ("test_slurm.py", "test_workflow.py")


def pytest_collection_modifyitems(items):
    items.sort(key=lambda item: FIRST.index(item.path.name) if item.path.name in FIRST else len(FIRST))


@pytest.fixture(autouse=True)
def restore_environment():
    """Put os.environ back after each test: code under test sets the rank variables for real (submitit's
    export), and a leaked WORLD_SIZE would make a later in-process process group wait for absent ranks."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


def start_ranks(args: list[str], cfg: dict, out: Path, world_size: int, env: dict | None = None) -> list:
    """Start `nyaflow <args> --config out/config.yaml` as `world_size` ranks of a CPU process group over
    127.0.0.1 (the variables torchrun would set, plus `env`); rank r writes to out/rank<r>.log."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(yaml.safe_dump(cfg))
    cmd = [sys.executable, "-m", "nyaflow.cli", *args, "--config", str(out / "config.yaml")]
    port = free_port()
    procs = []
    for rank in range(world_size):
        rank_env = {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size)}
        rank_env |= {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
        full_env = {k: v for k, v in os.environ.items() if k != "SLURMD_NODENAME"} | rank_env | (env or {})
        log = open(out / f"rank{rank}.log", "a")  # noqa: SIM115 - closed when the process ends
        procs.append(
            subprocess.Popen(cmd, env=full_env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        )
    return procs


def make_config(**sections) -> dict:
    """A validated config: the schema's defaults, with the given sections merged in."""
    raw = {"run": "test", "data": {"demo": {"port": free_port()}}}
    for key, value in sections.items():
        raw[key] = {**raw.get(key, {}), **value} if isinstance(value, dict) else value
    return nyaflow_config.validate(raw)


def run_snakemake(workdir: Path, *args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    """Run the real snakemake on the project's Snakefile in `workdir` (which holds config/)."""
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    cmd = [
        str(BIN / "snakemake"),
        "--snakefile",
        str(REPO / "workflow" / "Snakefile"),
        "--directory",
        str(workdir),
    ]
    return subprocess.run([*cmd, *args], capture_output=True, text=True, env=env, timeout=timeout)


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    """A scratch working directory with a copy of the project's config/ folder."""
    shutil.copytree(REPO / "config", tmp_path / "config")
    return tmp_path


@pytest.fixture(scope="session")
def demo_download(tmp_path_factory):
    """A small demo source (24 images + the broken rows) downloaded with img2dataset from 127.0.0.1."""
    from nyaflow.demo_data import make_demo_source
    from nyaflow.download import download

    root = tmp_path_factory.mktemp("demo")
    cfg = make_config(data={"demo": {"num_images": 24, "port": free_port()}})
    table = make_demo_source(root / "source", 24, 64, cfg["data"]["demo"]["port"], seed=0)
    download(cfg, root / "source" / "urls.parquet", root / "download", serve_dir=root / "source" / "images")
    return cfg, root, table


@pytest.fixture(scope="session")
def demo_data(demo_download):
    """The demo download preprocessed into training shards."""
    from nyaflow.preprocess import preprocess

    cfg, root, table = demo_download
    manifest = preprocess(cfg, root / "source" / "urls.parquet", root / "download", root / "data")
    return cfg, root / "data", manifest, table


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """A randomly initialised tiny SDXL-shaped model saved as a diffusers folder."""
    from nyaflow.demo_data import TAG_WORDS
    from nyaflow.model import build_tiny_components, save_components

    folder = tmp_path_factory.mktemp("tiny_model")
    save_components(build_tiny_components(folder, TAG_WORDS, seed=0), folder)
    return folder
