"""Sweeps: a stage varied alone (its ``sweep``) and fields of several stages varied together.

A stage's own ``sweep`` replaces the stage by one stage per combination of its
values, named ``base[key=value,...]`` (``merge[alpha=0.25]``), each with its own
directory and spec hash; every backend then runs them as ordinary stages.
``after: [merge]`` waits for every element; a reference names one element.

Nothing downstream can follow the elements of a stage's sweep, so the paper's
K_seed study cannot be written with one: the seed and the VL stage change
together (K_seed + K_VL = 200k), and every merge, fine-tune and eval must
follow each pair. The pipeline's own ``sweep`` does::

    sweep:
      zip:                                  # vary together: element i takes the i-th values
        stages.seed.train.steps: [0, 50000, 100000, 150000]
        stages.vlpt.train.steps: [200000, 150000, 100000, 50000]
      product:                              # each field an axis of its own
        stages.merge.alpha: [0.25, 0.75]

The elements are the cross product of the axes (the zip is one axis). A stage
is copied once per distinct combination of the swept values that *reach* it:
the fields of its own and of every stage it reads a model or data from
(``init.from``, ``data.from``, ``source``, ``seed``, ``grams``, ...), directly or
not. A copy is named ``vlpt[seed.train.steps=50000,vlpt.train.steps=150000]``
and reads the matching copies upstream; a stage no swept field reaches is
shared by every element. So ``seed`` above has 4 copies, ``vlpt`` 4 and
``merge`` 8, and the data stage stays one.

A stage that reads many others side by side (the report; ``gathers`` in
``kinds.py``) is never copied: each of its rows and mergeability points that
reads copied stages becomes one entry per element, labelled ``label [...]``.
``after:`` carries no values: a copy waits for the copies of its ``after``
stages that agree with it (the same zip element), a shared stage for all of them. A copy's own name
can be used as a reference (``init: {from: "seed[seed.train.steps=100000]"}``)
to build on one element only.

``replicates: N`` is one more axis, written first in every copy's name
(``vlpt[rep=1,seed.train.steps=50000,...]``): replicate k of every seeded
stage (pre-training and fine-tunes; fine-tunes alone with
``replicates: {count: N, of: finetune}``) trains with ``train.seed + k``, which
seeds its initial weights and its data order, and every stage it feeds is
copied with it, also through a reference to one element (the copy of
``seed[seed.train.steps=300]`` in replicate 1 reads
``seed[rep=1,seed.train.steps=300]``). Stages no seeded stage feeds (data,
imports) stay shared.

The pipeline's sweep and replicates are applied first, then every stage sweep
(a copy keeps its stage's sweep: ``merge[k=1,alpha=0.25]``). The graph
(``graph.py``) takes the expanded stages from here.
"""

from __future__ import annotations

import copy
import itertools
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from vlcluster.stages.kinds import GATHERING_KINDS
from vlcluster.errors import SpecError
from vlcluster.jobspec.load import format_location, known_names, validate
from vlcluster.jobspec.pipeline import SWEPT_KEY_PREFIX as PREFIX, Pipeline
from vlcluster.jobspec.references import references
from vlcluster.suggest import did_you_mean

# More stages than any cluster queue or run directory listing handles well;
# 4 keys of 40 values (2.5 million) would otherwise be expanded and hashed.
MAX_STAGES = 1000
# What a sweep may not vary: how a stage runs or what it waits for, not what it computes.
UNSWEPT = {"kind", "sweep", "after", "resources"}
# The labelled references of a gathering stage (the report's rows and mergeability points).
GATHERED_FIELDS = ("rows", "mergeability")
REPLICATE_KEY = "rep"
# The stage kinds a replicate re-seeds, by ``replicates.of``.
SEEDED_KINDS = {"chain": ("pretrain", "finetune"), "finetune": ("finetune",)}


Assignment = dict[str, Any]  # swept key -> value


