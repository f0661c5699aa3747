"""Download stage: one prefiltered part of the URL table -> img2dataset webdataset shards, checked complete.

One `download_part` call (one Snakemake job, one SLURM job per part) runs img2dataset on a part table into
`<out>.partial/img2dataset/`, then checks every shard it should have written against what img2dataset
itself recorded: the `_stats.json` exists and parses, the shard's parquet lists exactly the rows of its
slice of the part table, and the tar is intact (every member complete, the end-of-archive marker present)
and holds exactly the parquet's successful rows. A shard that fails the check is deleted and downloaded
again (img2dataset's incremental mode redoes only the shards without `_stats.json`); a shard still missing
after `data.download.shard_retries` extra runs - img2dataset loses a whole shard with exit status 0 when,
for example, its input holds bytes that are not UTF-8 - has its rows recorded in `lost.parquet`. Only
then is the folder renamed to `<out>`, so a killed download never looks complete, and the next run
resumes it: the `.partial` folder is kept as long as the part table and the settings are the same.

Guards around img2dataset (1.47), which it does not have itself:
- every download has a total deadline (`max_seconds`; img2dataset's timeout is per read, so a server that
  trickles bytes would hold a thread for minutes) and a size cap (`max_bytes`); a response shorter than
  its Content-Length fails; redirects may only go to `data.allowed_schemes`.
- with `resize_mode: no` (the default) img2dataset does not decode at all: the original bytes reach the
  preprocess stage, which decodes safely (pixel limit, EXIF, 16-bit, CMYK, transparency).
- with resizing on, an image whose header says it has more than `data.preprocess.max_pixels` pixels fails
  before it is decoded (decompression bomb), and images img2dataset's OpenCV path mishandles (16-bit,
  CMYK, palette, grey+alpha, EXIF-rotated, GIF) are passed through unchanged for preprocess.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import functools
import hashlib
import importlib
import io
import json
import math
import os
import shutil
import signal
import socket
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

import pandas as pd
import pyarrow.parquet as pq

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
from img2dataset import downloader as i2d_downloader  # noqa: E402 - needs the variable above
from img2dataset import resizer as i2d_resizer  # noqa: E402

from nyaflow import demo_data  # noqa: E402
from nyaflow.shards import check_tar  # noqa: E402

i2d_main = importlib.import_module("img2dataset.main")  # the package's `main` attribute is a function

OOM_SHARD_COUNT = 5  # img2dataset names shards with 5 digits: 00000.tar, 00000.parquet, 00000_stats.json
SHARD_SETTINGS = (  # the settings that change what a downloaded shard holds: a change restarts the part
    "number_sample_per_shard",
    "resize_mode",
    "image_size",
    "resize_only_if_bigger",
    "min_image_size",
    "encode_format",
    "encode_quality",
)


# ---------------------------------------------------------------------------------------------------------
# A guarded replacement for img2dataset's download_image


class _Watchdog:
    """Shuts down the sockets of one download when its time is up, whatever the download is waiting for."""

    def __init__(self, seconds: float):
        self.expired = False
        self._socks: list[socket.socket] = []
        self._lock = threading.Lock()
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True

    def add(self, sock: socket.socket) -> socket.socket:
        with self._lock:
            self._socks.append(sock)
            if self.expired:
                self._shutdown(sock)
        return sock

    def _expire(self) -> None:
        with self._lock:
            self.expired = True
            for sock in self._socks:
                self._shutdown(sock)

    @staticmethod
    def _shutdown(sock: socket.socket) -> None:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)

    def __enter__(self):
        self._timer.start()
        return self

    def __exit__(self, *exc):
        self._timer.cancel()


def _tracked(base):
    class Tracked(base):
        def __init__(self, *args, watchdog: _Watchdog, **kwargs):
            super().__init__(*args, **kwargs)
            create = self._create_connection
            self._create_connection = lambda *a, **k: watchdog.add(create(*a, **k))

    return Tracked


_TrackedHTTP = _tracked(urllib.request.http.client.HTTPConnection)
_TrackedHTTPS = _tracked(urllib.request.http.client.HTTPSConnection)


class _HTTPHandler(urllib.request.HTTPHandler):
    def __init__(self, watchdog: _Watchdog):
        super().__init__()
        self.watchdog = watchdog

    def http_open(self, req):
        return self.do_open(functools.partial(_TrackedHTTP, watchdog=self.watchdog), req)


class _HTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, watchdog: _Watchdog):
        super().__init__()
        self.watchdog = watchdog

    def https_open(self, req):
        return self.do_open(
            functools.partial(_TrackedHTTPS, watchdog=self.watchdog), req, context=self._context
        )


class _Redirects(urllib.request.HTTPRedirectHandler):
    def __init__(self, allowed: tuple[str, ...]):
        super().__init__()
        self.allowed = allowed

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        scheme = urlsplit(newurl).scheme.lower()
        if scheme not in self.allowed:
            raise urllib.error.HTTPError(
                newurl, code, f"redirect to a disallowed scheme: {scheme}", headers, fp
            )
        return super().redirect_request(req, fp, code, msg, headers, newurl)


USER_AGENT = "Mozilla/5.0 (X11; Ubuntu; Linux x86_64; rv:72.0) Gecko/20100101 Firefox/72.0"


def fetch(
    row,
    timeout,
    user_agent_token,
    disallowed_header_directives,
    *,
    max_seconds: float,
    max_bytes: int,
    allowed_schemes: tuple[str, ...],
):
    """img2dataset's `download_image(row, timeout, ...)` -> (key, BytesIO or None, error or None), with a
    total deadline, a size cap, complete-body and redirect checks."""
    key, url = row
    scheme = urlsplit(str(url)).scheme.lower()
    if scheme not in allowed_schemes:
        return key, None, f"url scheme not allowed: {scheme or '<none>'}"
    agent = USER_AGENT
    if user_agent_token:
        agent += f" (compatible; {user_agent_token}; +https://github.com/rom1504/img2dataset)"
    with _Watchdog(max_seconds) as watchdog:
        opener = urllib.request.build_opener(
            urllib.request.ProxyHandler(),
            _HTTPHandler(watchdog),
            _HTTPSHandler(watchdog),
            _Redirects(allowed_schemes),
        )
        try:
            request = urllib.request.Request(url, data=None, headers={"User-Agent": agent})
            with opener.open(request, timeout=timeout) as r:
                if disallowed_header_directives and i2d_downloader.is_disallowed(
                    r.headers, user_agent_token, disallowed_header_directives
                ):
                    return key, None, "Use of image disallowed by X-Robots-Tag directive"
                length = r.headers.get("Content-Length")
                if length and length.isdigit() and int(length) > max_bytes:
                    return key, None, f"larger than max_bytes={max_bytes}"
                body = io.BytesIO()
                while chunk := r.read1(1 << 16):
                    body.write(chunk)
                    if body.tell() > max_bytes:
                        return key, None, f"larger than max_bytes={max_bytes}"
                if watchdog.expired:
                    raise TimeoutError
                if r.length:  # http.client's read1 does not raise on a short body: check it here
                    return key, None, f"incomplete body: {r.length} of {length} bytes missing"
            body.seek(0)
            return key, body, None
        except Exception as err:  # noqa: BLE001 - every failure is this row's error message
            if watchdog.expired:
                return key, None, f"download took longer than max_seconds={max_seconds}"
            return key, None, str(err)


def _die_with_parent(parent: int) -> None:
    """Make an img2dataset worker process die with the process that started it (Linux), so that a killed
    download leaves no orphan writing into the folder that the next run resumes."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # it died before the line above took effect
        os._exit(1)


