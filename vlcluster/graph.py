"""The dependency graph of a pipeline.

Edges come from references inside stage specs (``init.from``, ``data.from``,
``source``, ``seed``, ``grams``, report ``rows``, ``mergeability``) plus ``after:``. Each stage
gets a spec hash that also covers its upstream hashes, so changing a stage
invalidates everything downstream of it and nothing else.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import math
from dataclasses import dataclass
from graphlib import CycleError, TopologicalSorter
from typing import Any

from vlcluster.stages.kinds import MODEL_KINDS
from vlcluster.jobspec.load import SpecError, validate
from vlcluster.jobspec.models import Pipeline
from vlcluster.jobspec.pipeline_sweep import NotAMapping, expand_pipeline_sweep, set_path
from vlcluster.suggest import did_you_mean


# Which kinds each reference field may point at.
REFERENCE_TARGETS: dict[str, frozenset[str]] = {
    "init.from": MODEL_KINDS,
    "data.from": frozenset({"data", "import"}),
    "tokenizer.from": frozenset({"data"}),
    "source": MODEL_KINDS,
    "seed": MODEL_KINDS,
    "grams": frozenset({"grams"}),
    "rows": frozenset({"eval"}),
    "metrics": frozenset({"metrics"}),
    "merged": frozenset({"eval"}),
    "unmerged": frozenset({"eval"}),
}

# Fields that say how a stage runs, not what it computes: changing them must
# not re-run finished work.
# How a stage runs, not what it computes. The data-loader worker count does
# change the sample order, like the number of ranks: resuming with another
# value is refused at run time instead of silently starting over.
# How a stage runs, not what it computes (speed options change results only within float rounding).
NON_IDENTITY_FIELDS = {
    "resources": True, "after": True, "sweep": True, "data": {"num_workers", "max_bad_fraction"},
    "train": {"compile", "activation_checkpointing"},
}


# Fields added after run directories existed: left out of a stage's identity at their default, so those
# run directories keep their stage hashes (set, they change the stage as any field does).
LATER_FIELDS = {"data": {"shuffle_run": 1}}


def sweep_base(name: str) -> str:
    """``merge[alpha=0.25]`` -> ``merge``; other names are their own base."""
    return name.split("[", 1)[0] if name.endswith("]") else name


def sweep_element_name(base: str, assignment: dict[str, Any]) -> str:
    """``merge[alpha=0.25]``; a copy made by the pipeline sweep keeps one bracket: ``merge[k=1,alpha=0.25]``."""
    values = ",".join(f"{key}={json.dumps(value)}" for key, value in assignment.items())
    return f"{base[:-1]},{values}]" if base.endswith("]") else f"{base}[{values}]"


# More stages than any cluster queue or run directory listing handles well;
# 4 keys of 40 values (2.5 million) would otherwise be expanded and hashed.
MAX_STAGES = 1000


def sweep_size(stage) -> int:
    return math.prod(len(values) for values in (stage.sweep or {}).values())


def expand_sweeps(pipeline: Pipeline, source: str) -> Pipeline:
    """Replace every stage with a ``sweep`` by one stage per combination of
    its values, named ``base[key=value,...]``, each with its own directory
    and spec hash; every backend then runs them as ordinary stages. The
    pipeline's own ``sweep`` (``jobspec/pipeline_sweep.py``) is applied first."""
    pipeline = expand_pipeline_sweep(pipeline, source)
    if not any(stage.sweep for stage in pipeline.stages.values()):
        return pipeline
    total = sum(max(sweep_size(stage), 1) for stage in pipeline.stages.values())
    if total > MAX_STAGES:
        sizes = ", ".join(f"stages.{name}.sweep: {sweep_size(stage)}" for name, stage in pipeline.stages.items() if stage.sweep)
        raise SpecError(f"{source}: the sweeps expand to {total} stages (at most {MAX_STAGES}): {sizes}")
    stages: dict[str, dict] = {}
    for name, stage in pipeline.stages.items():
        raw = stage.model_dump(mode="json", by_alias=True, exclude={"sweep"}, exclude_unset=True)
        raw["kind"] = stage.kind
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


@dataclass(frozen=True)
class Reference:
    field: str  # e.g. "init.from", "rows.merged", "mergeability.k100.metrics"
    target: str

    @property
    def kind_rule(self) -> str:
        if self.field.startswith("rows."):
            return "rows"
        return self.field.rsplit(".", 1)[1] if self.field.startswith("mergeability.") else self.field


def references(stage) -> list[Reference]:
    refs: list[Reference] = []
    init = getattr(stage, "init", None)
    if init is not None and init.from_ is not None:
        refs.append(Reference("init.from", init.from_))
    data = getattr(stage, "data", None)
    if data is not None and data.from_ is not None:
        refs.append(Reference("data.from", data.from_))
    tokenizer = getattr(stage, "tokenizer", None)
    if tokenizer is not None and not isinstance(tokenizer, str):
        refs.append(Reference("tokenizer.from", tokenizer.from_))
    for field in ("source", "seed", "grams"):
        target = getattr(stage, field, None)
        if isinstance(target, str):
            refs.append(Reference(field, target))
    for label, targets in getattr(stage, "rows", {}).items():
        refs.extend(Reference(f"rows.{label}", target) for target in ([targets] if isinstance(targets, str) else targets))
    for label, point in getattr(stage, "mergeability", {}).items():
        refs.extend(Reference(f"mergeability.{label}.{role}", getattr(point, role)) for role in ("metrics", "merged", "unmerged"))
    return refs