def expand_sweeps(pipeline: Pipeline, source: str) -> Pipeline:
    """The pipeline with every sweep applied: its own ``sweep`` and ``replicates`` first, then each stage's."""
    pipeline_sweep = Expansion(pipeline, source) if pipeline.sweep is not None or pipeline.replicates is not None else None
    check_size(pipeline, pipeline_sweep, source)
    if pipeline_sweep is not None:
        pipeline = pipeline_sweep.expand()
    return expand_stage_sweeps(pipeline, source)


# ---- names, sizes and fields: one notion of each for both kinds of sweep ------


def values_text(assignment: dict[str, Any]) -> str:
    """``alpha=0.25,train.lr=0.001``: what an element's bracket holds."""
    return ",".join(f"{key}={json.dumps(value)}" for key, value in assignment.items())


def sweep_element_name(base: str, assignment: Assignment) -> str:
    """``merge[alpha=0.25]``; a copy made by the pipeline sweep keeps one bracket: ``merge[k=1,alpha=0.25]``."""
    return f"{base[:-1]},{values_text(assignment)}]" if base.endswith("]") else f"{base}[{values_text(assignment)}]"


def sweep_base(name: str) -> str:
    """``merge[alpha=0.25]`` -> ``merge``; other names are their own base."""
    return name.split("[", 1)[0] if name.endswith("]") else name


def sweep_size(stage) -> int:
    """How many stages the stage's own sweep makes of it (1 without one)."""
    return math.prod(len(values) for values in (stage.sweep or {}).values())


def stage_counts(pipeline: Pipeline, pipeline_sweep: Expansion | None) -> dict[str, int]:
    """How many stages each written stage expands to: its copies times its own sweep."""
    return {name: (pipeline_sweep.copy_count(name) if pipeline_sweep else 1) * sweep_size(stage)
            for name, stage in pipeline.stages.items()}


def check_size(pipeline: Pipeline, pipeline_sweep: Expansion | None, source: str) -> None:
    """Refuse sweeps that expand to more than ``MAX_STAGES`` before building any of them
    (a pipeline without sweeps is as long as its file, which the loader bounds)."""
    if pipeline_sweep is None and not any(stage.sweep for stage in pipeline.stages.values()):
        return
    counts = stage_counts(pipeline, pipeline_sweep)
    total = sum(counts.values())
    if total > MAX_STAGES:
        sizes = ", ".join(f"{name} x{count}" for name, count in counts.items() if count > 1 or pipeline.stages[name].sweep)
        raise SpecError(f"{source}: the sweeps expand to {total} stages (at most {MAX_STAGES}): {sizes}")


class NotAMapping(ValueError):
    """A swept key runs through a value (``train.steps.x`` where ``train.steps`` is 2)."""


def set_path(raw: dict, path: str, value: Any) -> None:
    """Set the dotted ``path`` inside a stage, making the mappings it lacks."""
    keys = path.split(".")
    for depth, key in enumerate(keys[:-1]):
        child = raw.get(key)
        if child is None:
            child = raw[key] = {}
        elif not isinstance(child, dict):
            held = "a list" if isinstance(child, list) else f"the value {json.dumps(child, default=str)[:60]}"
            raise NotAMapping(f"{'.'.join(keys[:depth + 1])} holds {held}, not a mapping, so {path!r} cannot be set inside it")
        raw = child
    raw[keys[-1]] = value


def stage_raw(stage, exclude: set[str] | None = None) -> dict:
    """The stage as written (unset fields left out), ready to be changed and validated again."""
    raw = stage.model_dump(mode="json", by_alias=True, exclude=exclude, exclude_unset=True)
    raw["kind"] = stage.kind
    return copy.deepcopy(raw)


# ---- a stage's own sweep ----------------------------------------------------


