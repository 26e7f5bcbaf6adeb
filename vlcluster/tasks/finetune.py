"""How a ``finetune`` stage with ``task:`` trains: data, model, batches, objective.

The trainer (``vlcluster.train.loop``) asks this object for each piece
instead of the pre-training ones; checkpoints, resume, FSDP and bad-data
accounting stay the trainer's.
"""

from __future__ import annotations

import random

import torch
from torch import Tensor, nn

from vlcluster.data.augment import NO_AUGMENT
from vlcluster.data.fields import FieldMap
from vlcluster.data.sources import single_source
from vlcluster.stages.context import DataSources, StageContext
from vlcluster.data.tokenizer import TextEncoder
from vlcluster.model import ModelConfig, MultiwayTransformer
from vlcluster.model.files import read_model_config
from vlcluster.tasks.base import Task, TaskBatch, TaskInfo
from vlcluster.tasks.dataset import TaskData, stage_task_data
from vlcluster.tasks.registry import get_task
from vlcluster.train.model_config import build_model_config


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
    def __init__(self, ctx: StageContext):
        self.ctx = ctx
        self.task = get_task(ctx.spec.task)
        self.data = stage_task_data(ctx, self.task.name)
        where = f"stages.{ctx.name}.data"
        train = self.data.shards("train", where)
        # The task's decoder reads its own fields; image-caption fields and augmentation do not apply.
        self.sources = DataSources(
            train=train, val=self.data.splits.get("val", []),
            tokenizer=self.data.tokenizer, answers=None, shuffle_buffer=ctx.spec.data.shuffle_buffer,
            shuffle_run=ctx.spec.data.shuffle_run,
            train_mixture=single_source(train), fields=FieldMap(), augment=NO_AUGMENT,
        )
        self.encoder = task_encoder(self.task, self.data, where)
        self.decode = self.task.decode

    def model_config(self) -> ModelConfig:
        """The init model's text vocabulary (its embedding must load), the spec's or data's resolution."""
        init = read_model_config(self.ctx.upstream_dir(self.ctx.spec.init.from_).root)
        vocab = self.encoder.vocab_size if self.encoder else init.vocab_size
        if vocab != init.vocab_size:
            raise ValueError(
                f"stages.{self.ctx.name}: the dataset's tokenizer has {vocab} tokens, the model of stage "
                f"{self.ctx.spec.init.from_!r} was trained with {init.vocab_size}: import the data with the "
                "pre-training tokenizer (--tokenizer)"
            )
        return build_model_config(self.ctx, vocab, 0)

    def build_model(self, config: ModelConfig) -> MultiwayTransformer:
        return self.task.attach(MultiwayTransformer(config, heads=self.task.model_heads), self.data.info)

    def objective(self, model: MultiwayTransformer, rank_sizes: list[int]) -> TaskObjective:
        return TaskObjective(model, self.task, rank_sizes)

    def batch_builder(self, config: ModelConfig, seed: int) -> TaskBatchBuilder:
        return TaskBatchBuilder(self.task, self.data.info, self.encoder, config.max_text_len, seed)
