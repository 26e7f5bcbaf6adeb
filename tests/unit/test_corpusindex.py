"""The shard index: made once (``vlcluster index``, the data stage), equal to walking the shards,
read by the loader instead of walking them, checked against hostile or stale content."""

from __future__ import annotations

import io
import json
import os
import shutil
import struct
import subprocess
import sys
import tarfile
import zlib
from pathlib import Path

import pytest

from vlcluster.data import membertable
from vlcluster.data import synthetic as syn
from vlcluster.data.corpusindex import INDEX_NAME, MAGIC, CorpusIndex, IndexFormatError, write_index
from vlcluster.data.loader import FETCH_AHEAD, TrainLoader
from vlcluster.data.quality import BadDataError
from vlcluster.data.rangedread import RangedReader, locate_shards
from vlcluster.data.tarindex import IndexedSample, ShardIndex

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def corpus(synthetic_data) -> list[str]:
    """Train shards with an index beside them (the data stage writes it), two of them damaged (and indexed again)."""
    return synthetic_data.damaged(40, 4, 8, 16, seed=1).train_shards


def copy_without_index(urls: list[str], directory: Path) -> list[str]:
    directory.mkdir()
    for url in urls:
        shutil.copy(url, directory)
    return [str(directory / Path(url).name) for url in urls]


def epoch_keys(urls: list[str], workers: int = 0) -> list[str]:
    train = TrainLoader(urls, 0, 1, seed=2, shuffle_buffer=7, batch_size=6, num_workers=workers)
    keys = [key for _ in range(8) for key in train.next_batch()["key"]]  # 48 positions: past the epoch
    train.close()
    return keys


def test_the_index_holds_what_walking_the_shards_gives(corpus: list[str]) -> None:
    index = CorpusIndex.load(str(Path(corpus[0]).parent / INDEX_NAME))
    for url in corpus:
        walked = ShardIndex(url)
        walked.close()
        assert list(index.table(Path(url).name)) == walked.samples
        assert index.entries[Path(url).name].size == Path(url).stat().st_size
    assert index.table(Path(corpus[0]).name)[-1].error  # the truncated shard's marker is part of the index


def test_reads_by_index_equal_reads_by_walking(corpus: list[str]) -> None:
    counts, locations = locate_shards(corpus)
    reader = RangedReader(locations)
    wanted = [(url, item) for url, count in zip(corpus, counts) for item in range(count)][::-1]
    walked = {url: ShardIndex(url) for url in corpus}
    assert reader.fetch(wanted) == [walked[url].read(item) for url, item in wanted]


def test_the_loader_gives_the_same_order_with_and_without_an_index(corpus: list[str], tmp_path: Path, caplog) -> None:
    plain = copy_without_index(corpus, tmp_path / "plain")
    with caplog.at_level("WARNING", "vlcluster.data"):
        unindexed = epoch_keys(plain)
    assert "have no index" in caplog.text
    assert epoch_keys(corpus) == unindexed == epoch_keys(corpus, workers=2)


def test_shards_without_an_index_are_indexed_once_per_node_in_the_cache(corpus: list[str], tmp_path: Path, monkeypatch) -> None:
    from vlcluster.storage import config

    plain = copy_without_index(corpus, tmp_path / "plain")
    monkeypatch.setattr(config, "_active", None)
    monkeypatch.setenv(config.ENV, "")
    config.activate(config.StorageSpec(cache_dir=str(tmp_path / "cache")))
    try:
        assert epoch_keys(plain) == epoch_keys(corpus)
        made = list((tmp_path / "cache" / "indexes").glob("*.vlindex"))
        assert len(made) == 1
        stamp = made[0].stat().st_mtime_ns
        epoch_keys(plain, workers=2)  # another rank of the node: reads the cached index, writes none
        assert [p.stat().st_mtime_ns for p in (tmp_path / "cache" / "indexes").glob("*.vlindex")] == [stamp]
    finally:
        monkeypatch.setattr(config, "_active", None)


def test_a_rewritten_shard_is_refused_naming_shard_and_index(corpus: list[str], tmp_path: Path) -> None:
    urls = copy_without_index(corpus, tmp_path / "copy")
    write_index(urls, str(tmp_path / "copy" / INDEX_NAME))
    last = Path(urls[-1])
    original = last.read_bytes()
    last.write_bytes(original + bytes(512))  # another size
    with pytest.raises(ValueError, match=f"{last}.*{INDEX_NAME} indexed it at .*rewritten"):
        locate_shards(urls)
    # The same size, other bytes: the tar header in front of each item no longer matches.
    last.write_bytes(bytes(len(original)))
    train = TrainLoader(urls, 0, 1, seed=2, shuffle_buffer=7, batch_size=40, num_workers=0)
    with pytest.raises(BadDataError, match=f"{last} does not match its index .*{INDEX_NAME}"):
        train.next_batch()