def expand_stage_sweeps(pipeline: Pipeline, source: str) -> Pipeline:
    """Every stage with a ``sweep`` replaced by one stage per combination of its values."""
    if not any(stage.sweep for stage in pipeline.stages.values()):
        return pipeline
    stages: dict[str, dict] = {}
    for name, stage in pipeline.stages.items():
        raw = stage_raw(stage, exclude={"sweep"})
        if not stage.sweep:
            stages[name] = raw
            continue
        keys = list(stage.sweep)
        for values in itertools.product(*(stage.sweep[key] for key in keys)):
            element = copy.deepcopy(raw)
            for key, value in zip(keys, values):
                try:
                    set_path(element, key, value)
                except NotAMapping as exc:
                    raise SpecError(f"{source}: stages.{name}.sweep.{key}: {exc}") from None
            stages[sweep_element_name(name, dict(zip(keys, values)))] = element
    payload = pipeline.model_dump(mode="json", by_alias=True, exclude={"stages"})
    return validate({**payload, "stages": stages}, source)


# ---- the pipeline's sweep and replicates ------------------------------------


@dataclass(frozen=True)
class SweptField:
    key: str  # as written: stages.seed.train.steps
    stage: str
    path: str  # within the stage: train.steps
    rider: bool = False  # resources: set per zip element, not part of a copy's name

    @property
    def label(self) -> str:
        """How the field appears in a copy's name: ``seed.train.steps``."""
        return self.key[len(PREFIX):]

    def sets(self, name: str) -> bool:
        return name == self.stage

    def reaches(self, name: str, upstream: dict[str, set[str]], upstream_pinned: dict[str, set[str]]) -> bool:
        return self.stage == name or self.stage in upstream[name]

    def apply(self, raw: dict, stage, value: Any) -> None:
        set_path(raw, self.path, value)


@dataclass(frozen=True)
class ReplicateField:
    """The replicate axis: sets ``train.seed`` of every seeded stage to its own seed + k."""

    seeded: frozenset[str]
    key: str = REPLICATE_KEY
    label: str = REPLICATE_KEY

    def sets(self, name: str) -> bool:
        return name in self.seeded

    def reaches(self, name: str, upstream: dict[str, set[str]], upstream_pinned: dict[str, set[str]]) -> bool:
        """Through references to one element too: replicate k of a copy reads replicate k upstream."""
        return name in self.seeded or bool(self.seeded & upstream_pinned[name])

    def apply(self, raw: dict, stage, value: int) -> None:
        set_path(raw, "train.seed", stage.train.seed + value)


