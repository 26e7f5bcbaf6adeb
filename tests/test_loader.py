"""The training loader: ranks x data-loader workers (real worker processes),
exact resume, bad-data accounting (real damaged shards)."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pytest

from tests.damage import EXPECTED_BAD, damage
from vlcluster.data import synthetic as syn
from vlcluster.data.loader import LoaderConfig, TrainLoader, decode_batch
from vlcluster.data.quality import BadDataError, BadSample, DataQuality, check_bad_fraction
from vlcluster.data.shards import decode_sample
from vlcluster.data.stream import eval_samples, shard_items

N_TRAIN, SHARD_SIZE, IMAGE_SIZE, BATCH = 64, 8, 16, 5


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    built = syn.build_dataset(str(tmp_path_factory.mktemp("clean")), N_TRAIN, 8, SHARD_SIZE, IMAGE_SIZE, seed=3)
    return built["train_shards"]


@pytest.fixture(scope="module")
def damaged(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[str], set[str]]:
    built = syn.build_dataset(str(tmp_path_factory.mktemp("damaged")), N_TRAIN, 8, SHARD_SIZE, IMAGE_SIZE, seed=3)
    return built["train_shards"], damage(built["train_shards"])


def loader(urls: list[str], workers: int, rank: int = 0, world: int = 1) -> TrainLoader:
    return TrainLoader(urls, rank, world, seed=5, shuffle_buffer=6, batch_size=BATCH, num_workers=workers)


def keys(train: TrainLoader, batches: int) -> list[list[str]]:
    return [train.next_batch()["key"] for _ in range(batches)]


def test_ranks_and_workers_read_disjoint_shards_covering_the_epoch(shards: list[str]) -> None:
    readers = [LoaderConfig(tuple(shards), rank, 2, 5, 6, BATCH, None, 2).stream(worker) for rank in range(2) for worker in range(2)]
    assert [r.part for r in readers] == [0, 1, 2, 3]
    for epoch in (0, 1):
        per_reader = [set(reader.shards_for_epoch(epoch)) for reader in readers]
        assert sum(map(len, per_reader)) == len(shards) and set().union(*per_reader) == set(shards)
    assert readers[0].shards_for_epoch(0) != readers[0].shards_for_epoch(1)  # reshuffled per epoch


def test_workers_take_turns_and_match_the_single_process_replay(shards: list[str]) -> None:
    train = loader(shards, workers=2)
    seen = keys(train, 8)
    config = train.config
    streams = [config.stream(0), config.stream(1)]
    expected = [decode_batch(streams[k % 2], BATCH, None)["key"] for k in range(8)]
    assert seen == expected
    assert train.state_dict()["workers"] == [s.state_dict() for s in streams]
    train.close()
    flat = [key for batch in seen for key in batch]
    assert len(set(flat)) == len(flat) == 8 * BATCH  # 40 of 64: no repeat within the first epoch


def loader_from(urls: list[str], workers: int, state: dict) -> TrainLoader:
    train = loader(urls, workers)
    train.load_state_dict(json.loads(json.dumps(state)))  # as a checkpoint stores it
    return train


@pytest.mark.parametrize("workers, cut", [(0, 7), (2, 3), (2, 6)])
def test_resume_continues_exactly(damaged: tuple[list[str], set[str]], workers: int, cut: int) -> None:
    urls, _ = damaged
    total = 30  # 150 samples: past the second epoch of every worker
    reference = loader(urls, workers)
    expected = keys(reference, total)
    expected_quality = reference.quality.state_dict()
    reference.close()
    first = loader(urls, workers)
    assert keys(first, cut) == expected[:cut]
    state = first.state_dict()
    keys(first, 2)  # consumed after the state was taken (and more prefetched): lost with the process
    first.close()
    resumed = loader_from(urls, workers, state)
    assert keys(resumed, total - cut) == expected[cut:]
    assert resumed.quality.state_dict() == expected_quality
    resumed.close()


def test_bad_samples_are_skipped_and_counted_per_shard(damaged: tuple[list[str], set[str]]) -> None:
    urls, broken = damaged
    train = loader(urls, workers=2)
    batches = [train.next_batch() for _ in range(30)]
    train.close()
    assert all(len(batch["key"]) == BATCH and batch["image"].shape[0] == BATCH for batch in batches)
    assert not broken & {key for batch in batches for key in batch["key"]}

    # Replaying every worker's stream up to its position in this process,
    # decoding each item, gives exactly the counts the workers sent.
    expected = DataQuality()
    positions = train.state_dict()["workers"]
    for worker, position in enumerate(positions):
        stream = train.config.stream(worker)
        while stream.state_dict() != position:
            raw = next(stream)
            expected.read += 1
            try:
                decode_sample(raw)
            except BadSample as bad:
                expected.record(raw["__url__"], bad.reason, bad.cause)
    assert train.quality.state_dict() == expected.state_dict()

    passes = min(position["epoch"] for position in positions)  # epochs every worker has finished
    assert passes >= 2
    assert set(train.quality.bad) == {urls[index] for index in EXPECTED_BAD}
    for index, reasons in EXPECTED_BAD.items():
        counts = train.quality.bad[urls[index]]
        assert set(counts) == set(reasons)
        assert all(counts[reason] >= passes * n for reason, n in reasons.items())
    summary = train.quality.summary(0.05)
    assert summary["bad_samples"] == sum(sum(c.values()) for c in train.quality.bad.values())
    assert summary["samples_read"] == sum(len(b["key"]) for b in batches) + summary["bad_samples"]
    assert set(summary["bad_by_reason"]) == {"read_error", "bad_image", "missing_field", "bad_text"}


def test_evaluation_skips_and_counts_bad_samples_in_file_order(damaged: tuple[list[str], set[str]], shards: list[str]) -> None:
    """Eval and Gram stages read every shard once, in order, with the same accounting."""
    urls, broken = damaged
    quality = DataQuality()
    samples = list(eval_samples(urls, quality=quality))
    keys_read = [sample["key"] for sample in samples]
    assert not broken & set(keys_read)
    assert {url: dict(counts) for url, counts in quality.bad.items()} == {urls[i]: reasons for i, reasons in EXPECTED_BAD.items()}
    assert quality.read == len(samples) + quality.bad_total
    clean = [sample["key"] for sample in eval_samples(shards)]
    assert keys_read == [key for key in clean if key in set(keys_read)]  # file order, nothing extra
    assert len(keys_read) < len(clean) - len(broken)  # the truncated shard lost its tail too


@pytest.mark.parametrize("where", ["header", "data", "end"])
def test_truncated_tar_yields_what_was_read_then_one_error(shards: list[str], tmp_path, where: str) -> None:
    data = Path(shards[0]).read_bytes()
    with tarfile.open(shards[0]) as tar:
        members = tar.getmembers()
    # header: cut before the 7th file (the 3rd sample's first); data: inside the 8th file;
    # end: only trailing zero padding removed, nothing lost.
    cut = {"header": members[6].offset, "data": members[7].offset_data + 10, "end": len(data) - 512}[where]
    path = tmp_path / "cut.tar"
    path.write_bytes(data[:cut])
    items = list(shard_items(str(path)))
    errors = [item for item in items if "__error__" in item]
    complete = [item["__key__"] for item in items if {"png", "txt", "json"} <= set(item)]
    assert complete == [item["__key__"] for item in shard_items(shards[0])][: len(complete)]
    if where == "end":
        assert not errors and len(complete) == len(members) // 3
    else:
        assert errors == [items[-1]] and items[-1]["__url__"] == str(path)
        assert len(complete) == 2


def test_worker_count_change_is_refused_but_0_and_1_are_the_same(shards: list[str]) -> None:
    two = loader(shards, 2)
    keys(two, 3)
    with pytest.raises(ValueError, match="data.num_workers back to 2"):
        loader(shards, 3).load_state_dict(two.state_dict())
    two.close()

    zero = loader(shards, 0)
    keys(zero, 2)
    state, expected = zero.state_dict(), keys(zero, 3)
    assert keys(loader_from(shards, 1, state), 3) == expected
    # A single-stream position of earlier versions still loads.
    legacy = loader_from(shards, 0, {"epoch": 0, "offset": 2 * BATCH})
    assert keys(legacy, 3) == expected


def test_too_few_shards_for_ranks_times_workers(shards: list[str]) -> None:
    with pytest.raises(ValueError, match="2 rank\\(s\\) x 2 data-loader worker"):
        loader(shards[:3], workers=2, rank=0, world=2)


def test_bad_fraction_limit() -> None:
    check_bad_fraction(5, 100, 0.01, final=False)  # too few samples to judge mid-run
    check_bad_fraction(10, 1000, 0.01, final=True)  # exactly at the limit is allowed
    with pytest.raises(BadDataError, match="11 of 1000 .* data.max_bad_fraction = 0.01"):
        check_bad_fraction(11, 1000, 0.01, final=False)
    with pytest.raises(BadDataError, match="5 of 100"):
        check_bad_fraction(5, 100, 0.01, final=True)


def test_shards_without_one_usable_sample_fail_clearly(tmp_path) -> None:
    urls = []
    for index in range(2):
        urls.append(str(tmp_path / f"junk-{index}.tar"))
        Path(urls[-1]).write_bytes(b"this is not a tar file" * 100)
    with pytest.raises(BadDataError, match="without one usable sample"):
        loader(urls, workers=0).next_batch()
