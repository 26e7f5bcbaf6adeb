"""Random augmentation of training images, seeded per sample.

``data.augment: randaugment`` is the paper's: a random resized crop to the
model's input size, then RandAugment (kornia's, ``n`` operations of
magnitude ``m``). Horizontal flips stay off unless ``data.augment_flip`` is
set: captions say "left" and "right". Each sample's crop, flip and
RandAugment draw come from an RNG seeded by (seed, epoch, shard, key), so
the same sample in the same epoch gets the same pixels in a resumed run, on
any worker, and gets new ones the next epoch. The global torch RNG (part of
the training state) is left untouched.

kornia is an optional dependency (``pip install 'vlcluster[augment]'``);
``none`` needs nothing.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

AUGMENTS = ("none", "randaugment")
_RAND_AUGMENT: dict[tuple[int, int], Any] = {}  # one kornia module per process and (n, m)


def _rand_augment(n: int, m: int):
    if (n, m) not in _RAND_AUGMENT:
        try:
            from kornia.augmentation.auto import RandAugment
        except ImportError:
            raise ImportError(
                "data.augment: randaugment needs kornia: pip install 'vlcluster[augment]' (or pip install kornia)"
            ) from None
        _RAND_AUGMENT[(n, m)] = RandAugment(n=n, m=m)
    return _RAND_AUGMENT[(n, m)]


@dataclass(frozen=True)
class Augment:
    kind: str = "none"
    flip: bool = False
    n: int = 2  # RandAugment operations per image
    m: int = 9  # RandAugment magnitude, of (0, 30)
    scale: tuple[float, float] = (0.5, 1.0)  # crop area as a fraction of the image
    ratio: tuple[float, float] = (3 / 4, 4 / 3)

    def __post_init__(self) -> None:
        if self.kind not in AUGMENTS:
            raise ValueError(f"unknown augmentation {self.kind!r}; known: {list(AUGMENTS)}")
        if self.kind == "randaugment":
            _rand_augment(self.n, self.m)  # fail at start-up, not in a worker, when kornia is missing

    @property
    def active(self) -> bool:
        return self.kind != "none" or self.flip

    def __call__(self, image: Image.Image, size: int | None, sample_seed: str) -> np.ndarray:
        """uint8 ``[H, W, 3]`` pixels of the augmented ``image`` at ``size`` (its own size if None)."""
        rng = random.Random(f"{sample_seed}:augment")
        size = size or min(image.size)
        if self.kind == "randaugment":
            image = image.resize((size, size), Image.Resampling.BILINEAR, box=self.crop_box(image.size, rng))
        elif image.size != (size, size):
            image = image.resize((size, size), Image.Resampling.BILINEAR)
        if self.flip and rng.random() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        pixels = np.array(image)
        if self.kind == "randaugment":
            pixels = self.rand_augment(pixels, rng.getrandbits(63))
        return pixels

    def crop_box(self, image_size: tuple[int, int], rng: random.Random) -> tuple[int, int, int, int]:
        """A random resized crop's box (left, upper, right, lower), as torchvision draws it."""
        width, height = image_size
        area = width * height
        for _ in range(10):
            target = area * rng.uniform(*self.scale)
            aspect = math.exp(rng.uniform(math.log(self.ratio[0]), math.log(self.ratio[1])))
            w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
            if 0 < w <= width and 0 < h <= height:
                left, top = rng.randint(0, width - w), rng.randint(0, height - h)
                return left, top, left + w, top + h
        side = min(width, height)  # fall back to the centre square
        left, top = (width - side) // 2, (height - side) // 2
        return left, top, left + side, top + side

    def rand_augment(self, pixels: np.ndarray, seed: int) -> np.ndarray:
        images = torch.from_numpy(pixels).permute(2, 0, 1).unsqueeze(0).float().div_(255)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            out = _rand_augment(self.n, self.m)(images)
        return out.squeeze(0).clamp_(0, 1).mul_(255).round_().to(torch.uint8).permute(1, 2, 0).contiguous().numpy()


NO_AUGMENT = Augment()
