"""The whole DAG, run by the real Snakemake on the demo config: artifacts, honesty of the demo, reruns."""

import json
import re

import pandas as pd
import pytest
import yaml
from conftest import free_port, run_snakemake
from PIL import Image

RULES = ["demo_source", "download", "preprocess", "base_model", "train", "export", "sample"]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """`snakemake --profile cluster/local` on config/config.yaml (the demo, as `make demo` runs it)."""
    import shutil

    from conftest import REPO

    workdir = tmp_path_factory.mktemp("demo_run")
    shutil.copytree(REPO / "config", workdir / "config")
    cfg = yaml.safe_load((workdir / "config" / "config.yaml").read_text())
    cfg["data"]["demo"]["port"] = free_port()
    (workdir / "config" / "config.yaml").write_text(yaml.safe_dump(cfg))
    dry = run_snakemake(workdir, "--profile", str(REPO / "cluster" / "local"), "-n")
    result = run_snakemake(workdir, "--profile", str(REPO / "cluster" / "local"), timeout=1500)
    assert result.returncode == 0, result.stderr[-5000:]
    return workdir, dry, result


def test_dry_run_shows_every_stage(demo_run):
    _, dry, _ = demo_run
    assert dry.returncode == 0
    for rule in RULES:  # each in the job-count table of the plan, with its number of jobs
        assert re.search(rf"^{rule}\s+\d+$", dry.stdout, re.M), rule


def test_demo_produces_every_artifact(demo_run):
    workdir, _, _ = demo_run
    results = workdir / "results" / "demo"
    manifest = json.loads((results / "data" / "manifest.json").read_text())
    assert manifest["counts"]["kept"] == 384
    assert sum(manifest["counts"].values()) == manifest["rows_in"] == 390
    assert len(pd.read_parquet(results / "data" / "rows.parquet")) == 390
    assert (results / "train" / "checkpoints" / "latest").read_text().strip() == "step00000500"
    assert (results / "export" / "diffusers" / "model_index.json").is_file()
    assert (results / "export" / "demo.safetensors").stat().st_size > 1_000_000
    grid = Image.open(results / "samples" / "grid.png")
    assert grid.size == (200 + 4 * 128, 20 + 5 * 128)  # 4 seeds x 5 prompts, 64 px cells enlarged to 128
    assert not list(results.rglob("*.partial*"))


def test_demo_really_learns(demo_run):
    """The trained model's validation loss falls and its samples show the colour the prompt names far more
    often than the untrained model's."""
    workdir, _, _ = demo_run
    summary = json.loads((workdir / "results" / "demo" / "train" / "summary.json").read_text())
    assert summary["val_loss_last"] < 0.3 * summary["val_loss_first"]
    scores = json.loads((workdir / "results" / "demo" / "samples" / "scores.json").read_text())
    assert scores["colour_match_trained"] > scores["colour_match_untrained"] + 0.2


def test_until_and_forcerun_rerun_only_what_was_asked(demo_run):
    from conftest import REPO

    workdir, _, _ = demo_run
    profile = ["--profile", str(REPO / "cluster" / "local")]
    nothing = run_snakemake(workdir, *profile, "-n")
    assert nothing.returncode == 0 and "Nothing to be done" in nothing.stdout + nothing.stderr
    grid = workdir / "results" / "demo" / "samples" / "grid.png"
    before = grid.stat().st_mtime_ns
    rerun = run_snakemake(workdir, *profile, "--forcerun", "sample", "--until", "sample")
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "rule sample:" in rerun.stdout + rerun.stderr
    assert "rule train:" not in rerun.stdout + rerun.stderr
    assert grid.stat().st_mtime_ns > before
    plan = run_snakemake(workdir, *profile, "-n", "--forcerun", "preprocess", "--until", "preprocess")
    assert "preprocess" in plan.stdout and "rule train" not in plan.stdout


def test_report_has_plots_grids_and_accounting(demo_run):
    """The demo ran the report rule; `snakemake --report` then gathers its plots and tables, the sample grid,
    the data accounting and the config into one file (.zip here, and .html with everything embedded)."""
    import base64
    import html
    import zipfile

    from conftest import REPO

    workdir, dry, _ = demo_run
    assert "report" in dry.stdout
    results = workdir / "results" / "demo"
    for name in ("loss.png", "throughput.png", "training.html", "data.html", "config.html"):
        assert (results / "report" / name).stat().st_size > 500, name
    assert Image.open(results / "report" / "loss.png").format == "PNG"

    # The profile gives --cores, which rules with `threads: workflow.cores` need even to build the DAG.
    profile = ["--profile", str(REPO / "cluster" / "local")]
    result = run_snakemake(workdir, *profile, "--report", str(workdir / "report.zip"))
    assert result.returncode == 0, result.stderr[-3000:]
    with zipfile.ZipFile(workdir / "report.zip") as z:
        files = {name.rsplit("/", 1)[-1]: name for name in z.namelist()}
        for name in ("report.html", "loss.png", "throughput.png", "grid.png", "data.html", "config.html"):
            assert name in files, sorted(files)
        data = z.read(files["data.html"]).decode()
        training = z.read(files["training.html"]).decode()
    # The accounting: the totals and every reason a row was not kept, as the manifest has them.
    manifest = json.loads((results / "data" / "manifest.json").read_text())
    assert f"{manifest['rows_in']:,} rows in the URL table; {manifest['counts']['kept']:,} kept" in data
    reasons = [reason for by_reason in manifest["reasons"].values() for reason in by_reason]
    assert reasons and all(html.escape(reason) in data for reason in reasons), reasons
    assert "images seen" in training and "throughput, median" in training

    result = run_snakemake(workdir, *profile, "--report", str(workdir / "report.html"))
    assert result.returncode == 0, result.stderr[-3000:]
    page = (workdir / "report.html").read_text()
    embedded = dict(re.findall(r"filename=([\w.-]+);base64,([A-Za-z0-9+/=]+)", page))
    for name in ("loss.png", "throughput.png", "grid.png", "training.html", "data.html", "config.html"):
        assert name in embedded, sorted(embedded)
    assert base64.b64decode(embedded["grid.png"]).startswith(b"\x89PNG")
    assert "failed_download" in base64.b64decode(embedded["data.html"]).decode()
