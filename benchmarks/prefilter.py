"""Prefilter throughput on a synthetic danbooru-shaped URL table (1M rows by default).

    .venv/bin/python benchmarks/prefilter.py [--rows 1000000] [--format parquet|csv|jsonl] [--parts 32]

Builds the table once (cached under --workdir), then times `nyaflow.prefilter.prefilter` as the workflow
runs it: read the table, every check (URL scheme and host, relative URLs, rating, score, size, aspect,
banned tags, URL and md5 dedupe), and writing the parts and the dropped rows. Prints the figure.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from nyaflow import config as nyaflow_config  # noqa: E402
from nyaflow.prefilter import prefilter  # noqa: E402


def synthetic_table(rows: int, seed: int = 0) -> pa.Table:
    """Danbooru API field names and value shapes: ~25 general tags per post from a 20k-tag vocabulary,
    md5 in the file_url, a few relative URLs, duplicates, bad schemes, old and new ratings."""
    rng = np.random.default_rng(seed)
    vocab = np.array(
        [f"tag_{i}_{'x' * (i % 9)}" for i in range(20000)] + ["comic", "monochrome", "1girl", ":d"]
    )
    pool = 50000  # distinct tag strings, sampled per row (building 1M unique ones would dominate the setup)
    lengths = rng.integers(10, 40, pool)
    general = np.array([" ".join(rng.choice(vocab, n, replace=False)) for n in lengths])
    characters = np.array([""] + [f"character_{i}_(series_{i % 50})" for i in range(3000)])
    md5 = np.frombuffer(rng.bytes(16 * rows), dtype="S16")
    md5 = np.array([m.hex() for m in md5])
    dup = rng.random(rows) < 0.01  # 1% re-uploads with the same md5 under another URL
    md5[dup] = md5[rng.integers(0, rows, dup.sum())]
    ext = rng.choice(["jpg", "png", "gif", "webp"], rows, p=[0.7, 0.2, 0.05, 0.05])
    url = np.char.add(np.char.add("https://cdn.donmai.us/original/", md5), np.char.add(".", ext))
    relative = rng.random(rows) < 0.05
    url[relative] = np.char.add("/data/", md5[relative])
    url[rng.random(rows) < 0.001] = "file:///etc/passwd"
    same_url = rng.random(rows) < 0.005
    url[same_url] = url[rng.integers(0, rows, same_url.sum())]
    width = rng.integers(300, 5000, rows)
    height = (width * rng.uniform(0.3, 2.5, rows)).astype(np.int64)
    years = rng.integers(2005, 2025, rows)
    created = np.char.add(years.astype(str), "-06-15T12:34:56.789-04:00")
    return pa.table(
        {
            "id": pa.array(rng.permutation(rows * 5)[:rows] + 1, pa.int64()),
            "created_at": created,
            "score": pa.array(rng.poisson(8, rows) - 2, pa.int64()),
            "rating": rng.choice(["g", "s", "q", "e"], rows, p=[0.4, 0.35, 0.15, 0.1]),
            "md5": md5,
            "image_width": width,
            "image_height": height,
            "file_url": url,
            "tag_string_general": general[rng.integers(0, pool, rows)],
            "tag_string_character": characters[rng.integers(0, len(characters), rows)],
            "tag_string_copyright": rng.choice(["original", "touhou", "fate/grand_order", "hololive"], rows),
            "tag_string_artist": np.char.add("artist_", rng.integers(0, 50000, rows).astype(str)),
            "tag_string_meta": rng.choice(
                ["", "highres", "absurdres commentary_request", "translated"], rows
            ),
        }
    )


def write(table: pa.Table, path: Path, fmt: str) -> None:
    if fmt == "parquet":
        pq.write_table(table, path)
    elif fmt == "csv":
        pa_csv.write_csv(table, path)
    else:
        with open(path, "w") as f:
            for batch in table.to_batches(100_000):
                f.writelines(json.dumps(r) + "\n" for r in batch.to_pylist())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--format", choices=["parquet", "csv", "jsonl"], default="parquet")
    p.add_argument("--parts", type=int, default=32)
    p.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "nyaflow-bench-prefilter")
    args = p.parse_args()

    args.workdir.mkdir(parents=True, exist_ok=True)
    table_path = args.workdir / f"danbooru-{args.rows}.{args.format}"
    if not table_path.exists():
        start = time.perf_counter()
        write(synthetic_table(args.rows), table_path, args.format)
        print(f"built {table_path} in {time.perf_counter() - start:.1f} s", flush=True)
    cfg = nyaflow_config.validate(
        {
            "run": "bench",
            "data": {
                "base_url": "https://danbooru.donmai.us",
                "download": {"parts": args.parts},
                "prefilter": {
                    "ratings": ["g", "s"],
                    "min_score": 0,
                    "min_side": 512,
                    "min_aspect": 0.4,
                    "max_aspect": 2.5,
                    "ban_tags": ["comic", "monochrome"],
                },
            },
        }
    )
    start, cpu = time.perf_counter(), time.process_time()
    summary = prefilter(cfg, table_path, args.workdir / "out")
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    print(json.dumps({k: summary[k] for k in ("rows_in", "kept", "dropped", "seconds")}, indent=2))
    print(
        f"prefilter: {summary['rows_in']:,} rows ({args.format}, {table_path.stat().st_size / 2**20:.0f} MiB)"
        f" in {seconds:.2f} s = {summary['rows_in'] / seconds / 1e6:.2f} M rows/s"
        f" ({os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}; reading the table"
        f" {summary['seconds']['read']:.2f} s; CPU time {cpu:.1f} s)"
    )


if __name__ == "__main__":
    main()
