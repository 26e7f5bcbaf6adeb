"""Damaged copies of generated shards, for the bad-data tests."""

from __future__ import annotations

import tarfile
from pathlib import Path

import webdataset as wds
from webdataset.tariterators import group_by_keys, tar_file_expander

from vlcluster.data.corpusindex import INDEX_NAME, write_index

# What ``damage`` does to the shards it is given, per pass over them.
EXPECTED_BAD = {0: {"read_error": 1, "missing_field": 1}, 1: {"bad_image": 1, "missing_field": 1, "bad_text": 1}}


def _samples(path: Path) -> list[dict]:
    with open(path, "rb") as stream:
        return list(group_by_keys(tar_file_expander([{"url": str(path), "stream": stream}])))


def _rewrite(path: Path, samples: list[dict]) -> None:
    with open(path, "wb") as out, wds.TarWriter(out, encoder=False, compress=False) as tar:
        for sample in samples:
            tar.write({key: value for key, value in sample.items() if key != "__url__"})


def damage(shards: list[str]) -> set[str]:
    """Truncate ``shards[0]`` mid-archive (samples of three files); in ``shards[1]`` break one image,
    drop one caption and make one caption invalid UTF-8 (see ``EXPECTED_BAD``).
    Returns the keys of the three broken samples."""
    first = Path(shards[0])
    with tarfile.open(first) as tar:
        members = tar.getmembers()
    # Cut at the header of the second file of a sample mid-shard: that sample
    # is left with one file (missing fields), the rest of the shard is lost.
    cut = members[3 * (len(members) // 6) + 1].offset
    first.write_bytes(first.read_bytes()[:cut])
    second = Path(shards[1])
    samples = _samples(second)
    samples[0]["png"] = b"\x89PNG\r\n\x1a\n" + b"not really a png" * 8
    del samples[1]["txt"]
    samples[2]["txt"] = b"\xff\xfe caption"
    _rewrite(second, samples)
    reindex(first.parent)
    return {sample["__key__"] for sample in samples[:3]}


def reindex(directory: Path) -> None:
    """Index the directory's shards again, as a data owner does after changing them (the old index is stale)."""
    if (directory / INDEX_NAME).exists():
        write_index(sorted(str(path) for path in directory.glob("*.tar")), str(directory / INDEX_NAME))
