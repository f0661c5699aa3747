"""Captions from danbooru-style tags, and the caption processing the trainer applies at each step.

Build time (the preprocess stage, `build_captions`): the tag categories of a row are joined in a configured
order (`data.captions.order`, e.g. character, copyright, artist, general), optionally with a rating tag, a
quality tag (from the row's score percentile, computed by the prefilter over the whole table) and a year tag
(from `created_at`). Each tag has its underscores turned into spaces, except kaomoji-like tags such as
`^_^`, `>_<`, `0_0` and `o_o`, whose underscore is part of the face, and its parentheses escaped (`\\(`,
`\\)`) so that prompt parsers that read `(...)` as emphasis leave them alone. Rows without tags fall back to
the plain caption column, which passes through unchanged.

Training time (`train_caption`, called by the trainer): the caption's comma-separated tags are shuffled
keeping the first `keep_first_n` fixed, and tags after those are dropped with probability `tag_dropout`;
the result depends only on (seed, epoch, sample index), so a resumed run sees the same captions.
Whole-caption dropout for classifier-free guidance (`caption_dropped`, rate `train.caption_dropout`) is
keyed the same way; a dropped caption is the empty prompt, which the text encoding turns into zeros.
Both run on the CPU, in the training loop: nothing here waits for the GPU.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

import numpy as np
import pandas as pd

TAG_CATEGORIES = ("character", "copyright", "artist", "general", "meta")
EXTRA_TAGS = ("rating", "quality", "year")
REPLACEMENT = "\ufffd"  # what undecodable bytes became when the table was read

# No two letters or digits in a row: the underscore joins two halves of a face, not two words.
_KAOMOJI = re.compile(r"[^A-Za-z0-9]*(?:[A-Za-z0-9][^A-Za-z0-9]+)*[A-Za-z0-9]?[^A-Za-z0-9]*")


def is_kaomoji(tag: str) -> bool:
    """True for emoticon tags whose underscore must stay: `^_^`, `>_<`, `0_0`, `o_o`, `(o)_(o)`, `|_|`."""
    return "_" in tag and _KAOMOJI.fullmatch(tag) is not None


def format_tag(tag: str, escape_parentheses: bool = True) -> str:
    """'star_(sky)' -> 'star \\(sky\\)'; '^_^' stays '^_^'."""
    if not is_kaomoji(tag):
        tag = tag.replace("_", " ")
    if escape_parentheses:
        tag = tag.replace("(", r"\(").replace(")", r"\)")
    return tag


def split_tags(tag_string) -> list[str]:
    """Danbooru tag strings are space-separated; None, NaN and '' hold no tags."""
    if not isinstance(tag_string, str):
        return []
    return tag_string.split()


def quality_tag(percentile: float, levels: Sequence[dict]) -> str | None:
    """The tag of the first level (highest first) whose `min_percentile` the score percentile reaches."""
    if percentile is None or not np.isfinite(percentile):
        return None
    for level in sorted(levels, key=lambda lv: -lv["min_percentile"]):
        if percentile >= level["min_percentile"]:
            return level["tag"]
    return None


def build_caption(
    tags: dict[str, Iterable[str]],
    settings: dict,
    rating: str | None = None,
    percentile: float | None = None,
    year: int | None = None,
    plain: str | None = None,
) -> str:
    """One caption: tag categories and extra tags in `settings['order']`, each tag formatted once.

    `tags` maps a category (character, copyright, ...) to its raw tags. Without any tag, the plain caption
    passes through unchanged (undecodable bytes removed).
    """
    drop = set(settings["drop_tags"])
    escape = settings["escape_parentheses"]
    out, seen = [], set()
    has_tags = False
    for part in settings["order"]:
        if part in TAG_CATEGORIES:
            new = [t for t in tags.get(part, ()) if t not in drop and REPLACEMENT not in t]
            has_tags |= bool(new)
            new = [format_tag(t, escape) for t in new]
        elif part == "rating":
            new = [settings["rating_tags"].get(rating)] if isinstance(rating, str) and rating else []
        elif part == "quality":
            new = [quality_tag(percentile, settings["quality_tags"])]
        elif part == "year":
            valid = year is not None and not pd.isna(year) and year > 0
            new = [settings["year_format"].format(year=int(year))] if valid else []
        else:
            raise ValueError(f"data.captions.order: unknown entry '{part}'")
        for tag in new:
            if tag and tag not in seen:
                seen.add(tag)
                out.append(tag)
    if not has_tags and isinstance(plain, str) and plain.strip():
        return plain.replace(REPLACEMENT, "").strip()
    return ", ".join(out)


def build_captions(table: pd.DataFrame, settings: dict) -> pd.Series:
    """Captions for a prefiltered part table (canonical columns: tags_<category>, rating, score_percentile,
    year, caption; any may be absent), indexed like the table."""
    n = len(table)

    def column(name):
        return table[name].tolist() if name in table.columns else [None] * n

    categories = {c: column(f"tags_{c}") for c in TAG_CATEGORIES}
    ratings, percentiles, years, plains = (
        column(c) for c in ("rating", "score_percentile", "year", "caption")
    )
    captions = [
        build_caption(
            {c: split_tags(categories[c][i]) for c in TAG_CATEGORIES},
            settings,
            rating=ratings[i],
            percentile=percentiles[i],
            year=years[i],
            plain=plains[i],
        )
        for i in range(n)
    ]
    return pd.Series(captions, index=table.index, dtype=object)


def process_caption(
    caption: str, rng: np.random.Generator, keep_first_n: int, shuffle: bool, tag_dropout: float
) -> str:
    """Tag dropout and tag shuffle on a comma-separated caption; the first `keep_first_n` tags stay fixed
    in place and are never dropped. Draws from `rng` in a fixed order (dropout, then shuffle)."""
    if not caption or (not shuffle and tag_dropout <= 0):
        return caption
    tags = [t.strip() for t in caption.split(",")]
    tags = [t for t in tags if t]
    head, tail = tags[:keep_first_n], tags[keep_first_n:]
    if tag_dropout > 0 and tail:
        keep = rng.random(len(tail)) >= tag_dropout
        tail = [t for t, k in zip(tail, keep, strict=True) if k]
    if shuffle and len(tail) > 1:
        tail = [tail[i] for i in rng.permutation(len(tail))]
    return ", ".join(head + tail)


def train_caption(caption: str, settings: dict, seed: int, epoch: int, index: int) -> str:
    """The caption the trainer uses for sample `index` in `epoch`: `process_caption` with the
    `data.captions` settings (keep_first_n, shuffle, tag_dropout) and a generator keyed by
    (seed, epoch, index), so the same run, epoch and sample always give the same caption."""
    if not settings["shuffle"] and settings["tag_dropout"] <= 0:
        return caption
    rng = np.random.default_rng([seed, epoch, index, 0x6E7961])
    return process_caption(
        caption, rng, settings["keep_first_n"], settings["shuffle"], settings["tag_dropout"]
    )


def caption_dropped(seed: int, epoch: int, index: int, rate: float) -> bool:
    """Whether sample `index` trains with the empty prompt in `epoch` (probability `rate`), keyed by
    (seed, epoch, index) like `train_caption`, from a stream of its own."""
    if rate <= 0:
        return False
    return bool(np.random.default_rng([seed, epoch, index, 0x64726F70]).random() < rate)
