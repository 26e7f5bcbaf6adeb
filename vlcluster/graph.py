"""The dependency graph of a pipeline: dependencies, their order and spec hashes.

Edges come from references inside stage specs (``init.from``, ``data.from``,
``source``, ``seed``, ``grams``, report ``rows``, ``mergeability``;
``jobspec/references.py``) plus ``after:``, between the stages that the sweeps
expand to (``jobspec/sweep.py``). Each stage gets a spec hash that also covers
its upstream hashes, so changing a stage invalidates everything downstream of
it and nothing else.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from graphlib import CycleError, TopologicalSorter

from vlcluster.errors import SpecError
from vlcluster.jobspec.pipeline import Pipeline
from vlcluster.jobspec.references import references
from vlcluster.jobspec.sweep import expand_sweeps, sweep_base
from vlcluster.suggest import did_you_mean


# Fields that say how a stage runs, not what it computes: changing them must
# not re-run finished work. The data-loader worker count does change the sample
# order, like the number of ranks: resuming with another value is refused at run
# time instead of silently starting over. Speed options change results only
# within float rounding.
NON_IDENTITY_FIELDS = {
    "resources": True, "after": True, "sweep": True, "data": {"num_workers", "max_bad_fraction"},
    "train": {"compile", "activation_checkpointing"},
}


# Fields added after run directories existed: left out of a stage's identity at these values, so those
# run directories keep their stage hashes (set otherwise, they change the stage as any field does).
# data.shuffle_run was 1 by default before auto: both keep the hashes (on an object store a checkpoint
# of runs of 1 then refuses to resume under auto's 16, naming the field: data/order.py).
LATER_FIELDS = {"data": {"shuffle_run": (1, "auto")}}


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
            elif target.kind not in ref.kinds:
                allowed = ", ".join(sorted(ref.kinds))
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
        for name, defaults in fields.items():
            if isinstance(identity.get(section), dict) and name in identity[section] and identity[section][name] in defaults:
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
