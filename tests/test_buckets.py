"""Aspect buckets, placement and SDXL micro-conditioning on chosen sizes."""

import io
import json

import pytest
from PIL import Image

from nyaflow.buckets import make_buckets, nearest_bucket, place
from nyaflow.preprocess import Rejected, download_scale, make_sample

SETTINGS = {
    "resolution": 64,
    "bucket_step": 16,
    "max_aspect": 2.0,
    "min_side": 48,
    "max_upscale": 1.0,
    "max_pixels": 10_000,
    "image_format": "png",
    "downscale_filter": "lanczos",
}


def test_sdxl_buckets_are_multiples_of_64_with_area_near_1024_squared():
    buckets = make_buckets(1024, 64, 2.0)
    assert (1024, 1024) in buckets
    assert (768, 1344) in buckets and (1344, 768) in buckets
    for h, w in buckets:
        assert h % 64 == 0 and w % 64 == 0
        assert 0.93 < h * w / 1024**2 <= 1
        assert max(h, w) / min(h, w) <= 2.0
    assert buckets == sorted(buckets)


def test_demo_buckets():
    assert make_buckets(64, 16, 2.0) == [(48, 80), (64, 64), (80, 48)]


def test_nearest_bucket_and_placement_on_chosen_sizes():
    buckets = make_buckets(1024, 64, 2.0)
    # A 3:2 landscape photo (h=1000, w=1500) goes to the bucket closest to aspect 1.5.
    bucket = nearest_bucket(1000, 1500, buckets)
    assert bucket == (832, 1216)
    p = place(1000, 1500, bucket)
    # scale = max(832/1000, 1216/1500) = 0.832 -> resized (832, 1248), crop 32 px off the width, centred.
    assert p.resized == (832, 1248)
    assert p.crop_top_left == (0, 16)
    assert p.target == (832, 1216)
    assert p.original == (1000, 1500)


def _png(w, h, colour=(200, 30, 30)):
    buf = io.BytesIO()
    Image.new("RGB", (w, h), colour).save(buf, format="PNG")
    return buf.getvalue()


def test_micro_conditioning_of_a_training_sample():
    bucket, sample = make_sample(_png(120, 64), "red circle", SETTINGS, make_buckets(64, 16, 2.0))
    assert bucket == (48, 80)  # aspect 1.875 -> 80/48 = 1.67 is nearest
    meta = json.loads(sample["json"])
    # scale = max(48/64, 80/120) = 0.75 -> resized (48, 90), crop 5 px from the left
    assert meta == {"original_size": [64, 120], "crop_top_left": [0, 5], "target_size": [48, 80]}
    assert Image.open(io.BytesIO(sample["png"])).size == (80, 48)
    assert sample["txt"] == b"red circle"


@pytest.mark.parametrize(
    "data,reason",
    [
        (_png(40, 40), "shorter side below 48 px"),
        (_png(200, 40), "shorter side below 48 px"),
        (_png(150, 80), "more than 10000 pixels"),
        (_png(99, 48), "aspect ratio beyond 2.0"),
        (b"<html>not an image</html>", "undecodable image"),
        (_png(64, 64)[:40], "undecodable image"),
    ],
)
def test_unusable_images_are_rejected_with_a_reason(data, reason):
    with pytest.raises(Rejected, match=reason):
        make_sample(data, "x", SETTINGS, make_buckets(64, 16, 2.0))


def test_small_images_are_upscaled_only_up_to_max_upscale():
    buckets = make_buckets(96, 16, 2.0)
    with pytest.raises(
        Rejected, match=r"smaller than its bucket \(needs 1.50x, data.preprocess.max_upscale is 1\)"
    ):
        make_sample(_png(64, 64), "x", SETTINGS, buckets)
    with pytest.raises(Rejected, match="needs 1.50x"):
        make_sample(_png(64, 64), "x", {**SETTINGS, "max_upscale": 1.4}, buckets)
    bucket, sample = make_sample(_png(64, 64), "x", {**SETTINGS, "max_upscale": 1.5}, buckets)
    assert bucket == (96, 96)
    assert json.loads(sample["json"])["original_size"] == [64, 64]
    assert Image.open(io.BytesIO(sample["png"])).size == (96, 96)


def test_original_size_is_the_size_before_img2dataset_shrank_it():
    # img2dataset stored a 1536 x 1024 copy of a 3072 x 2048 original: SDXL is told the original size.
    shrunk = {"width": 1536, "height": 1024, "original_width": 3072, "original_height": 2048}
    assert download_scale(shrunk) == (2.0, 2.0)
    cropped = {"width": 512, "height": 512, "original_width": 2000, "original_height": 1000}  # center_crop
    assert download_scale(cropped) == (1000 / 512, 2000 / 512)
    assert download_scale({"width": None, "original_width": 3072}) == (1.0, 1.0)  # stored as downloaded
    assert download_scale({"width": None, "original_width": None}) == (1.0, 1.0)  # resize_mode: no
    buckets = make_buckets(64, 16, 2.0)
    _, sample = make_sample(_png(120, 64), "x", SETTINGS, buckets, source_scale=(2.0, 2.0))
    assert json.loads(sample["json"]) == {
        "original_size": [128, 240],
        "crop_top_left": [0, 5],
        "target_size": [48, 80],
    }
