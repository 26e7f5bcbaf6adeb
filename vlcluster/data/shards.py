"""Shard URLs, reading one shard, decoding one sample.

Shards are WebDataset tars read through fsspec, so local paths and any
fsspec scheme (s3://, gs://, memory://, ...) work the same way. The
streams over them (training: resumable; evaluation: file order) are in
``stream`` and ``loader``.
"""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from typing import IO, Any

import numpy as np
import torch
from PIL import Image

from vlcluster.data.quality import BAD_IMAGE, BAD_TEXT, MISSING_FIELD, READ_ERROR, BadSample
from vlcluster.storage import shardlist

RawSample = dict[str, Any]


def expand_urls(spec: str | Sequence[str]) -> list[str]:
    """Shard URLs of brace patterns, globs and prefixes (see vlcluster.storage.shardlist)."""
    return shardlist.expand(spec)


def missing_shards(urls: Sequence[str]) -> list[str]:
    """The URLs that do not exist (one listing per parent directory)."""
    return shardlist.missing(urls)


def open_url(url: str) -> IO[bytes]:
    """Open ``url`` for binary reading (through the shard cache if configured); the caller closes it."""
    return shardlist.open_input(url)


def normalise_images(pixels: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """uint8 ``[..., H, W, 3]`` -> float32 ``[..., 3, H, W]`` in [-1, 1], into ``out`` if given."""
    channels_first = pixels.movedim(-1, -3)
    if out is None:
        out = torch.empty(channels_first.shape, dtype=torch.float32, device=pixels.device)
    return out.copy_(channels_first).div_(127.5).sub_(1.0)  # == (x/255 - 0.5) / 0.5


IMAGE_FIELDS = ("jpg", "jpeg", "png", "webp")


def decode_sample(raw: RawSample, image_size: int | None = None) -> dict[str, Any]:
    """Decode a raw sample; the image becomes float32 ``[3, H, W]`` in [-1, 1]."""
    sample = decode_fields(raw, image_size)
    sample["image"] = normalise_images(torch.from_numpy(sample.pop("pixels")))
    return sample


def decode_fields(raw: RawSample, image_size: int | None = None) -> dict[str, Any]:
    """Decode a raw sample; the image becomes uint8 ``pixels`` ``[H, W, 3]``.

    No random augmentation: flips or colour jitter would contradict the text.
    Raises ``BadSample`` (with the reason it is counted under) for a read-error
    marker, a missing field or bytes that do not decode.
    """
    if "__error__" in raw:
        raise BadSample(READ_ERROR, raw["__error__"])
    image_field = next((field for field in IMAGE_FIELDS if field in raw), None)
    missing = [name for name, present in (("image", image_field), ("txt", "txt" in raw), ("json", "json" in raw)) if not present]
    if missing:
        raise BadSample(MISSING_FIELD, "no " + ", ".join(missing))
    try:
        caption = raw["txt"].decode("utf-8")
        meta = json.loads(raw["json"])
        qa = [tuple(pair) for pair in meta["qa"]]
        objects = [tuple(obj) for obj in meta["objects"]]
    except (ValueError, KeyError, TypeError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise BadSample(BAD_TEXT, f"{type(exc).__name__}: {exc}") from None
    try:
        image = Image.open(io.BytesIO(raw[image_field])).convert("RGB")
        if image_size is not None and image.size != (image_size, image_size):
            image = image.resize((image_size, image_size), Image.Resampling.BILINEAR)
    except Exception as exc:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError, ... on broken bytes
        raise BadSample(BAD_IMAGE, f"{type(exc).__name__}: {exc}") from None
    return {"key": raw["__key__"], "pixels": np.array(image), "caption": caption, "qa": qa, "objects": objects}
