"""Tests for vlcluster.data: generation, tokenizers, shard streaming (real files, no mocks)."""

from __future__ import annotations

import collections
import io
import itertools
import json
import math
import random
import uuid
from pathlib import Path

import fsspec
import numpy as np
import pytest
import torch
from PIL import Image
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers

from vlcluster.data import synthetic as syn
from vlcluster.data.shards import decode_sample
from vlcluster.storage.shardlist import expand as expand_urls, missing as missing_shards
from vlcluster.data.order import Position, SourceOrder, shard_counts
from vlcluster.data.stream import eval_samples
from vlcluster.data.tarindex import ShardIndex
from vlcluster.data.tokenizer import SPECIAL_TOKENS, TextEncoder, build_word_tokenizer

N_TRAIN, N_VAL, SHARD_SIZE, IMAGE_SIZE, SEED = 60, 20, 8, 32, 7


def _build(out_dir: Path, seed: int = SEED) -> dict:
    return syn.build_dataset(str(out_dir), N_TRAIN, N_VAL, SHARD_SIZE, IMAGE_SIZE, seed)


@pytest.fixture(scope="module")
def dataset(synthetic_data) -> dict:
    return synthetic_data.clean(N_TRAIN, N_VAL, SHARD_SIZE, IMAGE_SIZE, SEED).summary


def _raws(urls: list[str], n: int, seed: int = 0, window: int = 16, start: int = 0) -> list[dict]:
    """Positions ``start .. start + n`` of the canonical order, read by index."""
    order = SourceOrder(urls, shard_counts(urls), seed, window)
    indexes: dict[str, ShardIndex] = {}
    raws = []
    for position in range(start, start + n):
        _, shard, item = order.locate(position)
        raws.append(indexes.setdefault(urls[shard], ShardIndex(urls[shard])).read(item))
    for index in indexes.values():
        index.close()
    return raws


def _keys(urls: list[str], n: int, seed: int = 0, window: int = 16, start: int = 0) -> list[str]:
    return [raw["__key__"] for raw in _raws(urls, n, seed, window, start)]


# ------------------------------------------------------------------ generation


def test_build_is_deterministic(dataset: dict, tmp_path: Path) -> None:
    again = _build(tmp_path / "again")
    for split in ("train_shards", "val_shards"):
        for a, b in zip(dataset[split], again[split], strict=True):
            assert Path(a).read_bytes() == Path(b).read_bytes()
    first = list(eval_samples(dataset["train_shards"][:2]))
    second = list(eval_samples(again["train_shards"][:2]))
    for x, y in zip(first, second, strict=True):
        assert (x["key"], x["caption"], x["qa"]) == (y["key"], y["caption"], y["qa"])
        assert torch.equal(x["image"], y["image"])

    other = _build(tmp_path / "other", seed=SEED + 1)
    other_captions = [s["caption"] for s in eval_samples(other["train_shards"][:2])]
    assert other_captions != [s["caption"] for s in first]


def test_summary_and_shard_counts(dataset: dict) -> None:
    assert len(dataset["train_shards"]) == math.ceil(N_TRAIN / SHARD_SIZE)
    assert len(dataset["val_shards"]) == math.ceil(N_VAL / SHARD_SIZE)
    assert Path(dataset["train_shards"][0]).name == "train-000000.tar"
    assert (dataset["n_train"], dataset["n_val"]) == (N_TRAIN, N_VAL)
    train = list(eval_samples(dataset["train_shards"]))
    assert [s["key"] for s in train] == [f"train-{i:08d}" for i in range(N_TRAIN)]
    assert json.loads(Path(dataset["answers"]).read_text()) == list(syn.ANSWERS)
    assert dataset["vocab_size"] == TextEncoder(dataset["tokenizer"]).vocab_size


def test_val_is_unique_and_differs_from_train(dataset: dict) -> None:
    val = list(eval_samples(dataset["val_shards"]))
    keys = {tuple(sorted(s["objects"])) for s in val}
    assert len(keys) == N_VAL
    train_captions = [s["caption"] for s in eval_samples(dataset["train_shards"][:3])]
    assert [s["caption"] for s in val] != train_captions[:N_VAL]


