"""What a downstream task is: its sample fields, head, loss, metric and route.

A task is one module defining a :class:`Task` subclass, registered by one
line in ``registry.py``. The fine-tune objective, the ``eval`` stage, the
synthetic generator and the importers all work through this interface, so
no code outside the task's module knows what a VQA or NLVR2 sample holds.

Routes (see ``vlcluster.model.multiway``):

- ``fusion``: bottom layers per modality, then the top M layers with the VL
  expert on [image; text] (VQA, NLVR2);
- ``dual``: image through all N layers with the V expert, text with the L
  expert, dot product of projected [CLS] features (retrieval);
- ``vision``: image only, all N layers with the V expert (classification,
  segmentation).
"""

from __future__ import annotations

import io
import json
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from vlcluster.data.quality import BAD_IMAGE, BAD_TEXT, MISSING_FIELD, READ_ERROR, BadSample
from vlcluster.data.tokenizer import TextEncoder
from vlcluster.model import ModelConfig, MultiwayTransformer
from vlcluster.model.multiway import trunc_normal_

Route = Literal["fusion", "dual", "vision"]
RawSample = dict[str, Any]
IMAGE_FIELDS = ("jpg", "jpeg", "png", "webp")


@dataclass(frozen=True)
class TaskInfo:
    """What a task's head and metric depend on, read from ``dataset.json``:
    the answer vocabulary (VQA) or the class names (classification, segmentation)."""

    labels: tuple[str, ...] = ()

    @cached_property
    def label_index(self) -> dict[str, int]:
        return {label: i for i, label in enumerate(self.labels)}


@dataclass(frozen=True)
class SyntheticData:
    """A task's synthetic counterpart, written by a ``data`` stage with ``tasks: [name]``:
    ``samples(rng, image_size)`` yields raw samples in the task's WebDataset format
    (field -> bytes, no ``__key__``) without end, a pure function of ``rng``;
    ``labels`` are dataset.json's (answers, class names)."""

    samples: Callable[[random.Random, int], Iterator[dict[str, bytes]]]
    labels: tuple[str, ...] = ()


class TaskBatch(dict):
    """Model-ready tensors of one batch, by name; moves as one."""

    def to(self, device: torch.device) -> TaskBatch:
        return TaskBatch({k: v.to(device, non_blocking=True) if isinstance(v, Tensor) else v for k, v in self.items()})

    @property
    def size(self) -> int:
        return len(self["image"])

    def rows(self, start: int, stop: int) -> TaskBatch:
        """The whole batch (task fine-tunes take no micro-batches: some fields index others)."""
        if (start, stop) != (0, self.size):
            raise ValueError("train.micro_batch_size is not supported for task fine-tunes yet")
        return self


