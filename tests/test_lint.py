"""The project is lint clean: ruff, snakefmt and snakemake --lint."""

import subprocess

from conftest import BIN, REPO, run_snakemake


def test_ruff():
    result = subprocess.run([str(BIN / "ruff"), "check", str(REPO)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


def test_snakefmt():
    result = subprocess.run(
        [str(BIN / "snakefmt"), "--check", str(REPO / "workflow")], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr


def test_snakemake_lint(workdir):
    result = run_snakemake(workdir, "--lint")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Lints for" not in result.stdout + result.stderr, result.stdout + result.stderr