def test_sample_content_is_consistent(dataset: dict) -> None:
    for sample in eval_samples(dataset["train_shards"]):
        assert 1 <= len(sample["objects"]) <= syn.MAX_OBJECTS
        assert 3 <= len(sample["qa"]) <= 5
        assert all(answer in syn.ANSWERS for _, answer in sample["qa"])
        for shape, color, position in sample["objects"]:
            assert f"a {color} {shape} at the {position}" in sample["caption"]


def test_questions_balanced_and_need_the_image() -> None:
    rng = random.Random(0)
    answers_by_question: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for _ in range(500):
        scene = syn.sample_scene(rng)
        pairs = syn.questions(scene, rng)
        assert 3 <= len(pairs) <= 5 and len({q for q, _ in pairs}) == len(pairs)
        for question, answer in pairs:
            assert answer in syn.ANSWERS
            answers_by_question[question][answer] += 1
    yes_no = collections.Counter()
    for question, counts in answers_by_question.items():
        if question.startswith("is there"):
            yes_no.update(counts)
    assert 0.4 < yes_no["yes"] / (yes_no["yes"] + yes_no["no"]) < 0.6
    # A blind model's best guess is the majority answer for the exact question text.
    total = sum(sum(c.values()) for c in answers_by_question.values())
    blind = sum(max(c.values()) for c in answers_by_question.values()) / total
    assert blind < 0.45


def test_render_places_colours_in_quadrants() -> None:
    rng = random.Random(1)
    for size in (32, 224):
        for _ in range(20):
            scene = syn.sample_scene(rng)
            pixels = np.asarray(syn.render(scene, size, rng), dtype=np.int32)
            assert pixels.shape == (size, size, 3)
            for position, (col, row) in syn._GRID.items():
                centre = pixels[int((row + 0.5) * size / 2), int((col + 0.5) * size / 2)]
                obj = scene.at(position)
                if obj is None:
                    assert np.ptp(centre) <= 2 * 6 + 1  # grey plus noise
                else:
                    assert np.abs(centre - syn.RGB[obj.color]).max() <= 6


def test_shapes_are_distinguishable_at_32px() -> None:
    masks = {}
    for shape in syn.SHAPES:
        scene = syn.Scene((syn.SceneObject(shape, "red", "top left"),))
        pixels = np.asarray(syn.render(scene, 32, random.Random(5)), dtype=np.int32)
        masks[shape] = pixels[..., 0] - pixels[..., 1] > 100  # red, not grey
    for a in syn.SHAPES:
        for b in syn.SHAPES:
            if a < b:
                assert (masks[a] ^ masks[b]).sum() >= 12, (a, b)


def test_unique_scenes_fail_loudly_when_exhausted() -> None:
    objects = [(s, c) for s in syn.SHAPES for c in syn.COLORS]
    every_scene = {
        tuple(sorted((s, c, p) for (s, c), p in zip(combo, positions)))
        for k in range(1, syn.MAX_OBJECTS + 1)
        for positions in itertools.combinations(syn.POSITIONS, k)
        for combo in itertools.product(objects, repeat=k)
    }
    with pytest.raises(ValueError, match="unique"):
        syn._next_scene(random.Random(0), every_scene)


# ------------------------------------------------------------------ urls


def test_expand_urls() -> None:
    assert expand_urls("s3://b/train-{000000..000002}.tar") == [
        f"s3://b/train-{i:06d}.tar" for i in range(3)
    ]
    assert expand_urls(["a-{1,2}.tar", "b.tar"]) == ["a-1.tar", "a-2.tar", "b.tar"]


def test_missing_shards_local(dataset: dict, tmp_path: Path) -> None:
    shards = dataset["train_shards"]
    ghost = str(Path(shards[0]).with_name("train-999999.tar"))
    elsewhere = str(tmp_path / "nowhere" / "x.tar")
    assert missing_shards([*shards, ghost, elsewhere]) == [ghost, elsewhere]
    assert missing_shards(shards) == []


def test_missing_shards_and_stream_through_fsspec(dataset: dict) -> None:
    root = f"memory://vlcluster-test-{uuid.uuid4().hex}"
    urls = []
    for i, local in enumerate(dataset["val_shards"]):
        urls.append(f"{root}/val-{i:06d}.tar")
        with fsspec.open(urls[-1], "wb") as f:
            f.write(Path(local).read_bytes())
    ghost = f"{root}/val-000099.tar"
    assert missing_shards([*urls, ghost]) == [ghost]
    assert sorted(_keys(urls, N_VAL, window=4)) == [f"val-{i:08d}" for i in range(N_VAL)]


