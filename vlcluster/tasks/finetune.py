"""How a ``finetune`` stage with ``task:`` trains: data, model, batches, objective.

:class:`TaskTraining` is the trainer's recipe (``vlcluster.train.loop``) for one
task, in place of pre-training's (``vlcluster.train.pretraining``); checkpoints,
resume, FSDP and bad-data accounting stay the trainer's.
"""

from __future__ import annotations

import random

import torch
from torch import Tensor, nn

from vlcluster.data.augment import NO_AUGMENT
from vlcluster.data.fields import FieldMap
from vlcluster.data.inputs import DataSources
from vlcluster.data.mixture import ShardSource
from vlcluster.data.tokenizer import TextEncoder
from vlcluster.model import ModelConfig, MultiwayTransformer
from vlcluster.tasks.base import Task, TaskBatch, TaskInfo
from vlcluster.tasks.dataset import TaskData


class TaskObjective(nn.Module):
    """The task loss as one module, so FSDP's root forward covers it."""

    def __init__(self, model: MultiwayTransformer, task: Task, rank_sizes: list[int]):
        super().__init__()
        self.model, self.task, self.rank_sizes = model, task, rank_sizes

    def forward(self, batch: TaskBatch, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        loss = self.task.loss(self.model, batch, self.rank_sizes)
        return {"loss": loss, self.task.name: loss.detach()}


class TaskBatchBuilder:
    """Decoded samples -> a task batch; draws one question/caption per image
    with its own seeded RNG (checkpointed by the trainer, like pre-training's)."""

    def __init__(self, task: Task, info: TaskInfo, encoder: TextEncoder | None, max_len: int, seed: int):
        self.task, self.info, self.encoder, self.max_len = task, info, encoder, max_len
        self.rng = random.Random(seed)

    def __call__(self, samples: dict, with_questions: bool = False) -> TaskBatch:
        return self.task.collate(samples, self.info, self.encoder, self.max_len, self.rng, train=True)


def task_encoder(task: Task, data: TaskData, where: str) -> TextEncoder | None:
    if not task.needs_text:
        return None
    if data.tokenizer is None:
        raise ValueError(f"{where}: the {task.name} dataset in {data.root} has no tokenizer.json (import it with --tokenizer)")
    return TextEncoder(data.tokenizer)


class TaskTraining:
    """One task's recipe: its dataset's train split, its decoder, head, loss and batches.
    ``where``: the spec field the dataset came from (for messages)."""

    fields = FieldMap()  # the task's decoder reads its own fields
    uint8_images = False
    counts_flops = False  # FLOPs are counted for the pre-training objective's routes only

    def __init__(self, task: Task, data: TaskData, shuffle_buffer: int, shuffle_run: int | str, where: str):
        self.task, self.data = task, data
        train = data.shards("train", where)
        # Image-caption fields and augmentation do not apply to a task's samples.
        self.sources = DataSources(
            train=train, val=data.splits.get("val", []),
            tokenizer=data.tokenizer, answers=None, shuffle_buffer=shuffle_buffer, shuffle_run=shuffle_run,
            train_mixture=(ShardSource(tuple(train)),), fields=FieldMap(), augment=NO_AUGMENT,
        )
        self.encoder = task_encoder(task, data, where)
        self.decode = task.decode

    def build_model(self, config: ModelConfig) -> MultiwayTransformer:
        return self.task.attach(MultiwayTransformer(config, heads=self.task.model_heads), self.data.info)

    def objective(self, model: MultiwayTransformer, rank_sizes: list[int]) -> TaskObjective:
        return TaskObjective(model, self.task, rank_sizes)

    def batch_builder(self, config: ModelConfig, seed: int) -> TaskBatchBuilder:
        return TaskBatchBuilder(self.task, self.data.info, self.encoder, config.max_text_len, seed)
