"""Prefilter stage: the URL table -> the rows worth downloading, split into N parts, and every other row
with the reason it was dropped.

Input contract. A table (parquet, csv or jsonl) with one row per image. Column names are configurable
(`data.columns`); the danbooru metadata shape is the reference: id, file_url, tag_string_general /
character / copyright / artist / meta, rating (g/s/q/e), score, image_width, image_height, created_at,
md5. Only the URL column is required. Rows keep a stable unique id: the table's id column (integers), or
the row number when `data.columns.id` is empty. Relative URLs (`/data/...`) are resolved against
`data.base_url`. Text that is not valid UTF-8 is decoded with replacement characters (a URL that is not
valid UTF-8 is dropped).

Checks, in order; the first a row fails is its reason (status `prefiltered` in the manifest):
URL present, valid UTF-8, absolute (or resolvable), with an allowed scheme (`data.allowed_schemes`: no
file://, data:, ftp:...) and a host; rating, score, size, aspect ratio (from the metadata, when the
columns exist); required and banned tags; then among the rows still in, duplicate URLs and duplicate md5s
(the first row wins).

Everything is vectorised with pyarrow / numpy: a 1M-row danbooru-shaped table takes a few seconds
(`benchmarks/prefilter.py`).

Outputs in the prefilter folder: `part-NNNNN.parquet` (the kept rows in table order, split into
`data.download.parts` contiguous parts, with canonical columns: row, id, url, md5, rating,
score_percentile, year, tags_<category>, caption), `dropped.parquet` (row, id, url, reason) and
`summary.json` (counts).
"""

from __future__ import annotations

import json
import os
import re
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
import pyarrow.json as pa_json
import pyarrow.parquet as pq

from nyaflow.captions import TAG_CATEGORIES
from nyaflow.errors import UserError

REPLACEMENT = "\ufffd"
TEXT_COLUMNS = ("url", "caption", "md5", "rating", "created_at")
RATINGS = ("g", "s", "q", "e")


class TableError(UserError, ValueError):
    """The URL table cannot be used as it is (missing column, duplicate ids, ...)."""


def part_names(parts: int) -> list[str]:
    return [f"part-{i:05d}" for i in range(parts)]


