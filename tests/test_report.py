"""The run report's plots and tables, from hand-made stage outputs (fast; the demo run in
tests/test_workflow.py checks `snakemake --report` on the real thing), and the sample grid names."""

import json

import pytest
from conftest import make_config
from PIL import Image

from nyaflow.cli import main as cli_main
from nyaflow.report import REPORT_FILES, read_metrics, sample_grids, throughput, write_report

MANIFEST = {
    "rows_in": 10,
    "counts": {"kept": 6, "prefiltered": 1, "failed_download": 2, "filtered": 1, "lost": 0},
    "reasons": {
        "prefiltered": {"url scheme not allowed: file": 1},
        "failed_download": {"HTTP Error 404: File not found": 1, "Image decoding error": 1},
        "filtered": {"shorter side below 48 px": 1},
        "lost": {},
    },
    "buckets": {"64x64": 4, "48x80": 2},
    "parts": {"part-0": {"rows": 5, "kept": 3, "failed_download": 2}, "part-1": {"rows": 4, "kept": 3}},
    "shards": [{"path": "64x64-00000.tar", "count": 4}, {"path": "48x80-00000.tar", "count": 2}],
}


@pytest.fixture
def finished_run(tmp_path):
    train, data, samples = tmp_path / "train", tmp_path / "data", tmp_path / "samples"
    for d in (train, data, samples):
        d.mkdir()
    # The trainer's records: TensorBoard tags as keys, validation in a record of its own.
    lines = [
        {"step": s, "train/loss": 1 / s, "train/lr": 1e-4, "train/images_per_s": 10.0 + s} for s in (5, 10)
    ]
    lines.append({"step": 10, "val/loss": 0.7})
    # A resumed run logs step 10 again: the later record wins.
    lines += [
        {"step": 10, "train/loss": 0.05, "train/images_per_s": 30.0},
        {"step": 15, "train/loss": 0.04, "train/images_per_s": 31.0},
    ]
    (train / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    summary = {
        "steps": 15,
        "world_size": 2,
        "global_batch": 8,
        "images_seen": 120,
        "val_loss": [[0, 1.5], [15, 0.5]],
        "val_loss_first": 1.5,
        "val_loss_last": 0.5,
        "seconds_this_session": 3725.0,
        "checkpoint": "step00000015",
        "nonfinite_skipped": 0,
    }
    (train / "summary.json").write_text(json.dumps(summary))
    (data / "manifest.json").write_text(json.dumps(MANIFEST))
    scores = {"colour_match_trained": 0.8, "colour_match_untrained": 0.1}
    (samples / "scores.json").write_text(json.dumps(scores))
    return tmp_path


def test_metrics_of_a_resumed_run_and_throughput(finished_run):
    metrics = read_metrics(finished_run / "train" / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [5, 10, 15]
    assert metrics[1] == {"step": 10, "loss": 0.05, "lr": 1e-4, "images_per_s": 30.0, "val_loss": 0.7}
    assert throughput(metrics) == {"median": 30.5, "last": 31.0, "intervals": 3}
    assert read_metrics(finished_run / "nothing.jsonl") == []
    assert throughput([]) == {"median": None, "last": None, "intervals": 0}


def test_report_files(finished_run, tmp_path):
    cfg = make_config(run="myrun")
    out = tmp_path / "report"
    paths = write_report(cfg, finished_run / "train", finished_run / "data", finished_run / "samples", out)
    assert [p.name for p in paths] == list(REPORT_FILES)
    assert sorted(p.name for p in out.iterdir()) == sorted(REPORT_FILES)  # nothing partial left
    for plot in ("loss.png", "throughput.png"):
        image = Image.open(out / plot)
        assert image.format == "PNG" and image.size == (700, 400)
        assert len(image.convert("RGB").getcolors(1 << 16)) > 10  # not a blank canvas
    training = (out / "training.html").read_text()
    for fact in (
        "Training of run myrun",
        '<td>optimizer steps</td><td class="n">15</td>',
        '<td>images seen</td><td class="n">120</td>',
        "1:02:05 (h:mm:ss)",
        '<td>throughput, median (images / s)</td><td class="n">30.5</td>',
        '<td>throughput per process (images / s)</td><td class="n">15.25</td>',
        '<td>validation loss, last</td><td class="n">0.5</td>',
        "colour_match_untrained",
    ):
        assert fact in training, fact
    data = (out / "data.html").read_text()
    for fact in (
        "10 rows in the URL table; 6 kept",
        '<td>failed_download</td><td>img2dataset could not download or decode it</td><td class="n">2</td>'
        "<td>20.0 %</td>",
        '<td>failed_download</td><td>HTTP Error 404: File not found</td><td class="n">1</td>',
        "<td>prefiltered</td><td>url scheme not allowed: file</td>",
        '<tr><td>part-1</td><td class="n">4</td><td class="n">3</td><td>-</td></tr>',
        '<td>48x80</td><td class="n">2</td>',
        '<td>total</td><td>rows in</td><td class="n">10</td>',
    ):
        assert fact in data, fact
    config = (out / "config.html").read_text()
    assert "run: myrun" in config and "sweep:" in config and "weights: raw" in config


def test_report_without_metrics_or_scores_still_renders(finished_run, tmp_path):
    (finished_run / "train" / "metrics.jsonl").unlink()
    out = tmp_path / "report"
    write_report(make_config(), finished_run / "train", finished_run / "data", None, out)
    assert Image.open(out / "loss.png").format == "PNG"
    assert "Sample scores" not in (out / "training.html").read_text()


def test_cli_report(finished_run, tmp_path, capsys):
    import yaml

    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(make_config()))
    args = ["report", "--config", str(config), "--train", str(finished_run / "train")]
    args += ["--data", str(finished_run / "data"), "--out", str(tmp_path / "r")]
    assert cli_main(args) == 0
    assert capsys.readouterr().out.split() == [str(tmp_path / "r" / name) for name in REPORT_FILES]


def test_sample_grid_names():
    sc = make_config(sample={"sweep": {"guidance": [5, 7.5], "shift": [1], "steps": [8]}})["sample"]
    assert sample_grids(sc) == {
        "grid.png": {},
        "grid_guidance-5.0.png": {"guidance": 5},
        "grid_guidance-7.5.png": {"guidance": 7.5},
        "grid_shift-1.0.png": {"shift": 1},
        "grid_steps-8.png": {"steps": 8},
    }
    assert list(sample_grids(make_config()["sample"])) == ["grid.png"]
