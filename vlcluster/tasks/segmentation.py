"""Semantic segmentation (ADE20k style): vision route patch features -> linear decoder.

A sample is an image and ``seg.png``, a single-channel mask with 0 = ignore
and 1..K = the K classes (ADE20k: 150). The decoder normalises every patch
feature, maps it to K logits and upsamples bilinearly to the image size.
mIoU: per-class intersection over union summed over the whole evaluation
set, averaged over the classes that occur in the labels or predictions.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from vlcluster.model import ModelConfig, MultiwayTransformer
from vlcluster.tasks.base import RawSample, Scorer, SyntheticData, Task, TaskBatch, TaskInfo, read_image

IGNORE = 0  # label 0 in the mask; the loss and metric skip it


class LinearDecoder(nn.Module):
    def __init__(self, dim: int, classes: int, eps: float):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.classify = nn.Linear(dim, classes)

    def forward(self, patches: Tensor, size: tuple[int, int]) -> Tensor:
        """patches [B, P, D] (P a square grid) -> logits [B, K, H, W]."""
        grid = int(round(patches.shape[1] ** 0.5))
        logits = self.classify(self.norm(patches)).transpose(1, 2)
        logits = logits.reshape(patches.shape[0], -1, grid, grid)
        return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)


class SegmentationTask(Task):
    name = "segmentation"
    route = "vision"
    fields = ("seg.png",)
    metric = "miou"
    needs_text = False

    def decode_fields(self, raw: RawSample, image_size: int | None) -> dict[str, Any]:
        # Nearest neighbour: a resized mask keeps valid labels only.
        return {"mask": read_image(raw["seg.png"], image_size, mode="L", resample=Image.Resampling.NEAREST)}

    def collate(self, samples, info: TaskInfo, encoder, max_len, rng: random.Random, train: bool) -> TaskBatch:
        masks = torch.from_numpy(np.stack(samples["mask"])).long()
        if masks.max() > len(info.labels):
            raise ValueError(f"mask label {masks.max().item()} beyond the {len(info.labels)} classes (keys {samples['key'][:3]}...)")
        return TaskBatch(image=samples["image"], target=masks - 1)  # -1 = ignore, 0..K-1 = classes

    def synthetic(self) -> SyntheticData:
        from vlcluster.data.synthetic import SEGMENT_CLASSES
        from vlcluster.data.synthetic_tasks import segmentation_samples

        return SyntheticData(segmentation_samples, SEGMENT_CLASSES)

    def build_head(self, config: ModelConfig, info: TaskInfo) -> nn.Module:
        return LinearDecoder(config.dim, len(info.labels), config.layer_norm_eps)

    def logits(self, model: MultiwayTransformer, batch: TaskBatch) -> Tensor:
        image = batch["image"]
        return model.heads[self.name](model.encode_image(image)[:, 1:], image.shape[-2:])

    def loss(self, model, batch, rank_sizes) -> Tensor:
        return F.cross_entropy(self.logits(model, batch), batch["target"], ignore_index=-1)

    def scorer(self, info: TaskInfo) -> Scorer:
        return IoUScorer(self, len(info.labels))


class IoUScorer(Scorer):
    def __init__(self, task: SegmentationTask, classes: int):
        self.task, self.classes = task, classes
        self.confusion = torch.zeros(classes, classes, dtype=torch.long)  # [label, predicted]

    def update(self, model, batch) -> None:
        predicted = self.task.logits(model, batch).argmax(dim=1).cpu()
        target = batch["target"].cpu()
        valid = target >= 0
        pairs = target[valid] * self.classes + predicted[valid]
        self.confusion += torch.bincount(pairs, minlength=self.classes**2).view(self.classes, self.classes)

    def result(self) -> dict[str, float]:
        intersection = self.confusion.diagonal().double()
        union = self.confusion.sum(0).double() + self.confusion.sum(1).double() - intersection
        present = union > 0
        iou = intersection[present] / union[present]
        pixels = self.confusion.sum().item()
        return {
            "miou": 100 * iou.mean().item() if present.any() else 0.0,
            "pixel_acc": 100 * intersection.sum().item() / max(pixels, 1),
            "classes_present": int(present.sum()),
        }
