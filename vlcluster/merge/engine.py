"""Execute a merge plan: one output tensor at a time from a tensor source.

A source is anything with ``__contains__`` and ``read(key)``: a state dict
(:class:`StateSource`, the in-memory path) or a :class:`TensorFile` (the
streaming path). Both paths run exactly the same code per tensor, which is
why the streamed result is bitwise identical to the in-memory one.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from vlcluster.merge.methods import Group, Method
from vlcluster.merge.layout import MergeTensor
from vlcluster.merge.regmean import needs_gram
from vlcluster.model import SHARED


class TensorSource(Protocol):
    def __contains__(self, key: str) -> bool: ...

    def read(self, key: str) -> torch.Tensor: ...


@dataclass(frozen=True)
class StateSource:
    state: Mapping[str, torch.Tensor]

    def __contains__(self, key: str) -> bool:
        return key in self.state

    def read(self, key: str) -> torch.Tensor:
        return self.state[key]


@dataclass(frozen=True)
class MergeInputs:
    """The method, its hyper-parameters and the side inputs it may need."""

    method: Method
    params: dict[str, Any]
    base: TensorSource | None = None  # seed checkpoint (W⁰)
    grams: TensorSource | None = None  # output of a grams stage

    def __post_init__(self) -> None:
        if self.method.needs_base and self.base is None:
            raise ValueError("this merge method needs the seed checkpoint W0 (give 'seed' / --base)")
        if self.method.needs_grams and self.grams is None:
            raise ValueError("RegMean needs Gram matrices from a grams stage (give 'grams' / --grams)")


def _base_weight(step: MergeTensor, base: TensorSource) -> torch.Tensor:
    key = step.info.key(SHARED)
    if key not in base:
        raise ValueError(f"the seed checkpoint has no {key} (is it a modality-agnostic checkpoint of the same size?)")
    return base.read(key)


def _grams(step: MergeTensor, grams: TensorSource) -> dict[str, torch.Tensor]:
    if not needs_gram(step.info.part, step.info.rest):
        return {}
    # Missing ones are reported by the method, which knows which experts it needs.
    return {expert: grams.read(key) for expert, key in step.experts.items() if key in grams}


def merge_tensor(step: MergeTensor, source: TensorSource, inputs: MergeInputs) -> torch.Tensor:
    experts = {expert: source.read(key) for expert, key in step.experts.items()}
    group = Group(
        info=step.info,
        experts=experts,
        base=_base_weight(step, inputs.base) if inputs.method.needs_base else None,
        grams=_grams(step, inputs.grams) if inputs.method.needs_grams else {},
    )
    return inputs.method.fn(group, **inputs.params).to(experts["v"].dtype).contiguous()


def merge_steps(steps: list, source: TensorSource, inputs: MergeInputs) -> Iterator[tuple[str, torch.Tensor]]:
    for step in steps:
        if isinstance(step, MergeTensor):
            yield step.key, merge_tensor(step, source, inputs)
        else:
            yield step.key, source.read(step.source_key)