class Task:
    """Base of every task; subclasses set the class attributes and override the methods."""

    name: str = ""
    route: Route = "fusion"
    fields: tuple[str, ...] = ()  # WebDataset fields a sample must carry besides the image
    image_fields: tuple[str, ...] = IMAGE_FIELDS  # the first present one is the image
    metric: str = ""  # headline metric in result.json (percent)
    model_heads: tuple[str, ...] = ()  # heads of the pre-trained model the task keeps (retrieval: itc)
    has_head: bool = True  # adds a head of its own, ``heads.<name>`` (retrieval: none)
    needs_text: bool = True
    image_caption_fields: tuple[str, ...] = ()  # fields an image-caption sample must carry for the task (vqa: qa)

    # ---- data ------------------------------------------------------------------

    def decode(self, raw: RawSample, image_size: int | None) -> dict[str, Any]:
        """One raw WebDataset sample -> ``pixels`` (uint8 [..., H, W, 3]) plus task fields.
        Raises ``BadSample`` with the reason it is counted under."""
        if "__error__" in raw:
            raise BadSample(READ_ERROR, raw["__error__"])
        missing = [name for name in self.fields if name not in raw]
        if missing:
            raise BadSample(MISSING_FIELD, "no " + ", ".join(missing))
        field = next((f for f in self.image_fields if f in raw), None)
        if field is None:
            raise BadSample(MISSING_FIELD, f"no image ({'/'.join(self.image_fields)})")
        return {"key": raw["__key__"], "pixels": read_image(raw[field], image_size), **self.decode_fields(raw, image_size)}

    def decode_fields(self, raw: RawSample, image_size: int | None) -> dict[str, Any]:
        return {}

    def from_image_caption(self, sample: dict[str, Any]) -> dict[str, Any] | None:
        """The task's fields of a decoded image-caption sample (``captions``, ``qa``), as
        ``decode_fields`` gives them: an eval stage scores the task on pre-training data
        this way. None: the task cannot be read from such data."""
        return None

    def collate(self, samples: dict[str, Any], info: TaskInfo, encoder: TextEncoder | None, max_len: int, rng: random.Random, train: bool) -> TaskBatch:
        """Decoded, stacked samples (``image`` tensor plus lists of the task fields) -> tensors.
        ``train``: draw one of several questions/captions with ``rng``; else keep all."""
        raise NotImplementedError

    def synthetic(self) -> SyntheticData | None:
        """The generator of the task's synthetic dataset (CPU tests, tutorials); None:
        the task has none, its data comes from an import stage."""
        return None

    # ---- model -----------------------------------------------------------------

    def build_head(self, config: ModelConfig, info: TaskInfo) -> nn.Module | None:
        return None

    @property
    def heads(self) -> tuple[str, ...]:
        """Heads a model needs for this task's loss and metric."""
        return self.model_heads + ((self.name,) if self.has_head else ())

    def attach(self, model: MultiwayTransformer, info: TaskInfo) -> MultiwayTransformer:
        """Add the task head (freshly initialised) under ``heads.<task name>``."""
        head = self.build_head(model.config, info)
        if head is not None:
            init_head(head)
            model.heads[self.name] = head
        return model

    def loss(self, model: MultiwayTransformer, batch: TaskBatch, rank_sizes: list[int]) -> Tensor:
        raise NotImplementedError

    # ---- metric ----------------------------------------------------------------

    def scorer(self, info: TaskInfo) -> Scorer:
        raise NotImplementedError

    def chance(self, info: TaskInfo) -> dict[str, float]:
        """Expected metric (percent) of a predictor that ignores the input."""
        return {}


class Scorer:
    """Accumulates one task's metric over evaluation batches."""

    def update(self, model: MultiwayTransformer, batch: TaskBatch) -> None:
        raise NotImplementedError

    def result(self) -> dict[str, float]:
        raise NotImplementedError


# ---- shared helpers ------------------------------------------------------------------


def init_head(head: nn.Module) -> None:
    for m in head.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            trunc_normal_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def read_image(data: bytes, image_size: int | None, mode: str = "RGB", resample=Image.Resampling.BILINEAR) -> np.ndarray:
    try:
        image = Image.open(io.BytesIO(data))
        image = image.convert(mode)
        if image_size is not None and image.size != (image_size, image_size):
            image = image.resize((image_size, image_size), resample)
        return np.array(image)
    except Exception as exc:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError, ... on broken bytes
        raise BadSample(BAD_IMAGE, f"{type(exc).__name__}: {exc}") from None


def read_json(raw: RawSample, field: str = "json") -> Any:
    try:
        return json.loads(raw[field])
    except (ValueError, TypeError) as exc:
        raise BadSample(BAD_TEXT, f"{field}: {type(exc).__name__}: {exc}") from None


def read_lines(raw: RawSample, field: str = "txt") -> list[str]:
    """Captions, one per line (COCO/Flickr: five per image)."""
    try:
        lines = [line.strip() for line in raw[field].decode("utf-8").splitlines()]
    except ValueError as exc:
        raise BadSample(BAD_TEXT, f"{field}: {type(exc).__name__}: {exc}") from None
    lines = [line for line in lines if line]
    if not lines:
        raise BadSample(BAD_TEXT, f"{field}: no caption")
    return lines


def require(condition: bool, detail: str) -> None:
    if not condition:
        raise BadSample(BAD_TEXT, detail)
