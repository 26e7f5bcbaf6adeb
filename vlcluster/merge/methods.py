"""Merge methods: small functions over one group of expert tensors.

A method receives a :class:`Group` — the tensors of one parameter across
experts (``{"v": W_v, "l": W_l, "vl": W_vl?}``), the seed weight W⁰ when the
method needs one, and the Gram matrices when it needs them — plus its
hyper-parameters, and returns the shared tensor.

This module is the single source of what each method takes: its parameters
(type, default, valid range: :data:`PARAMS`) and inputs (:data:`SPECS`). The
job-file validation, the ``vlcluster merge`` flags and the stage hash (only
the chosen method's parameters) derive from it. It imports no torch, so the
submit path stays light; the functions live in ``linear.py``
(interpolation, arithmetic), ``sparse.py`` (TIES, DARE) and ``regmean.py``,
imported when a method is first used. A new method: one file with a
:func:`register`-ed function plus one :data:`SPECS` line.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from vlcluster.suggest import did_you_mean

if TYPE_CHECKING:
    import torch

ExpertTensors = dict[str, "torch.Tensor"]
MergeFn = Callable[..., "torch.Tensor"]

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
class Param:
    """A merge hyper-parameter: its type, default and valid range."""

    type: type
    default: Any
    help: str
    low: float | None = None
    high: float | None = None
    low_open: bool = False  # (low, ...: low itself is not allowed
    high_open: bool = False

    @property
    def range_text(self) -> str:
        if self.low is not None and self.high is not None:
            return f"{'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"
        if self.low is not None:
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        return "any integer" if self.type is int else "any finite number"

    def problem(self, value: Any) -> str | None:
        """Why ``value`` is not valid, or None."""
        if value is None:
            return None
        if isinstance(value, Mapping):  # per-part values (part_alpha)
            return next((self.problem(item) for item in value.values() if self.problem(item)), None)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (self.type is int and not isinstance(value, int)):
            return f"must be {'an integer' if self.type is int else 'a number'}, not {value!r}"
        if not math.isfinite(value):
            return f"must be a finite number in {self.range_text}, not {value}"
        below = self.low is not None and (value <= self.low if self.low_open else value < self.low)
        above = self.high is not None and (value >= self.high if self.high_open else value > self.high)
        return f"must be in {self.range_text}, not {value:g}" if below or above else None


PARAMS: dict[str, Param] = {
    "alpha": Param(float, 0.5, "weight of the vision expert", 0, 1),
    "part_alpha": Param(dict, None, "per-part alpha: attn, ffn, ln (both LayerNorms of a block); unset parts use alpha", 0, 1),
    "lam": Param(float, 0.5, "lambda: scale of the summed modality vectors", 0, None, low_open=True),
    "gamma": Param(float, 1.0, "scale of the Grams' off-diagonal", 0, 1),
    "density": Param(float, 0.5, "kept fraction (TIES), keep probability (DARE)", 0, 1, low_open=True),
    "random_seed": Param(int, 0, "seed of the drop masks"),
}


@dataclass(frozen=True)
class MethodSpec:
    params: tuple[str, ...]  # the hyper-parameters it reads (in provenance and the stage hash)
    module: str  # where its function is registered
    needs_base: bool = False  # the seed weights W0 ('seed' / --base)
    needs_grams: bool = False  # a grams stage's Gram matrices ('grams' / --grams)

    @property
    def knob(self) -> str | None:
        """The parameter a study sweeps this method over (the paper's Table 2): the first it reads."""
        return self.params[0] if self.params else None


SPECS: dict[str, MethodSpec] = {
    "interpolation": MethodSpec(("alpha", "part_alpha"), "vlcluster.merge.linear"),
    "arithmetic": MethodSpec(("lam",), "vlcluster.merge.linear", needs_base=True),
    "regmean": MethodSpec(("gamma",), "vlcluster.merge.regmean", needs_grams=True),
    "ties": MethodSpec(("lam", "density"), "vlcluster.merge.sparse", needs_base=True),
    "dare": MethodSpec(("lam", "density", "random_seed"), "vlcluster.merge.sparse", needs_base=True),
}
METHOD_NAMES = tuple(SPECS)


@dataclass(frozen=True)
class Method:
    fn: MergeFn
    spec: MethodSpec

    @property
    def params(self) -> tuple[str, ...]:
        return self.spec.params

    @property
    def needs_base(self) -> bool:
        return self.spec.needs_base

    @property
    def needs_grams(self) -> bool:
        return self.spec.needs_grams


METHODS: dict[str, Method] = {}


def register(name: str) -> Callable[[MergeFn], MergeFn]:
    def add(fn: MergeFn) -> MergeFn:
        if name not in SPECS:
            raise ValueError(f"merge method {name!r} is not declared in vlcluster.merge.methods.SPECS")
        if name in METHODS:
            raise ValueError(f"merge method {name!r} registered twice")
        METHODS[name] = Method(fn, SPECS[name])
        return fn

    return add


def get_method(name: str) -> Method:
    if name not in SPECS:
        raise ValueError(f"unknown merge method {name!r}; known: {sorted(SPECS)}{did_you_mean(name, SPECS)}")
    importlib.import_module(SPECS[name].module)  # registers its function
    return METHODS[name]


def chosen_params(method: str, values: Mapping[str, Any]) -> dict[str, Any]:
    """The hyper-parameters ``method`` reads, from a mapping of every knob."""
    return {name: values[name] for name in SPECS[method].params if name in values}


def param_problems(method: str, values: Mapping[str, Any]) -> list[str]:
    """``name: why`` for each of the method's parameters that is out of range."""
    problems = []
    for name, value in chosen_params(method, values).items():
        problem = PARAMS[name].problem(value)
        if problem:
            problems.append(f"{name} {problem} ({PARAMS[name].help})")
    return problems


def part_alpha_for(part: str, alpha: float, part_alpha: Mapping[str, float | None] | None) -> float:
    override = (part_alpha or {}).get(PART_FAMILY[part])
    return alpha if override is None else override


def modality_vectors(group: Group) -> ExpertTensors:
    """τ_m = W_m − W⁰ for every expert of the group."""
    if group.base is None:
        raise ValueError(f"{group.info.key('*')}: this method needs the seed weights W0 (set 'seed')")
    return {expert: weight - group.base for expert, weight in group.experts.items()}