# ------------------------------------------------------------------ streaming


@pytest.mark.parametrize("window", [1, 5, 16, N_TRAIN, 10 * N_TRAIN])
def test_every_epoch_covers_every_sample_once(dataset: dict, window: int) -> None:
    keys = _keys(dataset["train_shards"], 2 * N_TRAIN, seed=3, window=window)
    epoch0, epoch1 = keys[:N_TRAIN], keys[N_TRAIN:]
    assert sorted(epoch0) == sorted(epoch1) == [f"train-{i:08d}" for i in range(N_TRAIN)]
    assert epoch0 != epoch1  # reshuffled per epoch


@pytest.mark.parametrize("start", [0, 17, N_TRAIN, N_TRAIN + 1, 2 * N_TRAIN - 3])
def test_any_position_is_found_without_reading_the_ones_before(dataset: dict, start: int) -> None:
    total = 2 * N_TRAIN + 25  # crosses two epoch boundaries
    reference = _keys(dataset["train_shards"], total, seed=11)
    assert _keys(dataset["train_shards"], total - start, seed=11, start=start) == reference[start:]


def test_windows_shuffle_locally_and_seeds_change_the_order(dataset: dict) -> None:
    shards = dataset["train_shards"]
    order = SourceOrder(shards, shard_counts(shards), 0, 16)
    first_window = {order.locate(position)[1:] for position in range(16)}
    epoch_order = order.shard_order(0)
    flat = [(shard, item) for shard in epoch_order for item in range(order.counts[shard])]
    assert first_window == set(flat[:16])  # a window takes the next 16 items of the epoch's shard sequence
    assert [order.locate(p)[1:] for p in range(16)] != flat[:16]  # in a shuffled order
    assert _keys(shards, N_TRAIN, seed=1) != _keys(shards, N_TRAIN, seed=0)


def test_positions_of_another_order_are_rejected() -> None:
    assert Position.from_state({"position": 7, "drawn": [3, 4]}, 2) == Position(7, (3, 4))
    bad = [
        ({"position": 7, "drawn": [3, 3]}, 2),  # the sources do not add up
        ({"position": -1, "drawn": [-1]}, 1),
        ({"epoch": 0, "offset": 3}, 1),  # a per-worker position of earlier versions
        ({"position": 7, "drawn": [7]}, 2),  # one source saved, two now
    ]
    for state, sources in bad:
        with pytest.raises(ValueError, match="data.train changed"):
            Position.from_state(state, sources)


def test_decode_normalisation(dataset: dict) -> None:
    raws = _raws(dataset["val_shards"], 11)
    raw = raws[0]
    sample = decode_sample(raw)
    pixels = np.asarray(Image.open(io.BytesIO(raw["png"])).convert("RGB"), dtype=np.float32)
    expected = torch.from_numpy((pixels / 255 - 0.5) / 0.5).permute(2, 0, 1)
    assert torch.allclose(sample["image"], expected, atol=1e-6)
    image = torch.stack([decode_sample(other)["image"] for other in raws[1:]])
    assert image.min() >= -1 and image.max() <= 1
    assert image.max() - image.min() > 1  # saturated colours reach far from grey


# ------------------------------------------------------------------ tokenizers


def test_text_encoder_on_generated_tokenizer(dataset: dict) -> None:
    encoder = TextEncoder(dataset["tokenizer"])
    assert (encoder.pad_id, encoder.unk_id, encoder.cls_id, encoder.sep_id, encoder.mask_id) == (0, 1, 2, 3, 4)
    assert encoder.special_ids == frozenset(range(5))
    texts = [s["caption"] for s in eval_samples(dataset["train_shards"][:1])]
    texts += [q for s in eval_samples(dataset["val_shards"][:1]) for q, _ in s["qa"]]
    ids, mask = encoder.encode(texts, max_len=48)
    longest = max(encoder.encode([t], max_len=48)[0].shape[1] for t in texts)
    assert ids.shape == mask.shape == (len(texts), longest)
    assert mask.all(dim=0).sum() >= 2 and mask[:, -1].any()  # padded to the longest text, no further
    assert ids.dtype == torch.long and mask.dtype == torch.bool
    assert (ids[:, 0] == encoder.cls_id).all()
    assert (ids[~mask] == encoder.pad_id).all()
    lengths = mask.sum(1)
    assert (ids[torch.arange(len(texts)), lengths - 1] == encoder.sep_id).all()
    assert not (ids == encoder.unk_id).any()  # the vocabulary covers everything generated

    short_ids, short_mask = encoder.encode([texts[0]], max_len=5)
    assert short_mask.all() and short_ids[0, -1] == encoder.sep_id and short_ids[0, 0] == encoder.cls_id


