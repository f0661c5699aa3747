"""Captions from danbooru-style tags."""

from __future__ import annotations


def tags_to_caption(tags: str) -> str:
    """'red_circle, blue_background' -> 'red circle, blue background'; plain text passes through."""
    parts = [t.strip().replace("_", " ") for t in tags.split(",")]
    return ", ".join(p for p in parts if p)
