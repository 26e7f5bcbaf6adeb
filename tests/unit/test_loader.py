"""The training loader: the canonical order on any ranks x data-loader workers
(real worker processes), exact resume also onto another topology, bad-data
accounting (real damaged shards)."""

from __future__ import annotations

import json
import shutil
import tarfile
from pathlib import Path

import pytest

from tests.support.damage import EXPECTED_BAD
from vlcluster.data.loader import TrainLoader
from vlcluster.data.quality import BadDataError, BadSample, DataQuality, check_bad_fraction
from vlcluster.data.shards import decode_sample
from vlcluster.data.stream import eval_samples, shard_items
from vlcluster.data.tarindex import ShardIndex

N_TRAIN, SHARD_SIZE, IMAGE_SIZE, BATCH = 64, 8, 16, 5


@pytest.fixture(scope="module")
def shards(synthetic_data) -> list[str]:
    return synthetic_data.clean(N_TRAIN, 8, SHARD_SIZE, IMAGE_SIZE, seed=3).train_shards


@pytest.fixture(scope="module")
def damaged(synthetic_data) -> tuple[list[str], set[str]]:
    built = synthetic_data.damaged(N_TRAIN, 8, SHARD_SIZE, IMAGE_SIZE, seed=3)
    return built.train_shards, set(built.bad_keys)


def loader(urls: list[str], workers: int, rank: int = 0, world: int = 1, batch: int = BATCH, **options) -> TrainLoader:
    """Rank ``rank`` of ``world``, each with ``batch`` samples (a global batch of ``world * batch``)."""
    options = {"seed": 5, "shuffle_buffer": 6, **options}
    return TrainLoader(urls, rank, world, batch_size=batch, num_workers=workers, **options)


def keys(train: TrainLoader, batches: int) -> list[list[str]]:
    return [train.next_batch()["key"] for _ in range(batches)]


def ranks(urls: list[str], sizes: list[int], workers: int) -> list[TrainLoader]:
    """One loader per rank of a global batch split as ``sizes``."""
    return [
        TrainLoader(urls, rank, len(sizes), 5, 6, size, num_workers=workers, rank_sizes=sizes) for rank, size in enumerate(sizes)
    ]


def global_steps(loaders: list[TrainLoader], steps: int) -> list[list[str]]:
    """The keys of each step over all ranks, in rank order."""
    return [[key for train in loaders for key in train.next_batch()["key"]] for _ in range(steps)]


def close(loaders: list[TrainLoader]) -> None:
    for train in loaders:
        train.close()


# The global batch of 12 on topologies of 1 to 4 ranks (uneven on 5), with and without workers.
TOPOLOGIES = [([12], 0), ([6, 6], 2), ([4, 4, 4], 1), ([3, 3, 3, 3], 2), ([3, 3, 2, 2, 2], 0)]


def test_every_topology_trains_on_the_same_canonical_steps(shards: list[str]) -> None:
    reference = None
    for sizes, workers in TOPOLOGIES:
        loaders = ranks(shards, sizes, workers)
        steps = global_steps(loaders, 11)  # 132 positions: past the first epoch of 64
        close(loaders)
        reference = reference or steps
        assert steps == reference, (sizes, workers)
    flat = [key for step in reference for key in step]
    first, second = flat[:N_TRAIN], flat[N_TRAIN : 2 * N_TRAIN]
    assert len(set(first)) == N_TRAIN and set(second) == set(first)  # each epoch: every sample exactly once
    assert second != first  # reshuffled per epoch


@pytest.mark.parametrize("before, after", [(([6, 6], 2), ([4, 4, 4], 1)), (([6, 6], 2), ([12], 0)), (([4, 4, 4], 1), ([3, 3, 3, 3], 2))])
def test_resume_onto_another_topology_continues_the_canonical_steps(shards: list[str], before, after) -> None:
    total, cut = 14, 5
    reference = ranks(shards, [12], 0)
    expected = global_steps(reference, total)
    close(reference)
    first = ranks(shards, *before)
    assert global_steps(first, cut) == expected[:cut]
    states = [json.loads(json.dumps(train.state_dict())) for train in first]  # as checkpoints store them
    assert len({json.dumps({k: v for k, v in state.items() if k != "quality"}) for state in states}) == 1  # one global position
    global_steps(first, 2)  # consumed after the states were taken (and more prefetched): lost with the processes
    close(first)
    resumed = ranks(shards, *after)
    for train in resumed:
        train.load_state_dict(states[0])
    assert global_steps(resumed, total - cut) == expected[cut:]
    close(resumed)
    flat = [key for step in expected for key in step]
    assert len(set(flat[:N_TRAIN])) == N_TRAIN  # no sample twice within an epoch, across the resume


