"""The run report: plots and tables of one run, for `snakemake --report report.html`.

`nyaflow report` reads what the stages wrote and writes, under results/<run>/report/:

- loss.png        training loss (metrics.jsonl) and validation loss (summary.json) against the step;
- throughput.png  training images per second against the step;
- training.html   the training summary: steps, images seen, batch, time, throughput, validation losses,
                  and the demo's sample scores;
- data.html       the data accounting from the manifest: rows in, rows kept, and every other row's fate
                  with its reason; samples per aspect bucket;
- config.html     the run's validated config, every default filled.

The report rule marks these (and the sample rule its grids) with Snakemake's `report()`, so that
`snakemake --report` puts them, with the captions in workflow/report/, into one file.

This module also names the sample grid files (`sample_grids`), for the sample stage and the workflow; it
imports nothing heavy at the top so that the Snakefile can use it.
"""

from __future__ import annotations

import html
import json
import math
import statistics
from pathlib import Path

REPORT_FILES = ("loss.png", "throughput.png", "training.html", "data.html", "config.html")
SWEEP_KEYS = ("guidance", "shift", "steps")


def sample_grids(sc: dict) -> dict[str, dict]:
    """The sample grids, as {file name in the samples folder: settings that differ from `sample`}:
    `grid.png` (the `sample` settings) first, then `grid_<key>-<value>.png` for every value of
    `sample.sweep.<key>`, e.g. grid_guidance-5.0.png, grid_shift-1.0.png, grid_steps-8.png."""
    grids: dict[str, dict] = {"grid.png": {}}
    for key in SWEEP_KEYS:
        for value in sc["sweep"][key]:
            text = str(int(value)) if key == "steps" else str(float(value))
            grids[f"grid_{key}-{text}.png"] = {key: value}
    return grids


# --- reading the stages' outputs -------------------------------------------------------------------------


def _number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _key(name: str) -> str:
    """The trainer logs TensorBoard tags ("train/loss", "val/loss"); the report reads plain names."""
    return "val_loss" if name == "val/loss" else name.removeprefix("train/")


def read_metrics(path: Path) -> list[dict]:
    """metrics.jsonl as one dict per step (the records of a step merged), sorted by step, with plain keys:
    loss, images_per_s, lr, val_loss, ... A resumed run logs again the steps after its checkpoint: the later
    record wins. Missing file -> []."""
    path = Path(path)
    if not path.is_file():
        return []
    by_step: dict[int, dict] = {}
    for line in path.read_text().splitlines():
        if line.strip():
            record = {_key(k): v for k, v in json.loads(line).items()}
            by_step.setdefault(int(record["step"]), {}).update(record)
    return [by_step[s] for s in sorted(by_step)]


def throughput(metrics: list[dict]) -> dict:
    """Images per second over the logged intervals: median (the steady rate), last, and all of them. The
    first interval holds start-up costs, so the median leaves it out when there are others."""
    rates = [m["images_per_s"] for m in metrics if _number(m.get("images_per_s"))]
    steady = rates[1:] or rates
    return {
        "median": statistics.median(steady) if steady else None,
        "last": rates[-1] if rates else None,
        "intervals": len(rates),
    }


# --- plots -----------------------------------------------------------------------------------------------


def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.grid(True, alpha=0.3)
    return plt, fig, ax


def _save(plt, fig, path: Path) -> None:
    fig.tight_layout()
    tmp = path.with_name(f"{path.stem}.partial{path.suffix}")
    fig.savefig(tmp, format="png")
    plt.close(fig)
    tmp.replace(path)


def plot_loss(metrics: list[dict], summary: dict, path: Path, title: str = "") -> None:
    plt, fig, ax = _figure()
    train = [(m["step"], m["loss"]) for m in metrics if _number(m.get("loss"))]
    if not train:  # the loss history the trainer keeps in its checkpoints and summary
        train = [(s, v) for s, v in summary.get("loss", []) if _number(v)]
    val = [(s, v) for s, v in summary.get("val_loss", []) if _number(v)]
    if train:
        ax.plot(*zip(*train, strict=True), label="training loss (mean over the logging interval)", lw=1.2)
    if val:
        ax.plot(*zip(*val, strict=True), "o-", label="validation loss (held-out samples)", color="C3")
    if not train and not val:
        ax.text(0.5, 0.5, "no loss logged", ha="center", va="center", transform=ax.transAxes)
    values = [v for _, v in train + val]
    if values and min(values) > 0 and max(values) / min(values) > 20:
        ax.set_yscale("log")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("flow-matching loss (MSE of v = eps - x0)")
    ax.set_title(title or "loss")
    if train or val:
        ax.legend()
    _save(plt, fig, path)


