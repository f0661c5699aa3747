"""The self-contained demo data set: coloured shapes on coloured backgrounds, with danbooru-style tags.

`make_demo_source` writes the images and a danbooru-shaped URL table (parquet) whose URLs point at a
loopback HTTP server; `serve` runs that server (127.0.0.1 only) while img2dataset downloads. A few rows are
broken on purpose (missing file, HTML served as an image, truncated PNG, too small, refused connection, a
file:// URL) so that the run shows how failures are accounted.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import http.server
import re
import threading
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 70, 220),
    "yellow": (240, 210, 40),
    "purple": (140, 50, 190),
}
SHAPES = ("circle", "square", "triangle")
ASPECTS = ((1, 1), (4, 3), (3, 4), (3, 2), (2, 3))
TAG_WORDS = [*COLOURS, *SHAPES, "background", "solo"]


def background_colour(prompt: str) -> str | None:
    """The colour a demo prompt names for the background ('red circle, blue background' -> 'blue')."""
    match = re.search(r"\b(" + "|".join(COLOURS) + r")[ _]background\b", prompt)
    return match.group(1) if match else None


def draw_shape(width: int, height: int, shape: str, colour: str, background: str, rng) -> Image.Image:
    """One demo image: a `colour` `shape` covering about a quarter of a `background` canvas."""
    img = Image.new("RGB", (width, height), COLOURS[background])
    size = min(width, height) * rng.uniform(0.35, 0.55)
    cx = rng.uniform(size / 2 + 1, width - size / 2 - 1)
    cy = rng.uniform(size / 2 + 1, height - size / 2 - 1)
    box = (cx - size / 2, cy - size / 2, cx + size / 2, cy + size / 2)
    draw = ImageDraw.Draw(img)
    if shape == "circle":
        draw.ellipse(box, fill=COLOURS[colour])
    elif shape == "square":
        draw.rectangle(box, fill=COLOURS[colour])
    else:
        draw.polygon([(cx, box[1]), (box[0], box[3]), (box[2], box[3])], fill=COLOURS[colour])
    return img


def make_demo_source(folder: Path, num_images: int, min_side: int, port: int, seed: int) -> pd.DataFrame:
    """Write `num_images` demo PNGs plus broken files to `folder`/images and the URL table to
    `folder`/urls.parquet, in the danbooru metadata shape (id, file_url, tag_string_general/character/
    copyright/artist/meta, rating, score, image_width, image_height, created_at, md5). Returns the table."""
    rng = np.random.default_rng(seed)
    images = folder / "images"
    images.mkdir(parents=True, exist_ok=True)
    base = f"http://127.0.0.1:{port}"
    names = list(COLOURS)
    rows = []

    def row(url, tags, size=None, md5=None):
        width, height = size or (None, None)
        return (url, tags, width, height, md5)

    for i in range(num_images):
        colour, background = rng.choice(names, size=2, replace=False)
        shape = SHAPES[rng.integers(len(SHAPES))]
        aw, ah = ASPECTS[rng.integers(len(ASPECTS))]
        short = int(rng.integers(min_side, int(min_side * 1.25) + 1))
        width, height = (short * aw // min(aw, ah), short * ah // min(aw, ah))
        name = f"{i:05d}.png"
        draw_shape(width, height, shape, colour, background, rng).save(images / name)
        md5 = hashlib.md5((images / name).read_bytes()).hexdigest()
        rows.append(
            row(f"{base}/{name}", f"{colour}_{shape} {background}_background solo", (width, height), md5)
        )

    # Broken on purpose: each row's fate must show up in the manifest.
    (images / "not_an_image.png").write_text("<html><body>404 page served as an image</body></html>")
    good = (images / "00000.png").read_bytes()
    (images / "truncated.png").write_bytes(good[: len(good) // 2])
    draw_shape(20, 20, "circle", "red", "blue", rng).save(images / "too_small.png")
    rows += [
        row(f"{base}/missing.png", "red_circle green_background solo"),
        row(f"{base}/not_an_image.png", "blue_square yellow_background solo"),
        row(f"{base}/truncated.png", "green_triangle red_background solo"),
        row(f"{base}/too_small.png", "red_circle blue_background solo", (20, 20)),
        row("http://127.0.0.1:9/refused.png", "purple_circle green_background solo"),
        row(f"file://{(images / '00001.png').resolve()}", "yellow_square purple_background solo"),
    ]
    table = pd.DataFrame(
        rows, columns=["file_url", "tag_string_general", "image_width", "image_height", "md5"]
    )
    table.insert(0, "id", np.arange(len(table), dtype=np.int64))
    for category in ("character", "copyright", "artist", "meta"):
        table[f"tag_string_{category}"] = ""
    table["rating"] = "g"
    table["score"] = (table["id"] * 7919 % 100).astype(np.int64)  # spread out: quality tags have percentiles
    table["created_at"] = [f"{2015 + i % 10}-06-01T12:00:00.000+00:00" for i in range(len(table))]
    table = table.astype({"image_width": "Int64", "image_height": "Int64"})
    table.to_parquet(folder / "urls.parquet", index=False)
    return table


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 - signature of the base class
        pass


@contextlib.contextmanager
def serve(folder: Path, port: int):
    """Serve `folder` over HTTP on 127.0.0.1:`port` for the duration of the `with` block."""
    handler = functools.partial(_QuietHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
