"""Preprocessing throughput (images/s per core) beside img2dataset's own resize on the same images, and the
training loader beside a bare tar read + decode loop on the same shard.

    .venv/bin/python benchmarks/data.py [--images 32] [--resolution 1024]

Makes danbooru-like images (JPEG and PNG, 1100-4000 px, aspect 0.5-2), then, in this one process (one core):
- nyaflow's preprocess (`nyaflow.preprocess.make_sample`: header check, EXIF, JPEG draft decoding, SDXL
  bucket, resize (area, the default, or Lanczos), centre crop, encode, caption and micro-conditioning)
  with jpg and png output;
- img2dataset's Resizer (OpenCV decode, INTER_AREA resize, encode) in center_crop mode at the same
  resolution, jpg output, and in keep_ratio mode.
Prints images/s per core for each and the ratio of nyaflow's to img2dataset's (same output format).

Then it writes those images, preprocessed, as one training shard (PNG, as the preprocess stage writes by
default) and reads it, in this process, with:
- nyaflow's training loader (`nyaflow.loader.micro_batches`, no workers: the loader's own cost): index
  lookup, read, PNG decode, [-1, 1] tensors, collated micro batches of 4;
- a bare loop: `tarfile` over the shard in order, PIL decode of each image, the same tensor conversion.
Prints images/s of both (the best of 3 alternating rounds) and their ratio.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
from img2dataset.resizer import Resizer  # noqa: E402

from nyaflow import config as nyaflow_config  # noqa: E402
from nyaflow.buckets import make_buckets  # noqa: E402
from nyaflow.preprocess import make_sample  # noqa: E402


def make_images(count: int, seed: int = 0) -> list[bytes]:
    """Smooth colour fields with fine noise (realistic decode cost); two thirds JPEG q90, a third PNG."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        short = int(rng.integers(1100, 2000))  # every image covers its 1024^2 bucket: nothing is upscaled
        aspect = float(np.exp(rng.uniform(np.log(0.5), np.log(2.0))))
        w, h = (int(short * aspect), short) if aspect >= 1 else (short, int(short / aspect))
        base = Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).resize(
            (w, h), Image.BICUBIC
        )
        noise = rng.integers(-12, 13, (h, w, 1), dtype=np.int16)
        img = Image.fromarray(np.clip(np.asarray(base, dtype=np.int16) + noise, 0, 255).astype(np.uint8))
        buf = io.BytesIO()
        if i % 3 == 2:  # a third PNG, as in danbooru
            img.save(buf, format="PNG", compress_level=1)  # fast to make; decoding costs about the same
        else:
            img.save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def rates(methods: dict, images: list[bytes]) -> dict[str, float]:
    """Images/s of each method. The methods take turns on every image, so that a change in the machine's
    load while the benchmark runs affects them all alike."""
    seconds = dict.fromkeys(methods, 0.0)
    for fn in methods.values():
        fn(images[0])  # warm up
    for data in images:
        for name, fn in methods.items():
            start = time.perf_counter()
            fn(data)
            seconds[name] += time.perf_counter() - start
    return {name: len(images) / s for name, s in seconds.items()}


def loader_rates(samples: list[tuple], rounds: int = 3) -> dict[str, float]:
    """Images/s of nyaflow's loader and of a bare tar read + decode loop over the shards (one per bucket)
    of `samples`, (bucket, {ext: bytes}) pairs."""
    import json
    import tarfile
    import tempfile

    import torch

    from nyaflow.loader import TrainingSet, micro_batches
    from nyaflow.shards import ShardWriter

    folder = Path(tempfile.mkdtemp(prefix="nyaflow-loader-bench-"))
    (folder / "shards").mkdir()
    shards = []
    for bucket in sorted({b for b, _ in samples}):
        writer = ShardWriter(folder / "shards", f"{bucket[0]}x{bucket[1]}", len(samples))
        for i, (b, sample) in enumerate(samples):
            if b == bucket:
                writer.write(f"{i:06d}", sample)
        writer.close()
        shards += [{**shard, "bucket": list(bucket)} for shard in writer.shards]
    (folder / "manifest.json").write_text(json.dumps({"shards": shards}))
    dataset = TrainingSet(folder)
    indices = np.arange(len(dataset))

    def nyaflow_loader():
        batches = micro_batches(dataset, indices, 4, 0, 1, 0, 0, num_workers=0)
        seen = 0
        while seen < len(indices):
            seen += len(next(batches)[1]["caption"])

    def bare_tar():
        for shard in shards:
            with tarfile.open(folder / "shards" / shard["path"]) as tar:
                for member in tar:
                    if member.name.endswith(".png"):
                        image = Image.open(tar.extractfile(member)).convert("RGB")
                        torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1

    best = {"nyaflow loader": float("inf"), "bare tar loop": float("inf")}
    for _ in range(rounds):
        for name, fn in (("bare tar loop", bare_tar), ("nyaflow loader", nyaflow_loader)):
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
    return {name: len(samples) / seconds for name, seconds in best.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=32)
    p.add_argument("--resolution", type=int, default=1024)
    args = p.parse_args()

    start = time.perf_counter()
    images = make_images(args.images)
    mpix = np.mean([np.prod(Image.open(io.BytesIO(d)).size) for d in images]) / 1e6
    print(
        f"{len(images)} images, {mpix:.1f} Mpx on average, made in {time.perf_counter() - start:.1f} s",
        flush=True,
    )

    cfg = nyaflow_config.validate({"run": "bench", "data": {"preprocess": {"resolution": args.resolution}}})
    settings = {**cfg["data"]["preprocess"], "bucket_step": 64}
    buckets = make_buckets(args.resolution, 64, settings["max_aspect"])
    methods = {}
    for fmt, resample in (("jpg", "area"), ("jpg", "lanczos"), ("png", "area")):
        s = {**settings, "image_format": fmt, "downscale_filter": resample}
        methods[f"nyaflow preprocess {resample} ({fmt})"] = lambda d, s=s: make_sample(
            d, "1girl, solo", s, buckets
        )
    for mode in ("center_crop", "keep_ratio"):
        resizer = Resizer(
            image_size=args.resolution, resize_mode=mode, resize_only_if_bigger=True, encode_format="jpg"
        )
        methods[f"img2dataset resize {mode} (jpg)"] = lambda d, r=resizer: r(io.BytesIO(d))
    results = rates(methods, images)

    width = max(map(len, results))
    for name, value in results.items():
        print(f"{name:{width}s}  {value:6.1f} images/s per core")
    theirs = results["img2dataset resize center_crop (jpg)"]
    for resample in ("area", "lanczos"):
        ours = results[f"nyaflow preprocess {resample} (jpg)"]
        print(f"ratio nyaflow ({resample}) / img2dataset (center_crop), jpg: {ours / theirs:.2f}")

    png = {**settings, "image_format": "png", "downscale_filter": "area"}
    loader = loader_rates([make_sample(d, "1girl, solo", png, buckets) for d in images])
    for name, value in loader.items():
        print(f"{name:{width}s}  {value:6.1f} images/s per core")
    ratio = loader["nyaflow loader"] / loader["bare tar loop"]
    print(f"ratio nyaflow loader / bare tar read+decode, png: {ratio:.2f}")
    print(f"(one process; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)")


if __name__ == "__main__":
    main()
