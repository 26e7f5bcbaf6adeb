"""How long a pipeline takes and how it is held to a GPU cap.

Two views of the same stages (``Job``: GPUs, estimated hours, dependencies,
the family it belongs to: the elements of a sweep or the copies a pipeline
sweep makes of one stage, throttled together by ``resources.max_concurrent``):

- :func:`critical_path`: with unlimited GPUs, each stage starts once its
  upstream is done (and its family is under its throttle); the longest chain.
- :func:`shape_for_cap`: what ``limits: {gpus: N}`` becomes on a queue that
  starts jobs by itself once their dependencies hold (SLURM). The N GPUs are
  N slots; each family in submission order (one SLURM job or array) takes the
  slots that free up first, ``GPUs per task x tasks at once`` of them, and
  waits for every job that held those slots before (``afterany``). A slot is
  never held by two jobs at once, so at most N GPUs are requested at any time,
  whatever the real durations turn out to be; the estimates only choose which
  slots, and give the wall time of that schedule.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Job:
    name: str
    family: str
    gpus: int
    hours: float
    deps: tuple[str, ...]
    max_concurrent: int | None = None


@dataclass
class Family:
    """One submission: a stage, or the elements of a sweep (a job array)."""

    name: str
    jobs: list[Job] = field(default_factory=list)

    @property
    def gpus(self) -> int:  # per task
        return max(job.gpus for job in self.jobs)

    def parallel(self, cap: int | None) -> int:
        """Tasks running at once: the family's throttle, and what fits under the cap."""
        limit = min(job.max_concurrent or len(self.jobs) for job in self.jobs)
        if cap is not None and self.gpus:
            limit = min(limit, cap // self.gpus)
        return max(1, min(len(self.jobs), limit))


def unit_keys(names: list[str], shape_of: Callable[[str], str], deps_of: Callable[[str], tuple[str, ...]]) -> dict[str, str]:
    """Stage -> its submission unit: the elements of one sweep that ask for the same
    resources (``shape_of``), since one SLURM array has one shape, and that read the
    same split upstream units, so an array can still wait for its upstream task by
    task. Other elements form units of their own, ``seed~2`` (``~`` is never in a
    stage name): a zipped ``resources`` splits a stage, and every stage reading its
    copies splits alike. ``names`` in dependency order."""
    from vlcluster.jobspec.sweep import sweep_base

    signatures: dict[str, list[tuple]] = {}
    keys: dict[str, str] = {}
    for name in names:
        # only a split upstream splits: an array reading one upstream array keeps its shape (upstream_jobs pairs the tasks)
        split_upstream = {keys[dep] for dep in deps_of(name) if dep in keys and "~" in keys[dep]}
        signature = (shape_of(name), tuple(sorted(split_upstream)))
        seen = signatures.setdefault(sweep_base(name), [])
        if signature not in seen:
            seen.append(signature)
        index = seen.index(signature)
        keys[name] = sweep_base(name) if index == 0 else f"{sweep_base(name)}~{index + 1}"
    return keys


def families(jobs: list[Job]) -> list[Family]:
    grouped: dict[str, Family] = {}
    for job in jobs:
        grouped.setdefault(job.family, Family(job.family)).jobs.append(job)
    return list(grouped.values())


def tasks_duration(hours: list[float], parallel: int) -> float:
    """An array's tasks started in index order, ``parallel`` at a time."""
    workers = [0.0] * parallel
    for duration in hours:
        heapq.heappush(workers, heapq.heappop(workers) + duration)
    return max(workers)


def critical_path(jobs: list[Job]) -> tuple[float, list[str]]:
    """Hours until the last stage ends with unlimited GPUs, and the chain of
    stages that decides it. ``jobs`` in dependency order."""
    finish: dict[str, float] = {}
    via: dict[str, str | None] = {}
    running: dict[str, list[float]] = {}  # family -> end times of its started jobs (its throttle)
    for job in jobs:
        ready_dep = max(job.deps, key=lambda dep: finish.get(dep, 0.0), default=None)
        start = finish.get(ready_dep, 0.0) if ready_dep else 0.0
        ends = running.setdefault(job.family, [])
        if job.max_concurrent and len(ends) >= job.max_concurrent:
            start = max(start, sorted(ends)[len(ends) - job.max_concurrent])  # wait for a free place in the family
        finish[job.name], via[job.name] = start + job.hours, ready_dep
        ends.append(finish[job.name])
    if not finish:
        return 0.0, []
    last = max(finish, key=finish.get)
    chain = [last]
    while via[chain[-1]] is not None:
        chain.append(via[chain[-1]])
    return finish[last], chain[::-1]


@dataclass(frozen=True)
class CapShape:
    cap: int
    parallel: dict[str, int]  # family -> tasks at once (a SLURM array's %N)
    waits_for: dict[str, tuple[str, ...]]  # family -> families that held its slots before (afterany)
    start: dict[str, float]
    finish: dict[str, float]

    @property
    def hours(self) -> float:
        return max(self.finish.values(), default=0.0)


class CapError(ValueError):
    pass


def shape_for_cap(jobs: list[Job], cap: int) -> CapShape:
    """Slots, throttles and extra dependencies that keep the GPUs requested at once within ``cap``."""
    free_at = [0.0] * cap
    holder: list[str | None] = [None] * cap
    family_of = {job.name: job.family for job in jobs}
    parallel, waits, start, finish = {}, {}, {}, {}
    for fam in families(jobs):
        if fam.gpus > cap:
            raise CapError(f"stage {fam.jobs[0].name} asks for {fam.gpus} GPUs; limits.gpus is {cap}")
        parallel[fam.name] = fam.parallel(cap)
        upstream = {family_of[dep] for job in fam.jobs for dep in job.deps if dep in family_of} - {fam.name}
        ready = max((finish[up] for up in upstream), default=0.0)
        # the slots that free up first, never-held ones first on a tie (no needless waiting)
        order = sorted(range(cap), key=lambda slot: (free_at[slot], holder[slot] is not None, slot))
        slots = order[: fam.gpus * parallel[fam.name]]
        begins = max([ready, *(free_at[slot] for slot in slots)])
        start[fam.name] = begins
        finish[fam.name] = begins + tasks_duration([job.hours for job in fam.jobs], parallel[fam.name])
        waits[fam.name] = tuple(dict.fromkeys(holder[slot] for slot in sorted(slots) if holder[slot] is not None))
        for slot in slots:
            free_at[slot], holder[slot] = finish[fam.name], fam.name
    return CapShape(cap, parallel, waits, start, finish)
