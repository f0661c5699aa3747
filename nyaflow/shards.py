"""Webdataset-style tar shards: a sample is the tar members that share a key (`<key>.<ext>`)."""

from __future__ import annotations

import io
import os
import tarfile
from collections.abc import Iterator
from pathlib import Path


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


class TarIndex:
    """Random access to the samples of one tar shard: members' data offsets are read once from the headers."""

    def __init__(self, path: Path):
        self.path = Path(path)
        members: dict[str, dict[str, tuple[int, int]]] = {}
        try:
            with tarfile.open(self.path, "r:") as tar:
                for m in tar:
                    if m.isfile():
                        key, ext = split_name(m.name)
                        members.setdefault(key, {})[ext] = (m.offset_data, m.size)
        except tarfile.TarError as e:
            raise ValueError(f"shard {self.path} is truncated or not a tar file ({e})") from e
        self.keys = list(members)
        self._members = members
        self._file = None
        self._pid = None

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, i: int) -> dict[str, bytes]:
        if self._pid != os.getpid():  # a fresh handle in every data-loader worker
            self._file, self._pid = open(self.path, "rb"), os.getpid()  # noqa: SIM115 - kept open for reuse
        out = {}
        for ext, (offset, size) in self._members[self.keys[i]].items():
            self._file.seek(offset)
            out[ext] = self._file.read(size)
        return out

    def __getstate__(self):
        return {**self.__dict__, "_file": None, "_pid": None}


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
        if self._tar is not None:
            self._tar.close()
            self._tar = None


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
