"""Captions from danbooru tags (on real metadata) and the deterministic training-time caption processing."""

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import make_config

from nyaflow.captions import (
    build_caption,
    build_captions,
    caption_dropped,
    format_tag,
    is_kaomoji,
    train_caption,
)
from nyaflow.prefilter import prefilter_table, read_table

SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "danbooru_sample.jsonl"


def settings(**changes):
    return {**make_config()["data"]["captions"], **changes}


@pytest.fixture(scope="module")
def danbooru():
    """The real danbooru metadata, prefiltered (canonical part columns), relative URLs resolved."""
    if not SAMPLE.is_file():
        pytest.skip(f"real danbooru metadata not found at {SAMPLE} (see DESIGN.md, section 4)")
    cfg = make_config(data={"base_url": "https://danbooru.donmai.us"})
    kept, dropped, _ = prefilter_table(read_table(SAMPLE, "auto", cfg["data"]["columns"]), cfg)
    assert dropped.num_rows == 0
    return kept.to_pandas(), pd.read_json(SAMPLE, lines=True)


@pytest.mark.parametrize(
    "tag,expected",
    [
        ("long_hair", "long hair"),
        ("^_^", "^_^"),
        (">_<", ">_<"),
        ("0_0", "0_0"),
        ("o_o", "o_o"),
        ("|_|", "|_|"),
        ("star_(sky)", r"star \(sky\)"),
        ("asuna_(bunny)_(blue_archive)", r"asuna \(bunny\) \(blue archive\)"),
        ("herta_(honkai:_star_rail)", r"herta \(honkai: star rail\)"),
        (":d", ":d"),
        (">:)", r">:\)"),
        ("ch'en_(arknights)", r"ch'en \(arknights\)"),
        ("love_live!_sunshine!!", "love live! sunshine!!"),
        ("k.syo.e+", "k.syo.e+"),
        ("1girl", "1girl"),
    ],
)
def test_tags_are_formatted_for_captions(tag, expected):
    assert format_tag(tag) == expected


def test_kaomoji_detection():
    for tag in ("^_^", ">_<", "0_0", "o_o", "(o)_(o)", "x_x", "u_u", "=_=", "@_@", "+_+", "6_9"):
        assert is_kaomoji(tag), tag
    for tag in ("long_hair", "1girl", ":d", "one_eye_closed", "blue_archive", "o_ring", "re:zero"):
        assert not is_kaomoji(tag), tag
    assert format_tag("star_(sky)", escape_parentheses=False) == "star (sky)"


def test_caption_order_extra_tags_and_plain_captions():
    tags = {
        "general": ["1girl", "smile", "^_^", "highres"],
        "character": ["hatsune_miku"],
        "copyright": ["vocaloid"],
        "artist": ["kei_(keigarou)"],
        "meta": ["commentary"],
    }
    order = ["character", "copyright", "artist", "general", "rating", "quality", "year"]
    caption = build_caption(
        tags, settings(order=order, drop_tags=["highres"]), rating="s", percentile=0.97, year=2021
    )
    assert caption == (
        r"hatsune miku, vocaloid, kei \(keigarou\), 1girl, smile, ^_^, sensitive, masterpiece, year 2021"
    )
    # Defaults: character, copyright, artist, general; no meta, rating, quality or year.
    assert build_caption(tags, settings(), rating="e", percentile=0.5, year=2020) == (
        r"hatsune miku, vocaloid, kei \(keigarou\), 1girl, smile, ^_^, highres"
    )
    assert build_caption(tags, settings(order=["quality"]), percentile=0.0) == "worst quality"
    assert build_caption(tags, settings(order=["quality"]), percentile=0.6) == "high quality"
    assert build_caption(tags, settings(order=["quality", "year"]), percentile=float("nan"), year=0) == ""
    # No tags: the plain caption passes through unchanged; undecodable bytes are left out.
    plain = "A girl_with (red) hair, smiling."
    assert build_caption({}, settings(), plain=plain) == plain
    assert build_caption({}, settings(), plain="caf\ufffd au lait") == "caf au lait"
    assert build_caption({"general": ["ok", "bad\ufffdtag"]}, settings()) == "ok"
    assert build_caption({}, settings(), plain=None) == ""