def loader_from(urls: list[str], workers: int, state: dict) -> TrainLoader:
    train = loader(urls, workers)
    train.load_state_dict(json.loads(json.dumps(state)))  # as a checkpoint stores it
    return train


@pytest.mark.parametrize("workers, cut", [(0, 7), (2, 3), (2, 6)])
def test_resume_continues_exactly(damaged: tuple[list[str], set[str]], workers: int, cut: int) -> None:
    urls, _ = damaged
    total = 30  # 150 positions: past the second epoch
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


def test_bad_samples_are_dropped_and_counted_per_shard(damaged: tuple[list[str], set[str]]) -> None:
    urls, broken = damaged
    train = loader(urls, workers=2)
    batches = [train.next_batch() for _ in range(30)]
    train.close()
    assert all(batch["image"].shape[0] == len(batch["key"]) <= BATCH for batch in batches)
    assert not broken & {key for batch in batches for key in batch["key"]}

    # Decoding the canonical positions the batches covered, one by one in this process,
    # gives exactly the counts the workers sent.
    order, expected = train.order, DataQuality()
    assert train.state_dict()["position"] == 30 * BATCH
    indexes: dict[str, ShardIndex] = {}
    for position in range(30 * BATCH):
        _, shard, item = order.sources[0].locate(position)
        url = order.sources[0].urls[shard]
        raw = indexes.setdefault(url, ShardIndex(url)).read(item)
        expected.read += 1
        try:
            decode_sample(raw)
        except BadSample as bad:
            expected.record(raw["__url__"], bad.reason, bad.cause)
    assert train.quality.state_dict() == expected.state_dict()

    passes = 30 * BATCH // order.sources[0].epoch_items  # whole epochs read
    assert passes >= 2
    assert set(train.quality.bad) == {urls[index] for index in EXPECTED_BAD}
    for index, reasons in EXPECTED_BAD.items():
        counts = train.quality.bad[urls[index]]
        assert set(counts) == set(reasons)
        assert all(counts[reason] >= passes * n for reason, n in reasons.items())
    summary = train.quality.summary(0.05)
    assert summary["bad_samples"] == sum(sum(c.values()) for c in train.quality.bad.values())
    assert summary["samples_read"] == sum(len(b["key"]) for b in batches) + summary["bad_samples"] == 30 * BATCH
    assert set(summary["bad_by_reason"]) == {"read_error", "bad_image", "missing_field", "bad_text"}


def test_the_index_reads_what_webdataset_reads_and_marks_damage(damaged: tuple[list[str], set[str]], shards: list[str]) -> None:
    urls, _ = damaged
    for url in [*urls, *shards[:2]]:
        index = ShardIndex(url)
        by_index = [index.read(item) for item in range(len(index))]
        index.close()
        streamed = list(shard_items(url))
        assert [raw["__key__"] for raw in by_index] == [raw["__key__"] for raw in streamed]
        for mine, theirs in zip(by_index, streamed):
            assert {k: v for k, v in mine.items() if k != "__error__"} == {k: v for k, v in theirs.items() if k != "__error__"}
            assert ("__error__" in mine) == ("__error__" in theirs)


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


