"""Preprocess stage: downloaded parts -> bucketed training shards + an account of every input row.

`preprocess_part` (one Snakemake job per part) turns one download part into training shards. Each image
is decoded safely: the pixel count is read from the header and checked before decoding (decompression
bombs), JPEGs are decoded at a reduced scale when the bucket is much smaller (DCT scaling, never below the
resized size), EXIF orientation is applied, transparency (alpha, palette) is flattened on white, 16-bit
images are scaled to 8 bits and CMYK is converted to RGB. Images that are too small or too elongated are
dropped; the others go to the nearest SDXL aspect bucket, are resized (area averaging by default) to
cover it and centre cropped. A training sample holds the image (`png`/`jpg`/`webp`), the caption (`txt`,
built from the row's tags, see nyaflow.captions) and SDXL micro-conditioning (`json`: original_size,
crop_top_left, target_size, all (h, w) pixels). Download shards are processed in parallel worker
processes; each training shard holds one bucket, so that a batch drawn from one shard's bucket is
bucket-homogeneous.

`write_manifest` (one job) merges the prefilter's dropped rows and every part's rows into
`manifest.json` (totals, reasons, buckets, the shard list) and `rows.parquet` (one row per input row: row,
id, url, status, reason, shard), checking that every input row is there exactly once.

Statuses: kept, prefiltered (before download), failed_download, filtered (decode, size or aspect;
img2dataset's own resize failures too), lost (in no complete img2dataset shard).
Layout of the data folder: `manifest.json`, `rows.parquet`, `parts/<part>.parquet`,
`shards/<part>/<h>x<w>-<download shard>-NNNNN.tar` (paths in the manifest are relative to `shards/`).
"""

from __future__ import annotations

import functools
import io
import json
import multiprocessing
import os
import shutil
import sys
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageOps
from tqdm import tqdm

from nyaflow.buckets import bucket_name, make_buckets, nearest_bucket, place
from nyaflow.captions import build_captions
from nyaflow.errors import UserError
from nyaflow.prefilter import part_names, read_part
from nyaflow.shards import ShardWriter, TarIndex

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
STATUSES = ("kept", "prefiltered", "failed_download", "filtered", "lost")
ROW_COLUMNS = ["row", "id", "url", "status", "reason", "shard"]
SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N", "I")
SWAPS_SIDES = (5, 6, 7, 8)  # EXIF orientations that rotate by 90 degrees
FILTERS = {  # downscaling; upscaling (up to data.preprocess.max_upscale) is always Lanczos
    "lanczos": Image.Resampling.LANCZOS,
    "bicubic": Image.Resampling.BICUBIC,
    "area": Image.Resampling.BOX,  # pixel-area averaging, like OpenCV's INTER_AREA
}


class Rejected(Exception):
    """An image that cannot be used; the message is the reason recorded in the manifest."""


class DownloadIncomplete(UserError):
    """A download folder without its completeness check: it must not be read."""