@dataclass(frozen=True)
class Graph:
    pipeline: Pipeline
    deps: dict[str, tuple[str, ...]]
    order: tuple[str, ...]
    hashes: dict[str, str]

    def upstream(self, name: str) -> set[str]:
        seen: set[str] = set()
        stack = list(self.deps[name])
        while stack:
            dep = stack.pop()
            if dep not in seen:
                seen.add(dep)
                stack.extend(self.deps[dep])
        return seen


def _check_references(pipeline: Pipeline, source: str) -> dict[str, tuple[str, ...]]:
    deps, problems = reference_problems(pipeline)
    if problems:
        raise SpecError(f"{source}: invalid references:\n  " + "\n  ".join(problems))
    return deps


def reference_problems(pipeline: Pipeline) -> tuple[dict[str, tuple[str, ...]], list[str]]:
    """Each stage's dependencies, and every reference that names no stage or a stage of the wrong kind."""
    problems: list[str] = []
    deps: dict[str, tuple[str, ...]] = {}
    sweeps: dict[str, list[str]] = {}
    for element in pipeline.stages:
        if sweep_base(element) != element:
            sweeps.setdefault(sweep_base(element), []).append(element)
    for name, stage in pipeline.stages.items():
        targets: list[str] = []
        for ref in references(stage):
            target = pipeline.stages.get(ref.target)
            if target is None and ref.target in sweeps:
                problems.append(
                    f"stages.{name}.{ref.field}: stage {ref.target!r} is a sweep of {len(sweeps[ref.target])}; "
                    f"name one element, e.g. {sweeps[ref.target][0]!r} (or depend on all with after: [{ref.target}])"
                )
            elif target is None:
                problems.append(f"stages.{name}.{ref.field}: unknown stage {ref.target!r}{did_you_mean(ref.target, pipeline.stages)}")
            elif target.kind not in REFERENCE_TARGETS[ref.kind_rule]:
                allowed = ", ".join(sorted(REFERENCE_TARGETS[ref.kind_rule]))
                problems.append(
                    f"stages.{name}.{ref.field}: stage {ref.target!r} is a {target.kind} stage; expected {allowed}"
                )
            elif ref.field == "data.from" and target.kind == "import":
                problems += _import_feeds_its_task(name, stage, ref.target, target)
            targets.append(ref.target)
        for index, after in enumerate(stage.after):
            if after in sweeps:  # the whole sweep: downstream waits for every element
                targets.extend(sweeps[after])
            elif after not in pipeline.stages:
                problems.append(f"stages.{name}.after[{index}]: unknown stage {after!r}{did_you_mean(after, pipeline.stages)}")
            else:
                targets.append(after)
        if name in targets:
            problems.append(f"stages.{name}: a stage cannot depend on itself")
        deps[name] = tuple(dict.fromkeys(t for t in targets if t in pipeline.stages and t != name))
    return deps, problems


def _import_feeds_its_task(name: str, stage, source: str, producer) -> list[str]:
    """An import stage holds one task's data: only stages of that task can read it."""
    from vlcluster.importers.registry import FORMATS

    task = FORMATS[producer.format].task
    if stage.kind == "eval":  # lists its tasks
        if stage.tasks == [task]:
            return []
        what, setting = f"tasks {stage.tasks}", f"tasks: [{task}]"
    else:
        wanted = getattr(stage, "task", None)
        if wanted == task:
            return []
        what, setting = f"task {wanted!r}" if wanted else "no task", f"task: {task}"
    return [f"stages.{name}.data.from: stage {source!r} imports {task} data ({producer.format}); this stage has {what} (set {setting})"]


def _topological_order(deps: dict[str, tuple[str, ...]], source: str) -> tuple[str, ...]:
    """Dependencies first; otherwise the order of the file, so runs and
    listings follow what the user wrote."""
    try:
        TopologicalSorter(deps).prepare()
    except CycleError as exc:
        cycle = " -> ".join(reversed(exc.args[1]))
        raise SpecError(f"{source}: the stages form a cycle: {cycle}") from None
    order: list[str] = []
    placed: set[str] = set()
    while len(order) < len(deps):
        name = next(n for n in deps if n not in placed and placed.issuperset(deps[n]))
        order.append(name)
        placed.add(name)
    return tuple(order)


def stage_identity(stage) -> dict:
    exclude = {**NON_IDENTITY_FIELDS, **{name: True for name in stage.unused_fields()}}
    identity = stage.model_dump(mode="json", by_alias=True, exclude=exclude)
    for section, fields in LATER_FIELDS.items():
        for name, default in fields.items():
            if isinstance(identity.get(section), dict) and identity[section].get(name) == default:
                del identity[section][name]
    return identity


def _hashes(pipeline: Pipeline, deps: dict[str, tuple[str, ...]], order: tuple[str, ...]) -> dict[str, str]:
    hashes: dict[str, str] = {}
    for name in order:
        payload = {
            "stage": stage_identity(pipeline.stages[name]),
            "upstream": {dep: hashes[dep] for dep in sorted(deps[name])},
        }
        blob = json.dumps(payload, sort_keys=True).encode()
        hashes[name] = hashlib.sha256(blob).hexdigest()[:16]
    return hashes


def build_graph(pipeline: Pipeline, source: str = "<pipeline>") -> Graph:
    pipeline = expand_sweeps(pipeline, source)
    deps = _check_references(pipeline, source)
    order = _topological_order(deps, source)
    return Graph(pipeline=pipeline, deps=deps, order=order, hashes=_hashes(pipeline, deps, order))
