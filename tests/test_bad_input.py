"""Bad input, end to end: a corpus of broken and awkward images served from 127.0.0.1 goes through the
workflow's data rules (prefilter, download in two parts, preprocess, manifest) without crashing, every row is
accounted for with its reason, and nothing outside the output folders is read or written. Also: a shard
img2dataset loses shows up as lost rows, and a download killed midway resumes into complete shards."""

import base64
import collections
import functools
import http.server
import io
import json
import os
import signal
import struct
import subprocess
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import yaml
from conftest import BIN, REPO, free_port, make_config, run_snakemake
from PIL import Image

from nyaflow.shards import check_tar, iter_samples

# ------------------------------------------------------------------------------------------------------
# The corpus


def image_bytes(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def bomb_png(width: int = 30000, height: int = 30000) -> bytes:
    """A 1-bit greyscale PNG of width x height pixels, written row by row: a few hundred KB on disk,
    900 M pixels decoded."""

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    row = b"\0" * (1 + (width + 7) // 8)
    z = zlib.compressobj(9)
    idat = b"".join(z.compress(row) for _ in range(height)) + z.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def corpus_images() -> dict[str, bytes]:
    rgb = functools.partial(Image.new, "RGB", (96, 64))
    good = image_bytes(rgb((200, 30, 30)), "JPEG", quality=95)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, shown rotated 90 degrees clockwise: portrait
    landscape = rgb((30, 200, 30))
    landscape.paste((0, 0, 0), (0, 0, 48, 64))  # left half black: after rotation, the top half
    palette = Image.new("P", (96, 64), 1)
    palette.putpalette([0, 0, 0, 30, 30, 220] + [0] * 762)
    palette.paste(0, (0, 0, 48, 64))  # index 0 is transparent: the left half must come out white
    gray16 = Image.fromarray(np.full((64, 96), 40000, dtype=np.uint16))
    return {
        "/good.jpg": good,
        "/good2.jpg": image_bytes(rgb((30, 30, 200)), "JPEG", quality=95),
        "/nocaption.jpg": image_bytes(rgb((200, 200, 30)), "JPEG"),
        "/badutf8.jpg": image_bytes(rgb((200, 30, 200)), "JPEG"),
        "/html.jpg": b"<!doctype html><html><body>Not found</body></html>",
        "/truncated.jpg": good[: len(good) // 2],
        "/empty.jpg": b"",
        "/bomb.png": bomb_png(),
        "/cmyk.jpg": image_bytes(Image.new("CMYK", (96, 64), (0, 255, 255, 0)), "JPEG", quality=95),
        "/gray16.png": image_bytes(gray16, "PNG"),
        "/palette.png": image_bytes(palette, "PNG", transparency=0),
        "/exif.jpg": image_bytes(landscape, "JPEG", quality=95, exif=exif.tobytes()),
        "/wide.png": image_bytes(Image.new("RGB", (400, 40), (90, 90, 90)), "PNG"),
        "/wide2.png": image_bytes(Image.new("RGB", (400, 40), (90, 90, 90)), "PNG"),
    }


def make_handler(routes: dict, hits: collections.Counter, delay: float = 0.0):
    """A handler serving `routes` (path -> bytes, or a function of the handler) and counting requests."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - the name http.server calls
            hits[self.path] += 1
            time.sleep(delay)
            route = routes.get(self.path)
            if route is None:
                self.send_error(404, "File not found")
            elif callable(route):
                route(self)
            else:
                self.send_response(200)
                self.send_header("Content-Type", "image/jpeg")
                self.send_header("Content-Length", str(len(route)))
                self.end_headers()
                self.wfile.write(route)

        def log_message(self, format, *args):  # noqa: A002 - signature of the base class
            pass

    return Handler


def slow(handler):
    time.sleep(6)  # longer than the 2 s timeout before the first byte
    with_body(handler, b"late")


def trickle(handler):
    """One byte every 0.3 s: each read is well within img2dataset's per-read timeout."""
    handler.send_response(200)
    handler.send_header("Content-Length", "100000")
    handler.end_headers()
    try:
        for _ in range(200):
            handler.wfile.write(b"\xff")
            handler.wfile.flush()
            time.sleep(0.3)
    except OSError:
        pass


def with_body(handler, body: bytes):
    handler.send_response(200)
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body)


def redirect(location):
    def handle(handler):
        handler.send_response(302)
        handler.send_header("Location", location)
        handler.send_header("Content-Length", "0")
        handler.end_headers()

    return handle


class Server:
    def __init__(self, routes: dict, delay: float = 0.0):
        class Listener(http.server.ThreadingHTTPServer):
            daemon_threads = True
            request_queue_size = 128  # img2dataset connects with many threads at once

        self.hits = collections.Counter()
        self.httpd = Listener(("127.0.0.1", 0), make_handler(routes, self.hits, delay))
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def __enter__(self):
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


# ------------------------------------------------------------------------------------------------------
# The corpus through the workflow's data rules


def expected_fates(base: str, secret: Path, closed_port: int) -> list[tuple]:
    """(url, tags, width, height, status, reason fragment) per row of the URL table."""
    png = base64.b64encode(image_bytes(Image.new("RGB", (64, 64)), "PNG")).decode()
    return [
        (f"{base}/good.jpg", "red solo", None, None, "kept", ""),
        (f"{base}/redirect-good.jpg", "blue solo", None, None, "kept", ""),
        (f"{base}/missing.jpg", "x", None, None, "failed_download", "404"),
        (f"http://127.0.0.1:{closed_port}/refused.jpg", "x", None, None, "failed_download", "refused"),
        (f"{base}/slow.jpg", "x", None, None, "failed_download", "timed out"),
        (f"{base}/trickle.jpg", "x", None, None, "failed_download", "longer than max_seconds=4"),
        (f"{base}/html.jpg", "x", None, None, "filtered", "undecodable image"),
        (f"{base}/truncated.jpg", "x", None, None, "filtered", "undecodable image"),
        (f"{base}/empty.jpg", "x", None, None, "filtered", "undecodable image"),
        (f"{base}/bomb.png", "x", None, None, "filtered", "more than 89478485 pixels"),
        (f"{base}/cmyk.jpg", "cmyk", None, None, "kept", ""),
        (f"{base}/gray16.png", "gray16", None, None, "kept", ""),
        (f"{base}/palette.png", "palette", None, None, "kept", ""),
        (f"{base}/exif.jpg", "exif", 96, 64, "kept", ""),
        (f"{base}/wide.png", "x", None, None, "filtered", "aspect ratio beyond 2.0"),
        (f"{base}/wide2.png", "x", 400, 40, "prefiltered", "aspect ratio (width/height) above 5.0"),
        (f"{base}/nocaption.jpg", None, None, None, "kept", ""),
        (f"{base}/badutf8.jpg", b"caf\xe9 smile", None, None, "kept", ""),
        (f"{base}/good.jpg", "duplicate", None, None, "prefiltered", "duplicate url"),
        (f"file://{secret}", "x", None, None, "prefiltered", "url scheme not allowed: file"),
        (f"data:image/png;base64,{png}", "x", None, None, "prefiltered", "url scheme not allowed: data"),
        (f"{base}/redirect-file.jpg", "x", None, None, "failed_download", "not allowed"),
    ]


def write_jsonl(rows: list[tuple], path: Path) -> None:
    """The URL table as jsonl, written byte by byte so that one row's tags are not valid UTF-8."""
    lines = []
    for i, (url, tags, width, height, *_) in enumerate(rows):
        record = {"id": 5000 + i, "file_url": url, "rating": "g", "score": i, "image_width": width}
        record |= {"image_height": height, "created_at": "2023-01-02T03:04:05Z"}
        line = json.dumps(record)[:-1].encode()
        if isinstance(tags, bytes):
            line += b', "tag_string_general": "' + tags + b'"'
        elif tags is not None:
            line += b', "tag_string_general": ' + json.dumps(tags).encode()
        lines.append(line + b"}")
    path.write_bytes(b"\n".join(lines) + b"\n")


def listing(folder: Path) -> dict[str, tuple]:
    return {
        str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
    }


def kept_sample(data_dir: Path, rows: pd.DataFrame, url: str) -> dict:
    row = rows.loc[rows["url"] == url].iloc[0]
    for key, sample in iter_samples(data_dir / "shards" / row["shard"]):
        if int(key) == row["id"]:
            return sample
    raise AssertionError(f"{url} not in {row['shard']}")


def test_bad_input_corpus_runs_through_the_data_rules(tmp_path):
    (tmp_path / "outside").mkdir()
    secret = tmp_path / "outside" / "secret.png"
    secret.write_bytes(image_bytes(Image.new("RGB", (77, 55), (1, 2, 3)), "PNG"))
    routes = corpus_images()
    routes |= {"/slow.jpg": slow, "/trickle.jpg": trickle}
    routes |= {
        "/redirect-good.jpg": redirect("/good2.jpg"),
        "/redirect-file.jpg": redirect(f"file://{secret}"),
    }
    work, inputs = tmp_path / "work", tmp_path / "input"
    inputs.mkdir()
    (work / "config").mkdir(parents=True)
    with Server(routes) as server:
        rows = expected_fates(server.url, secret, free_port())
        write_jsonl(rows, inputs / "urls.jsonl")
        config = {
            "run": "bad",
            "data": {
                "source": "table",
                "table": str(inputs / "urls.jsonl"),
                "prefilter": {"max_aspect": 5.0},
                "download": {"parts": 2, "timeout": 2, "max_seconds": 4, "threads": 16},
                "preprocess": {"resolution": 64, "bucket_step": 16, "min_side": 32, "processes": 2},
            },
        }
        (work / "config" / "config.yaml").write_text(yaml.safe_dump(config))
        before = {"input": listing(inputs), "outside": listing(tmp_path / "outside")}
        result = run_snakemake(work, "--profile", str(REPO / "cluster" / "local"), "--until", "manifest")
    assert result.returncode == 0, result.stderr[-5000:]

    data_dir = work / "results" / "bad" / "data"
    manifest = json.loads((data_dir / "manifest.json").read_text())
    table = pd.read_parquet(data_dir / "rows.parquet")
    assert manifest["rows_in"] == len(table) == len(rows) and table["id"].is_unique
    assert sum(manifest["counts"].values()) == len(rows)
    for i, (url, *_, status, reason) in enumerate(rows):
        got = table.loc[table["id"] == 5000 + i].iloc[0]
        assert (got["status"], reason in got["reason"]) == (status, True), (url[:60], got.to_dict())
    expected_counts = collections.Counter(r[4] for r in rows)
    assert manifest["counts"] == {s: expected_counts.get(s, 0) for s in manifest["counts"]}

    # The awkward images that are kept come out right.
    def pixels(url):
        sample = kept_sample(data_dir, table, url)
        meta = json.loads(sample["json"])
        return np.asarray(Image.open(io.BytesIO(sample["png"])).convert("RGB")).astype(int), meta, sample

    cmyk, _, _ = pixels(f"{server.url}/cmyk.jpg")
    assert np.abs(cmyk.mean(axis=(0, 1)) - (255, 0, 0)).max() < 12  # CMYK (0, 255, 255, 0) is red
    gray, _, _ = pixels(f"{server.url}/gray16.png")
    assert np.abs(gray - 40000 // 256).max() <= 1  # scaled to 8 bits, not clipped to white
    palette, _, _ = pixels(f"{server.url}/palette.png")
    assert (palette[:, :4] == 255).all() and np.abs(palette[:, -4:] - (30, 30, 220)).max() < 3
    exif, meta, _ = pixels(f"{server.url}/exif.jpg")
    assert meta["original_size"] == [96, 64] and meta["target_size"] == [80, 48]  # portrait after rotation
    assert exif[:8].mean() < 20 and exif[-8:, :, 1].mean() > 150  # the black half is now on top
    *_, sample = pixels(f"{server.url}/nocaption.jpg")
    assert sample["txt"] == b""
    *_, sample = pixels(f"{server.url}/badutf8.jpg")
    assert sample["txt"].decode("utf-8") == "smile"

    # Nothing outside the output folders was read or written.
    assert {"input": listing(inputs), "outside": listing(tmp_path / "outside")} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["input", "outside", "work"]
    assert sorted(p.name for p in work.iterdir()) == [".snakemake", "config", "logs", "resources", "results"]
    everything = b"".join(p.read_bytes() for p in work.rglob("*") if p.is_file() and p.suffix != ".tar")
    assert secret.read_bytes() not in everything
    for shard in (data_dir / "shards").rglob("*.tar"):
        for _, sample in iter_samples(shard):
            assert json.loads(sample["json"])["original_size"] != [55, 77]
    assert not list(work.rglob("*.partial"))


def test_guarded_resizer_fails_bombs_and_passes_awkward_images_through():
    from nyaflow.download import GuardedResizer

    resizer = GuardedResizer(
        image_size=32, resize_mode="keep_ratio_largest", resize_only_if_bigger=True, max_pixels=10**6
    )
    images = corpus_images()
    assert resizer(io.BytesIO(images["/bomb.png"]))[-1] == "more than 1000000 pixels"
    for name in ("/cmyk.jpg", "/gray16.png", "/palette.png", "/exif.jpg"):
        data, *_, err = resizer(io.BytesIO(images[name]))
        assert err is None and data == images[name], name  # the original bytes, for preprocess
    data, width, height, *_, err = resizer(io.BytesIO(images["/good.jpg"]))
    assert err is None and (width, height) == (32, 21)  # img2dataset's own resize
    assert resizer(io.BytesIO(images["/html.jpg"]))[-1] is not None


# ------------------------------------------------------------------------------------------------------
# Lost shards and killed downloads


def invalid_utf8_part(urls: list[bytes], path: Path) -> None:
    """A part table whose url column holds bytes that are not UTF-8 (pyarrow does not check on write)."""
    data = b"".join(urls)
    offsets = np.cumsum([0, *map(len, urls)]).astype(np.int32)
    url = pa.Array.from_buffers(
        pa.string(), len(urls), [None, pa.py_buffer(offsets.tobytes()), pa.py_buffer(data)]
    )
    ids = pa.array(np.arange(len(urls)) * 3 + 7, pa.int64())
    pq.write_table(pa.table({"row": pa.array(range(len(urls)), pa.int64()), "id": ids, "url": url}), path)


def test_a_shard_img2dataset_loses_is_counted_as_lost_rows(tmp_path):
    from nyaflow.download import download_part
    from nyaflow.preprocess import preprocess_part

    routes = {f"/{i}.jpg": image_bytes(Image.new("RGB", (64, 64), (i * 40, 0, 0)), "JPEG") for i in range(6)}
    with Server(routes) as server:
        urls = [f"{server.url}/{i}.jpg".encode() for i in range(6)]
        urls[3] = urls[3].replace(b".jpg", b"\xff.jpg")
        invalid_utf8_part(urls, tmp_path / "part-00000.parquet")
        cfg = make_config(data={"download": {"number_sample_per_shard": 2, "shard_retries": 0}})
        check = download_part(cfg, tmp_path / "part-00000.parquet", tmp_path / "download")
    # img2dataset exits normally but writes nothing for shard 1 (rows 2 and 3).
    assert check["shards"] == 3 and check["complete_shards"] == 2 and check["lost_rows"] == 2
    assert list(check["lost_shards"]) == ["00001"]
    assert not list((tmp_path / "download" / "img2dataset").glob("00001*"))
    rows = preprocess_part(
        cfg,
        tmp_path / "part-00000.parquet",
        tmp_path / "download",
        tmp_path / "data" / "shards" / "part-00000",
        tmp_path / "data" / "parts" / "part-00000.parquet",
    )
    fates = dict(zip(rows["id"], rows["status"], strict=True))
    assert fates == {7: "kept", 10: "kept", 13: "lost", 16: "lost", 19: "kept", 22: "kept"}
    assert rows.loc[rows["status"] == "lost", "reason"].str.startswith("img2dataset lost shard 00001").all()


def test_a_killed_download_resumes_into_complete_unduplicated_shards(tmp_path):
    from nyaflow.download import download_part

    n, per_shard = 24, 4
    routes = {f"/{i}.png": image_bytes(Image.new("RGB", (64, 64), (i * 10, 0, 0)), "PNG") for i in range(n)}
    cfg = make_config(data={"download": {"number_sample_per_shard": per_shard, "threads": 1}})
    cfg_file = tmp_path / "config.yaml"
    cfg_file.write_text(yaml.safe_dump(cfg))
    with Server(routes, delay=0.2) as server:
        part = tmp_path / "part-00000.parquet"
        pd.DataFrame(
            {"row": range(n), "id": range(100, 100 + n), "url": [f"{server.url}/{i}.png" for i in range(n)]}
        ).to_parquet(part)
        out = tmp_path / "download"
        folder = tmp_path / "download.partial" / "img2dataset"
        cmd = [
            str(BIN / "nyaflow"),
            "download",
            "--config",
            str(cfg_file),
            "--table",
            str(part),
            "--out",
            str(out),
        ]
        env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
        with open(tmp_path / "first.log", "w") as log:
            proc = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )

        def midway():  # two shards complete and a third being written
            done = {p.name[:5] for p in folder.glob("*_stats.json")}
            return len(done) >= 2 and any(p.name[:5] not in done for p in folder.glob("*.tar"))

        deadline = time.time() + 240
        while not midway():
            if proc.poll() is not None or time.time() > deadline:
                raise AssertionError((tmp_path / "first.log").read_text()[-3000:])
            time.sleep(0.02)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        done = sorted(p.name[:5] for p in folder.glob("*_stats.json"))
        assert 2 <= len(done) < n // per_shard
        assert not out.exists()  # a killed download never looks complete
        in_progress = [p for p in folder.glob("*.tar") if p.name[:5] not in done]
        assert in_progress  # the shard being written when the download was killed
        # A complete-looking shard whose tar was cut short (e.g. the disk filled up) must be redone too.
        cut = folder / f"{done[0]}.tar"
        cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])
        hits_before = dict(server.hits)
        check = download_part(cfg, part, out)

    assert check["resumed"] and check["complete_shards"] == check["shards"] == n // per_shard
    assert check["lost_rows"] == 0
    ids = []
    for tar in sorted((out / "img2dataset").glob("*.tar")):
        check_tar(tar)
        ids += [json.loads(s["json"])["id"] for _, s in iter_samples(tar)]
    assert sorted(ids) == list(range(100, 100 + n))  # every row once: complete and not duplicated
    # Shards finished before the kill were not downloaded again; the cut one and the unfinished ones were.
    for shard in range(n // per_shard):
        urls = [f"/{i}.png" for i in range(shard * per_shard, (shard + 1) * per_shard)]
        again = sum(server.hits[u] - hits_before.get(u, 0) for u in urls)
        if f"{shard:05d}" in done[1:]:
            assert again == 0, shard
        else:
            assert again >= per_shard, shard
