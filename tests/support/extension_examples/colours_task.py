"""Which colours a scene shows, several at once (multi-label): the worked
example of docs/extending, a downstream task as one module plus one line in
``tasks/registry.py``.

Vision route: the image's [CLS] feature -> one logit per colour, binary cross
entropy. A sample is an image and ``colours``, the names of the colours in it
separated by spaces. The headline score ``colours_acc`` is the percent of
images whose whole set of colours is predicted exactly. The module brings its
own synthetic generator (the scenes of ``vlcluster.data.synthetic``), so a
``data`` stage with ``tasks: [colours]`` writes the task's dataset.
"""

from __future__ import annotations

import io
import random
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlcluster.data.synthetic import COLORS, render, sample_scene
from vlcluster.model import ModelConfig, MultiwayTransformer
from vlcluster.tasks.base import RawSample, Scorer, SyntheticData, Task, TaskBatch, TaskInfo, require


def colour_scenes(rng: random.Random, image_size: int) -> Iterator[dict[str, bytes]]:
    """Scenes of one to three objects, with the colours they show."""
    while True:
        scene = sample_scene(rng)
        png = io.BytesIO()
        render(scene, image_size, rng).save(png, format="PNG")
        shown = sorted({obj.color for obj in scene.objects}, key=COLORS.index)
        yield {"png": png.getvalue(), "colours": " ".join(shown).encode()}


class ColoursTask(Task):
    name = "colours"
    route = "vision"
    fields = ("colours",)
    metric = "colours_acc"
    needs_text = False

    def decode_fields(self, raw: RawSample, image_size: int | None) -> dict[str, Any]:
        names = raw["colours"].decode("utf-8", "replace").split()
        require(bool(names), "colours: no colour named")
        return {"colours": names}

    def collate(self, samples, info: TaskInfo, encoder, max_len, rng: random.Random, train: bool) -> TaskBatch:
        target = torch.zeros(len(samples["colours"]), len(info.labels))
        for row, names in enumerate(samples["colours"]):
            unknown = sorted(set(names) - set(info.label_index))
            if unknown:
                raise ValueError(f"colours: {', '.join(unknown)} not among the dataset's labels {list(info.labels)}")
            target[row, [info.label_index[name] for name in names]] = 1.0
        return TaskBatch(image=samples["image"], target=target)

    def synthetic(self) -> SyntheticData:
        return SyntheticData(colour_scenes, COLORS)

    def build_head(self, config: ModelConfig, info: TaskInfo) -> nn.Module:
        return nn.Linear(config.dim, len(info.labels))

    def logits(self, model: MultiwayTransformer, batch: TaskBatch) -> Tensor:
        return model.heads[self.name](model.encode_image(batch["image"])[:, 0])

    def loss(self, model, batch, rank_sizes) -> Tensor:
        return F.binary_cross_entropy_with_logits(self.logits(model, batch), batch["target"])

    def scorer(self, info: TaskInfo) -> Scorer:
        return ExactSetScorer(self)

    def chance(self, info: TaskInfo) -> dict[str, float]:
        # A coin per colour, ignoring the image: right on every colour with probability 2^-C.
        return {self.metric: 100 / 2 ** max(len(info.labels), 1)}


class ExactSetScorer(Scorer):
    def __init__(self, task: ColoursTask):
        self.task = task
        self.items: list[float] = []  # 100 or 0 per image, for the study report's bootstrap

    def update(self, model, batch) -> None:
        exact = ((self.task.logits(model, batch) > 0) == batch["target"].bool()).all(dim=1)
        self.items += [100.0 * hit for hit in exact.tolist()]

    def result(self) -> dict:
        score = sum(self.items) / max(len(self.items), 1)
        return {self.task.metric: score, "examples": len(self.items), "items": {self.task.metric: self.items}}
