"""The paper's two merges: interpolation and modality arithmetic."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from vlcluster.merge.methods import Group, modality_vectors, part_alpha_for, register


@register("interpolation")
def interpolation(group: Group, alpha: float, part_alpha: Mapping[str, float | None] | None = None, **_: Any) -> torch.Tensor:
    """W = α·W_v + (1−α)·W_l; layers with a VL expert take ⅔ of that plus ⅓·W_vl."""
    weight = part_alpha_for(group.info.part, alpha, part_alpha)
    # lerp is one fused pass: l + α(v − l) = α·v + (1−α)·l.
    merged = torch.lerp(group.experts["l"], group.experts["v"], weight)
    if "vl" in group.experts:
        merged.mul_(2 / 3).add_(group.experts["vl"], alpha=1 / 3)
    return merged


@register("arithmetic")
def arithmetic(group: Group, lam: float, **_: Any) -> torch.Tensor:
    """Modality arithmetic: W = W⁰ + λ·Σ_m τ_m over the group's experts (v, l and vl on top)."""
    vectors = modality_vectors(group)
    return group.base + lam * torch.stack(list(vectors.values())).sum(dim=0)
