"""SDXL aspect-ratio buckets and micro-conditioning. Pure functions, sizes in pixels as (height, width).

A bucket has sides that are multiples of `step` and an area close to `resolution`^2. An image goes to the
bucket nearest in log aspect ratio, is resized (keeping its aspect) to just cover the bucket and centre
cropped. SDXL conditions on the original size, the crop's top-left corner in the resized image and the
target (bucket) size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


def make_buckets(resolution: int, step: int, max_aspect: float) -> list[tuple[int, int]]:
    """All (h, w) and (w, h) where h is a multiple of `step` and w the largest multiple of `step` with
    h * w <= resolution^2, within `max_aspect`; sorted by h. (For 1024/64: 1024x1024, 832x1216, ...)"""
    area = resolution * resolution
    buckets = set()
    for h in range(step, area // step + 1, step):
        w = area // h // step * step
        if w >= step and max(h, w) / min(h, w) <= max_aspect:
            buckets |= {(h, w), (w, h)}
    if not buckets:
        raise ValueError(f"no bucket fits resolution={resolution}, step={step}, max_aspect={max_aspect}")
    return sorted(buckets)


def nearest_bucket(height: int, width: int, buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is closest to the image's, in log space."""
    aspect = math.log(width / height)
    return min(buckets, key=lambda b: abs(math.log(b[1] / b[0]) - aspect))


@dataclass(frozen=True)
class Placement:
    """How an image of `original` size is fitted into `target` (all (h, w) pixels)."""

    original: tuple[int, int]
    resized: tuple[int, int]
    crop_top_left: tuple[int, int]
    target: tuple[int, int]

    @property
    def scale(self) -> float:
        return self.resized[0] / self.original[0]


def place(height: int, width: int, bucket: tuple[int, int]) -> Placement:
    """Resize (height, width) to cover `bucket`, keeping the aspect ratio, then centre-crop to it."""
    bh, bw = bucket
    scale = max(bh / height, bw / width)
    rh, rw = max(bh, round(height * scale)), max(bw, round(width * scale))
    return Placement((height, width), (rh, rw), ((rh - bh) // 2, (rw - bw) // 2), bucket)


def bucket_name(bucket: tuple[int, int]) -> str:
    return f"{bucket[0]}x{bucket[1]}"
