"""Webdataset-style tar shards: a sample is the tar members that share a key (`<key>.<ext>`)."""

from __future__ import annotations

import io
import os
import tarfile
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path

import numpy as np


def split_name(name: str) -> tuple[str, str]:
    """'dir/000012.png' -> ('dir/000012', 'png'): the key ends at the first dot of the base name."""
    head, _, base = name.rpartition("/")
    key, _, ext = base.partition(".")
    return (f"{head}/{key}" if head else key), ext


def iter_samples(path: Path) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Yield (key, {ext: bytes}) for each sample of a tar shard, in file order."""
    key, sample = None, {}
    with tarfile.open(path, "r:") as tar:
        for member in tar:
            if not member.isfile():
                continue
            k, ext = split_name(member.name)
            if k != key and sample:
                yield key, sample
                sample = {}
            key = k
            sample[ext] = tar.extractfile(member).read()
    if sample:
        yield key, sample


INDEX_SUFFIX = ".idx.npz"  # the sidecar index of `<shard>.tar`: `<shard>.tar.idx.npz`
MAX_OPEN_SHARDS = 64  # shard files kept open per process (a site's open-file limit is often 1024)


class TarIndex:
    """Random access to the samples of one tar shard by the data offsets of their members.

    The offsets come from the shard's sidecar index (`<shard>.tar.idx.npz`, written by ShardWriter) when it
    fits the shard (same size and modification time, and the tar headers in front of its first and last
    samples name them), else from reading every tar header once. They are kept as numpy arrays (a few
    bytes per member, not Python objects per sample: a rank indexes millions of samples, and its loader
    workers share the arrays). Samples are read through a per-process cache of the newest MAX_OPEN_SHARDS
    open files, so that a rank reading thousands of shards in random order stays within open-file limits.
    """

    def __init__(self, path: Path, use_sidecar: bool = True):
        self.path = Path(path)
        if not (use_sidecar and self._read_sidecar()):
            self.keys, self.exts, self.spans = self._read_headers()

    def _read_sidecar(self) -> bool:
        sidecar = self.path.with_name(self.path.name + INDEX_SUFFIX)
        try:
            stat = self.path.stat()
            with np.load(sidecar, allow_pickle=False) as index:
                if int(index["tar_size"]) != stat.st_size or int(index["tar_mtime_ns"]) != stat.st_mtime_ns:
                    return False
                self.keys, self.exts, self.spans = index["keys"], index["exts"].tolist(), index["spans"]
        except (OSError, KeyError, ValueError):  # no sidecar, an older or a damaged one: read the headers
            return False
        return all(self._header_names_sample(i) for i in {0, len(self.keys) - 1} if i >= 0)

    def _header_names_sample(self, i: int) -> bool:
        """Whether the tar header in front of sample i's first member carries that member's name."""
        spans = zip(self.exts, self.spans[i, :, 0].tolist(), strict=True)
        ext, offset = next((e, offset) for e, offset in spans if offset >= 0)
        with open(self.path, "rb") as f:
            f.seek(offset - tarfile.BLOCKSIZE)
            name = f.read(100).rstrip(b"\0").decode(errors="replace")
        return name == f"{self.keys[i]}.{ext}"

    def _read_headers(self) -> tuple[np.ndarray, list[str], np.ndarray]:
        members: dict[str, dict[str, tuple[int, int]]] = {}
        try:
            with tarfile.open(self.path, "r:") as tar:
                for m in tar:
                    if m.isfile():
                        key, ext = split_name(m.name)
                        members.setdefault(key, {})[ext] = (m.offset_data, m.size)
        except (tarfile.TarError, OSError) as e:
            raise ValueError(f"shard {self.path} is truncated or not a tar file ({e})") from e
        exts = sorted({ext for sample in members.values() for ext in sample})
        spans = np.full((len(members), len(exts), 2), -1, dtype=np.int64)  # (offset, size); -1: absent
        for i, sample in enumerate(members.values()):
            for ext, span in sample.items():
                spans[i, exts.index(ext)] = span
        return np.array(list(members), dtype=str), exts, spans

    def save(self) -> None:
        """Write the sidecar index next to the shard (under a temporary name, then renamed)."""
        sidecar = self.path.with_name(self.path.name + INDEX_SUFFIX)
        tmp = sidecar.with_name(sidecar.name + ".tmp.npz")
        stat = self.path.stat()
        np.savez(
            tmp,
            keys=self.keys,
            exts=np.array(self.exts, dtype=str),
            spans=self.spans,
            tar_size=np.int64(stat.st_size),
            tar_mtime_ns=np.int64(stat.st_mtime_ns),
        )
        os.replace(tmp, sidecar)

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, i: int) -> dict[str, bytes]:
        f = _open_shard(self.path)
        out = {}
        for ext, (offset, size) in zip(self.exts, self.spans[i].tolist(), strict=True):
            if offset >= 0:
                f.seek(offset)
                out[ext] = f.read(size)
        return out


def rename_shard(source: Path, target: Path) -> None:
    """Rename a shard together with its sidecar index."""
    for suffix in (INDEX_SUFFIX, ""):  # the index first: a shard without one is merely read slower
        os.replace(f"{source}{suffix}", f"{target}{suffix}")


_open_files: OrderedDict[Path, io.BufferedReader] = OrderedDict()
_open_files_pid: int | None = None


def _open_shard(path: Path) -> io.BufferedReader:
    """The open file of `path` in this process (a data-loader worker opens its own), least recently used
    files closed beyond MAX_OPEN_SHARDS."""
    global _open_files_pid
    if _open_files_pid != os.getpid():  # a forked worker: the parent's file positions are not ours
        _open_files.clear()
        _open_files_pid = os.getpid()
    f = _open_files.get(path)
    if f is None:
        f = _open_files[path] = open(path, "rb")  # noqa: SIM115 - closed when evicted
        while len(_open_files) > MAX_OPEN_SHARDS:
            _open_files.popitem(last=False)[1].close()
    _open_files.move_to_end(path)
    return f


class ShardWriter:
    """Write samples to `<folder>/<prefix>-NNNNN.tar`, starting a new shard every `max_count` samples."""

    def __init__(self, folder: Path, prefix: str, max_count: int):
        self.folder, self.prefix, self.max_count = Path(folder), prefix, max_count
        self.shards: list[dict] = []  # {"path": file name, "count": n}
        self._tar = None

    def write(self, key: str, sample: dict[str, bytes]) -> None:
        if self._tar is None or self.shards[-1]["count"] >= self.max_count:
            self.close()
            name = f"{self.prefix}-{len(self.shards):05d}.tar"
            self._tar = tarfile.open(self.folder / name, "w:")  # noqa: SIM115 - closed in close()
            self.shards.append({"path": name, "count": 0})
        for ext, data in sample.items():
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size = len(data)
            info.mode = 0o644
            self._tar.addfile(info, io.BytesIO(data))
        self.shards[-1]["count"] += 1

    def close(self) -> None:
        """Finish the current shard and write its sidecar index (nyaflow.shards.TarIndex)."""
        if self._tar is not None:
            self._tar.close()
            self._tar = None
            TarIndex(self.folder / self.shards[-1]["path"], use_sidecar=False).save()


def check_tar(path: Path) -> list[str]:
    """The sample keys of a tar shard, after checking that it is complete: every member's data is in the
    file and the end-of-archive marker (two zero blocks) follows the last member. A tar cut off at a member
    boundary reads without error in `tarfile`; this catches it. Raises ValueError if it is not complete."""
    path = Path(path)
    size = path.stat().st_size
    keys: dict[str, None] = {}
    try:
        with tarfile.open(path, "r:") as tar:
            end = 0
            for member in tar:
                end = member.offset_data + tarfile.BLOCKSIZE * -(-member.size // tarfile.BLOCKSIZE)
                if member.offset_data + member.size > size:
                    raise ValueError(f"{path.name}: member {member.name} is cut off")
                if member.isfile():
                    keys[split_name(member.name)[0]] = None
    except tarfile.TarError as e:
        raise ValueError(f"{path.name} is truncated or not a tar file ({e})") from e
    with open(path, "rb") as f:
        f.seek(end)
        marker = f.read(2 * tarfile.BLOCKSIZE)
    if len(marker) < 2 * tarfile.BLOCKSIZE or marker.strip(b"\0"):
        raise ValueError(f"{path.name} has no end-of-archive marker (truncated)")
    return list(keys)
