"""One downstream task's metric on one split of its dataset."""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator, Sequence

import torch

from vlcluster.data.loader import stack_samples
from vlcluster.data.quality import BadSample, DataQuality
from vlcluster.data.stream import shard_items
from vlcluster.data.tokenizer import TextEncoder
from vlcluster.model import MultiwayTransformer, load_into
from vlcluster.tasks.base import Task, TaskInfo

log = logging.getLogger("vlcluster.eval")


def task_model(state: dict[str, torch.Tensor], config, task: Task, info: TaskInfo, where: str) -> MultiwayTransformer:
    """The model with the task's head loaded from ``state``; heads the task does not use are dropped."""
    model = task.attach(MultiwayTransformer(config, heads=task.model_heads), info)
    wanted = {key for key in state if not key.startswith("heads.") or key.split(".")[1] in model.heads}
    head_keys = [key for key in model.state_dict() if key.startswith("heads.")]
    if any(key not in state for key in head_keys):
        raise ValueError(
            f"{where}: the model has no trained {task.name} head ({', '.join(sorted(set(head_keys) - set(state))[:3])} "
            f"missing): evaluate a model fine-tuned with task: {task.name}"
        )
    load_into(model, {key: state[key] for key in wanted}, allow_missing_prefixes=())
    return model.eval()


def decoded_batches(task: Task, urls: Sequence[str], image_size: int, batch_size: int, quality: DataQuality) -> Iterator[dict]:
    """Every usable sample in file order, stacked in batches; bad ones counted in ``quality``."""
    chunk: list[dict] = []
    for url in urls:
        for raw in shard_items(url):
            quality.read += 1
            try:
                chunk.append(task.decode(raw, image_size))
            except BadSample as bad:
                quality.record(url, bad.reason)
                log.warning("skipped a bad sample (%s): %s in %s: %s", bad.reason, raw["__key__"], url, bad.detail[:200])
                continue
            if len(chunk) == batch_size:
                yield stack_samples(chunk)
                chunk = []
    if chunk:
        yield stack_samples(chunk)


@torch.no_grad()
def evaluate_task(model: MultiwayTransformer, task: Task, info: TaskInfo, encoder: TextEncoder | None,
                  urls: Sequence[str], batch_size: int, quality: DataQuality | None = None) -> dict:
    quality = quality if quality is not None else DataQuality()
    scorer = task.scorer(info)
    rng = random.Random(0)  # unused at evaluation (every question/caption is kept)
    model.eval()
    for samples in decoded_batches(task, urls, model.config.image_size, batch_size, quality):
        scorer.update(model, task.collate(samples, info, encoder, model.config.max_text_len, rng, train=False))
    return scorer.result()
