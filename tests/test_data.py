"""Download (img2dataset from 127.0.0.1), completeness checks, preprocess accounting, training shards and the
loader."""

import json

import pandas as pd
import pytest
from PIL import Image

from nyaflow.loader import TrainingSet


def test_download_keeps_img2dataset_stats_and_prefilters_non_http_urls(demo_download):
    _, root, table = demo_download
    part = root / "download" / "part-00000"
    stats = json.loads((part / "img2dataset" / "00000_stats.json").read_text())
    assert stats["count"] == len(table) - 1  # the file:// row never reaches img2dataset
    assert stats["successes"] == 24 + 3  # nothing is decoded while downloading: too small, HTML, truncated
    check = json.loads((part / "check.json").read_text())
    assert check["complete_shards"] == check["shards"] == 1 and check["lost_rows"] == 0
    assert not (root / "download" / "part-00000.partial").exists()
    dropped = pd.read_parquet(root / "download" / "prefilter" / "dropped.parquet")
    assert dropped["reason"].tolist() == ["url scheme not allowed: file"]
    assert table.loc[table["id"] == dropped["id"][0], "file_url"].item().startswith("file://")


def test_manifest_accounts_for_every_input_row(demo_data):
    _, data_dir, manifest, table = demo_data
    assert manifest["rows_in"] == len(table) == 30
    assert manifest["counts"] == {
        "kept": 24,
        "prefiltered": 1,
        "failed_download": 2,
        "filtered": 3,
        "lost": 0,
    }
    assert sum(manifest["counts"].values()) == manifest["rows_in"]
    rows = pd.read_parquet(data_dir / "rows.parquet").set_index("url")
    assert sorted(rows["id"]) == sorted(table["id"]) and rows["row"].tolist() == list(range(30))
    by_name = {url.rsplit("/", 1)[-1]: row for url, row in rows.iterrows()}
    assert by_name["missing.png"]["status"] == "failed_download"
    assert "404" in by_name["missing.png"]["reason"]
    assert "refused" in by_name["refused.png"]["reason"].lower()
    assert by_name["not_an_image.png"]["status"] == "filtered"
    assert by_name["not_an_image.png"]["reason"].startswith("undecodable image")
    assert by_name["truncated.png"]["status"] == "filtered"
    assert by_name["too_small.png"]["status"] == "filtered"
    assert by_name["too_small.png"]["reason"] == "shorter side below 48 px"
    assert by_name["00001.png"]["status"] == "prefiltered"  # the file:// URL
    assert by_name["00003.png"]["status"] == "kept"
    assert by_name["00003.png"]["shard"] in {s["path"] for s in manifest["shards"]}
    assert sum(s["count"] for s in manifest["shards"]) == 24
    assert sum(manifest["buckets"].values()) == 24
    assert manifest["parts"]["part-00000"]["rows"] == 29


def test_manifest_refuses_a_missing_part(demo_data, tmp_path):
    from nyaflow.preprocess import write_manifest

    cfg, data_dir, _, _ = demo_data
    prefilter_dir = data_dir.parent / "download" / "prefilter"
    with pytest.raises(ValueError, match="a part is missing"):
        write_manifest(cfg, prefilter_dir, [], tmp_path)
    assert not (tmp_path / "manifest.json").exists()


def test_check_tar_catches_truncation_that_tarfile_reads_silently(demo_data, tmp_path):
    import tarfile

    from nyaflow.shards import check_tar

    _, data_dir, manifest, _ = demo_data
    shard = data_dir / "shards" / manifest["shards"][0]["path"]
    keys = check_tar(shard)
    assert len(keys) == manifest["shards"][0]["count"]
    with tarfile.open(shard) as tar:
        members = tar.getmembers()
    # Cut right after the last member's data: tarfile reads every member without complaint.
    last = members[-1]
    cut = tmp_path / "cut.tar"
    cut.write_bytes(shard.read_bytes()[: last.offset_data + (last.size + 511) // 512 * 512])
    with tarfile.open(cut) as tar:
        assert len(tar.getmembers()) == len(members)
    with pytest.raises(ValueError, match="end-of-archive"):
        check_tar(cut)
    cut.write_bytes(shard.read_bytes()[: last.offset_data + 10])
    with pytest.raises(ValueError):
        check_tar(cut)


def test_training_shards_hold_bucket_sized_images_captions_and_micro_conditioning(demo_data):
    _, data_dir, manifest, table = demo_data
    ds = TrainingSet(data_dir)
    assert len(ds) == 24
    seen_ids = set()
    for entry in manifest["shards"]:
        assert entry["path"].startswith(f"part-00000/{entry['bucket'][0]}x{entry['bucket'][1]}-")
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

    url, tags = table.loc[0, ["file_url", "tag_string_general"]]
    img = Image.open(root / "source" / "images" / url.rsplit("/", 1)[-1]).convert("RGB")
    corner = img.getpixel((0, 0))
    assert corner == COLOURS[background_colour(tags)]
    assert background_colour("red circle, blue background, solo") == "blue"
    assert background_colour("a cat") is None