def test_vocabulary_covers_templates() -> None:
    tokenizer = build_word_tokenizer(["Top Left", "red"])
    assert tokenizer.encode("top left red").tokens == ["[CLS]", "top", "left", "red", "[SEP]"]
    assert [tokenizer.token_to_id(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3, 4]


def _wordpiece_tokenizer(path: Path) -> Path:
    # Specials deliberately not at 0..4, like bert-base-uncased ([PAD]=0, [UNK]=100, [CLS]=101, ...).
    specials = ["[UNK]", "[MASK]", "[SEP]", "[CLS]", "[PAD]"]
    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    corpus = ["a red circle at the top left", "is there a green triangle", "how many shapes are there"] * 5
    tokenizer.train_from_iterator(corpus, trainers.WordPieceTrainer(vocab_size=200, special_tokens=specials))
    tokenizer.post_processor = processors.BertProcessing(
        ("[SEP]", tokenizer.token_to_id("[SEP]")), ("[CLS]", tokenizer.token_to_id("[CLS]"))
    )
    tokenizer.save(str(path))
    return path


def test_text_encoder_on_wordpiece_tokenizer(tmp_path: Path) -> None:
    path = _wordpiece_tokenizer(tmp_path / "tokenizer.json")
    raw = Tokenizer.from_file(str(path))
    encoder = TextEncoder(path)
    assert encoder.pad_id == raw.token_to_id("[PAD]") != 0
    assert encoder.cls_id == raw.token_to_id("[CLS]")
    assert encoder.special_ids == frozenset(raw.token_to_id(t) for t in SPECIAL_TOKENS)
    ids, mask = encoder.encode(["a red circle", "is there a purple circle at the bottom"], max_len=8)
    assert ids.shape == (2, 8)
    assert (ids[:, 0] == encoder.cls_id).all()
    assert (ids[0][~mask[0]] == encoder.pad_id).all() and not mask[0].all()
    assert mask[1].all() and ids[1, -1] == encoder.sep_id


def test_text_encoder_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope" / "tokenizer.json"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        TextEncoder(missing)


@pytest.mark.parametrize("run", [1, 4])
def test_source_order_runs_partition_each_window_into_consecutive_items(run: int) -> None:
    import random

    counts = [8, 8, 8, 8, 8, 3]  # 43 items: the last window is short, its last run too
    order = SourceOrder([f"s{i}.tar" for i in range(len(counts))], counts, seed=3, window=10, run=run)
    window = order.window
    assert window == -(-10 // run) * run
    for epoch in range(2):
        shard_order = order.shard_order(epoch)
        first_flat = {shard: sum(counts[s] for s in shard_order[: shard_order.index(shard)]) for shard in shard_order}
        flat = [first_flat[shard] + item for _, shard, item in map(order.locate, range(epoch * 43, (epoch + 1) * 43))]
        assert sorted(flat) == list(range(43)) != flat  # every item once per epoch, shuffled
        for start in range(0, 43, window):
            positions = flat[start : start + window]
            assert sorted(positions) == list(range(start, min(start + window, 43)))  # windows stay windows
            end = min(start + window, 43)
            for first in range(start, end, run):  # each run of `run` consecutive items is read as one
                block = list(range(first, min(first + run, end)))
                at = positions.index(first)
                assert positions[at : at + len(block)] == block
            if run == 1:  # runs of one item: the item permutation seeded per (seed, epoch, window)
                expected = list(range(len(positions)))
                random.Random(f"3:{epoch}:{start // window}:window").shuffle(expected)
                assert positions == [start + p for p in expected]
