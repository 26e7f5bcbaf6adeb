"""Real image-text corpora: img2dataset's shard layout, several captions per
image, configurable fields, task fields only where used, clear errors for
unusable data, weighted mixtures, BERT WordPiece tokenizers."""

from __future__ import annotations

import collections
import json
import random

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from tests.support.realdata import bert_wordpiece_tokenizer, scene, write_img2dataset_shards
from vlcluster.data.fields import FieldMap
from vlcluster.data.loader import LoaderConfig, TrainLoader
from vlcluster.data.mixture import ShardSource
from vlcluster.data.quality import BadDataError, BadSample, DataQuality
from vlcluster.data.shards import decode_sample
from vlcluster.data.stream import eval_samples
from vlcluster.data.tokenizer import TextEncoder
from vlcluster.model import MultiwayTransformer, preset
from vlcluster.tasks.evaluate import evaluate
from vlcluster.tasks.recall import retrieval_scores

@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, list[str]]:
    """img2dataset shards: jpg, png and webp folders (1 caption each) and a val folder with 5 captions per image."""
    root = tmp_path_factory.mktemp("img2dataset")
    shards = {}
    for number, fmt in enumerate(("jpg", "png", "webp")):
        samples = [scene(100 * number + i, 1) for i in range(16)]
        shards[fmt] = write_img2dataset_shards(root / fmt, samples, per_shard=8, encode_format=fmt)
    shards["val"] = write_img2dataset_shards(root / "val", [scene(900 + i, 5) for i in range(12)], per_shard=6, encode_format="jpg")
    return shards


def test_img2dataset_samples_decode_with_the_default_fields(corpus) -> None:
    for fmt in ("jpg", "png", "webp"):
        samples = list(eval_samples(corpus[fmt], image_size=16))
        assert len(samples) == 16
        assert samples[0]["image"].shape == (3, 16, 16) and samples[0]["key"] == "000000"
        assert samples[0]["captions"] == [samples[0]["caption"]] and "qa" not in samples[0]
    val = list(eval_samples(corpus["val"]))
    assert all(len(sample["captions"]) == 5 for sample in val)
    assert val[0]["captions"][3] == "photo 900 of a purple thing, view 3"


def test_configured_fields_json_caption_lists_and_other_extensions(tmp_path) -> None:
    image, _ = scene(1, 1)
    from tests.support.realdata import image_bytes

    raw = {"__key__": "k", "__url__": "u", "image.jpeg": image_bytes(image, "jpg"), "json": json.dumps({"meta": {"texts": ["one", " two "]}}).encode()}
    fields = FieldMap(image=("image.jpeg",), caption=("txt", "json.meta.texts"))
    assert decode_sample(raw, 8, fields)["captions"] == ["one", "two"]
    with pytest.raises(BadSample) as missing:
        decode_sample(raw, 8)  # defaults: no jpg/jpeg/png/webp, no txt, no json.caption
    assert missing.value.cause == "missing field image"
    raw["jpg"] = raw.pop("image.jpeg")
    with pytest.raises(BadSample) as no_caption:
        decode_sample(raw, 8)
    assert no_caption.value.cause == "missing field caption"
    raw["txt"] = b"\n  \n"
    with pytest.raises(BadSample, match="empty"):
        decode_sample(raw, 8)
    # Task fields: passed on when present, required only when asked for.
    raw["txt"], raw["json"] = b"a caption", json.dumps({"qa": [["q?", "a"]]}).encode()
    assert decode_sample(raw, 8, FieldMap().requiring("qa"))["qa"] == [("q?", "a")]
    del raw["json"]
    assert "qa" not in decode_sample(raw, 8)
    with pytest.raises(BadSample) as needed:
        decode_sample(raw, 8, FieldMap().requiring("qa"))
    assert needed.value.cause == "missing field qa"


def captions_seen(train: TrainLoader, batches: int) -> list[list[str]]:
    return [train.next_batch()["caption"] for _ in range(batches)]


