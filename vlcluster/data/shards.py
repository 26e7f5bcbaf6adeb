"""Decoding one sample of a WebDataset shard (listing and opening shards: ``vlcluster.storage.shardlist``).

Shards are WebDataset tars read through fsspec, so local paths and any
fsspec scheme (s3://, gs://, memory://, ...) work the same way. The
streams over them (training: resumable; evaluation: file order) are in
``stream`` and ``loader``.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import torch
from PIL import Image

from vlcluster.data.augment import NO_AUGMENT, Augment
from vlcluster.data.fields import FieldMap, read_json
from vlcluster.data.quality import BAD_IMAGE, READ_ERROR, BadSample

RawSample = dict[str, Any]
DEFAULT_FIELDS = FieldMap()


def normalise_images(pixels: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """uint8 ``[..., H, W, 3]`` -> float32 ``[..., 3, H, W]`` in [-1, 1], into ``out`` if given."""
    channels_first = pixels.movedim(-1, -3)
    if out is None:
        out = torch.empty(channels_first.shape, dtype=torch.float32, device=pixels.device)
    return out.copy_(channels_first).div_(127.5).sub_(1.0)  # == (x/255 - 0.5) / 0.5


def decode_sample(raw: RawSample, image_size: int | None = None, fields: FieldMap = DEFAULT_FIELDS) -> dict[str, Any]:
    """Decode a raw sample; the image becomes float32 ``[3, H, W]`` in [-1, 1]."""
    sample = decode_fields(raw, image_size, fields)
    sample["image"] = normalise_images(torch.from_numpy(sample.pop("pixels")))
    return sample


def decode_fields(
    raw: RawSample, image_size: int | None = None, fields: FieldMap = DEFAULT_FIELDS,
    augment: Augment = NO_AUGMENT, sample_seed: str = "",
) -> dict[str, Any]:
    """Decode a raw sample: ``key``, uint8 ``pixels`` ``[H, W, 3]``, ``captions``
    (one or more), ``caption`` (the first) and the task fields it has (see ``fields``).

    The image is resized to ``image_size``, or augmented (training only, see
    ``augment``: seeded by ``sample_seed``). Raises ``BadSample`` (with the
    reason it is counted under) for a read-error marker, a missing field or
    bytes that do not decode.
    """
    if "__error__" in raw:
        raise BadSample(READ_ERROR, raw["__error__"])
    image_bytes = fields.image_bytes(raw)
    meta = read_json(raw, fields)
    captions = fields.captions(raw, meta)
    tasks = fields.task_fields(meta)
    try:
        image = Image.open(io.BytesIO(image_bytes)).convert("RGB")
        if not augment.active and image_size is not None and image.size != (image_size, image_size):
            image = image.resize((image_size, image_size), Image.Resampling.BILINEAR)
    except Exception as exc:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError, ... on broken bytes
        raise BadSample(BAD_IMAGE, f"{type(exc).__name__}: {exc}") from None
    pixels = augment(image, image_size, sample_seed) if augment.active else np.array(image)
    return {"key": raw["__key__"], "pixels": pixels, "captions": captions, "caption": captions[0], **tasks}
