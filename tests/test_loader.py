"""The training loader: exactly-once coverage per epoch for any world size and worker count,
bucket-homogeneous batches, per-epoch reshuffling, and resume equivalence at an arbitrary micro-step."""

import os

import numpy as np
import pytest

from nyaflow import shards
from nyaflow.loader import TrainingSet, epoch_batches, micro_batches, split_validation

BUCKETS = np.repeat([0, 1, 2], [17, 9, 30])  # 56 samples in 3 buckets of uneven size


@pytest.mark.parametrize("world_size", [1, 2, 3, 8])
@pytest.mark.parametrize("batch_size", [2, 4, 7])
def test_every_sample_exactly_once_per_epoch(world_size, batch_size):
    indices = np.arange(len(BUCKETS))
    for epoch in (0, 1):
        per_rank = [
            epoch_batches(indices, BUCKETS, batch_size, seed=7, epoch=epoch, world_size=world_size, rank=r)
            for r in range(world_size)
        ]
        assert len({len(batches) for batches in per_rank}) == 1  # same number of steps on every rank
        seen = sorted(i for batches in per_rank for batch in batches for i in batch)
        assert seen == list(range(len(BUCKETS)))  # none missing, none twice
        for batches in per_rank:
            for batch in batches:
                assert 1 <= len(batch) <= batch_size
                assert len(set(BUCKETS[batch])) == 1  # one bucket per batch


def test_single_sample_batches_leave_out_fewer_than_world_size_samples():
    indices = np.arange(len(BUCKETS))
    per_rank = [epoch_batches(indices, BUCKETS, 1, 0, 0, world_size=3, rank=r) for r in range(3)]
    seen = [i for batches in per_rank for batch in batches for i in batch]
    assert len(seen) == len(set(seen)) == 54  # 56 samples, 2 = 56 % 3 left out
    assert len({len(batches) for batches in per_rank}) == 1


def test_order_is_seeded_and_reshuffled_per_epoch():
    indices = np.arange(len(BUCKETS))
    e0 = epoch_batches(indices, BUCKETS, 4, seed=7, epoch=0, world_size=2, rank=1)
    assert e0 == epoch_batches(indices, BUCKETS, 4, seed=7, epoch=0, world_size=2, rank=1)
    assert e0 != epoch_batches(indices, BUCKETS, 4, seed=7, epoch=1, world_size=2, rank=1)
    assert e0 != epoch_batches(indices, BUCKETS, 4, seed=8, epoch=0, world_size=2, rank=1)


def test_too_few_samples_for_the_ranks_is_refused():
    with pytest.raises(ValueError, match="cannot feed 8 ranks"):
        epoch_batches(np.arange(5), np.zeros(5, dtype=int), 4, 0, 0, world_size=8, rank=0)


@pytest.mark.parametrize("world_size", [1, 2, 3, 8])
@pytest.mark.parametrize("num_workers", [0, 1, 3])
def test_loader_covers_the_epoch_and_resumes_exactly(demo_data, world_size, num_workers):
    _, data_dir, _, _ = demo_data
    ds = TrainingSet(data_dir)
    train_idx, val_idx = split_validation(len(ds), 4, seed=0)
    assert not set(train_idx) & set(val_idx) and len(train_idx) + len(val_idx) == len(ds)

    def take(rank, start, n):
        it = micro_batches(ds, train_idx, 3, 0, world_size, rank, start, num_workers)
        return [(epoch, batch["index"].tolist()) for epoch, batch in (next(it) for _ in range(n))]

    per_epoch = len(epoch_batches(train_idx, ds.bucket_ids, 3, 0, 0, world_size, 0))
    first_epoch = [i for r in range(world_size) for _, b in take(r, 0, per_epoch) for i in b]
    assert sorted(first_epoch) == sorted(train_idx.tolist())
    full = take(0, 0, 2 * per_epoch + 1)  # crosses two epoch boundaries
    assert {e for e, _ in full} == {0, 1, 2}
    k = per_epoch + per_epoch // 2  # a micro-step in the second epoch
    assert take(0, k, len(full) - k) == full[k:]


def write_shards(folder, n_shards: int, per_shard: int) -> list:
    writer = shards.ShardWriter(folder, "b", max_count=per_shard)
    for i in range(n_shards * per_shard):
        writer.write(f"{i:06d}", {"txt": f"caption {i}".encode(), "json": b"{}" if i % 2 else b'{"a": 1}'})
    writer.close()
    return [folder / s["path"] for s in writer.shards]


def test_shard_index_sidecar_matches_the_tar_headers_and_a_stale_one_is_ignored(tmp_path):
    (path, *_) = write_shards(tmp_path, 1, 5)
    sidecar = path.with_name(path.name + shards.INDEX_SUFFIX)
    assert sidecar.is_file()
    from_sidecar = shards.TarIndex(path)
    sidecar.unlink()
    from_headers = shards.TarIndex(path)
    assert from_sidecar.keys.tolist() == from_headers.keys.tolist() == [f"{i:06d}" for i in range(5)]
    assert [from_sidecar[i] for i in range(5)] == [from_headers[i] for i in range(5)]
    assert from_headers[3] == {"txt": b"caption 3", "json": b"{}"}

    # The shard is rewritten in place with other samples of the same sizes (so the same tar size), and
    # even given back its old modification time: the headers no longer name the indexed samples.
    from_headers.save()
    stat = path.stat()
    (tmp_path / "other").mkdir()
    writer = shards.ShardWriter(tmp_path / "other", "b", max_count=5)
    for i in range(5):
        writer.write(f"{i + 100:06d}", {"txt": f"caption {i + 100:d}"[:9].encode(), "json": b"{}"})
    writer.close()
    rewritten = (tmp_path / "other" / writer.shards[0]["path"]).read_bytes()
    assert len(rewritten) == stat.st_size
    path.write_bytes(rewritten)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    index = shards.TarIndex(path)
    assert index.keys.tolist() == [f"{i + 100:06d}" for i in range(5)] and index[0]["txt"] == b"caption 1"
    sidecar.write_bytes(b"not an npz")  # a damaged sidecar: the headers are read
    assert shards.TarIndex(path).keys.tolist() == index.keys.tolist()


def test_reading_many_shards_keeps_few_files_open(tmp_path, monkeypatch):
    monkeypatch.setattr(shards, "MAX_OPEN_SHARDS", 3)
    paths = write_shards(tmp_path, 8, 4)
    indexes = [shards.TarIndex(p) for p in paths]
    rng = np.random.default_rng(0)
    for _ in range(200):
        s, i = int(rng.integers(8)), int(rng.integers(4))
        assert indexes[s][i]["txt"] == f"caption {4 * s + i}".encode()
        assert len(shards._open_files) <= 3
    assert sum(not f.closed for f in shards._open_files.values()) == len(shards._open_files)