def test_captions_of_real_danbooru_posts(danbooru):
    kept, raw = danbooru
    order = ["character", "copyright", "artist", "general", "rating", "quality", "year"]
    captions = build_captions(kept, settings(order=order))
    assert len(captions) == len(raw) == 67
    by_id = dict(zip(kept["id"], captions, strict=True))
    for caption in captions:
        assert caption
        tags = caption.split(", ")
        assert len(tags) == len(set(tags))
        for tag in tags:  # underscores survive only inside kaomoji; every parenthesis is escaped
            assert "_" not in tag or is_kaomoji(tag), tag
            assert not re.search(r"(?<!\\)[()]", tag), tag
        assert re.search(r"year 20(1[6-9]|2[0-3])$", caption)
    # Post 4018204: eyjafjalla_(arknights) / arknights / chagara, general tags in their order.
    assert by_id[4018204].startswith(
        r"eyjafjalla \(arknights\), arknights, chagara, 1girl, ahoge, animal ears, brown hair"
    )
    assert r"originium arts \(arknights\)" in by_id[4018204]
    assert "commentary" not in by_id[4018204].split(", ")  # meta tags are not in the default order
    # Kaomoji tags from the sample keep their form.
    general = raw.set_index("id")["tag_string_general"]
    for kaomoji in (":d", ";)", ">:)", "|_|"):
        posts = [i for i, tags in general.items() if kaomoji in tags.split()]
        assert posts, kaomoji
        assert format_tag(kaomoji) in by_id[posts[0]].split(", ")
    # The 2016 records have no tag_string_meta: still captioned; rating tags cover the old and new scale.
    assert {c.split(", ")[-3] for c in captions} <= {"general", "sensitive", "questionable", "explicit"}
    # Quality tags follow score percentiles over the table: the top scorer gets the top tag.
    top = raw.loc[raw["score"].idxmax(), "id"]
    assert "masterpiece" in by_id[top].split(", ")


def test_train_caption_is_deterministic_and_keeps_the_first_tags():
    caption = ", ".join(f"tag{i}" for i in range(30))
    s = settings(keep_first_n=2, shuffle=True, tag_dropout=0.0)
    first = train_caption(caption, s, seed=3, epoch=0, index=5)
    assert first == train_caption(caption, s, seed=3, epoch=0, index=5)
    assert first.split(", ")[:2] == ["tag0", "tag1"]
    assert sorted(first.split(", ")) == sorted(caption.split(", "))
    others = {train_caption(caption, s, seed=3, epoch=e, index=i) for e in range(3) for i in range(3)}
    assert len(others) == 9  # a new order for every epoch and sample
    assert train_caption(caption, s, seed=4, epoch=0, index=5) != first
    # Neither shuffle nor dropout: the caption is untouched, plain text included.
    plain = "A girl, smiling, in a park."
    assert train_caption(plain, settings(shuffle=False, tag_dropout=0.0), 0, 0, 0) == plain
    assert train_caption("", s, 0, 0, 0) == ""


def test_tag_dropout_rate_and_fixed_head():
    caption = ", ".join(f"t{i}" for i in range(101))
    s = settings(keep_first_n=1, shuffle=False, tag_dropout=0.3)
    kept = []
    for index in range(200):
        tags = train_caption(caption, s, seed=0, epoch=1, index=index).split(", ")
        assert tags[0] == "t0"
        assert tags[1:] == sorted(tags[1:], key=lambda t: int(t[1:]))  # no shuffle: order kept
        kept.append(len(tags) - 1)
    assert abs(np.mean(kept) / 100 - 0.7) < 0.02
    everything = settings(keep_first_n=0, shuffle=False, tag_dropout=1.0)
    assert train_caption(caption, everything, 0, 0, 0) == ""


def test_caption_dropout_rate_is_keyed_by_seed_epoch_and_sample():
    drops = np.array([[caption_dropped(0, epoch, i, 0.1) for i in range(4000)] for epoch in range(2)])
    assert abs(drops.mean() - 0.1) < 0.01
    assert drops.tolist() == [[caption_dropped(0, e, i, 0.1) for i in range(4000)] for e in range(2)]
    assert (drops[0] != drops[1]).sum() > 400  # other samples drop in another epoch
    assert [caption_dropped(1, 0, i, 0.1) for i in range(4000)] != drops[0].tolist()
    assert not any(caption_dropped(0, 0, i, 0.0) for i in range(100))
    assert all(caption_dropped(0, 0, i, 1.0) for i in range(100))
