"""NLVR2: is a statement true of a pair of images?

A sample holds two images (``img0.<ext>``, ``img1.<ext>``, left and right)
and ``json`` = ``{"sentence": str, "label": true|false}``. Each image goes
through the fusion route with the statement; the two fused [CLS] vectors are
concatenated (left, right) and an MLP decides true/false. Accuracy.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlcluster.data.quality import MISSING_FIELD, READ_ERROR, BadSample
from vlcluster.model import ModelConfig, MultiwayTransformer
from vlcluster.tasks.base import IMAGE_FIELDS, RawSample, Scorer, SyntheticData, Task, TaskBatch, TaskInfo, read_image, read_json, require

SIDES = ("img0", "img1")


class PairHead(nn.Module):
    """Concatenated pooled outputs of the two passes -> MLP -> 2 classes."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.fc1 = nn.Linear(2 * dim, 2 * dim)
        self.norm = nn.LayerNorm(2 * dim, eps=eps)
        self.fc2 = nn.Linear(2 * dim, 2)

    def forward(self, left: Tensor, right: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.norm(self.fc1(torch.cat([left, right], dim=-1)))))


def image_field(raw: RawSample, side: str) -> str:
    field = next((f"{side}.{ext}" for ext in IMAGE_FIELDS if f"{side}.{ext}" in raw), None)
    if field is None:
        raise BadSample(MISSING_FIELD, f"no {side} image ({side}.jpg/png/...)")
    return field


class NLVR2Task(Task):
    name = "nlvr2"
    route = "fusion"
    fields = ("json",)
    metric = "nlvr2_acc"

    def decode(self, raw: RawSample, image_size: int | None) -> dict[str, Any]:
        if "__error__" in raw:
            raise BadSample(READ_ERROR, raw["__error__"])
        if "json" not in raw:
            raise BadSample(MISSING_FIELD, "no json")
        pixels = [read_image(raw[image_field(raw, side)], image_size) for side in SIDES]
        if pixels[0].shape != pixels[1].shape:  # without a fixed image_size the two may differ
            raise BadSample(MISSING_FIELD, f"left and right images differ in size: {pixels[0].shape} vs {pixels[1].shape}")
        meta = read_json(raw)
        require(isinstance(meta, dict) and isinstance(meta.get("sentence"), str), "json: no 'sentence'")
        require(isinstance(meta.get("label"), bool), "json: 'label' is not true/false")
        return {"key": raw["__key__"], "pixels": np.stack(pixels), "sentence": meta["sentence"], "label": int(meta["label"])}

    def collate(self, samples, info: TaskInfo, encoder, max_len, rng: random.Random, train: bool) -> TaskBatch:
        ids, mask = encoder.encode(samples["sentence"], max_len)
        return TaskBatch(image=samples["image"], ids=ids, mask=mask, label=torch.tensor(samples["label"]))

    def synthetic(self) -> SyntheticData:
        from vlcluster.data.synthetic_tasks import nlvr2_samples

        return SyntheticData(nlvr2_samples)

    def build_head(self, config: ModelConfig, info: TaskInfo) -> nn.Module:
        return PairHead(config.dim, config.layer_norm_eps)

    def logits(self, model: MultiwayTransformer, batch: TaskBatch) -> Tensor:
        images, ids, mask = batch["image"], batch["ids"], batch["mask"]  # images [B, 2, 3, H, W]
        both = model.fusion(images.flatten(0, 1), ids.repeat_interleave(2, 0), mask.repeat_interleave(2, 0))[:, 0]
        pooled = both.view(images.shape[0], 2, -1)
        return model.heads[self.name](pooled[:, 0], pooled[:, 1])

    def loss(self, model, batch, rank_sizes) -> Tensor:
        return F.cross_entropy(self.logits(model, batch), batch["label"])

    def scorer(self, info: TaskInfo) -> Scorer:
        return AccuracyScorer(self, "nlvr2_acc")

    def chance(self, info: TaskInfo) -> dict[str, float]:
        return {self.metric: 50.0}


class AccuracyScorer(Scorer):
    def __init__(self, task, metric: str):
        self.task, self.metric, self.correct, self.count = task, metric, 0, 0
        self.items: list[float] = []  # 100 or 0 per example: the study report bootstraps over them

    def update(self, model, batch) -> None:
        predicted = self.task.logits(model, batch).argmax(dim=-1)
        hits = predicted == batch["label"]
        self.correct += hits.sum().item()
        self.count += len(predicted)
        self.items += [100.0 * hit for hit in hits.tolist()]

    def result(self) -> dict[str, float]:
        return {self.metric: 100 * self.correct / max(self.count, 1), "examples": self.count, "items": {self.metric: self.items}}
