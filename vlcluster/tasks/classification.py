"""Image classification (ImageNet-1k style): vision route, [CLS] -> linear head.

A sample is an image and ``cls`` (the class index as text, WebDataset's
ImageNet convention). Top-1 and top-5 accuracy.
"""

from __future__ import annotations

import random
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlcluster.data.quality import BAD_TEXT, BadSample
from vlcluster.model import ModelConfig, MultiwayTransformer
from vlcluster.tasks.base import RawSample, Scorer, SyntheticData, Task, TaskBatch, TaskInfo

TOP_K = (1, 5)


class ClassificationTask(Task):
    name = "classification"
    route = "vision"
    fields = ("cls",)
    metric = "top1"
    needs_text = False

    def decode_fields(self, raw: RawSample, image_size: int | None) -> dict[str, Any]:
        try:
            return {"label": int(raw["cls"].decode("ascii").strip())}
        except ValueError as exc:
            raise BadSample(BAD_TEXT, f"cls: {exc}") from None

    def collate(self, samples, info: TaskInfo, encoder, max_len, rng: random.Random, train: bool) -> TaskBatch:
        labels = torch.tensor(samples["label"])
        if len(labels) and (labels.min() < 0 or labels.max() >= len(info.labels)):
            raise ValueError(f"class index outside 0..{len(info.labels) - 1} in a batch (keys {samples['key'][:3]}...)")
        return TaskBatch(image=samples["image"], label=labels)

    def synthetic(self) -> SyntheticData:
        from vlcluster.data.synthetic_tasks import CLASSES, classification_samples

        return SyntheticData(classification_samples, CLASSES)

    def build_head(self, config: ModelConfig, info: TaskInfo) -> nn.Module:
        return nn.Linear(config.dim, len(info.labels))

    def logits(self, model: MultiwayTransformer, batch: TaskBatch) -> Tensor:
        return model.heads[self.name](model.encode_image(batch["image"])[:, 0])

    def loss(self, model, batch, rank_sizes) -> Tensor:
        return F.cross_entropy(self.logits(model, batch), batch["label"])

    def scorer(self, info: TaskInfo) -> Scorer:
        return TopKScorer(self)

    def chance(self, info: TaskInfo) -> dict[str, float]:
        classes = max(len(info.labels), 1)
        return {f"top{k}": 100 * min(k, classes) / classes for k in TOP_K}


class TopKScorer(Scorer):
    def __init__(self, task: ClassificationTask):
        self.task, self.hits, self.count = task, dict.fromkeys(TOP_K, 0), 0
        self.items: list[float] = []  # top-1: 100 or 0 per image, for the study report's bootstrap

    def update(self, model, batch) -> None:
        logits = self.task.logits(model, batch)
        ranked = logits.topk(min(max(TOP_K), logits.shape[-1]), dim=-1).indices
        for k in TOP_K:
            found = (ranked[:, :k] == batch["label"][:, None]).any(dim=1)
            self.hits[k] += found.sum().item()
            if k == 1:
                self.items += [100.0 * hit for hit in found.tolist()]
        self.count += len(logits)

    def result(self) -> dict[str, float]:
        return {**{f"top{k}": 100 * self.hits[k] / max(self.count, 1) for k in TOP_K}, "examples": self.count,
                "items": {"top1": self.items}}
