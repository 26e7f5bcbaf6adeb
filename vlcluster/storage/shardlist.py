"""Shard lists and shard reads on any fsspec URL.

A shard pattern is one of

- a brace pattern: ``s3://bucket/train-{000000..000099}.tar``;
- a glob: ``s3://bucket/train/*.tar`` (``*``, ``?``, ``[...]``);
- a prefix ending in ``/``: ``s3://bucket/data/train/`` means every
  ``.tar`` below it.

Globs and prefixes are listed once per pattern and sorted, so every rank
and every restart sees the same list in the same order (the per-rank split
and the resume position depend on it).

With ``storage.cache_dir`` set, a shard is downloaded once
(:mod:`vlcluster.storage.cache`) and later epochs, other stages and requeued
jobs on the same machine read the local copy (one HEAD request per open
checks that the object did not change).
"""

from __future__ import annotations

import posixpath
from collections.abc import Sequence
from typing import IO, Any

import fsspec
from braceexpand import braceexpand

from vlcluster.storage.config import active

GLOB_CHARS = ("*", "?", "[")
SHARD_SUFFIX = ".tar"


def _listed(url: str) -> list[str]:
    """The shard URLs a glob or prefix stands for, sorted."""
    fs, path = fsspec.core.url_to_fs(url)
    protocol = url.split("://", 1)[0] + "://" if "://" in url else ""
    if url.endswith("/"):
        found = [p for p in fs.find(path) if p.endswith(SHARD_SUFFIX)]
    else:
        found = fs.glob(path)
    if not found:
        raise FileNotFoundError(f"{url}: no shard files match (expected {SHARD_SUFFIX} files)")
    return sorted(protocol + p if protocol and not p.startswith(protocol) else p for p in found)


def needs_listing(pattern: str) -> bool:
    """Whether ``pattern`` names its shards only through a listing (glob or prefix)."""
    return pattern.endswith("/") or any(char in pattern for char in GLOB_CHARS)


def expand(spec: str | Sequence[str]) -> list[str]:
    """Every shard URL of one pattern or several, keeping their order."""
    active()
    specs = [spec] if isinstance(spec, str) else list(spec)
    urls: list[str] = []
    for pattern in specs:
        for url in braceexpand(pattern):
            urls.extend(_listed(url) if needs_listing(url) else [url])
    return urls


def missing(urls: Sequence[str]) -> list[str]:
    """The URLs that do not exist, with one listing per parent (not one request per shard)."""
    active()
    by_parent: dict[tuple[Any, str], list[tuple[str, str]]] = {}
    for url in urls:
        fs, path = fsspec.core.url_to_fs(url)
        by_parent.setdefault((fs, posixpath.dirname(path)), []).append((url, path))
    present: set[str] = set()
    for (fs, parent), entries in by_parent.items():
        fs.invalidate_cache(parent)  # remote filesystems cache listings; we want "exists now"
        try:
            listed = {p.rstrip("/") for p in fs.ls(parent, detail=False)}
        except (FileNotFoundError, NotADirectoryError):
            listed = set()
        present.update(url for url, path in entries if path in listed)
    return [url for url in urls if url not in present]


def open_input(url: str) -> IO[bytes]:
    """Open a shard for binary reading, through the local cache when one is configured."""
    spec = active()
    if spec.cache_dir and "://" in url and not url.startswith("file://"):
        from pathlib import Path

        from vlcluster.storage.cache import cached_copy

        return open(cached_copy(url, Path(spec.cache_dir).expanduser() / "shards"), "rb")
    return fsspec.open(url, "rb").open()
