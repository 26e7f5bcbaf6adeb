"""The state of every stage of a run, whichever backend ran it.

Each backend describes the stages it ran (:meth:`Backend.describe`); the
rules that do not depend on the backend are applied here, once:

- a stage whose done-marker holds its spec hash is ``done``;
- a failed merge that exited with ``GATE_CLOSED`` and recorded a closed gate
  is ``gated``;
- a stage that has not run while a stage it depends on failed, was gated,
  cancelled or is blocked is ``blocked`` by those stages;
- the resume point and the progress record are added to the detail.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from vlcluster.backends import get_backend
from vlcluster.backends.contract import StageStatus
from vlcluster.graph import Graph
from vlcluster.errors import SpecError
from vlcluster.plan import StagePlan
from vlcluster.stages.progress import describe_progress, read_progress
from vlcluster.errors import GATE_CLOSED
from vlcluster.stages.rundir import stage_dir

BLOCKING = frozenset({"failed", "gated", "blocked", "cancelled"})
NOT_STARTED = frozenset({"pending", "blocked", "cancelled"})  # states a blocked stage may be reported in


def backend_of(record: dict) -> str:
    """A stage never submitted has no record: the local rules describe it (pending)."""
    return record.get("backend") or "local"


def job_label(record: dict) -> str:
    return f"{record['backend']} {record['job_id']}" if record.get("backend") and record.get("job_id") else ""


def run_status(graph: Graph, plans: list[StagePlan], records: dict[str, dict], run_dir: Path) -> dict[str, StageStatus]:
    """Stage -> status, in the plans' (topological) order."""
    described: dict[str, StageStatus] = {}
    by_backend: dict[str, list[StagePlan]] = defaultdict(list)
    for plan in plans:
        if plan.status == "done":
            described[plan.name] = StageStatus("done")
        else:
            by_backend[backend_of(records[plan.name])].append(plan)
    for name, group in by_backend.items():
        described.update(get_backend(name).describe(group, {plan.name: records[plan.name] for plan in group}, run_dir))
    statuses: dict[str, StageStatus] = {}
    for plan in plans:
        statuses[plan.name] = shared_rules(plan, records[plan.name], described[plan.name], graph, statuses, run_dir)
    return statuses


def shared_rules(plan: StagePlan, record: dict, status: StageStatus, graph: Graph,
                 upstream: dict[str, StageStatus], run_dir: Path) -> StageStatus:
    job = job_label(record)
    if status.state == "done":
        return StageStatus("done", "", job)
    if is_gated(status, record):
        return StageStatus("gated", "; ".join(filter(None, [record.get("reason"), status.detail])), job)
    blockers = {dep: upstream[dep].state for dep in graph.deps[plan.name] if upstream[dep].state in BLOCKING}
    if blockers and status.state in NOT_STARTED:
        by_state = defaultdict(list)
        for dep, state in blockers.items():
            by_state[state].append(dep)
        detail = "; ".join(f"upstream {state}: {', '.join(sorted(deps))}" for state, deps in sorted(by_state.items()))
        return StageStatus("blocked", detail, job)
    state = "pending" if status.state == "blocked" else status.state  # its upstream has recovered since
    facts = [status.detail]
    if plan.resume_step is not None:
        facts.append(f"checkpoint at step {plan.resume_step}")
    if state in {"running", "interrupted"}:
        facts.append(describe_progress(read_progress(stage_dir(run_dir, plan.name))))
    return StageStatus(state, "; ".join(fact for fact in facts if fact), job)


def is_gated(status: StageStatus, record: dict) -> bool:
    gate = record.get("gate") or {}
    return status.state == "failed" and record.get("returncode") == GATE_CLOSED and gate.get("passed") is False


def stage_log_text(run_dir: Path, stage: str) -> str | None:
    """The stage's own log (``<stage>/logs/stage.log``), or None before it started."""
    log_file = stage_dir(run_dir, stage).log_file
    return log_file.read_text() if log_file.is_file() else None


def no_log(run_dir: Path, stage: str) -> SpecError:
    return SpecError(f"{stage_dir(run_dir, stage).log_file}: no log (has stage {stage!r} started?)")