def table_format(path: Path, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    name = path.name.lower()
    for ext, kind in ((".parquet", "parquet"), (".csv", "csv"), (".jsonl", "jsonl"), (".ndjson", "jsonl")):
        if name.endswith(ext):
            return kind
    raise TableError(f"cannot tell the format of {path} from its name: set data.table_format")


def read_table(path: Path, fmt: str, columns: dict) -> pa.Table:
    """Read the configured columns that the table has; text columns that may hold bytes that are not
    UTF-8 are read as binary and decoded later."""
    path = Path(path)
    kind = table_format(path, fmt)
    text = {columns[c] for c in TEXT_COLUMNS if columns[c]} | {v for v in columns["tags"].values() if v}
    if kind == "parquet":
        names = pq.read_schema(path).names
        wanted = [c for c in _wanted(columns) if c in names]
        return pq.read_table(path, columns=wanted)
    if kind == "csv":
        opts = pa_csv.ConvertOptions(
            column_types={c: pa.binary() for c in text},
            strings_can_be_null=True,
            quoted_strings_can_be_null=False,
        )
        table = pa_csv.read_csv(path, convert_options=opts)
    else:
        table = pa_json.read_json(path)
    return table.select([c for c in _wanted(columns) if c in table.column_names])


def _wanted(columns: dict) -> list[str]:
    names = [v for k, v in columns.items() if k != "tags" and v] + [v for v in columns["tags"].values() if v]
    return list(dict.fromkeys(names))


def to_text(column: pa.ChunkedArray | pa.Array) -> tuple[pa.Array, np.ndarray]:
    """(UTF-8 string array, mask of rows whose bytes were not valid UTF-8 and were decoded with
    replacement characters). Non-text columns (numbers, timestamps) are cast to strings."""
    column = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    n = len(column)
    bad = np.zeros(n, dtype=bool)
    kind = column.type
    if pa.types.is_null(kind):
        return pa.nulls(n, pa.string()), bad
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        try:
            column.validate(full=True)  # pyarrow's readers do not check UTF-8; this does
            return column.cast(pa.string()), bad
        except pa.ArrowInvalid:
            raw = column.view(pa.binary() if pa.types.is_string(kind) else pa.large_binary())
    elif pa.types.is_binary(kind) or pa.types.is_large_binary(kind):
        try:
            return column.cast(pa.string()), bad  # validates UTF-8
        except pa.ArrowInvalid:
            raw = column
    else:
        return pc.cast(column, pa.string()), bad
    values = []
    for i, b in enumerate(raw.to_pylist()):
        try:
            values.append(None if b is None else b.decode("utf-8"))
        except UnicodeDecodeError:
            bad[i] = True
            values.append(b.decode("utf-8", errors="replace"))
    return pa.array(values, type=pa.string()), bad


def to_number(column) -> np.ndarray:
    """float64 numpy array, NaN where missing or not a number."""
    column = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if (
        pa.types.is_integer(column.type)
        or pa.types.is_floating(column.type)
        or pa.types.is_boolean(column.type)
    ):
        return pc.cast(column, pa.float64()).to_numpy(zero_copy_only=False)
    text, _ = to_text(column)
    import pandas as pd

    return pd.to_numeric(pd.Series(text.to_numpy(zero_copy_only=False)), errors="coerce").to_numpy(float)


def to_year(column) -> np.ndarray:
    """Year of each created_at value (ISO string, timestamp, or seconds since the epoch); 0 if unknown."""
    column = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if pa.types.is_timestamp(column.type) or pa.types.is_date(column.type):
        return pc.fill_null(pc.year(column), 0).to_numpy(zero_copy_only=False).astype(np.int32)
    if pa.types.is_integer(column.type) or pa.types.is_floating(column.type):
        secs = pc.cast(column, pa.float64()).to_numpy(zero_copy_only=False)
        ok = np.isfinite(secs)
        years = np.zeros(len(secs), dtype=np.int32)
        years[ok] = secs[ok].astype("datetime64[s]").astype("datetime64[Y]").astype(int) + 1970
        return years
    text, _ = to_text(column)
    digits = pc.struct_field(pc.extract_regex(text, r"^\s*(?P<y>\d{4})"), [0])
    return pc.fill_null(pc.cast(pc.if_else(pc.equal(digits, ""), None, digits), pa.int32()), 0).to_numpy(
        zero_copy_only=False
    )


def score_percentiles(scores: np.ndarray) -> np.ndarray:
    """Fraction of the scored rows with a strictly lower score (ties share one value); NaN if no score."""
    out = np.full(len(scores), np.nan)
    ok = np.isfinite(scores)
    if ok.any():
        ranked = np.sort(scores[ok])
        out[ok] = np.searchsorted(ranked, scores[ok], side="left") / ok.sum()
    return out


def first_occurrence(values: pa.Array, candidates: np.ndarray) -> np.ndarray:
    """Mask of candidate rows whose value (not null) appeared in an earlier candidate row."""
    idx = np.flatnonzero(candidates)
    sub = values.take(pa.array(idx))
    valid = ~np.asarray(sub.is_null().to_numpy(zero_copy_only=False), dtype=bool)
    codes = pc.dictionary_encode(sub).indices.to_numpy(zero_copy_only=False)
    codes = np.where(valid, codes, -1)
    seen = np.zeros(len(idx), dtype=bool)
    _, first = np.unique(codes, return_index=True)
    seen[first] = True
    dup = np.zeros(len(values), dtype=bool)
    dup[idx[valid & ~seen]] = True
    return dup


class Reasons:
    """Per-row reason codes: the first check a row fails is the one recorded."""

    def __init__(self, n: int):
        self.code = np.zeros(n, dtype=np.int32)
        self.names = [""]

    def drop(self, where: np.ndarray, reason: str) -> None:
        """Drop the rows of `where` (a mask or row indices) that are still in."""
        where = np.asarray(where)
        if where.dtype != bool:
            mask = np.zeros(len(self.code), dtype=bool)
            mask[where.astype(np.int64)] = True
            where = mask
        mask = where & (self.code == 0)
        if mask.any():
            self.names.append(reason)
            self.code[mask] = len(self.names) - 1

    def drop_by_value(self, mask: np.ndarray, values: np.ndarray, template: str) -> None:
        """Drop masked rows with a reason naming each row's value (e.g. its URL scheme)."""
        rows = np.flatnonzero(np.asarray(mask, dtype=bool) & (self.code == 0))
        names = values[rows].astype(str)
        for value in np.unique(names):
            self.drop(rows[names == value], template.format(value=value or "<none>"))

    @property
    def kept(self) -> np.ndarray:
        return self.code == 0

    def reason_array(self, rows: np.ndarray) -> pa.Array:
        names = pa.array(self.names, type=pa.string())
        return names.take(pa.array(self.code[rows]))


def tag_columns(table: pa.Table, columns: dict, text) -> list[pa.Array]:
    """Space-separated tag strings to search: the tag columns, else a comma-separated caption column turned
    into tags ('red circle, solo' -> 'red_circle solo'); `text(name)` reads a column as UTF-8."""
    cols = [text(c) for c in columns["tags"].values() if c and c in table.column_names]
    if cols or not (columns["caption"] and columns["caption"] in table.column_names):
        return cols
    caption = pc.utf8_trim_whitespace(text(columns["caption"]))
    caption = pc.replace_substring_regex(caption, r"\s*,\s*", "\x00")
    return [pc.replace_substring(pc.replace_substring(caption, " ", "_"), "\x00", " ")]


def has_tag(cols: list[pa.Array], tags: list[str], rows: np.ndarray) -> np.ndarray:
    """Mask over `rows` (indices) of rows holding any of `tags` (danbooru spelling) in any column."""
    alternatives = "|".join(re.escape(t.strip().replace(" ", "_")) for t in tags)
    pattern = f"(?:^| )(?:{alternatives})(?: |$)"
    found = np.zeros(len(rows), dtype=bool)
    subset = pa.array(rows)
    for col in cols:
        hit = pc.match_substring_regex(col.take(subset) if len(rows) < len(col) else col, pattern)
        found |= np.asarray(pc.fill_null(hit, False).to_numpy(zero_copy_only=False), dtype=bool)
    return found


def resolve_urls(url: pa.Array, base_url: str) -> tuple[pa.Array, np.ndarray]:
    """Absolute URLs: relative ones ('/data/x.jpg', '//host/x.jpg', 'x.jpg') joined to `base_url`.
    Returns (urls, mask of rows that were relative)."""
    scheme = pc.struct_field(pc.extract_regex(url, r"^(?P<s>[A-Za-z][A-Za-z0-9+.\-]*):"), [0])
    relative = np.asarray(pc.fill_null(pc.is_null(scheme), False).to_numpy(zero_copy_only=False), dtype=bool)
    relative &= np.asarray(pc.is_valid(url).to_numpy(zero_copy_only=False), dtype=bool)
    if not base_url or not relative.any():
        return url, relative
    base = base_url.rstrip("/")
    base_scheme = base.split(":", 1)[0]
    origin = base.split("/", 3)
    origin = "/".join(origin[:3]) if len(origin) >= 3 else base
    joined = pc.if_else(
        pc.starts_with(url, "//"),
        pc.binary_join_element_wise(base_scheme + ":", url, ""),
        pc.if_else(
            pc.starts_with(url, "/"),
            pc.binary_join_element_wise(origin, url, ""),
            pc.binary_join_element_wise(base, url, "/"),
        ),
    )
    return pc.if_else(pa.array(relative), joined, url), relative


def prefilter_table(table: pa.Table, config: dict) -> tuple[pa.Table, pa.Table, dict]:
    """(kept rows with canonical columns, dropped rows (row, id, url, reason), counts)."""
    data = config["data"]
    columns, pf = data["columns"], data["prefilter"]
    n = table.num_rows
    have = set(table.column_names)
    reasons = Reasons(n)

    def col(key):
        name = columns[key]
        return table[name] if name and name in have else None

    decoded = {}

    def text(name: str) -> pa.Array:  # each text column is read as UTF-8 once
        if name not in decoded:
            decoded[name] = to_text(table[name])
        return decoded[name][0]

    # Stable ids.
    if columns["id"]:
        if columns["id"] not in have:
            raise TableError(
                f"the URL table has no id column '{columns['id']}' (data.columns.id; empty = row numbers);"
                f" columns: {table.column_names}"
            )
        ids_arr = table[columns["id"]].combine_chunks()
        if ids_arr.null_count:
            raise TableError(f"id column '{columns['id']}' has {ids_arr.null_count} empty values")
        try:
            ids = pc.cast(ids_arr, pa.int64()).to_numpy(zero_copy_only=False)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
            raise TableError(
                f"id column '{columns['id']}' must hold integers ({e});"
                " set data.columns.id to '' to number the rows instead"
            ) from e
        if len(ids) and ids.min() < 0:
            raise TableError(f"id column '{columns['id']}' has negative ids")
        uniq, counts = np.unique(ids, return_counts=True)
        if len(uniq) != n:
            raise TableError(
                f"id column '{columns['id']}' is not unique:"
                f" {uniq[counts > 1][:5].tolist()} appear more than once"
            )
    else:
        ids = np.arange(n, dtype=np.int64)

    # URLs.
    url_col = col("url")
    if url_col is None:
        raise TableError(
            f"the URL table has no URL column '{columns['url']}' (data.columns.url);"
            f" columns: {table.column_names}"
        )
    text(columns["url"])
    raw_url, bad_utf8 = decoded[columns["url"]]
    raw_url = pc.utf8_trim_whitespace(raw_url)
    empty = ~np.asarray(
        pc.fill_null(pc.greater(pc.utf8_length(raw_url), 0), False).to_numpy(False), dtype=bool
    )
    reasons.drop(empty, "missing url")
    reasons.drop(bad_utf8, "url is not valid UTF-8")
    url, relative = resolve_urls(raw_url, data["base_url"])
    if not data["base_url"]:
        reasons.drop(relative, "relative url and no data.base_url")
    scheme = pc.utf8_lower(pc.struct_field(pc.extract_regex(url, r"^(?P<s>[A-Za-z][A-Za-z0-9+.\-]*):"), [0]))
    scheme_np = np.asarray(pc.fill_null(scheme, "").to_numpy(zero_copy_only=False), dtype=object)
    allowed = np.isin(scheme_np, list(data["allowed_schemes"]))
    reasons.drop_by_value(~allowed, scheme_np, "url scheme not allowed: {value}")
    has_host = pc.fill_null(
        pc.match_substring_regex(url, r"^[A-Za-z][A-Za-z0-9+.\-]*://[^/?#\s@]*[^/?#\s:@]"), False
    )
    reasons.drop(~np.asarray(has_host.to_numpy(zero_copy_only=False), dtype=bool), "url has no host")

    # Metadata filters (each applies only when its column exists).
    rating = None
    if col("rating") is not None:
        rating = text(columns["rating"])
        rating = pc.utf8_slice_codeunits(pc.utf8_lower(pc.utf8_trim_whitespace(rating)), 0, 1)
        if pf["ratings"]:
            rating_np = np.asarray(pc.fill_null(rating, "").to_numpy(zero_copy_only=False), dtype=object)
            ok = np.isin(rating_np, list(pf["ratings"]))
            reasons.drop((~ok) & (rating_np == ""), "rating missing")
            reasons.drop_by_value(~ok, rating_np, "rating not allowed: {value}")
    scores = to_number(col("score")) if col("score") is not None else np.full(n, np.nan)
    if pf["min_score"] is not None and col("score") is not None:
        reasons.drop(np.isnan(scores), "score missing")
        reasons.drop(scores < pf["min_score"], f"score below {pf['min_score']}")
    if col("width") is not None and col("height") is not None:
        w, h = to_number(col("width")), to_number(col("height"))
        known = np.isfinite(w) & np.isfinite(h) & (w > 0) & (h > 0)
        with np.errstate(invalid="ignore", divide="ignore"):
            if pf["min_side"] > 0:
                reasons.drop(
                    known & (np.minimum(w, h) < pf["min_side"]), f"shorter side below {pf['min_side']} px"
                )
            if pf["min_pixels"] > 0:
                reasons.drop(known & (w * h < pf["min_pixels"]), f"fewer than {pf['min_pixels']} pixels")
            aspect = w / h
            lo, hi = pf["min_aspect"], pf["max_aspect"]
            if lo is not None:
                reasons.drop(known & (aspect < lo), f"aspect ratio (width/height) below {lo}")
            if hi is not None:
                reasons.drop(known & (aspect > hi), f"aspect ratio (width/height) above {hi}")
    if pf["require_tags"] or pf["ban_tags"]:
        cols = tag_columns(table, columns, text)
        if not cols:
            raise TableError(
                "data.prefilter has require_tags/ban_tags but the table has no tag or caption column"
            )
        for tag in pf["require_tags"]:
            rows = np.flatnonzero(reasons.kept)
            reasons.drop(rows[~has_tag(cols, [tag], rows)], f"missing required tag: {tag}")
        if pf["ban_tags"]:  # one pass for all banned tags, then which one, on the few rows that have any
            rows = np.flatnonzero(reasons.kept)
            rows = rows[has_tag(cols, pf["ban_tags"], rows)]
            for tag in pf["ban_tags"]:
                reasons.drop(rows[has_tag(cols, [tag], rows)], f"banned tag: {tag}")

    # Duplicates among the rows still in: the first row wins.
    if pf["dedupe_url"]:
        reasons.drop(first_occurrence(url, reasons.kept), "duplicate url")
    md5 = None
    if col("md5") is not None:
        md5 = pc.utf8_lower(pc.utf8_trim_whitespace(text(columns["md5"])))
        md5 = pc.if_else(pc.equal(pc.utf8_length(md5), 0), pa.scalar(None, pa.string()), md5)
        if pf["dedupe_md5"]:
            reasons.drop(first_occurrence(md5, reasons.kept), "duplicate md5")

    # Kept rows, canonical columns.
    keep = np.flatnonzero(reasons.kept)
    take = pa.array(keep)
    out = {"row": pa.array(keep, pa.int64()), "id": pa.array(ids[keep], pa.int64()), "url": url.take(take)}
    if md5 is not None:
        out["md5"] = md5.take(take)
    if rating is not None:
        out["rating"] = rating.take(take)
    if col("score") is not None:
        out["score_percentile"] = pa.array(score_percentiles(scores)[keep], pa.float64())
    if col("created_at") is not None:
        out["year"] = pa.array(to_year(col("created_at"))[keep], pa.int32())
    for category in TAG_CATEGORIES:
        name = columns["tags"].get(category)
        if name and name in have:
            out[f"tags_{category}"] = text(name).take(take)
    if col("caption") is not None:
        out["caption"] = text(columns["caption"]).take(take)
    kept = pa.table(out)

    gone = np.flatnonzero(~reasons.kept)
    dropped = pa.table(
        {
            "row": pa.array(gone, pa.int64()),
            "id": pa.array(ids[gone], pa.int64()),
            "url": pc.fill_null(raw_url, "").take(pa.array(gone)),
            "reason": reasons.reason_array(gone),
        }
    )
    counts = Counter(
        {reasons.names[c]: int(k) for c, k in zip(*np.unique(reasons.code, return_counts=True), strict=True)}
    )
    counts.pop("", None)
    summary = {"rows_in": n, "kept": len(keep), "dropped": dict(counts.most_common())}
    return kept, dropped, summary


def _write_parquet(table: pa.Table, path: Path) -> None:
    tmp = path.with_name(path.name + ".partial")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def prefilter(config: dict, table_path: Path, out: Path) -> dict:
    """Prefilter the URL table at `table_path` into `out` (parts, dropped.parquet, summary.json)."""
    start = time.perf_counter()
    data = config["data"]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    table = read_table(table_path, data["table_format"], data["columns"])
    read_s = time.perf_counter() - start
    kept, dropped, summary = prefilter_table(table, config)
    names = part_names(data["download"]["parts"])
    bounds = np.linspace(0, kept.num_rows, len(names) + 1).round().astype(int)
    for name, lo, hi in zip(names, bounds[:-1], bounds[1:], strict=True):
        _write_parquet(kept.slice(lo, hi - lo), out / f"{name}.parquet")
    _write_parquet(dropped, out / "dropped.parquet")
    summary |= {
        "table": str(table_path),
        "parts": {name: int(hi - lo) for name, lo, hi in zip(names, bounds[:-1], bounds[1:], strict=True)},
        "seconds": {"read": round(read_s, 3), "total": round(time.perf_counter() - start, 3)},
    }
    tmp = out / "summary.json.partial"
    tmp.write_text(json.dumps(summary, indent=2))
    os.replace(tmp, out / "summary.json")
    return summary


def read_part(path: Path):
    """A part table as a pandas DataFrame; text that is not valid UTF-8 (a part not written by `prefilter`)
    is decoded with replacement characters instead of failing."""
    table = pq.read_table(path)
    for i, name in enumerate(table.column_names):
        if pa.types.is_string(table.schema.field(i).type):
            table = table.set_column(i, name, to_text(table[name])[0])
    return table.to_pandas()
