"""Fine-tuning at another resolution than pre-training: resize the image position tables.

The absolute table holds [CLS] then one row per patch of a square grid. The
patch rows are resized as a 2-D grid with bicubic interpolation (as BEiT/VLMo
do when fine-tuning at 384 or 480 px); the [CLS] row is kept. The relative
bias's image table is resized the same way over its (2g-1) x (2g-1) grid of
distances (posbias.resize_image_table); its [CLS] rows are kept.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .posbias import resize_image_table

IMAGE_POSITIONS = "embed.image.pos"
IMAGE_BIAS = "position_bias.image"


def resize_position_table(table: Tensor, grid: int) -> Tensor:
    """[1, 1 + g*g, D] -> [1, 1 + grid*grid, D]."""
    cls, patches = table[:, :1], table[:, 1:]
    old = math.isqrt(patches.shape[1])
    if old * old != patches.shape[1]:
        raise ValueError(f"position table of {patches.shape[1]} patches is not a square grid")
    if old == grid:
        return table
    square = patches.reshape(1, old, old, -1).permute(0, 3, 1, 2).float()
    resized = F.interpolate(square, size=(grid, grid), mode="bicubic", align_corners=False)
    return torch.cat([cls, resized.permute(0, 2, 3, 1).reshape(1, grid * grid, -1).to(table.dtype)], dim=1)


def fit_position_table(state: Mapping[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
    """``state`` with its image position table resized to ``model``'s resolution."""
    out = dict(state)
    grid = model.config.image_size // model.config.patch_size
    if IMAGE_POSITIONS in out:
        out[IMAGE_POSITIONS] = resize_position_table(out[IMAGE_POSITIONS], grid)
    if IMAGE_BIAS in out:
        out[IMAGE_BIAS] = resize_image_table(out[IMAGE_BIAS], grid)
    return out