def plot_throughput(metrics: list[dict], path: Path, title: str = "") -> None:
    plt, fig, ax = _figure()
    rates = [(m["step"], m["images_per_s"]) for m in metrics if _number(m.get("images_per_s"))]
    if rates:
        ax.plot(*zip(*rates, strict=True), ".-", label="images / s (all processes)", lw=1)
        median = throughput(metrics)["median"]
        ax.axhline(median, color="C1", ls="--", label=f"median {median:.3g} images / s")
        ax.set_ylim(bottom=0)
        ax.legend()
    else:
        ax.text(0.5, 0.5, "no throughput logged", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training images per second")
    ax.set_title(title or "throughput")
    _save(plt, fig, path)


# --- tables ----------------------------------------------------------------------------------------------

_STYLE = """<style>
body { font-family: sans-serif; font-size: 14px; margin: 1em; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em 0; }
th, td { border: 1px solid #bbb; padding: 3px 10px; text-align: left; }
td.n { text-align: right; font-variant-numeric: tabular-nums; }
th { background: #eee; }
pre { background: #f6f6f6; padding: 1em; }
</style>"""


def html_page(title: str, body: list[str]) -> str:
    return "\n".join(
        [
            "<!DOCTYPE html>",
            f'<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>{_STYLE}</head><body>',
            f"<h2>{html.escape(title)}</h2>",
            *body,
            "</body></html>",
            "",
        ]
    )


def _cell(value) -> str:
    if isinstance(value, bool) or value is None:
        return f"<td>{html.escape(str(value if value is not None else '-'))}</td>"
    if isinstance(value, int):
        return f'<td class="n">{value:,}</td>'
    if isinstance(value, float):
        return f'<td class="n">{value:.4g}</td>'
    return f"<td>{html.escape(str(value))}</td>"


def html_table(header: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(_cell(v) for v in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _duration(seconds) -> str:
    if not isinstance(seconds, int | float) or not math.isfinite(seconds):
        return "-"
    s = round(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d} (h:mm:ss)"


def training_html(summary: dict, metrics: list[dict], scores: dict | None, run: str) -> str:
    rate = throughput(metrics)
    world = summary.get("world_size") or 1
    per_process = rate["median"] / world if rate["median"] is not None else None
    rows = [
        ["optimizer steps", summary.get("steps")],
        ["images seen", summary.get("images_seen")],
        ["global batch", summary.get("global_batch")],
        ["processes (GPUs, or CPU ranks)", summary.get("world_size")],
        ["latest checkpoint", summary.get("checkpoint", summary.get("latest"))],
        ["wall time of the last training job", _duration(summary.get("seconds_this_session"))],
        ["throughput, median (images / s)", rate["median"]],
        ["throughput per process (images / s)", per_process],
        ["throughput, last interval (images / s)", rate["last"]],
        ["validation loss, first", summary.get("val_loss_first")],
        ["validation loss, last", summary.get("val_loss_last")],
    ]
    losses = [m["loss"] for m in metrics if _number(m.get("loss"))]
    if losses:
        rows.append(["training loss, last logged", losses[-1]])
    if "nonfinite_skipped" in summary:
        rows.append(["micro-steps skipped for a non-finite loss", summary["nonfinite_skipped"]])
    body = ["<h3>Summary</h3>", html_table(["", "value"], rows)]
    val = summary.get("val_loss", [])
    if val:
        body += ["<h3>Validation loss</h3>", html_table(["step", "validation loss"], [list(v) for v in val])]
    if scores:
        body += [
            "<h3>Sample scores</h3>",
            "<p>Demo only: the share of pixels that show the background colour the prompt names, for the "
            "trained model and for the untrained base model (same prompts and seeds).</p>",
            html_table(["score", "value"], [[k, v] for k, v in scores.items()]),
        ]
    return html_page(f"Training of run {run}", body)


FATES = {
    "kept": "a training sample",
    "prefiltered": "dropped from the URL table before download (URL scheme, rating, size, duplicates, ...)",
    "rejected": "refused before download (URL scheme)",
    "failed_download": "img2dataset could not download or decode it",
    "filtered": "dropped in preprocessing (too small, too elongated, undecodable, ...)",
    "lost": "in no download shard",
}


def data_html(manifest: dict, run: str) -> str:
    rows_in = manifest.get("rows_in", 0)
    counts = manifest.get("counts", {})

    def share(n: int) -> str:
        return f"{100 * n / rows_in:.1f} %" if rows_in else "-"

    body = [
        f"<p>{rows_in:,} rows in the URL table; {counts.get('kept', 0):,} kept as training samples. Every "
        "row is accounted for, with the reason when it was not kept; data/rows.parquet has one line per "
        "row.</p>",
        "<h3>Rows by fate</h3>",
        html_table(
            ["fate", "meaning", "rows", "share"],
            [[k, FATES.get(k, ""), v, share(v)] for k, v in counts.items()]
            + [["total", "rows in", sum(counts.values()), share(sum(counts.values()))]],
        ),
        "<h3>Why rows were not kept</h3>",
    ]
    reasons = [
        [status, reason, n]
        for status, by_reason in manifest.get("reasons", {}).items()
        for reason, n in by_reason.items()
    ]
    body.append(html_table(["fate", "reason", "rows"], reasons) if reasons else "<p>Every row was kept.</p>")
    parts = manifest.get("parts", {})
    if parts:
        columns = list(dict.fromkeys(k for fates in parts.values() for k in fates))
        body += [
            "<h3>Download parts</h3>",
            html_table(
                ["part", *columns], [[name, *(f.get(c) for c in columns)] for name, f in parts.items()]
            ),
        ]
    buckets = manifest.get("buckets", {})
    if buckets:
        body += [
            "<h3>Training samples per aspect bucket</h3>",
            html_table(["bucket (h x w px)", "samples"], [[b, n] for b, n in buckets.items()]),
        ]
    body.append(f"<p>{len(manifest.get('shards', [])):,} training shards.</p>")
    return html_page(f"Data accounting of run {run}", body)


def config_html(config: dict) -> str:
    import yaml

    text = yaml.safe_dump(config, sort_keys=False)
    return html_page(
        f"Config of run {config.get('run', '')}",
        [
            "<p>The validated config with every default filled (results/&lt;run&gt;/config.yaml), as the "
            "stages read it. config/README.md describes every key.</p>",
            f"<pre>{html.escape(text)}</pre>",
        ],
    )


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(f"{path.stem}.partial{path.suffix}")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def write_report(
    config: dict, train_dir: Path, data_dir: Path, samples_dir: Path | None, out_dir: Path
) -> list[Path]:
    """Write REPORT_FILES into out_dir from the train, data and samples folders; returns their paths."""
    train_dir, data_dir, out_dir = Path(train_dir), Path(data_dir), Path(out_dir)
    run = config["run"]
    summary = json.loads((train_dir / "summary.json").read_text())
    metrics = read_metrics(train_dir / "metrics.jsonl")
    manifest = json.loads((data_dir / "manifest.json").read_text())
    scores_file = Path(samples_dir) / "scores.json" if samples_dir is not None else None
    scores = json.loads(scores_file.read_text()) if scores_file and scores_file.is_file() else None
    out_dir.mkdir(parents=True, exist_ok=True)
    plot_loss(metrics, summary, out_dir / "loss.png", f"loss of run {run}")
    plot_throughput(metrics, out_dir / "throughput.png", f"training throughput of run {run}")
    _write(out_dir / "training.html", training_html(summary, metrics, scores, run))
    _write(out_dir / "data.html", data_html(manifest, run))
    _write(out_dir / "config.html", config_html(config))
    return [out_dir / name for name in REPORT_FILES]