def open_image(data: bytes, max_pixels: int) -> tuple[Image.Image, tuple[int, int], int]:
    """Open lazily (header only): (image, (height, width) after EXIF orientation, orientation)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise Rejected(f"more than {max_pixels} pixels") from e
    except Exception as e:  # PIL raises many types for files it cannot read
        raise Rejected(f"undecodable image: {type(e).__name__}") from e
    if img.width * img.height > max_pixels:
        raise Rejected(f"more than {max_pixels} pixels")
    try:
        orientation = int(img.getexif().get(0x0112, 1) or 1)
    except Exception:  # noqa: BLE001 - a broken EXIF block is ignored, not fatal
        orientation = 1
    h, w = img.height, img.width
    return img, ((w, h) if orientation in SWAPS_SIDES else (h, w)), orientation


def to_rgb(img: Image.Image) -> Image.Image:
    """Decode to 8-bit RGB: EXIF orientation applied, 16-bit scaled down, transparency flattened on white."""
    img.load()
    img = ImageOps.exif_transpose(img)
    if img.mode in SIXTEEN_BIT:
        img = Image.fromarray(np.clip(np.asarray(img, dtype=np.int64) >> 8, 0, 255).astype(np.uint8))
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        img = Image.new("RGB", rgba.size, (255, 255, 255))
        img.paste(rgba, mask=rgba.getchannel("A"))
    return img.convert("RGB")


def decode_image(data: bytes, max_pixels: int) -> Image.Image:
    """Decode to 8-bit RGB with EXIF orientation applied; raise Rejected with the reason on failure."""
    img, _, _ = open_image(data, max_pixels)
    try:
        return to_rgb(img)
    except Exception as e:  # noqa: BLE001 - truncated or corrupt data
        raise Rejected(f"undecodable image: {type(e).__name__}") from e


def encode(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    if fmt == "png":
        img.save(buf, format="PNG", compress_level=3)
    else:
        img.save(buf, format={"jpg": "JPEG", "webp": "WEBP"}[fmt], quality=95)
    return buf.getvalue()


def download_scale(meta: dict) -> tuple[float, float]:
    """(height, width) factors by which img2dataset resized the image (original / stored; 1 when it stored
    the original bytes), from the metadata it writes beside each sample. Per side: its center_crop and
    border modes change the aspect ratio."""

    def ratio(stored, original) -> float:
        ok = isinstance(stored, int) and isinstance(original, int) and stored > 0 and original > 0
        return original / stored if ok else 1.0

    return (
        ratio(meta.get("height"), meta.get("original_height")),
        ratio(meta.get("width"), meta.get("original_width")),
    )


def make_sample(
    data: bytes, caption: str, settings: dict, buckets, source_scale: tuple[float, float] = (1.0, 1.0)
) -> tuple[tuple[int, int], dict[str, bytes]]:
    """Turn downloaded bytes into a training sample; returns (bucket, {ext: bytes}) or raises Rejected.

    SDXL's `original_size` is the size of the image before any resizing: the decoded size times
    `source_scale` ((h, w) factors, `download_scale`: img2dataset may have resized it while downloading).
    The crop is in the resized image, the target is the bucket (pixels, (h, w))."""
    img, (h, w), orientation = open_image(data, settings["max_pixels"])
    if min(h, w) < settings["min_side"]:
        raise Rejected(f"shorter side below {settings['min_side']} px")
    if max(h, w) / min(h, w) > settings["max_aspect"]:
        raise Rejected(f"aspect ratio beyond {settings['max_aspect']}")
    bucket = nearest_bucket(h, w, buckets)
    placement = place(h, w, bucket)
    if placement.scale > settings["max_upscale"]:
        raise Rejected(
            f"smaller than its bucket (needs {placement.scale:.2f}x, data.preprocess.max_upscale is"
            f" {settings['max_upscale']:g})"
        )
    (rh, rw), (top, left), (bh, bw) = placement.resized, placement.crop_top_left, placement.target
    try:
        if img.format == "JPEG":  # decode at 1/2, 1/4 or 1/8 scale where that still covers the resized size
            img.draft(None, (rh, rw) if orientation in SWAPS_SIDES else (rw, rh))
        img = to_rgb(img)
        if img.size != (rw, rh):
            down = rw * rh < img.width * img.height
            resample = FILTERS[settings["downscale_filter"]] if down else Image.Resampling.LANCZOS
            img = img.resize((rw, rh), resample, reducing_gap=3.0 if down else None)
        img = img.crop((left, top, left + bw, top + bh))
    except Exception as e:  # noqa: BLE001 - truncated or corrupt data shows up while decoding
        raise Rejected(f"undecodable image: {type(e).__name__}") from e
    original = [round(h * source_scale[0]), round(w * source_scale[1])]
    meta = {"original_size": original, "crop_top_left": [top, left], "target_size": [bh, bw]}
    fmt = settings["image_format"]
    sample = {fmt: encode(img, fmt), "txt": caption.encode(), "json": json.dumps(meta).encode()}
    return bucket, sample


def process_download_shard(
    task: tuple[Path, dict], out: Path, settings: dict
) -> tuple[list[tuple], list[dict]]:
    """Turn one downloaded tar into training shards `<bucket>-<tar stem>-NNNNN.tar` in `out`.

    `task` is (tar path, {row id: caption}). Returns (outcomes, shards): outcomes are
    (id, status, reason, shard file name) for every sample of the tar. Samples are taken in key order:
    img2dataset's threads write a tar in the order downloads finish, which differs from run to run, and
    the training shards (hence the training order) must not.
    """
    tar, captions = task
    Image.MAX_IMAGE_PIXELS = settings["max_pixels"]  # PIL's own bomb check, at our limit
    buckets = make_buckets(settings["resolution"], settings["bucket_step"], settings["max_aspect"])
    writers: dict[tuple[int, int], ShardWriter] = {}
    outcomes = []
    index = TarIndex(tar)
    for i in sorted(range(len(index)), key=index.keys.__getitem__):
        raw = index[i]
        downloaded = json.loads(raw["json"])
        row_id = int(downloaded["id"])
        image = next((raw[e] for e in IMAGE_EXTS if e in raw), None)
        try:
            if image is None:
                raise Rejected("no image in downloaded sample")
            scale = download_scale(downloaded)
            bucket, sample = make_sample(image, captions.get(row_id, ""), settings, buckets, scale)
        except Rejected as e:
            outcomes.append((row_id, "filtered", str(e), ""))
            continue
        if bucket not in writers:
            writers[bucket] = ShardWriter(out, f"{bucket_name(bucket)}-{tar.stem}", settings["shard_size"])
        writers[bucket].write(f"{row_id:012d}", sample)
        outcomes.append((row_id, "kept", "", writers[bucket].shards[-1]["path"]))
    shards = []
    for bucket, writer in sorted(writers.items()):
        writer.close()
        shards += [{**s, "bucket": list(bucket)} for s in writer.shards]
    return outcomes, shards


def _progress(iterable, **kwargs):
    """tqdm that also reports into log files (Snakemake logs), less often there."""
    tty = sys.stderr.isatty()
    return tqdm(iterable, file=sys.stderr, disable=False, mininterval=0.5 if tty else 30, **kwargs)


def preprocess_part(
    config: dict, part_path: Path, download_dir: Path, shards_out: Path, rows_out: Path, processes: int = 1
) -> pd.DataFrame:
    """Training shards of one part into `shards_out`, and its rows' fates into `rows_out` (parquet)."""
    settings = config["data"]["preprocess"]
    part_path, download_dir, shards_out, rows_out = map(Path, (part_path, download_dir, shards_out, rows_out))
    if not (download_dir / "check.json").is_file():
        raise DownloadIncomplete(f"{download_dir} has no check.json: the download did not finish; rerun it")
    part = read_part(part_path)
    captions = pd.Series(build_captions(part, config["data"]["captions"]).to_numpy(), index=part["id"])

    fates = [pd.read_parquet(download_dir / "lost.parquet").assign(status="lost", shard="")]
    tasks = []
    for parquet in sorted((download_dir / "img2dataset").glob("*.parquet")):
        status = pd.read_parquet(parquet, columns=["id", "status", "error_message"])
        failed = status[status["status"] != "success"]
        fates.append(
            pd.DataFrame(
                {
                    "id": failed["id"],
                    "status": np.where(failed["status"] == "failed_to_resize", "filtered", "failed_download"),
                    "reason": failed["error_message"].fillna("unknown").astype(str),
                    "shard": "",
                }
            )
        )
        ok = status.loc[status["status"] == "success", "id"]
        tasks.append((parquet.with_suffix(".tar"), captions.reindex(ok).fillna("").to_dict()))

    tmp = shards_out.with_name(shards_out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    work = functools.partial(process_download_shard, out=tmp, settings=settings)
    shards = []
    with multiprocessing.get_context("spawn").Pool(max(1, min(processes, len(tasks)))) as pool:
        results = pool.imap_unordered(work, tasks)
        for done, shard_list in _progress(
            results, total=len(tasks), desc=f"preprocess {part_path.stem}", unit="shard"
        ):
            fates.append(pd.DataFrame(done, columns=["id", "status", "reason", "shard"]))
            shards += shard_list
    buckets = {s["path"]: bucket_name(tuple(s["bucket"])) for s in shards}

    fates = pd.concat(fates, ignore_index=True)
    twice = fates["id"].duplicated()
    if twice.any():
        raise ValueError(
            f"rows {fates.loc[twice, 'id'].tolist()[:5]} appear twice in the download of {part_path}"
        )
    unknown = ~fates["id"].isin(part["id"])
    if unknown.any():
        raise ValueError(
            f"rows {fates.loc[unknown, 'id'].tolist()[:5]} of the download are not in {part_path}"
        )
    rows = part[["row", "id", "url"]].merge(fates, on="id", how="left")
    missing = rows["status"].isna()  # a complete download accounts for every row; this is a last guard
    rows.loc[missing, ["status", "reason", "shard"]] = ("lost", "in no img2dataset output shard", "")
    rows["bucket"] = rows["shard"].map(buckets).fillna("")
    kept = rows["status"] == "kept"
    rows.loc[kept, "shard"] = shards_out.name + "/" + rows.loc[kept, "shard"]
    rows = rows.astype({"reason": str, "shard": str})

    shutil.rmtree(shards_out, ignore_errors=True)
    tmp.rename(shards_out)
    rows_out.parent.mkdir(parents=True, exist_ok=True)
    rows.to_parquet(rows_out.with_name(rows_out.name + ".partial"), index=False)
    os.replace(rows_out.with_name(rows_out.name + ".partial"), rows_out)
    return rows


def write_manifest(config: dict, prefilter_dir: Path, part_rows: list[Path], out: Path) -> dict:
    """Merge the prefilter's dropped rows and every part's rows into `out`/rows.parquet and
    `out`/manifest.json; every input row must be there exactly once."""
    prefilter_dir, out = Path(prefilter_dir), Path(out)
    summary = json.loads((prefilter_dir / "summary.json").read_text())
    dropped = pd.read_parquet(prefilter_dir / "dropped.parquet").assign(
        status="prefiltered", shard="", bucket=""
    )
    parts = {Path(p).stem: pd.read_parquet(p) for p in part_rows}
    rows = pd.concat([dropped, *parts.values()], ignore_index=True).sort_values("row", kind="stable")
    twice = rows["id"].duplicated()
    if twice.any():
        raise ValueError(f"rows {rows.loc[twice, 'id'].tolist()[:5]} are accounted for twice")
    if len(rows) != summary["rows_in"] or not rows["row"].equals(
        pd.Series(range(len(rows)), index=rows.index)
    ):
        raise ValueError(
            f"{len(rows)} rows accounted for, the URL table has {summary['rows_in']}: a part is missing"
        )

    kept = rows[rows["status"] == "kept"]
    shards = [
        {"path": path, "count": len(group), "bucket": [int(x) for x in group["bucket"].iloc[0].split("x")]}
        for path, group in kept.groupby("shard", sort=True)
    ]
    counts = Counter(rows["status"])
    manifest = {
        "rows_in": len(rows),
        "counts": {s: counts.get(s, 0) for s in STATUSES},
        "reasons": {
            s: dict(Counter(rows.loc[rows["status"] == s, "reason"]).most_common()) for s in STATUSES[1:]
        },
        "buckets": dict(sorted(Counter(kept["bucket"]).items())),
        "parts": {
            name: {
                "rows": len(r),
                **{s: int((r["status"] == s).sum()) for s in STATUSES if s != "prefiltered"},
            }
            for name, r in parts.items()
        },
        "shards": shards,
        "rows_file": "rows.parquet",
    }
    assert sum(manifest["counts"].values()) == manifest["rows_in"]
    out.mkdir(parents=True, exist_ok=True)
    rows[ROW_COLUMNS].to_parquet(out / "rows.parquet.partial", index=False)
    os.replace(out / "rows.parquet.partial", out / "rows.parquet")
    (out / "manifest.json.partial").write_text(json.dumps(manifest, indent=2))
    os.replace(out / "manifest.json.partial", out / "manifest.json")
    return manifest


def preprocess(config: dict, table_path: Path, download_dir: Path, out: Path, processes: int = 1) -> dict:
    """Preprocess every part that `nyaflow.download.download` wrote into `download_dir` (prefilter/ and
    part-NNNNN/) and write the data folder `out`; returns the manifest. (The workflow runs the parts as
    separate jobs and the manifest as one more.)"""
    download_dir, out = Path(download_dir), Path(out)
    rows = []
    for name in part_names(config["data"]["download"]["parts"]):
        rows.append(out / "parts" / f"{name}.parquet")
        preprocess_part(
            config,
            download_dir / "prefilter" / f"{name}.parquet",
            download_dir / name,
            out / "shards" / name,
            rows[-1],
            processes=processes,
        )
    return write_manifest(config, download_dir / "prefilter", rows, out)
