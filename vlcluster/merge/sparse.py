"""Sparse modality-vector methods beyond the paper: TIES and DARE.

Both work on modality vectors τ_m = W_m − W⁰ (as modality arithmetic does)
and differ in how they thin them before summing:

- TIES (Yadav et al. 2023): keep the ``density`` fraction of each τ_m with
  the largest magnitude, elect a sign per entry (sign of the summed trimmed
  vectors), average only the entries that agree with it; W = W⁰ + λ·τ.
- DARE (Yu et al. 2024): drop each entry of τ_m with probability
  1 − ``density`` and rescale the kept ones by 1/density; W = W⁰ + λ·Σ τ̃_m.
  The mask is seeded by (``random_seed``, parameter name, expert), so a merge
  is reproducible whatever order tensors are processed in.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch

from vlcluster.merge.methods import Group, GroupInfo, modality_vectors, register


def trim_to_density(vector: torch.Tensor, density: float) -> torch.Tensor:
    """Zero all but the ``ceil(density·n)`` largest-magnitude entries (selection, not a sort)."""
    flat = vector.reshape(-1)
    drop = flat.numel() - int(torch.tensor(density * flat.numel()).ceil())
    if drop <= 0:
        return vector.clone()
    threshold = flat.abs().kthvalue(drop).values
    return torch.where(vector.abs() > threshold, vector, torch.zeros((), dtype=vector.dtype))


@register("ties")
def ties(group: Group, lam: float, density: float, **_: Any) -> torch.Tensor:
    trimmed = torch.stack([trim_to_density(v, density) for v in modality_vectors(group).values()])
    elected = torch.sign(trimmed.sum(dim=0))
    agree = (torch.sign(trimmed) == elected) & (trimmed != 0)
    count = agree.sum(dim=0).clamp(min=1)
    merged_vector = (trimmed * agree).sum(dim=0) / count
    return group.base + lam * merged_vector


def dare_seed(random_seed: int, info: GroupInfo, expert: str) -> int:
    digest = hashlib.sha256(f"{random_seed}:{info.key(expert)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def dare_keep_mask(shape: torch.Size, density: float, seed: int) -> torch.Tensor:
    """Bernoulli(density) keep-mask from its own generator (independent of global RNG state)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=generator) < density


@register("dare")
def dare(group: Group, lam: float, density: float, random_seed: int = 0, **_: Any) -> torch.Tensor:
    total = torch.zeros_like(group.base)
    for expert, vector in modality_vectors(group).items():
        keep = dare_keep_mask(vector.shape, density, dare_seed(random_seed, group.info, expert))
        total += torch.where(keep, vector / density, torch.zeros((), dtype=vector.dtype))
    return group.base + lam * total
