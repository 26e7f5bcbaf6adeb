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
import re
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


# A shard list larger than this is a typo (``{0..99999999}``), and braceexpand
# builds a numeric range eagerly: counted first, refused before expanding.
MAX_SHARDS = 1_000_000
RANGE = re.compile(r"^(-?\d+|[A-Za-z])\.\.(-?\d+|[A-Za-z])(?:\.\.(-?\d+))?$")


def _scan(text: str, start: int = 0):
    """Unescaped characters of ``text`` from ``start``, each with its index and the
    brace depth after it (a backslash escapes the next character)."""
    depth, index = 0, start
    while index < len(text):
        char = text[index]
        if char == "\\":
            index += 2
            continue
        depth += (char == "{") - (char == "}")
        yield index, char, depth
        index += 1


def _matching_brace(text: str, start: int) -> int:
    return next((index for index, _, depth in _scan(text, start) if depth == 0), -1)


def _split_top(text: str) -> list[str]:
    parts, begin = [], 0
    for index, char, depth in _scan(text):
        if char == "," and depth == 0:
            parts.append(text[begin:index])
            begin = index + 1
    return parts + [text[begin:]]


def brace_count(pattern: str, depth: int = 0) -> int:
    """How many strings ``braceexpand(pattern)`` yields (an upper bound), computed without expanding."""
    if depth > 32:
        raise ValueError(f"{pattern[:80]!r}: braces nested too deeply")
    total, index = 1, 0
    while index < len(pattern):
        if pattern[index] == "\\":
            index += 2
            continue
        if pattern[index] == "{" and (end := _matching_brace(pattern, index)) > 0:
            total *= _group_count(pattern[index + 1 : end], depth)
            index = end + 1
            continue
        index += 1
    return total


def _group_count(body: str, depth: int) -> int:
    if match := RANGE.match(body):
        first, last, step = match.groups()
        if first.lstrip("-").isdigit() != last.lstrip("-").isdigit():
            return 1
        span = abs(int(first) - int(last)) if first.lstrip("-").isdigit() else abs(ord(first) - ord(last))
        return span // max(abs(int(step or 1)), 1) + 1
    alternatives = _split_top(body)
    if len(alternatives) == 1:
        return brace_count(body, depth + 1)  # "{x}" is literal, but may hold groups
    return sum(brace_count(alternative, depth + 1) for alternative in alternatives)


def check_size(pattern: str) -> None:
    count = brace_count(pattern)
    if count > MAX_SHARDS:
        raise ValueError(f"{pattern[:200]}: the braces expand to {count} shard URLs (at most {MAX_SHARDS})")


def expand(spec: str | Sequence[str], listing: bool = True) -> list[str]:
    """Every shard URL of one pattern or several, keeping their order.
    Without ``listing``, globs and prefixes are kept as they are (not listed)."""
    active()
    specs = [spec] if isinstance(spec, str) else list(spec)
    for pattern in specs:
        check_size(pattern)
    urls: list[str] = []
    for pattern in specs:
        for url in braceexpand(pattern):
            if not listing:
                urls.append(url)
                continue
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


def limit_bytes(spec) -> int | None:
    """``storage.cache_limit_gb`` in bytes (None: no limit)."""
    return None if spec.cache_limit_gb is None else int(spec.cache_limit_gb * 1e9)


def open_input(url: str) -> IO[bytes]:
    """Open a shard for binary reading, through the local cache when one is configured."""
    spec = active()
    if spec.cache_dir and "://" in url and not url.startswith("file://"):
        from pathlib import Path

        from vlcluster.storage.cache import cached_copy

        return open(cached_copy(url, Path(spec.cache_dir).expanduser() / "shards", limit_bytes(spec)), "rb")
    return fsspec.open(url, "rb").open()
