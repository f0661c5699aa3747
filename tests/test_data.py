"""Download (img2dataset from 127.0.0.1), preprocess accounting, training shards and the loader."""

import io
import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from nyaflow.loader import TrainingSet, epoch_batches, micro_batches, split_validation


def test_download_keeps_img2dataset_stats_and_rejects_non_http_urls(demo_download):
    _, root, table = demo_download
    shards = root / "download" / "shards"
    stats = json.loads((shards / "00000_stats.json").read_text())
    assert stats["count"] == len(table) - 1  # the file:// row never reaches img2dataset
    assert stats["successes"] == 24 + 1  # the 24 images and the too-small one
    rejected = pd.read_parquet(root / "download" / "rejected.parquet")
    assert rejected["reason"].tolist() == ["url scheme not allowed: file"]
    assert table.loc[table["id"] == rejected["id"][0], "url"].item().startswith("file://")


def test_manifest_accounts_for_every_input_row(demo_data):
    _, data_dir, manifest, table = demo_data
    assert manifest["rows_in"] == len(table) == 30
    assert manifest["counts"] == {"kept": 24, "rejected": 1, "failed_download": 4, "filtered": 1, "lost": 0}
    assert sum(manifest["counts"].values()) == manifest["rows_in"]
    rows = pd.read_parquet(data_dir / "rows.parquet").set_index("url")
    assert sorted(rows["id"]) == sorted(table["id"])
    by_name = {url.rsplit("/", 1)[-1]: row for url, row in rows.iterrows()}
    assert by_name["missing.png"]["status"] == "failed_download"
    assert "404" in by_name["missing.png"]["reason"]
    assert "refused" in by_name["refused.png"]["reason"].lower()
    assert by_name["not_an_image.png"]["status"] == "failed_download"
    assert by_name["truncated.png"]["status"] == "failed_download"
    assert by_name["too_small.png"]["status"] == "filtered"
    assert by_name["too_small.png"]["reason"] == "shorter side below 48 px"
    assert by_name["00003.png"]["status"] == "kept"
    assert sum(s["count"] for s in manifest["shards"]) == 24
    assert sum(manifest["buckets"].values()) == 24


def test_training_shards_hold_bucket_sized_images_captions_and_micro_conditioning(demo_data):
    _, data_dir, manifest, table = demo_data
    ds = TrainingSet(data_dir)
    assert len(ds) == 24
    seen_ids = set()
    for entry in manifest["shards"]:
        assert entry["path"].startswith(f"{entry['bucket'][0]}x{entry['bucket'][1]}-")
    for i in range(len(ds)):
        item = ds[i]
        h, w = item["pixels"].shape[1:]
        oh, ow, top, left, th, tw = item["time_ids"].tolist()
        assert (th, tw) == (h, w)
        assert item["pixels"].min() >= -1 and item["pixels"].max() <= 1
        assert "_" not in item["caption"] and item["caption"].endswith("background, solo")
        assert 0 <= top <= oh - h * min(oh / h, ow / w) + 1 and left >= 0
        shard, local = ds.locations[i]
        seen_ids.add(int(ds.shards[shard].keys[local]))
    assert seen_ids <= set(table["id"])


def test_truncated_training_shard_is_refused(demo_data, tmp_path):
    import shutil

    _, data_dir, manifest, _ = demo_data
    copy = tmp_path / "data"
    shutil.copytree(data_dir, copy)
    shard = copy / "shards" / manifest["shards"][0]["path"]
    shard.write_bytes(shard.read_bytes()[:2048])
    with pytest.raises(ValueError, match="truncated"):
        TrainingSet(copy)


def test_demo_images_are_the_colours_their_tags_name(demo_download):
    _, root, table = demo_download
    from nyaflow.demo_data import COLOURS, background_colour

    url, caption = table.loc[0, ["url", "caption"]]
    img = Image.open(root / "source" / "images" / url.rsplit("/", 1)[-1]).convert("RGB")
    corner = img.getpixel((0, 0))
    assert corner == COLOURS[background_colour(caption)]
    assert background_colour("red circle, blue background, solo") == "blue"
    assert background_colour("a cat") is None


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_epoch_batches_are_bucket_homogeneous_disjoint_and_seeded(world_size):
    buckets = np.repeat([0, 1, 2], [17, 9, 30])
    indices = np.arange(len(buckets))
    per_rank = [
        epoch_batches(indices, buckets, 4, seed=7, epoch=0, world_size=world_size, rank=r)
        for r in range(world_size)
    ]
    assert len({len(b) for b in per_rank}) == 1  # every rank takes the same number of steps
    flat = [i for rank in per_rank for batch in rank for i in batch]
    assert len(flat) == len(set(flat))  # no sample twice in an epoch
    total_batches = 5 + 3 + 8
    dropped = total_batches % world_size
    assert len([b for rank in per_rank for b in rank]) == total_batches - dropped
    for rank in per_rank:
        for batch in rank:
            assert len(set(buckets[batch])) == 1
    again = epoch_batches(indices, buckets, 4, seed=7, epoch=0, world_size=world_size, rank=0)
    assert again == per_rank[0]
    assert epoch_batches(indices, buckets, 4, seed=7, epoch=1, world_size=world_size, rank=0) != per_rank[0]


def test_loader_resumed_at_any_micro_step_yields_the_same_batches(demo_data):
    _, data_dir, _, _ = demo_data
    ds = TrainingSet(data_dir)
    train_idx, val_idx = split_validation(len(ds), 4, seed=0)
    assert not set(train_idx) & set(val_idx) and len(train_idx) + len(val_idx) == len(ds)

    def take(start, n):
        it = micro_batches(ds, train_idx, 3, seed=0, world_size=1, rank=0, start=start, num_workers=0)
        return [(epoch, batch["index"].tolist()) for epoch, batch in (next(it) for _ in range(n))]

    full = take(0, 20)  # crosses epoch boundaries (about 8 batches per epoch)
    assert {e for e, _ in full} == {0, 1, 2}
    assert take(11, 9) == full[11:]
    img = ds[full[0][1][0]]["pixels"]
    assert tuple(img.shape[1:]) in {(48, 80), (64, 64), (80, 48)}
    Image.open(io.BytesIO(ds.shards[0][0]["png"])).verify()
