"""Prefilter: the input contract (parquet / csv / jsonl, configurable columns, ids, relative URLs), every
drop reason, dedupe among surviving rows, parts, and the real danbooru metadata."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import make_config

from nyaflow.prefilter import TableError, prefilter_table, read_table

SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "danbooru_sample.jsonl"
H = "https://img.example"

# (file_url, general tags, character tags, rating, score, width, height, md5) -> expected reason ("" = kept)
ROWS = [
    (f"{H}/a.jpg", "1girl solo", "", "g", 10, 1000, 1000, "AAAA", ""),
    (None, "1girl", "", "g", 10, None, None, None, "missing url"),
    ("", "1girl", "", "g", 10, None, None, None, "missing url"),
    ("/data/rel.jpg", "1girl", "", "g", 10, None, None, None, "relative url and no data.base_url"),
    ("file:///etc/passwd", "1girl", "", "g", 10, None, None, None, "url scheme not allowed: file"),
    (
        "data:image/png;base64,iVBORw0KGgo=",
        "1girl",
        "",
        "g",
        10,
        None,
        None,
        None,
        "url scheme not allowed: data",
    ),
    ("ftp://img.example/x.jpg", "1girl", "", "g", 10, None, None, None, "url scheme not allowed: ftp"),
    ("http:///nohost.jpg", "1girl", "", "g", 10, None, None, None, "url has no host"),
    (f"{H}/e.jpg", "1girl", "", "e", 10, None, None, None, "rating not allowed: e"),
    (f"{H}/norating.jpg", "1girl", "", None, 10, None, None, None, "rating missing"),
    (f"{H}/low.jpg", "1girl", "", "s", 1, None, None, None, "score below 5"),
    (f"{H}/noscore.jpg", "1girl", "", "g", None, None, None, None, "score missing"),
    (f"{H}/small.jpg", "1girl", "", "g", 10, 200, 1000, None, "shorter side below 256 px"),
    (f"{H}/wide.jpg", "1girl", "", "g", 10, 3000, 1000, None, "aspect ratio (width/height) above 2.5"),
    (f"{H}/tall.jpg", "1girl", "", "g", 10, 1000, 3000, None, "aspect ratio (width/height) below 0.4"),
    (f"{H}/comic.jpg", "comic 1girl", "", "g", 10, None, None, None, "banned tag: comic"),
    (f"{H}/boy.jpg", "1boy", "", "g", 10, None, None, None, "missing required tag: 1girl"),
    (f"{H}/a.jpg", "1girl", "", "g", 10, None, None, None, "duplicate url"),
    (f"{H}/a-copy.jpg", "1girl", "", "g", 10, None, None, "aaaa", "duplicate md5"),
    (f"{H}/unknown.jpg", "1girl", "", "s", 10, None, None, None, ""),
    (f"{H}/e.jpg", "1girl", "", "g", 10, None, None, None, ""),  # same URL as a dropped row: kept
    (f" {H}/spaces.jpg ", "1girl", "", "g", 10, None, None, "", ""),
    ("HTTPS://IMG.EXAMPLE/upper.jpg", "1girl", "", "g", 10, None, None, None, ""),
    (f"{H}/char.jpg", "1girl", "comic", "g", 10, None, None, None, "banned tag: comic"),
    ("//cdn.example/proto.jpg", "1girl", "", "g", 10, None, None, None, "relative url and no data.base_url"),
    (f"{H}/1girl-in-name.jpg", "1girls", "", "g", 10, None, None, None, "missing required tag: 1girl"),
    (f"{H}/fewpixels.jpg", "1girl", "", "g", 10, 500, 400, None, "fewer than 250000 pixels"),
]
PREFILTER = {
    "ratings": ["g", "s"],
    "min_score": 5,
    "min_side": 256,
    "min_pixels": 250_000,
    "min_aspect": 0.4,
    "max_aspect": 2.5,
    "require_tags": ["1girl"],
    "ban_tags": ["comic"],
}


def table() -> pd.DataFrame:
    df = pd.DataFrame(
        [r[:-1] for r in ROWS],
        columns=[
            "file_url",
            "tag_string_general",
            "tag_string_character",
            "rating",
            "score",
            "image_width",
            "image_height",
            "md5",
        ],
    )
    df.insert(0, "id", np.arange(len(df)) * 10 + 1000)
    df["created_at"] = "2021-03-04T05:06:07.000+09:00"
    return df.astype({"score": "Int64", "image_width": "Int64", "image_height": "Int64"})


def write(df: pd.DataFrame, path: Path) -> Path:
    if path.suffix == ".parquet":
        df.to_parquet(path, index=False)
    elif path.suffix == ".csv":
        df.to_csv(path, index=False)
    else:
        df.to_json(path, orient="records", lines=True)
    return path


def run(cfg: dict, path: Path):
    kept, dropped, summary = prefilter_table(read_table(path, "auto", cfg["data"]["columns"]), cfg)
    return kept.to_pandas(), dropped.to_pandas(), summary


@pytest.mark.parametrize("fmt", ["parquet", "csv", "jsonl"])
def test_every_row_is_kept_or_dropped_with_its_reason(tmp_path, fmt):
    cfg = make_config(data={"prefilter": PREFILTER})
    df = table()
    kept, dropped, summary = run(cfg, write(df, tmp_path / f"urls.{fmt}"))
    expected = dict(zip(df["id"], (r[-1] for r in ROWS), strict=True))
    got = {**dict.fromkeys(kept["id"], ""), **dict(zip(dropped["id"], dropped["reason"], strict=True))}
    assert got == expected
    assert summary["rows_in"] == len(df) and summary["kept"] == len(kept)
    assert sum(summary["dropped"].values()) == len(dropped)
    assert (
        kept["row"].tolist() == sorted(kept["row"]) and (df["id"].to_numpy()[kept["row"]] == kept["id"]).all()
    )
    urls = dict(zip(kept["id"], kept["url"], strict=True))
    assert urls[1000 + 21 * 10] == f"{H}/spaces.jpg"  # whitespace trimmed
    assert kept.set_index("id").loc[1000, "md5"] == "aaaa"  # md5 compared lower case
    assert set(kept["year"]) == {2021}
    assert kept.columns.tolist()[:3] == ["row", "id", "url"]


def test_relative_urls_resolve_against_base_url_and_ids_can_be_row_numbers(tmp_path):
    cfg = make_config(data={"base_url": "https://danbooru.donmai.us/", "columns": {"id": ""}})
    kept, dropped, _ = run(cfg, write(table(), tmp_path / "urls.parquet"))
    urls = dict(zip(kept["id"], kept["url"], strict=True))
    assert urls[3] == "https://danbooru.donmai.us/data/rel.jpg"
    assert urls[24] == "https://cdn.example/proto.jpg"
    assert urls[0] == f"{H}/a.jpg"
    assert sorted([*kept["id"], *dropped["id"]]) == list(range(len(ROWS)))  # row numbers as ids


def test_bad_ids_are_refused_with_the_column_named(tmp_path):
    df = table()
    cfg = make_config()
    with pytest.raises(TableError, match="not unique"):
        run(cfg, write(df.assign(id=1), tmp_path / "dup.parquet"))
    with pytest.raises(TableError, match="must hold integers"):
        run(cfg, write(df.assign(id=[f"x{i}" for i in range(len(df))]), tmp_path / "str.parquet"))
    with pytest.raises(TableError, match="no id column 'post_id'"):
        run(make_config(data={"columns": {"id": "post_id"}}), write(df, tmp_path / "ok.parquet"))
    with pytest.raises(TableError, match="no URL column 'file_url'"):
        run(cfg, write(df.rename(columns={"file_url": "url"}), tmp_path / "nourl.parquet"))
    # Other names for the columns, and a table without the optional ones.
    renamed = df[["id", "file_url"]].rename(columns={"id": "key", "file_url": "url"})
    kept, _, _ = run(
        make_config(data={"columns": {"id": "key", "url": "url"}}), write(renamed, tmp_path / "r.csv")
    )
    assert len(kept) == 17 and set(kept.columns) == {"row", "id", "url"}  # 8 bad URLs, 2 duplicates


def test_bytes_that_are_not_utf8_are_decoded_with_replacement(tmp_path):
    lines = [
        b'{"id": 1, "file_url": "https://x.example/1.jpg", "tag_string_general": "caf\xe9 1girl"}',
        b'{"id": 2, "file_url": "https://x.example/\xff.jpg", "tag_string_general": "1girl"}',
        b'{"id": 3, "file_url": "https://x.example/3.jpg", "tag_string_general": "1girl"}',
    ]
    (tmp_path / "t.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    csv = b"id,file_url,tag_string_general\n1,https://x.example/1.jpg,caf\xe9 1girl\n"
    csv += b"2,https://x.example/\xff.jpg,1girl\n3,https://x.example/3.jpg,1girl\n"
    (tmp_path / "t.csv").write_bytes(csv)
    for name in ("t.jsonl", "t.csv"):
        kept, dropped, _ = run(make_config(), tmp_path / name)
        assert kept["id"].tolist() == [1, 3]
        assert kept["tags_general"].tolist() == ["caf\ufffd 1girl", "1girl"]
        assert dropped["reason"].tolist() == ["url is not valid UTF-8"]


def test_prefilter_writes_parts_dropped_rows_and_a_summary(tmp_path):
    cfg = make_config(data={"prefilter": PREFILTER, "download": {"parts": 3}})
    cfg_file = tmp_path / "config.yaml"
    cfg_file.write_text(yaml.safe_dump(cfg))
    from nyaflow.cli import main

    assert (
        main(
            [
                "prefilter",
                "--config",
                str(cfg_file),
                "--table",
                str(write(table(), tmp_path / "t.parquet")),
                "--out",
                str(tmp_path / "pf"),
            ]
        )
        == 0
    )
    summary = json.loads((tmp_path / "pf" / "summary.json").read_text())
    parts = [pq.read_table(tmp_path / "pf" / f"part-{i:05d}.parquet").to_pandas() for i in range(3)]
    assert [len(p) for p in parts] == list(summary["parts"].values()) == [2, 1, 2]
    assert pd.concat(parts)["row"].tolist() == sorted(pd.concat(parts)["row"])  # contiguous, in table order
    dropped = pd.read_parquet(tmp_path / "pf" / "dropped.parquet")
    assert len(dropped) + summary["kept"] == summary["rows_in"] == len(ROWS)
    assert not list((tmp_path / "pf").glob("*.partial"))


def test_real_danbooru_metadata(tmp_path):
    if not SAMPLE.is_file():
        pytest.skip(f"real danbooru metadata not found at {SAMPLE} (see DESIGN.md, section 4)")
    raw = pd.read_json(SAMPLE, lines=True)
    kept, dropped, _ = run(make_config(), SAMPLE)
    relative = raw["file_url"].str.startswith("/")
    assert relative.sum() == 19
    assert set(dropped["id"]) == set(raw.loc[relative, "id"])
    assert set(dropped["reason"]) == {"relative url and no data.base_url"}
    cfg = make_config(data={"base_url": "https://danbooru.donmai.us", "prefilter": {"ratings": ["g", "s"]}})
    kept, dropped, _ = run(cfg, SAMPLE)
    assert len(kept) == (raw["rating"].isin(["g", "s"])).sum() == 61
    assert dict(dropped["reason"].value_counts()) == {"rating not allowed: q": 5, "rating not allowed: e": 1}
    assert kept["url"].str.startswith("https://").all()
    assert (kept["md5"].str.len() == 32).all() and kept["md5"].is_unique
    assert set(kept["year"]) <= set(range(2016, 2024)) and len(set(kept["year"])) >= 3
    assert kept["score_percentile"].between(0, 1).all()
    assert kept["tags_meta"].isna().sum() == 19  # the 2016 records have no tag_string_meta
    # A banned-tag filter on real tags with punctuation.
    cfg = make_config(data={"base_url": "https://danbooru.donmai.us", "prefilter": {"ban_tags": [":d"]}})
    kept, dropped, _ = run(cfg, SAMPLE)
    assert len(dropped) == raw["tag_string_general"].str.split().map(lambda t: ":d" in t).sum() > 0
