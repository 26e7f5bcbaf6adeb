"""A model's task scores on held-out image-caption data (pre-training's
validation shards): VQA from their questions, retrieval from their captions,
each through the task registry like an evaluation on the task's own dataset."""

from __future__ import annotations

import random
from collections.abc import Iterator

import torch

from vlcluster.data.fields import FieldMap
from vlcluster.data.quality import FIELDS_HINT, DataQuality, no_usable_samples
from vlcluster.data.shards import DEFAULT_FIELDS
from vlcluster.data.stream import eval_samples
from vlcluster.data.tokenizer import TextEncoder
from vlcluster.model import MultiwayTransformer, load_into
from vlcluster.tasks.base import Task, TaskBatch, TaskInfo
from vlcluster.tasks.registry import get_task

# Result names as an image-caption evaluation has always written them.
IMAGE_CAPTION_NAMES = {"retrieval_images": "retrieval_pairs"}
TASK_DATASET_ONLY = {"rsum_mean"}  # the task eval's name for (tr + ir) / 2


def load_model(state: dict[str, torch.Tensor], config) -> MultiwayTransformer:
    heads = tuple(sorted({key.split(".")[1] for key in state if key.startswith("heads.")}))
    model = MultiwayTransformer(config, heads=heads)
    load_into(model, state, allow_missing_prefixes=())
    return model.eval()


def batches(samples: Iterator[dict], size: int) -> Iterator[list[dict]]:
    chunk: list[dict] = []
    for sample in samples:
        chunk.append(sample)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


@torch.no_grad()
def evaluate(
    model: MultiwayTransformer, encoder: TextEncoder, answers: list[str], urls: list[str], tasks: list[str], batch_size: int,
    quality: DataQuality | None = None, fields: FieldMap = DEFAULT_FIELDS,
) -> dict:
    """Scores over every usable sample of ``urls``; skipped ones are counted in ``quality``.

    Every task of ``tasks`` reads its fields from the image-caption samples
    (``Task.from_image_caption``) and scores them with its own batches and
    scorer, as on its own dataset: retrieval embeds every caption of a sample
    (COCO-style 5 per image) and scores any-caption text retrieval; VQA asks
    every question of a sample, the ``answers`` being its vocabulary.
    """
    chosen = [image_caption_task(model, name) for name in tasks]
    quality = quality if quality is not None else DataQuality()
    fields = fields.requiring(*sorted({name for task in chosen for name in task.image_caption_fields}))
    info = TaskInfo(tuple(answers))
    scorers = {task.name: task.scorer(info) for task in chosen}
    rng = random.Random(0)  # unused at evaluation (every question/caption is kept)
    images_seen = 0
    for chunk in batches(eval_samples(urls, model.config.image_size, quality, fields), batch_size):
        images = torch.stack([sample["image"] for sample in chunk])
        for task in chosen:
            scorers[task.name].update(model, task_batch(task, chunk, images, info, encoder, model.config.max_text_len, rng))
        images_seen += len(chunk)
    if images_seen == 0:
        raise no_usable_samples(f"evaluation read {len(urls)} shard(s) ({', '.join(urls[:3])}{', ...' if len(urls) > 3 else ''})", quality, FIELDS_HINT)
    result: dict = {"items": {}}
    for task in chosen:
        scores = scorers[task.name].result()
        result["items"] |= scores.pop("items", {})
        result |= {IMAGE_CAPTION_NAMES.get(name, name): value for name, value in scores.items() if name not in TASK_DATASET_ONLY}
    return result


def image_caption_task(model: MultiwayTransformer, name: str) -> Task:
    """The registry's task ``name``, checked to be readable from image-caption samples
    and to have the heads it needs in ``model``."""
    task = get_task(name)
    if type(task).from_image_caption is Task.from_image_caption:
        raise ValueError(
            f"{name} cannot be scored on image-caption data: evaluate it on its own dataset "
            f"(data: {{from: an import stage, or a data stage with tasks: [{name}]}})"
        )
    missing = [head for head in task.heads if head not in model.heads]
    if missing:
        raise ValueError(
            f"the model has no {' or '.join(head.upper() for head in missing)} head: {name} cannot be evaluated "
            f"(evaluate a model fine-tuned for it, or drop {name!r} from tasks)"
        )
    return task


def task_batch(task: Task, chunk: list[dict], images: torch.Tensor, info: TaskInfo, encoder: TextEncoder,
               max_len: int, rng: random.Random) -> TaskBatch:
    """The task's evaluation batch of image-caption samples."""
    rows = [task.from_image_caption(sample) for sample in chunk]
    samples = {"key": [sample["key"] for sample in chunk], "image": images}
    samples |= {name: [row[name] for row in rows] for name in rows[0]}
    return task.collate(samples, info, encoder, max_len, rng, train=False)
