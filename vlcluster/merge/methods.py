"""Merge methods: small functions over one group of expert tensors.

A method receives a :class:`Group` — the tensors of one parameter across
experts (``{"v": W_v, "l": W_l, "vl": W_vl?}``), the seed weight W⁰ when the
method needs one, and the Gram matrices when it needs them — plus its
hyper-parameters, and returns the shared tensor. Register new methods with
:func:`register`; TIES/DARE live in ``sparse.py``, RegMean in ``regmean.py``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

ExpertTensors = dict[str, torch.Tensor]
MergeFn = Callable[..., torch.Tensor]

# Per-part α for sweeps: the two LayerNorms of a block share one setting.
PART_FAMILY = {"attn": "attn", "ffn": "ffn", "ln1": "ln", "ln2": "ln"}


@dataclass(frozen=True)
class GroupInfo:
    """Where a tensor group sits: layer, block part and the parameter name inside the expert."""

    layer: int
    part: str
    rest: str

    def key(self, expert: str) -> str:
        return f"layers.{self.layer}.{self.part}.{expert}.{self.rest}"


@dataclass(frozen=True)
class Group:
    """Everything a method may use to merge one parameter."""

    info: GroupInfo
    experts: ExpertTensors
    base: torch.Tensor | None = None  # W⁰ from the seed checkpoint
    grams: ExpertTensors = field(default_factory=dict)  # expert -> Gram of the layer's inputs


@dataclass(frozen=True)
class Method:
    fn: MergeFn
    params: tuple[str, ...]  # hyper-parameters it reads (recorded in provenance)
    needs_base: bool = False
    needs_grams: bool = False


METHODS: dict[str, Method] = {}


def register(name: str, params: tuple[str, ...] = (), needs_base: bool = False, needs_grams: bool = False) -> Callable[[MergeFn], MergeFn]:
    def add(fn: MergeFn) -> MergeFn:
        if name in METHODS:
            raise ValueError(f"merge method {name!r} registered twice")
        METHODS[name] = Method(fn, params, needs_base, needs_grams)
        return fn

    return add


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown merge method {name!r}; known: {sorted(METHODS)}")
    return METHODS[name]


def part_alpha_for(part: str, alpha: float, part_alpha: Mapping[str, float | None] | None) -> float:
    override = (part_alpha or {}).get(PART_FAMILY[part])
    return alpha if override is None else override


def modality_vectors(group: Group) -> ExpertTensors:
    """τ_m = W_m − W⁰ for every expert of the group."""
    if group.base is None:
        raise ValueError(f"{group.info.key('*')}: this method needs the seed weights W0 (set 'seed')")
    return {expert: weight - group.base for expert, weight in group.experts.items()}


@register("interpolation", params=("alpha", "part_alpha"))
def interpolation(group: Group, alpha: float, part_alpha: Mapping[str, float | None] | None = None, **_: Any) -> torch.Tensor:
    """W = α·W_v + (1−α)·W_l; layers with a VL expert take ⅔ of that plus ⅓·W_vl."""
    weight = part_alpha_for(group.info.part, alpha, part_alpha)
    # lerp is one fused pass: l + α(v − l) = α·v + (1−α)·l.
    merged = torch.lerp(group.experts["l"], group.experts["v"], weight)
    if "vl" in group.experts:
        merged.mul_(2 / 3).add_(group.experts["vl"], alpha=1 / 3)
    return merged


@register("arithmetic", params=("lam",), needs_base=True)
def arithmetic(group: Group, lam: float, **_: Any) -> torch.Tensor:
    """Modality arithmetic: W = W⁰ + λ·Σ_m τ_m over the group's experts (v, l and vl on top)."""
    vectors = modality_vectors(group)
    return group.base + lam * torch.stack(list(vectors.values())).sum(dim=0)
