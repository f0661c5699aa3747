"""Preprocess stage: downloaded shards -> bucketed training shards + an account of every input row.

Each downloaded image is decoded safely (pixel-count guard before decoding, EXIF orientation applied,
transparency flattened on white, 16-bit and CMYK converted to 8-bit RGB), dropped if too small or too
elongated, assigned an SDXL aspect bucket, resized to cover it and centre-cropped. A training sample holds
the image (`png`/`jpg`/`webp`), the caption (`txt`) and SDXL micro-conditioning (`json`: original_size,
crop_top_left, target_size, all (h, w) pixels).

Outputs in the data folder: `shards/<h>x<w>-<download shard>-NNNNN.tar` (one bucket per shard),
`rows.parquet` (one row per input row: id, url, status, reason, shard) and `manifest.json` (totals,
reasons, buckets, shard list).
Statuses: kept, rejected (before download), failed_download, filtered (decode or size), lost (in no
img2dataset output shard).
"""

from __future__ import annotations

import functools
import io
import json
import multiprocessing
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageOps
from tqdm import tqdm

from nyaflow.buckets import Placement, bucket_name, make_buckets, nearest_bucket, place
from nyaflow.captions import tags_to_caption
from nyaflow.shards import ShardWriter, iter_samples

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
STATUSES = ("kept", "rejected", "failed_download", "filtered", "lost")


class Rejected(Exception):
    """An image that cannot be used; the message is the reason recorded in the manifest."""


def decode_image(data: bytes, max_pixels: int) -> Image.Image:
    """Decode to 8-bit RGB with EXIF orientation applied; raise Rejected with the reason on failure."""
    try:
        img = Image.open(io.BytesIO(data))
        if img.width * img.height > max_pixels:
            raise Rejected(f"more than {max_pixels} pixels")
        img = ImageOps.exif_transpose(img)
        if img.mode in ("I;16", "I;16B", "I;16L", "I"):
            img = Image.fromarray((np.asarray(img, dtype=np.uint32) >> 8).astype(np.uint8))
        if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
            rgba = img.convert("RGBA")
            img = Image.new("RGB", rgba.size, (255, 255, 255))
            img.paste(rgba, mask=rgba.getchannel("A"))
        return img.convert("RGB")
    except Rejected:
        raise
    except Exception as e:  # PIL raises many types for broken files
        raise Rejected(f"undecodable image: {type(e).__name__}") from e


def fit(img: Image.Image, placement: Placement) -> Image.Image:
    """Resize to `placement.resized` (Lanczos) and crop to the bucket."""
    (rh, rw), (top, left), (bh, bw) = placement.resized, placement.crop_top_left, placement.target
    if img.size != (rw, rh):
        img = img.resize((rw, rh), Image.Resampling.LANCZOS)
    return img.crop((left, top, left + bw, top + bh))