class Expansion:
    """One pipeline sweep applied to one pipeline."""

    def __init__(self, pipeline: Pipeline, source: str):
        self.pipeline, self.source = pipeline, source
        zip_fields, product = (pipeline.sweep.zip, pipeline.sweep.product) if pipeline.sweep else ({}, {})
        self.fields: dict[str, SweptField | ReplicateField] = {}
        self.axes: list[list[Assignment]] = []
        if pipeline.replicates:  # first: every copy's name starts with its replicate
            kinds = SEEDED_KINDS[pipeline.replicates.of]
            self.fields[REPLICATE_KEY] = ReplicateField(frozenset(n for n, s in pipeline.stages.items() if s.kind in kinds))
            for name in self.fields[REPLICATE_KEY].seeded:
                if "train.seed" in (pipeline.stages[name].sweep or {}):
                    raise self.fail(f"stages.{name}.sweep: replicates set train.seed of this stage; use one or the other")
            self.axes.append([{REPLICATE_KEY: k} for k in range(pipeline.replicates.count)])
        resolved = {key: self.resolve(group, key) for group, keys in (("zip", zip_fields), ("product", product)) for key in keys}
        # ``resources`` rides along a zip: it sets what each copy asks for, not what it computes, so it
        # neither names copies nor reaches downstream (its values are applied per element in ``copies``).
        self.riders = {key: field for key, field in resolved.items() if field.rider}
        self.fields |= {key: field for key, field in resolved.items() if not field.rider}
        # An axis is the list of its elements; the zip is one axis, each product field another.
        computing = [key for key in zip_fields if key in self.fields]
        zipped = [{key: element[key] for key in computing} for element in self.zip_elements()] if computing else []
        self.axes += [zipped] * bool(zipped) + [[{key: value} for value in values] for key, values in product.items()]
        self.upstream, self.upstream_pinned = self.model_upstream(), self.model_upstream(through_pinned=True)
        self.reach = {name: [key for key, f in self.fields.items() if f.reaches(name, self.upstream, self.upstream_pinned)]
                      for name in pipeline.stages}

    # ---- the fields ----------------------------------------------------------

    def zip_elements(self) -> list[Assignment]:
        zipped = self.pipeline.sweep.zip if self.pipeline.sweep else {}
        return [dict(zip(zipped, values)) for values in zip(*zipped.values())]

    def fail(self, message: str) -> SpecError:
        return SpecError(f"{self.source}: {message}")

    def resolve(self, group: str, key: str) -> SweptField:
        rest = key[len(PREFIX):]
        stages = [name for name in self.pipeline.stages if rest.startswith(name + ".")]
        if not stages:
            stage = rest.split(".", 1)[0]
            raise self.fail(f"sweep.{group}.{key}: no stage {stage!r} (stages: {', '.join(self.pipeline.stages)})"
                            + did_you_mean(stage, self.pipeline.stages))
        stage = max(stages, key=len)  # a stage named "a.b" beside one named "a"
        path = rest[len(stage) + 1:]
        if self.pipeline.stages[stage].kind in GATHERING_KINDS:
            raise self.fail(f"sweep.{group}.{key}: a {self.pipeline.stages[stage].kind} stage gathers the copies of others "
                            "and is never copied itself; sweep the stages it reads")
        if path.split(".")[0] == "resources":
            if group != "zip":
                raise self.fail(f"sweep.{group}.{key}: resources vary only in a zip, beside a field that changes what "
                                "the stage computes (e.g. fewer GPUs for the element of 0 steps)")
            return SweptField(key, stage, path, rider=True)
        if path.split(".")[0] in UNSWEPT:
            raise self.fail(f"sweep.{group}.{key}: {path!r} cannot be swept (only fields that change what the stage computes)")
        if path in (self.pipeline.stages[stage].sweep or {}):
            raise self.fail(f"sweep.{group}.{key}: stages.{stage}.sweep varies {path!r} too; sweep a field once")
        if path == "train.seed" and REPLICATE_KEY in self.fields and self.fields[REPLICATE_KEY].sets(stage):
            raise self.fail(f"sweep.{group}.{key}: replicates set train.seed of this stage; use one or the other")
        return SweptField(key, stage, path)

    def check_field(self, key: str) -> None:
        """Every value must give a valid stage that reads the same stages (a reference is not swept)."""
        field = self.fields.get(key) or self.riders[key]
        stage = self.pipeline.stages[field.stage]
        group = "zip" if key in self.pipeline.sweep.zip else "product"
        values = self.pipeline.sweep.zip.get(key) or self.pipeline.sweep.product[key]
        for index, value in enumerate(values):
            raw = stage_raw(stage)
            try:
                set_path(raw, field.path, value)
            except NotAMapping as exc:
                raise self.fail(f"sweep.{group}.{key}: in stages.{field.stage}, {exc}") from None
            try:
                changed = type(stage).model_validate(raw)
            except ValidationError as exc:
                first = exc.errors()[0]
                message = "unknown field" if first["type"] == "extra_forbidden" else first["msg"]
                message += did_you_mean(first["loc"][-1] if first["loc"] else None,
                                        known_names(("stages", field.stage, stage.kind, *first["loc"]), first["type"]))
                raise self.fail(f"sweep.{group}.{key}[{index}]: {json.dumps(value, default=str)} gives stages.{field.stage}."
                                f"{format_location(first['loc'])}: {message}") from None
            if references(changed) != references(stage):
                raise self.fail(f"sweep.{group}.{key}: a reference to another stage cannot be swept; "
                                "write one stage per input (or sweep the input stage itself)")

    def model_upstream(self, through_pinned: bool = False) -> dict[str, set[str]]:
        """Every stage each stage reads a model or data from, directly or not (``after`` and gathering stages
        excluded); ``through_pinned``: a reference to one element (``seed[...]``) counts as one to its stage."""
        stages = self.pipeline.stages
        parents = {name: [] if stage.kind in GATHERING_KINDS else
                   [target for r in references(stage) if (target := self.base_of(r.target) if through_pinned else r.target) in stages]
                   for name, stage in stages.items()}
        upstream: dict[str, set[str]] = {}

        def visit(name: str, path: tuple[str, ...]) -> set[str]:
            if name not in upstream:
                found: set[str] = set()
                for parent in parents[name]:
                    if parent not in path:  # a cycle: the graph reports it after expansion
                        found |= {parent} | visit(parent, (*path, name))
                upstream[name] = found
            return upstream[name]

        for name in stages:
            visit(name, ())
        return upstream

    def base_of(self, target: str) -> str:
        """The stage a reference names: ``seed`` for ``seed[seed.train.steps=300]`` (a written element's name)."""
        base = target.split("[", 1)[0]
        return base if target not in self.pipeline.stages and base in self.pipeline.stages else target

    # ---- the copies ----------------------------------------------------------

    def distinct_parts(self, keys: list[str]) -> list[list[Assignment]]:
        """Per axis holding any of ``keys``: the distinct values its elements give them, in the order written."""
        per_axis = []
        for axis in self.axes:
            parts = {}
            for element in axis:
                part = {key: element[key] for key in keys if key in element}
                if part:
                    parts.setdefault(json.dumps(part, sort_keys=True, default=str), part)
            if parts:
                per_axis.append(list(parts.values()))
        return per_axis

    def assignments(self, keys: list[str]) -> list[Assignment]:
        """The distinct combinations of these keys' values over all elements."""
        ordered = [key for key in self.fields if key in keys]
        combined = ({key: value for part in combo for key, value in part.items()} for combo in itertools.product(*self.distinct_parts(keys)))
        return [{key: values[key] for key in ordered} for values in combined]

    def copy_count(self, name: str) -> int:
        if not self.reach[name] or self.pipeline.stages[name].kind in GATHERING_KINDS:
            return 1
        return math.prod(len(parts) for parts in self.distinct_parts(self.reach[name]))

    def name(self, stage: str, assignment: Assignment) -> str:
        """``stage`` itself when no swept field reaches it, else its copy for ``assignment``."""
        keys = self.reach.get(stage)
        if not keys:
            return stage
        return stage + "[" + suffix(self.fields, {key: assignment[key] for key in keys}) + "]"

    def copies(self, name: str) -> Iterator[tuple[str, dict]]:
        stage = self.pipeline.stages[name]
        if stage.kind in GATHERING_KINDS:
            yield name, self.gathered(stage_raw(stage))
            return
        if not self.reach[name]:
            yield name, stage_raw(stage)
            return
        for assignment in self.assignments(self.reach[name]):
            raw = stage_raw(stage)
            for key, value in assignment.items():
                if self.fields[key].sets(name):
                    self.fields[key].apply(raw, stage, value)
            self.apply_riders(name, raw, assignment)
            self.point_upstream(stage, raw, assignment)
            yield self.name(name, assignment), raw

    def apply_riders(self, name: str, raw: dict, assignment: Assignment) -> None:
        """The ``resources`` the zip elements of this copy give it (they must agree)."""
        for key, field in self.riders.items():
            if field.stage != name:
                continue
            values = {json.dumps(element[key], sort_keys=True): element[key] for element in self.zip_elements()
                      if all(element[k] == v for k, v in assignment.items() if k in element)}
            if len(values) > 1:
                raise self.fail(f"sweep.zip.{key}: zip elements that make the same copy {self.name(name, assignment)!r} "
                                f"give it different values: {', '.join(values)}")
            if values:
                set_path(raw, field.path, next(iter(values.values())))

    def point_upstream(self, stage, raw: dict, assignment: Assignment) -> None:
        """References of a copy lead to the copies of the same element."""
        for ref in references(stage):
            if self.reach.get(ref.target):
                set_path(raw, ref.field, self.name(ref.target, assignment))
            elif REPLICATE_KEY in assignment and REPLICATE_KEY in self.reach.get(self.base_of(ref.target), ()):
                # a written element's name: the same element of this replicate
                base, rest = ref.target.split("[", 1)
                set_path(raw, ref.field, f"{base}[{REPLICATE_KEY}={assignment[REPLICATE_KEY]},{rest}")
        if "after" in raw:
            raw["after"] = [name for target in raw["after"] for name in self.agreeing(target, assignment)]

    def agreeing(self, target: str, assignment: Assignment) -> list[str]:
        """The copies of ``target`` that agree with ``assignment`` (each element of them when ``target`` has a sweep of its own)."""
        if not self.reach.get(target):
            return [target]
        names = [self.name(target, other) for other in self.assignments(self.reach[target]) if self.consistent(assignment, other)]
        own = self.pipeline.stages[target].sweep
        if not own:
            return names
        return [sweep_element_name(name, dict(zip(own, values))) for name in names for values in itertools.product(*own.values())]

    def consistent(self, one: Assignment, other: Assignment) -> bool:
        """Whether some element of the sweep gives both (zipped values agree only within one element)."""
        both = {**one, **other}
        if any(one[key] != other[key] for key in one.keys() & other.keys()):
            return False
        return all(any(all(both[key] == value for key, value in element.items() if key in both) for element in axis)
                   for axis in self.axes)

    def gathered(self, raw: dict) -> dict:
        """A gathering stage with one entry per element for each entry that reads copied stages."""
        for group in GATHERED_FIELDS:
            if isinstance(raw.get(group), dict):
                entries = [entry for label, value in raw[group].items() for entry in self.gathered_entry(label, value)]
                labels = [label for label, _ in entries]
                if len(set(labels)) < len(labels):
                    twice = next(label for label in labels if labels.count(label) > 1)
                    raise self.fail(f"{group}: the sweep makes the label {twice!r}, which is also written; rename that entry")
                raw[group] = dict(entries)
        return raw

    def gathered_entry(self, label: str, value: Any) -> Iterator[tuple[str, Any]]:
        targets = [value] if isinstance(value, str) else list(value.values()) if isinstance(value, dict) else list(value)
        keys = sorted({key for target in targets if isinstance(target, str) for key in self.reach.get(target, [])},
                      key=list(self.fields).index)
        if not keys:
            yield label, value
            return
        for assignment in self.assignments(keys):
            yield f"{label} [{suffix(self.fields, assignment)}]", self.renamed(value, assignment)

    def renamed(self, value: str | list | dict, assignment: Assignment) -> str | list | dict:
        """An entry's references (one, a list, or a mapping of them) with copies for ``assignment``."""
        if isinstance(value, list):
            return [self.name(item, assignment) for item in value]
        if isinstance(value, dict):
            return {key: self.name(item, assignment) for key, item in value.items()}
        return self.name(value, assignment)

    def expand(self) -> Pipeline:
        """The copies (call after ``check_size``: a sweep too large is refused before its values are validated)."""
        for key, field in [*self.fields.items(), *self.riders.items()]:
            if isinstance(field, SweptField):
                self.check_field(key)
        for key, field in self.riders.items():
            if not any(k in self.pipeline.sweep.zip for k in self.reach[field.stage]):
                raise self.fail(f"sweep.zip.{key}: no zipped field that changes what the stage computes reaches "
                                f"stages.{field.stage}, so it has no copies whose resources could differ")
        stages = dict(copy_ for name in self.pipeline.stages for copy_ in self.copies(name))
        payload = self.pipeline.model_dump(mode="json", by_alias=True, exclude={"stages", "sweep", "replicates"})
        return validate({**payload, "stages": stages}, self.source)


def suffix(fields: dict[str, SweptField | ReplicateField], assignment: Assignment) -> str:
    """What a copy's bracket holds: ``seed.train.steps=50000,vlpt.train.steps=150000``."""
    return values_text({fields[key].label: value for key, value in assignment.items()})