@pytest.mark.parametrize("workers", [0, 2])
def test_one_caption_drawn_per_sample_seeded_and_resumable(corpus, workers) -> None:
    urls = corpus["val"]  # 2 shards, 12 images x 5 captions
    def loader(seed: int = 1) -> TrainLoader:
        return TrainLoader(urls, 0, 1, seed, 4, batch_size=3, image_size=8, num_workers=workers // 2)
    reference = loader()
    expected = captions_seen(reference, 24)  # 72 samples: six epochs
    state_after = {}
    cut = 10
    first = loader()
    assert captions_seen(first, cut) == expected[:cut]
    state_after = json.loads(json.dumps(first.state_dict()))
    first.close()
    resumed = loader()
    resumed.load_state_dict(state_after)
    assert captions_seen(resumed, 24 - cut) == expected[cut:]
    for train in (reference, resumed):
        train.close()
    drawn = collections.Counter(caption.rsplit(" ", 1)[-1] for batch in expected for caption in batch)
    assert set(drawn) == {"0", "1", "2", "3", "4"}  # every caption gets drawn, not always the first
    per_image = collections.defaultdict(set)
    for batch in expected:
        for caption in batch:
            per_image[caption.split(" of ")[0]].add(caption)
    assert max(len(c) for c in per_image.values()) > 1  # an image's caption changes between epochs
    other_seed = loader(seed=2)
    assert captions_seen(other_seed, 24) != expected
    other_seed.close()


def test_a_required_field_no_shard_has_fails_at_the_first_batch_with_counts(corpus) -> None:
    urls = corpus["jpg"] + corpus["png"]  # 4 shards, 32 samples, no qa
    for workers in (0, 2):
        train = TrainLoader(urls, 0, 1, 0, 8, batch_size=4, image_size=8, num_workers=workers, fields=FieldMap().requiring("qa"))
        with pytest.raises(BadDataError) as error:
            train.next_batch()
        train.close()
        message = str(error.value)
        # The first batch's 4 items, every one without the field.
        assert "4 of 4 samples bad: missing field qa (4)" in message, message
        assert "without one usable sample" in message and "data.fields" in message
        assert "Traceback" not in message


def test_empty_shards_and_junk_fail_clearly(tmp_path, corpus) -> None:
    empty = tmp_path / "empty.tar"
    import tarfile

    tarfile.open(empty, "w").close()
    with pytest.raises(BadDataError, match="no samples at all"):
        TrainLoader([str(empty)], 0, 1, 0, 4, batch_size=2).next_batch()


@pytest.fixture(scope="module")
def tiny_model_and_encoder(tmp_path_factory, corpus):
    texts = [caption for sample in eval_samples(corpus["val"]) for caption in sample["captions"]]
    path = bert_wordpiece_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer.json", texts + ["is it red", "yes", "no"])
    encoder = TextEncoder(path)
    torch.manual_seed(0)
    config = preset("tiny", "agnostic", vocab_size=encoder.vocab_size, num_answers=2)
    return MultiwayTransformer(config, heads=("itc", "vqa")).eval(), encoder


def test_evaluation_of_an_unusable_or_empty_set_fails_clearly(tiny_model_and_encoder, corpus, tmp_path) -> None:
    model, encoder = tiny_model_and_encoder
    quality = DataQuality()
    with pytest.raises(BadDataError) as error:
        evaluate(model, encoder, ["yes", "no"], corpus["val"], ["vqa", "retrieval"], 8, quality)
    assert "12 of 12 samples bad: missing field qa (12)" in str(error.value)
    import tarfile

    tarfile.open(tmp_path / "empty.tar", "w").close()
    with pytest.raises(BadDataError, match="no samples at all"):
        evaluate(model, encoder, [], [str(tmp_path / "empty.tar")], ["retrieval"], 8)


def test_evaluation_scores_every_caption(tiny_model_and_encoder, corpus) -> None:
    model, encoder = tiny_model_and_encoder
    result = evaluate(model, encoder, [], corpus["val"], ["retrieval"], 4)
    assert result["retrieval_pairs"] == 12 and result["retrieval_captions"] == 60
    assert {"tr_r1", "tr_r5", "tr_r10", "tr", "ir_r1", "ir_r5", "ir_r10", "ir"} <= set(result)


def test_image_caption_evaluation_reads_tasks_from_the_registry_and_names_one_it_cannot_read(tiny_model_and_encoder, corpus) -> None:
    model, encoder = tiny_model_and_encoder
    with pytest.raises(ValueError, match=r"nlvr2 cannot be scored on image-caption data: evaluate it on its own dataset"):
        evaluate(model, encoder, [], corpus["val"], ["nlvr2"], 4)
    without_itc = MultiwayTransformer(model.config, heads=("vqa",)).eval()
    with pytest.raises(ValueError, match="the model has no ITC head: retrieval cannot be evaluated"):
        evaluate(without_itc, encoder, [], corpus["val"], ["retrieval"], 4)


def test_the_pretrained_vqa_head_is_the_vqa_tasks_head(tiny_model_and_encoder) -> None:
    from vlcluster.tasks.base import TaskInfo
    from vlcluster.tasks.registry import get_task
    from vlcluster.tasks.task_eval import task_model

    model, _ = tiny_model_and_encoder
    state = model.state_dict()
    loaded = task_model(state, model.config, get_task("vqa"), TaskInfo(("yes", "no")), "here")
    assert set(loaded.heads) == {"vqa"} and torch.equal(loaded.heads.vqa.fc2.weight, model.heads.vqa.fc2.weight)


def test_any_caption_text_retrieval_and_per_caption_image_retrieval() -> None:
    images, per_image = 20, 5
    image_emb = F.normalize(torch.randn(images, 32, generator=torch.Generator().manual_seed(0)), dim=-1)
    text_image = torch.arange(images).repeat_interleave(per_image)
    noise = F.normalize(torch.randn(images * per_image, 32, generator=torch.Generator().manual_seed(1)), dim=-1)
    # Only the first caption of each image describes it; the other four are noise.
    text_emb = noise.clone()
    text_emb[::per_image] = image_emb
    scores = retrieval_scores(image_emb, text_emb, text_image)
    assert scores["tr_r1"] == 100.0  # any caption counts: the first one is found first
    # Image retrieval ranks every caption: the matching fifth at rank 1, the noise near chance.
    assert 20.0 <= scores["ir_r1"] < 30.0
    # Untrained (random) embeddings: both directions at chance.
    chance = retrieval_scores(image_emb, noise, text_image)
    assert chance["ir_r1"] < 15.0 and chance["ir_r10"] < 70.0
    # One caption per image: the usual diagonal recall.
    assert retrieval_scores(image_emb, image_emb)["tr"] == 100.0


# ---------------------------------------------------------------- mixtures


def test_mixture_draws_by_weight_and_resumes_exactly_on_another_topology(corpus) -> None:
    sources = [ShardSource(tuple(corpus["jpg"]), 3.0), ShardSource(tuple(corpus["png"]), 1.0)]
    order = LoaderConfig(sources, 0, (8,), 0, 4, 8).build_order()
    served, after = order.walk(order.start, 4000)
    from_first = sum(source == 0 for source, _ in served) / len(served)
    print(f"share of the weight-3 source over 4,000 draws: {from_first:.4f}")
    assert abs(from_first - 0.75) < 0.02
    for index in (0, 1):  # each source serves its own canonical positions in turn
        assert [at for source, at in served if source == index] == list(range(after.drawn[index]))

    def loaders(sizes: list[int], seed: int = 0) -> list[TrainLoader]:
        return [TrainLoader(sources, rank, len(sizes), seed, 4, size, 8, rank_sizes=sizes) for rank, size in enumerate(sizes)]

    def steps(ranks: list[TrainLoader], count: int) -> list[list[tuple[str, str]]]:
        return [[key for train in ranks for key in train.next_batch()["key"]] for _ in range(count)]

    reference = loaders([8])
    expected = steps(reference, 12)
    first = loaders([4, 4])
    assert steps(first, 5) == expected[:5]
    state = json.loads(json.dumps(first[1].state_dict()))
    resumed = loaders([3, 3, 2])
    for train in resumed:
        train.load_state_dict(state)
    assert steps(resumed, 7) == expected[5:]
    other = loaders([8], seed=1)
    assert steps(other, 3) != expected[:3]
    for train in [*reference, *first, *resumed, *other]:
        train.close()


def test_mixture_through_the_loader_workers_and_a_changed_mixture_is_refused(corpus) -> None:
    sources = [ShardSource(tuple(corpus["jpg"]), 3.0), ShardSource(tuple(corpus["webp"]), 1.0)]
    def loader():
        return TrainLoader(sources, 0, 1, 0, 4, batch_size=4, image_size=8, num_workers=2)
    reference = loader()
    expected = [reference.next_batch()["key"] for _ in range(12)]
    reference.close()
    first = loader()
    [first.next_batch() for _ in range(5)]
    state = json.loads(json.dumps(first.state_dict()))
    first.close()
    resumed = loader()
    resumed.load_state_dict(state)
    assert [resumed.next_batch()["key"] for _ in range(7)] == expected[5:]
    resumed.close()
    single = TrainLoader(corpus["jpg"], 0, 1, 0, 4, batch_size=4, image_size=8, num_workers=2)
    with pytest.raises(ValueError, match="data.train changed"):
        single.load_state_dict(state)


def test_bert_layout_tokenizer_ids_come_from_the_file(tmp_path) -> None:
    path = bert_wordpiece_tokenizer(tmp_path / "tokenizer.json", ["a red circle at the top left", "two blue squares"] * 5)
    encoder = TextEncoder(path)
    assert (encoder.pad_id, encoder.unk_id, encoder.cls_id, encoder.sep_id, encoder.mask_id) == (0, 100, 101, 102, 103)
    ids, mask = encoder.encode(["A red circle", "two blue squares at the top left"], max_len=6)
    assert ids[:, 0].tolist() == [101, 101] and ids[1, -1] == 102 and ids[0, mask[0].sum() - 1] == 102
    assert (ids[0][~mask[0]] == 0).all()
    assert encoder.decode(ids[0].tolist()) == "a red circle"


# ------------------------------------------------------------ augmentation


def test_randaugment_is_seeded_per_sample_and_resumes_with_the_same_pixels(corpus) -> None:
    pytest.importorskip("kornia")  # in the test extra; CI always has it
    from vlcluster.data.augment import Augment

    urls = corpus["jpg"]  # 2 shards of 8
    def loader(augment: str, workers: int = 2) -> TrainLoader:
        return TrainLoader(urls, 0, 1, 0, 4, batch_size=4, image_size=16, num_workers=workers, augment=Augment(augment))
    reference = loader("randaugment")
    expected = [reference.next_batch() for _ in range(10)]  # 40 samples: two and a half epochs
    reference.close()
    first = loader("randaugment")
    [first.next_batch() for _ in range(3)]
    state = json.loads(json.dumps(first.state_dict()))
    first.close()
    resumed = loader("randaugment")
    resumed.load_state_dict(state)
    for batch in expected[3:]:
        again = resumed.next_batch()
        assert again["key"] == batch["key"] and torch.equal(again["image"], batch["image"])
    resumed.close()
    # The same samples without augmentation: other pixels; and one sample differs between epochs.
    plain = loader("none")
    unaugmented = [plain.next_batch() for _ in range(4)]
    plain.close()
    assert [b["key"] for b in unaugmented] == [b["key"] for b in expected[:4]]
    assert not torch.equal(unaugmented[0]["image"], expected[0]["image"])
    by_key = collections.defaultdict(list)
    for batch in expected:
        for key, image in zip(batch["key"], batch["image"]):
            by_key[key].append(image)
    twice = [images for images in by_key.values() if len(images) > 1]
    assert twice and all(not torch.equal(images[0], images[1]) for images in twice)
    # In the training process (no workers) the global torch RNG, part of the training state, is untouched.
    rng_before = torch.get_rng_state()
    single = loader("randaugment", workers=0)
    single.next_batch()
    single.close()
    assert torch.equal(torch.get_rng_state(), rng_before)


def test_random_resized_crop_boxes_stay_inside_and_flips_are_off_by_default() -> None:
    from vlcluster.data.augment import Augment

    augment = Augment("none")
    assert not augment.active and Augment("none", flip=True).active
    rng = random.Random(0)
    boxes = [Augment().crop_box((40, 30), rng) for _ in range(200)]
    assert all(0 <= left < right <= 40 and 0 <= top < bottom <= 30 for left, top, right, bottom in boxes)
    areas = [(r - l) * (b - t) / 1200 for l, t, r, b in boxes]
    assert 0.45 <= min(areas) and max(areas) <= 1.0 and len(set(boxes)) > 150
    # Without flips a left-right asymmetric image keeps its orientation.
    image = Image.new("RGB", (16, 16), (0, 0, 0))
    image.paste((255, 255, 255), (0, 0, 8, 16))
    for seed in range(20):
        pixels = Augment("none")(image, 16, f"s{seed}")
        assert pixels[:, :8].mean() > pixels[:, 8:].mean()
    flipped = [Augment("none", flip=True)(image, 16, f"s{seed}")[:, :8].mean() < 128 for seed in range(20)]
    assert 0 < sum(flipped) < 20