def test_what_changes_the_order_is_refused_with_the_reason(shards: list[str], tmp_path: Path) -> None:
    two = loader(shards, 2)
    keys(two, 3)
    state = json.loads(json.dumps(two.state_dict()))
    two.close()
    with pytest.raises(ValueError, match="data.shuffle_buffer changed \\(6 -> 7\\)"):
        loader(shards, 0, shuffle_buffer=7).load_state_dict(state)
    with pytest.raises(ValueError, match="train.seed changed"):
        loader(shards, 0, seed=6).load_state_dict(state)
    with pytest.raises(ValueError, match="data.shuffle_run changed \\(1 -> 4\\)"):
        loader(shards, 0, shuffle_run=4).load_state_dict(state)
    with pytest.raises(ValueError, match="the shards of data.train changed \\(8 shard\\(s\\) with 64 items -> 7 with 56\\)"):
        loader(shards[:7], 0).load_state_dict(state)
    with pytest.raises(ValueError, match="one per data-loader worker"):  # a position of earlier versions
        loader(shards, 0).load_state_dict({"workers": [{"epoch": 0, "offset": 3}], "next_worker": 0})
    # Workers and ranks are not part of it, nor where the shards lie (a moved run directory or data set).
    expected = keys(loader_from(shards, 0, state), 3)
    assert keys(loader_from(shards, 3, state), 3) == expected
    moved = tmp_path / "moved"
    moved.mkdir()
    copies = [shutil.copy(url, moved) for url in shards]
    assert keys(loader_from(copies, 0, state), 3) == expected


def test_shuffle_run_auto_is_16_on_an_object_store_and_1_on_a_file_system(shards: list[str]) -> None:
    from vlcluster.data.loader import OBJECT_STORE_RUN, resolve_shuffle_run
    from vlcluster.data.mixture import ShardSource

    local, remote = ShardSource(tuple(shards)), ShardSource(("s3://bucket/corpus/00000.tar",))
    assert resolve_shuffle_run("auto", [local]) == 1 and resolve_shuffle_run("auto", [local, remote]) == OBJECT_STORE_RUN == 16
    assert resolve_shuffle_run(4, [remote]) == 4 and resolve_shuffle_run(1, [remote]) == 1


def shard_item(key: str) -> tuple[int, int]:
    """(shard, item) of a synthetic train key: ``train-<global index>``, SHARD_SIZE per shard."""
    return divmod(int(key.rsplit("-", 1)[1]), SHARD_SIZE)


@pytest.mark.parametrize("run", [4, 5])
def test_runs_of_consecutive_items_keep_the_order_independent_of_topology(shards: list[str], run: int) -> None:
    reference = None
    for sizes, workers in TOPOLOGIES[:4]:
        loaders = [
            TrainLoader(shards, rank, len(sizes), 5, 6, size, num_workers=workers, rank_sizes=sizes, shuffle_run=run)
            for rank, size in enumerate(sizes)
        ]
        steps = global_steps(loaders, 11)
        close(loaders)
        reference = reference or steps
        assert steps == reference, (sizes, workers)
    flat = [shard_item(key) for step in reference for key in step]
    first, second = flat[:N_TRAIN], flat[N_TRAIN : 2 * N_TRAIN]
    assert len(set(first)) == N_TRAIN and set(second) == set(first) and second != first
    # Runs of consecutive items of a shard: most neighbours in the order are neighbours in a shard (with runs of 1, few).
    neighbours = sum(b == (a[0], a[1] + 1) for a, b in zip(first, first[1:]))
    assert neighbours >= (run - 1) / run * N_TRAIN * 0.6, neighbours


def test_more_readers_than_shards(shards: list[str]) -> None:
    loaders = ranks(shards[:3], [4, 4], 2)  # 4 readers, 3 shards
    steps = global_steps(loaders, 3)
    close(loaders)
    assert len({key for step in steps for key in step}) == 24


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


def test_coming_shards_are_the_windows_ahead_in_read_order_into_the_next_epoch() -> None:
    from vlcluster.data.order import SourceOrder

    order = SourceOrder([f"s{index}.tar" for index in range(4)], [10] * 4, seed=1, window=10)
    assert order.coming_shards(3, 10) == order.shard_order(0)[:2]  # its window's shard and the next window's
    at_the_end = [order.shard_order(0)[3], order.shard_order(1)[0]]
    assert order.coming_shards(35, 10) == list(dict.fromkeys(at_the_end))  # the last window, then epoch 1's first
    assert order.coming_shards(5, 25) == order.shard_order(0)  # items past its window: every shard they lie in