def encode(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    if fmt == "png":
        img.save(buf, format="PNG", compress_level=3)
    else:
        img.save(buf, format={"jpg": "JPEG", "webp": "WEBP"}[fmt], quality=95)
    return buf.getvalue()


def make_sample(
    data: bytes, caption: str, settings: dict, buckets
) -> tuple[tuple[int, int], dict[str, bytes]]:
    """Turn downloaded bytes into a training sample; returns (bucket, {ext: bytes}) or raises Rejected."""
    img = decode_image(data, settings["max_pixels"])
    w, h = img.size
    if min(h, w) < settings["min_side"]:
        raise Rejected(f"shorter side below {settings['min_side']} px")
    if max(h, w) / min(h, w) > settings["max_aspect"]:
        raise Rejected(f"aspect ratio beyond {settings['max_aspect']}")
    bucket = nearest_bucket(h, w, buckets)
    placement = place(h, w, bucket)
    if placement.scale > 1 and not settings["upscale"]:
        raise Rejected("smaller than its bucket (upscaling disabled)")
    meta = {
        "original_size": [h, w],
        "crop_top_left": list(placement.crop_top_left),
        "target_size": list(bucket),
    }
    fmt = settings["image_format"]
    sample = {
        fmt: encode(fit(img, placement), fmt),
        "txt": caption.encode(),
        "json": json.dumps(meta).encode(),
    }
    return bucket, sample


def process_download_shard(tar: Path, out: Path, settings: dict) -> tuple[list[tuple], list[dict]]:
    """Turn one downloaded tar into training shards `<bucket>-<tar stem>-NNNNN.tar` in `out`.

    Returns (outcomes, shards): outcomes are (id, status, reason, shard) for every sample of the tar.
    """
    buckets = make_buckets(settings["resolution"], settings["bucket_step"], settings["max_aspect"])
    writers: dict[tuple[int, int], ShardWriter] = {}
    outcomes = []
    for _, raw in iter_samples(tar):
        row_id = json.loads(raw["json"])["id"]
        image = next((raw[e] for e in IMAGE_EXTS if e in raw), None)
        try:
            if image is None:
                raise Rejected("no image in downloaded sample")
            caption = tags_to_caption(raw.get("txt", b"").decode("utf-8", errors="replace"))
            bucket, sample = make_sample(image, caption, settings, buckets)
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


def preprocess(config: dict, table_path: Path, download_dir: Path, out: Path, processes: int = 1) -> dict:
    """Build training shards and the manifest in `out` from the download folder; returns the manifest.

    Downloaded tars are processed in parallel by `processes` worker processes.
    """
    settings = config["data"]["preprocess"]
    table = pd.read_parquet(table_path)
    outcomes = [pd.read_parquet(download_dir / "rejected.parquet").assign(status="rejected", shard="")]
    tars = []
    for parquet in sorted((download_dir / "shards").glob("*.parquet")):
        status = pd.read_parquet(parquet, columns=["id", "status", "error_message"])
        failed = status[status["status"] != "success"]
        reason = failed["error_message"].fillna("unknown").astype(str)
        outcomes.append(
            pd.DataFrame({"id": failed["id"], "status": "failed_download", "reason": reason, "shard": ""})
        )
        if parquet.with_suffix(".tar").exists():
            tars.append(parquet.with_suffix(".tar"))

    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "shards").mkdir(parents=True)
    work = functools.partial(process_download_shard, out=tmp / "shards", settings=settings)
    shards = []
    with multiprocessing.get_context("spawn").Pool(processes) as pool:
        results = pool.imap(work, tars)
        for done, shard_list in tqdm(results, total=len(tars), desc="preprocess", unit="shard", disable=None):
            outcomes.append(pd.DataFrame(done, columns=["id", "status", "reason", "shard"]))
            shards += shard_list

    fates = pd.concat(outcomes, ignore_index=True)
    duplicated = fates["id"].duplicated()
    if duplicated.any():
        raise ValueError(
            f"rows {fates.loc[duplicated, 'id'].tolist()[:5]} appear twice in the download output"
        )
    rows = pd.DataFrame({"id": table["id"], "url": table[config["data"]["url_col"]].astype(str)})
    rows = rows.merge(fates, on="id", how="left")
    lost = rows["status"].isna()
    rows.loc[lost, ["status", "reason", "shard"]] = ("lost", "in no img2dataset output shard", "")
    rows.to_parquet(tmp / "rows.parquet", index=False)

    shards.sort(key=lambda s: s["path"])
    buckets = Counter()
    for s in shards:
        buckets[bucket_name(tuple(s["bucket"]))] += s["count"]
    counts = Counter(rows["status"])
    manifest = {
        "rows_in": len(rows),
        "counts": {s: counts.get(s, 0) for s in STATUSES},
        "reasons": {
            s: dict(Counter(rows.loc[rows["status"] == s, "reason"]).most_common()) for s in STATUSES[1:]
        },
        "buckets": dict(sorted(buckets.items())),
        "shards": shards,
        "rows_file": "rows.parquet",
    }
    assert sum(manifest["counts"].values()) == manifest["rows_in"]
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return manifest