def _index_with(header: dict | bytes, tables: bytes = b"") -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return MAGIC + struct.pack("<Q", len(raw)) + raw + tables


HOSTILE = {
    "not an index": (b"PK\x03\x04 a zip file", "magic line"),
    "future version": (_index_with({"version": 9, "shards": []}), "version 9"),
    "header past the end": (MAGIC + struct.pack("<Q", 1 << 40) + b"{}", "header length"),
    "not JSON": (_index_with(b"{nope"), "not JSON"),
    "path as name": (_index_with({"version": 1, "shards": [{"name": "../x.tar", "size": 1, "items": 1, "table": [0, 1]}]}), r"shards\[0\].name"),
    "negative size": (_index_with({"version": 1, "shards": [{"name": "a.tar", "size": -1, "items": 1, "table": [0, 1]}]}), r"shards\[0\].size"),
    "table past the end": (_index_with({"version": 1, "shards": [{"name": "a.tar", "size": 1, "items": 1, "table": [0, 999]}]}), r"shards\[0\].table lies past"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_a_hostile_index_is_one_paragraph_naming_file_and_field(case: str, tmp_path: Path) -> None:
    content, field = HOSTILE[case]
    path = tmp_path / INDEX_NAME
    path.write_bytes(content)
    with pytest.raises(IndexFormatError, match=f"{path}: not a usable shard index .*{field}") as caught:
        CorpusIndex.load(str(path))
    assert "\n" not in str(caught.value)


def _index_of_one_shard(path: Path, table: bytes, version: int = 2, items: int = 1, **fields) -> CorpusIndex:
    offset = 0
    while True:  # the header's length fixes the table's offset
        shard = {"name": "a.tar", "size": 2048, "items": items, "table": [offset, len(table)], **fields}
        header = {"version": version, "suffixes": ["jpg", "txt"], "shards": [shard]}
        if len(_index_with(header)) == offset:
            break
        offset = len(_index_with(header))
    path.write_bytes(_index_with(header, table))
    return CorpusIndex.load(str(path))


def _record(key: bytes, files: list[tuple[int, int, int]], keys: int = 1, slots: int = 1) -> bytes:
    """A version-2 member record laid out by hand from its specification (``membertable.py``)."""
    packed = b"".join(struct.pack("<HQQ", *file) for file in files)
    return struct.pack("<H", len(key)) + key.ljust(keys, b"\0") + bytes([len(files)]) + packed.ljust(18 * slots, b"\0")


JPG = (0, 600, 5)  # suffix 0 ("jpg") at 600, 5 bytes: inside the 2048-byte shard, past the tar header
HOSTILE_TABLES = {
    "a bomb": (1, zlib.compress(b"[" + b" " * 100_000 + b"]"), {}, "inflates past 50000 bytes"),
    "not zlib": (1, b"not zlib", {}, "does not decode"),
    "JSON file past the shard": (1, zlib.compress(b'[["k", [["jpg", 600, 999999]]]]'), {}, "item 0 of a.tar: jpg lies past the end of the 2048-byte shard"),
    "JSON file in the tar header": (1, zlib.compress(b'[["k", [["jpg", 10, 5]]]]'), {}, "item 0 of a.tar: jpg starts at 10, inside the tar header"),
    "JSON count": (1, zlib.compress(b'[["k", []], ["j", []]]'), {}, "the 1 items"),
    "record width": (2, _record(b"k", [JPG]), {"record": [1, 2]}, r"shards\[0\].table holds 22 bytes, not 1 records"),
    "record of a huge key": (2, _record(b"k", [JPG]), {"record": [1 << 20, 1]}, r"shards\[0\].record is \[1048576, 1\]"),
    "errors not a map": (2, _record(b"k", [JPG]), {"record": [1, 1], "errors": ["x"]}, r"shards\[0\].errors"),
    "key longer than its record": (2, struct.pack("<H", 900) + _record(b"k", [JPG])[2:], {"record": [1, 1]}, "item 0 of a.tar: a key of 900 bytes"),
    "more files than slots": (2, _record(b"k", [JPG])[:3] + b"\x07" + _record(b"k", [JPG])[4:], {"record": [1, 1]}, "item 0 of a.tar: 7 files in a record holding 1"),
    "suffix number": (2, _record(b"k", [(9, 600, 5)]), {"record": [1, 1]}, "item 0 of a.tar: suffix number 9 of the index's 2"),
    "file past the shard": (2, _record(b"k", [(0, 600, 999999)]), {"record": [1, 1]}, "item 0 of a.tar: jpg lies past the end"),
    "file in the tar header": (2, _record(b"k", [(1, 10, 5)]), {"record": [1, 1]}, "item 0 of a.tar: txt starts at 10"),
    "marker without its message": (2, _record(b"k", []), {"record": [1, 1]}, "item 0 of a.tar has 0 files and no error"),
    "files and a message": (2, _record(b"k", [JPG]), {"record": [1, 1], "errors": {"0": "x"}}, "item 0 of a.tar has 1 files and an error"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE_TABLES))
def test_a_hostile_member_table_is_refused_naming_the_item(case: str, tmp_path: Path, monkeypatch) -> None:
    version, table, fields, problem = HOSTILE_TABLES[case]
    monkeypatch.setattr(membertable, "MAX_TABLE_BYTES", 50_000)  # a bomb's size, scaled down
    path = tmp_path / INDEX_NAME
    with pytest.raises(IndexFormatError, match=f"{path}: not a usable shard index .*{problem}") as caught:
        _index_of_one_shard(path, table, version, **fields).table("a.tar")
    assert "\n" not in str(caught.value)


def test_a_reader_fetches_and_checks_the_records_of_the_items_it_uses_only(tmp_path: Path) -> None:
    """Rank r of 48 reads about 22 items a step from shards of 1,000: it fetches their records, one range per run
    of nearby items, and a hostile record elsewhere in the shard is never read; read, it fails naming its item."""
    good, bad = _record(b"k", [JPG]), _record(b"k", [(9, 600, 5)])  # suffix 9 of 2
    index = _index_of_one_shard(tmp_path / INDEX_NAME, good * 500 + bad + good * 499, items=1000, record=[1, 1])
    entry = index.entries["a.tar"]
    reader = membertable.RecordReader()
    wanted = [*range(16), *range(700, 716)]  # two runs of 16
    found = reader.read({"a.tar": (index.url, entry, wanted)})
    assert [found[("a.tar", item)] for item in wanted] == [IndexedSample("k", (("jpg", 600, 5),))] * 32
    spans = membertable._record_spans(entry, wanted)
    assert [(end - start) // entry.width for start, end, _ in spans] == [16, 16]  # not the shard's 1,000 records
    with pytest.raises(IndexFormatError, match="item 500 of a.tar: suffix number 9"):
        reader.read({"a.tar": (index.url, entry, [499, 500])})
    # Records read once are kept (with those between nearby items): a reader reading most of a shard over
    # several steps fetches its records about once. With the index gone, they still read; others do not.
    (tmp_path / INDEX_NAME).unlink()
    assert reader.read({"a.tar": (index.url, entry, [3, 707])})[("a.tar", 707)] == IndexedSample("k", (("jpg", 600, 5),))
    with pytest.raises(FileNotFoundError):
        reader.read({"a.tar": (index.url, entry, [300])})


def test_an_index_of_version_1_reads_the_items_it_lists(corpus: list[str], tmp_path: Path) -> None:
    """Indexes written before version 2 (JSON member tables) still read: a corpus need not be walked again."""
    urls = copy_without_index(corpus, tmp_path / "v1")
    walked = [ShardIndex(url).samples for url in urls]
    tables = [zlib.compress(json.dumps([[s.key, None, s.error] if s.error else [s.key, [list(f) for f in s.files]]
                                        for s in samples]).encode()) for samples in walked]
    shards = [{"name": Path(url).name, "size": Path(url).stat().st_size, "items": len(samples)} for url, samples in zip(urls, walked)]
    length = 0
    while True:  # the header's length fixes the tables' offsets
        offset = len(_index_with({})) - 2 + length
        for shard, table in zip(shards, tables):
            shard["table"], offset = [offset, len(table)], offset + len(table)
        header = json.dumps({"version": 1, "shards": shards}).encode()
        if len(header) == length:
            break
        length = len(header)
    (tmp_path / "v1" / INDEX_NAME).write_bytes(_index_with(header, b"".join(tables)))
    index = CorpusIndex.load(str(tmp_path / "v1" / INDEX_NAME))
    assert [list(index.table(Path(url).name)) for url in urls] == walked
    assert epoch_keys(urls) == epoch_keys(corpus)


def test_vlcluster_index_writes_one_index_per_directory(corpus: list[str], tmp_path: Path) -> None:
    plain = copy_without_index(corpus, tmp_path / "plain")
    done = subprocess.run(
        [sys.executable, "-m", "vlcluster.cli", "index", f"{tmp_path}/plain/"], capture_output=True, text=True, cwd=REPO, timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert f"indexed {len(plain)}/{len(plain)} shards" in done.stdout
    written = CorpusIndex.load(str(tmp_path / "plain" / INDEX_NAME))
    assert sorted(written.entries) == sorted(Path(url).name for url in plain)
    assert epoch_keys(plain) == epoch_keys(corpus)


def test_on_s3_the_loader_reads_the_index_and_ranges_of_the_shards(corpus: list[str], s3_env, s3_server) -> None:
    import fsspec

    from tests.support.countingproxy import CountingProxy
    from vlcluster.storage import config

    config.activate(config.StorageSpec(endpoint_url=s3_env.endpoint_url))
    fs = fsspec.filesystem("s3")
    remote = [f"s3://data/indexed/{Path(url).name}" for url in corpus]
    for url, target in zip(corpus, remote):
        fs.put_file(url, target)
    write_index(remote, f"s3://data/indexed/{INDEX_NAME}")
    with CountingProxy(int(s3_server.endpoint.rsplit(":", 1)[1])) as proxy:
        config.activate(config.StorageSpec(endpoint_url=proxy.endpoint))  # no node cache: ranged reads of the bucket
        fsspec.filesystem("s3").clear_instance_cache()
        assert epoch_keys(remote) == epoch_keys(corpus)
        requests, fetched = proxy.counts()
    shard_bytes = sum(Path(url).stat().st_size for url in corpus)
    # 8 steps of 6 read and FETCH_AHEAD more fetched: 60 of the corpus's 40 items, 1.5 corpora (the walk reads
    # every shard whole each time it opens one); the rest is the index and HTTP.
    fetched_items = (8 + FETCH_AHEAD) * 6
    assert 0 < fetched < 1.2 * fetched_items / 40 * shard_bytes, (requests, fetched, shard_bytes)


def test_a_2_to_3_rank_resume_on_s3_reads_every_sample_once_and_little_else(s3_env, s3_server, tmp_path: Path) -> None:
    import fsspec

    from tests.support.countingproxy import CountingProxy
    from tools.bench.loader_s3 import sample_bytes
    from vlcluster.storage import config

    built = syn.build_dataset(str(tmp_path / "clean"), 96, 4, 16, 48, seed=4)
    config.activate(config.StorageSpec(endpoint_url=s3_env.endpoint_url))
    fsspec.filesystem("s3").put([*built["train_shards"], str(tmp_path / "clean" / INDEX_NAME)], "s3://data/resume/")
    remote = [f"s3://data/resume/{Path(url).name}" for url in built["train_shards"]]
    spans = sample_bytes(built["train_shards"])  # what the bench divides by

    def run(world: int, steps: int, state: dict | None) -> tuple[list[str], dict]:
        loaders = [TrainLoader(remote, rank, world, 0, 24, 12 // world, shuffle_run=4) for rank in range(world)]
        for train in loaders:
            if state is not None:
                train.load_state_dict(state)
        seen = [key for _ in range(steps) for train in loaders for key in train.next_batch()["key"]]
        state = json.loads(json.dumps(loaders[0].state_dict()))
        for train in loaders:
            train.close()
        return seen, state

    with CountingProxy(int(s3_server.endpoint.rsplit(":", 1)[1])) as proxy:
        config.activate(config.StorageSpec(endpoint_url=proxy.endpoint))
        fsspec.filesystem("s3").clear_instance_cache()
        before, state = run(2, 3, None)
        after, _ = run(3, 5, state)
        fetched = proxy.counts()[1]
    assert sorted(before + after) == sorted(spans)  # 8 steps of 12: the epoch of 96, each sample once
    # Each reader also fetched the FETCH_AHEAD steps after its last: 2 x 6 and 3 x 4 items each, half this tiny
    # epoch. Beyond those, five readers' start-up (index header, listing) and HTTP on 96 samples of ~7 KB.
    ahead = FETCH_AHEAD * (2 * 6 + 3 * 4) * sum(spans.values()) / len(spans)
    assert fetched / (sum(spans.values()) + ahead) < 1.15, fetched / (sum(spans.values()) + ahead)


def test_vlcluster_index_names_shards_that_disagree_with_img2dataset_stats(tmp_path: Path) -> None:
    """img2dataset writes NNNNN_stats.json beside each NNNNN.tar: a shard
    holding fewer samples than it says were written (an upload cut short) is
    named; an intact one, or one with an unreadable record, is not."""
    from PIL import Image

    from tests.support.realdata import write_img2dataset_shards

    samples = [(Image.new("RGB", (8, 8), (index * 20, 0, 0)), f"caption {index}") for index in range(12)]
    shards = write_img2dataset_shards(tmp_path / "corpus", samples, per_shard=6)
    short = Path(shards[1])
    with tarfile.open(short) as whole:
        members = [(member, whole.extractfile(member).read()) for member in whole.getmembers()[:12]]  # 4 of 6 samples
    with tarfile.open(short, "w") as cut:
        for member, data in members:
            cut.addfile(member, io.BytesIO(data))
    write_img2dataset_shards(tmp_path / "corpus", samples[:3], per_shard=6, first_shard=2)
    (tmp_path / "corpus" / "00002_stats.json").write_text('{"successes": "three"}')  # a record that is not one
    done = subprocess.run([sys.executable, "-m", "vlcluster.cli", "index", f"{tmp_path}/corpus/"],
                          capture_output=True, text=True, cwd=REPO, timeout=120, env={**os.environ, "COLUMNS": "300"})
    assert done.returncode == 0, done.stderr
    warnings = [line for line in done.stderr.splitlines() if line.startswith("warning:")]
    assert warnings == ["warning: 00001.tar holds 4 readable samples; img2dataset's _stats.json beside it says it wrote 6 "
                        "(copied or uploaded only in part?)"], done.stderr
    assert "3 shards, 13 items" in done.stdout


def test_a_node_cache_fetches_the_coming_shards_ahead_once_each_and_within_its_limit(s3_env, s3_server, tmp_path: Path) -> None:
    import time

    import fsspec

    from tests.support.countingproxy import CountingProxy
    from vlcluster.storage import config

    from tests.support.realdata import scene, write_img2dataset_shards

    # img2dataset's layout (jpg, txt, json, _stats.json), 8 shards of 12: a window of 12 is a shard
    local = write_img2dataset_shards(tmp_path / "laion", [scene(index, 1) for index in range(96)], 12)
    write_index(local, str(tmp_path / "laion" / INDEX_NAME))
    config.activate(config.StorageSpec(endpoint_url=s3_env.endpoint_url))
    fsspec.filesystem("s3").put([*local, str(tmp_path / "laion" / INDEX_NAME)], "s3://data/ahead/")
    remote = [f"s3://data/ahead/{Path(url).name}" for url in local]
    shard_bytes = max(Path(url).stat().st_size for url in local)
    corpus_bytes = sum(Path(url).stat().st_size for url in local)
    copies = tmp_path / "cache" / "shards"

    def cached() -> set[str]:
        return {path.name.split("-", 1)[1] for path in copies.glob("*.tar")} if copies.exists() else set()

    with CountingProxy(int(s3_server.endpoint.rsplit(":", 1)[1])) as proxy:
        # Four copies fit: the window being read, the next one (being fetched by the second fetch thread), one ahead.
        limit_gb = 4.5 * shard_bytes / 1e9
        config.activate(config.StorageSpec(endpoint_url=proxy.endpoint, cache_dir=str(tmp_path / "cache"), cache_limit_gb=limit_gb))
        fsspec.filesystem("s3").clear_instance_cache()
        train = TrainLoader(remote, 0, 1, seed=3, shuffle_buffer=12, batch_size=6, image_size=16)
        shard_order = [Path(remote[shard]).name for shard in train.order.sources[0].shard_order(0)]
        keys = train.next_batch()["key"]  # step 0: half of the first window (shard); step 1, its other half, is fetched
        deadline = time.monotonic() + 10
        while shard_order[1] not in cached() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert shard_order[1] in cached()  # the next window's shard: no step that reads it has been asked for
        held = []
        for _ in range(15):  # the rest of the epoch
            keys += train.next_batch()["key"]
            held.append(sum(path.stat().st_size for path in copies.glob("*.tar")))
        train.close()
        fetched = proxy.counts()[1]
    indexes = [ShardIndex(url) for url in local]
    assert sorted(keys) == sorted(sample.key for index in indexes for sample in index.samples)  # the epoch, once each
    assert max(held) <= 4.5 * shard_bytes + shard_bytes < corpus_bytes  # the limit, but for a download under way
    assert corpus_bytes < fetched < 1.15 * corpus_bytes  # every shard downloaded once (and the index, HEADs)
