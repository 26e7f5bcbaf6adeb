"""Merge methods: small functions over one group of expert tensors.

A method receives the tensors of one parameter across experts
(``{"v": W_v, "l": W_l, "vl": W_vl?}``) plus its hyper-parameters and returns
the shared tensor. Register new methods with :func:`register`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

ExpertTensors = dict[str, torch.Tensor]
MergeFn = Callable[..., torch.Tensor]

METHODS: dict[str, MergeFn] = {}


def register(name: str) -> Callable[[MergeFn], MergeFn]:
    def add(fn: MergeFn) -> MergeFn:
        if name in METHODS:
            raise ValueError(f"merge method {name!r} registered twice")
        METHODS[name] = fn
        return fn

    return add


@dataclass(frozen=True)
class GroupInfo:
    """Where a tensor group sits: which layer/part, whether it has a VL expert."""

    layer: int
    part: str
    rest: str


@register("interpolation")
def interpolation(experts: ExpertTensors, info: GroupInfo, alpha: float, **_: Any) -> torch.Tensor:
    """W = α·W_v + (1−α)·W_l; layers with a VL expert take ⅔ of that plus ⅓·W_vl."""
    merged = alpha * experts["v"] + (1 - alpha) * experts["l"]
    if "vl" in experts:
        merged = (2 / 3) * merged + (1 / 3) * experts["vl"]
    return merged