class GuardedDownloader(i2d_downloader.Downloader):
    """img2dataset's Downloader with `fetch` in place of its download_image (in its worker processes:
    the worker imports this module when it unpickles the downloader)."""

    def __init__(self, *args, limits: dict, **kwargs):
        super().__init__(*args, **kwargs)
        self.limits = limits
        self.parent = os.getpid()  # built in img2dataset's main process, whose pool runs the shards

    def download_shard(self, row):
        _die_with_parent(self.parent)
        original = i2d_downloader.download_image
        i2d_downloader.download_image = functools.partial(fetch, **self.limits)
        try:
            return super().download_shard(row)
        finally:
            i2d_downloader.download_image = original


# ---------------------------------------------------------------------------------------------------------
# A guarded resizer: what img2dataset's OpenCV path must not see


PASS_THROUGH_MODES = ("RGB", "RGBA", "L")
PASS_THROUGH_FORMATS = ("JPEG", "PNG", "WEBP")


def inspect_header(data: bytes, max_pixels: int) -> tuple[str, tuple[int, int] | None]:
    """Read an image's header only: ('too_big' | 'original' | 'resize' | 'undecodable', (w, h))."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:
            size = img.size
            if size[0] * size[1] > max_pixels:
                return "too_big", size
            rotated = img.getexif().get(0x0112, 1) not in (0, 1)
            sixteen_bit_png = data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 24 and data[24] == 16
            if (
                img.format not in PASS_THROUGH_FORMATS
                or img.mode not in PASS_THROUGH_MODES
                or "transparency" in img.info
                or rotated
                or sixteen_bit_png
            ):
                return "original", size
            return "resize", size
    except Image.DecompressionBombError:
        return "too_big", None
    except Exception:  # noqa: BLE001 - not an image PIL can read; let img2dataset say so
        return "undecodable", None


class GuardedResizer(i2d_resizer.Resizer):
    """img2dataset's Resizer behind a header check (see `inspect_header`)."""

    def __init__(self, *args, max_pixels: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.max_pixels = max_pixels

    def __call__(self, img_stream, blurring_bbox_list=None):
        if self.disable_all_reencoding:
            return super().__call__(img_stream, blurring_bbox_list)
        img_stream.seek(0)
        data = img_stream.read()
        img_stream.seek(0)
        verdict, size = inspect_header(data, self.max_pixels)
        if verdict == "too_big":
            return None, None, None, None, None, f"more than {self.max_pixels} pixels"
        if verdict == "original":
            return data, None, None, size[0], size[1], None
        return super().__call__(img_stream, blurring_bbox_list)


# ---------------------------------------------------------------------------------------------------------
# Running img2dataset and checking what it wrote


def run_img2dataset(part_path: Path, out: Path, settings: dict, max_pixels: int, allowed_schemes) -> None:
    """img2dataset on one part table (parquet with id and url) into `out`, in incremental mode."""
    resize = settings["resize_mode"] != "no"
    limits = {
        "max_seconds": float(settings["max_seconds"]),
        "max_bytes": int(settings["max_bytes"]),
        "allowed_schemes": tuple(allowed_schemes),
    }
    fmt = settings["encode_format"]
    env = {"CV_IO_MAX_IMAGE_PIXELS": str(max_pixels)}  # OpenCV's own limit, a second guard
    old_env = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    patches = {
        "Downloader": functools.partial(GuardedDownloader, limits=limits),
        "Resizer": functools.partial(GuardedResizer, max_pixels=max_pixels),
    }
    originals = {name: getattr(i2d_main, name) for name in patches}
    for name, value in patches.items():
        setattr(i2d_main, name, value)
    try:
        i2d_main.download(
            url_list=str(part_path),
            input_format="parquet",
            url_col="url",
            caption_col=None,
            save_additional_columns=["id"],
            output_format="webdataset",
            output_folder=str(out),
            processes_count=settings["processes"],
            thread_count=settings["threads"],
            timeout=settings["timeout"],
            retries=settings["retries"],
            number_sample_per_shard=settings["number_sample_per_shard"],
            oom_shard_count=OOM_SHARD_COUNT,
            disable_all_reencoding=not resize,
            resize_mode=settings["resize_mode"] if resize else "no",
            image_size=settings["image_size"],
            resize_only_if_bigger=settings["resize_only_if_bigger"],
            min_image_size=settings["min_image_size"],
            max_image_area=float(max_pixels),
            encode_format=fmt,
            # img2dataset reads encode_quality as the zlib level (0-9) for PNG: use a fast lossless level.
            encode_quality=3 if fmt == "png" else settings["encode_quality"],
            extract_exif=False,
            compute_hash=None,
            enable_wandb=False,
            incremental_mode="incremental",
            max_shard_retry=1,
        )
    finally:
        for name, value in originals.items():
            setattr(i2d_main, name, value)
        for k, v in old_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def shard_name(shard: int) -> str:
    return f"{shard:0{OOM_SHARD_COUNT}d}"


def shard_files(folder: Path, shard: int) -> list[Path]:
    name = shard_name(shard)
    return [folder / f"{name}_stats.json", folder / f"{name}.parquet", folder / f"{name}.tar"]


def inspect_shard(folder: Path, shard: int, expected_ids) -> str | None:
    """None when downloaded shard `shard` is complete and consistent, else what is wrong with it."""
    stats_path, parquet_path, tar_path = shard_files(folder, shard)
    if not stats_path.is_file():
        return "no _stats.json (img2dataset did not finish the shard)"
    try:
        stats = json.loads(stats_path.read_text())
        table = pq.read_table(parquet_path, columns=["id", "key", "status"]).to_pandas()
    except Exception as e:  # noqa: BLE001 - any unreadable file makes the shard incomplete
        return f"unreadable stats or parquet ({type(e).__name__}: {e})"
    if sorted(table["id"].tolist()) != sorted(expected_ids):
        return "its parquet does not list exactly the rows of its slice of the part table"
    ok = table["status"] == "success"
    if stats.get("count") != len(table) or stats.get("successes") != int(ok.sum()):
        return (
            f"_stats.json counts {stats.get('count')} rows / {stats.get('successes')} successes,"
            f" the parquet {len(table)} / {int(ok.sum())}"
        )
    try:
        keys = check_tar(tar_path)
    except (OSError, ValueError) as e:
        return f"bad tar: {e}"
    if sorted(keys) != sorted(table.loc[ok, "key"].astype(str)):
        return f"the tar holds {len(keys)} samples, the parquet lists {int(ok.sum())} successes"
    return None


def _request_fingerprint(part_path: Path, settings: dict) -> dict:
    digest = hashlib.sha256(Path(part_path).read_bytes()).hexdigest()
    return {"part_sha256": digest, "settings": {k: settings[k] for k in SHARD_SETTINGS}}


@contextlib.contextmanager
def _serving(serve_dir: Path | None, port: int):
    """Serve the demo images on 127.0.0.1:`port`; parts of the demo take turns (one port)."""
    if serve_dir is None:
        yield
        return
    with open(Path(serve_dir).parent / ".serve.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        with demo_data.serve(serve_dir, port):
            yield


def download_part(config: dict, part_path: Path, out: Path, serve_dir: Path | None = None) -> dict:
    """Download one part table into `out` (img2dataset/, lost.parquet, check.json); returns the check.

    With `serve_dir`, that folder is served on 127.0.0.1:data.demo.port meanwhile (the demo).
    """
    data = config["data"]
    settings = data["download"]
    part_path, out = Path(part_path), Path(out)
    ids = pq.read_table(part_path, columns=["id"])["id"].to_pylist()
    per_shard = settings["number_sample_per_shard"]
    expected = {s: ids[s * per_shard : (s + 1) * per_shard] for s in range(math.ceil(len(ids) / per_shard))}

    tmp = out.with_name(out.name + ".partial")
    request = _request_fingerprint(part_path, settings)
    request_file = tmp / "request.json"
    if tmp.exists() and (not request_file.is_file() or json.loads(request_file.read_text()) != request):
        shutil.rmtree(tmp)  # another table or other settings: nothing there can be reused
    resumed = tmp.exists()
    folder = tmp / "img2dataset"
    folder.mkdir(parents=True, exist_ok=True)
    request_file.write_text(json.dumps(request, indent=2))

    runs, start = 0, time.time()
    with _serving(serve_dir, data["demo"]["port"]):
        while True:
            bad = {s: p for s in expected if (p := inspect_shard(folder, s, expected[s])) is not None}
            if not bad or runs > settings["shard_retries"]:
                break
            for s in bad:
                for f in shard_files(folder, s):
                    f.unlink(missing_ok=True)
            print(f"download {part_path.name}: {len(bad)} of {len(expected)} shards to download", flush=True)
            run_img2dataset(
                part_path, folder, settings, data["preprocess"]["max_pixels"], data["allowed_schemes"]
            )
            runs += 1

    lost = []
    for s, problem in sorted(bad.items()):
        for f in shard_files(folder, s):
            f.unlink(missing_ok=True)
        lost += [(i, f"img2dataset lost shard {shard_name(s)}: {problem}") for i in expected[s]]
    pd.DataFrame(lost, columns=["id", "reason"]).astype({"id": "int64", "reason": str}).to_parquet(
        tmp / "lost.parquet", index=False
    )
    shutil.rmtree(folder / "_tmp", ignore_errors=True)
    check = {
        "part": part_path.name,
        "rows": len(ids),
        "shards": len(expected),
        "complete_shards": len(expected) - len(bad),
        "lost_shards": {shard_name(s): p for s, p in sorted(bad.items())},
        "lost_rows": len(lost),
        "img2dataset_runs": runs,
        "resumed": resumed,
        "seconds": round(time.time() - start, 1),
    }
    (tmp / "check.json").write_text(json.dumps(check, indent=2))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return check


def download(config: dict, table_path: Path, out: Path, serve_dir: Path | None = None) -> list[dict]:
    """Prefilter the URL table into `out`/prefilter and download every part into `out`/part-NNNNN: the
    whole download side in one call (the workflow runs these steps as separate jobs)."""
    from nyaflow.prefilter import part_names, prefilter

    out = Path(out)
    prefilter(config, table_path, out / "prefilter")
    return [
        download_part(config, out / "prefilter" / f"{name}.parquet", out / name, serve_dir=serve_dir)
        for name in part_names(config["data"]["download"]["parts"])
    ]
