"""Download stage: URL table -> img2dataset webdataset shards (plus its per-shard parquet and stats).

Rows whose URL scheme is not allowed (file://, data:, ...) never reach img2dataset: img2dataset would read
local files or inline data. They are written to `rejected.parquet` with the reason. The output folder is
built under a temporary name and renamed when complete, so a killed download never looks finished.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from urllib.parse import urlsplit

import pandas as pd

from nyaflow import demo_data


def split_by_scheme(
    table: pd.DataFrame, url_col: str, allowed: list[str]
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Return (rows to download, rejected rows with a `reason` column)."""
    schemes = table[url_col].astype(str).map(lambda u: urlsplit(u.strip()).scheme.lower())
    ok = schemes.isin(allowed)
    rejected = table.loc[~ok, ["id"]].copy()
    rejected["reason"] = "url scheme not allowed: " + schemes[~ok].replace("", "<none>")
    return table[ok], rejected


def run_img2dataset(table_path: Path, out: Path, settings: dict, url_col: str, caption_col: str) -> None:
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    from img2dataset import download

    resize = {"resize_mode": "no"}
    if settings["max_side"] > 0:
        resize = {
            "resize_mode": "keep_ratio_largest",
            "resize_only_if_bigger": True,
            "image_size": settings["max_side"],
        }
    download(
        url_list=str(table_path),
        input_format="parquet",
        url_col=url_col,
        caption_col=caption_col,
        save_additional_columns=["id"],
        output_format="webdataset",
        output_folder=str(out),
        processes_count=settings["processes"],
        thread_count=settings["threads"],
        timeout=settings["timeout"],
        retries=settings["retries"],
        number_sample_per_shard=settings["number_sample_per_shard"],
        encode_format=settings["encode_format"],
        # img2dataset reads encode_quality as the zlib level (0-9) for PNG: use a fast lossless level there.
        encode_quality=3 if settings["encode_format"] == "png" else settings["encode_quality"],
        enable_wandb=False,
        compute_hash=None,
        **resize,
    )


def download(config: dict, table_path: Path, out: Path, serve_dir: Path | None = None) -> None:
    """Download every allowed row of the URL table at `table_path` into `out`.

    With `serve_dir`, that folder is served on 127.0.0.1:data.demo.port while img2dataset runs.
    """
    data = config["data"]
    table = pd.read_parquet(table_path)
    for col in ("id", data["url_col"]):
        if col not in table.columns:
            raise ValueError(f"URL table {table_path} has no column '{col}' (columns: {list(table.columns)})")
    if table["id"].duplicated().any():
        raise ValueError(f"URL table {table_path}: column 'id' must be unique")
    wanted, rejected = split_by_scheme(table, data["url_col"], data["allowed_schemes"])

    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    rejected.to_parquet(tmp / "rejected.parquet", index=False)
    wanted.to_parquet(tmp / "input.parquet", index=False)
    server = demo_data.serve(serve_dir, data["demo"]["port"]) if serve_dir else contextlib.nullcontext()
    with server:
        run_img2dataset(
            tmp / "input.parquet", tmp / "shards", data["download"], data["url_col"], data["caption_col"]
        )
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
