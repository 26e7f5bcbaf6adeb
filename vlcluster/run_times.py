"""How long a run and its stages took, read from the stages' own records.

Every backend writes ``started`` when a stage's attempt begins and ``ended``
when it ends (``state.json``, :mod:`vlcluster.stages.rundir`), and the
process that ran it the attempt's ``duration_s`` on a monotonic clock. A stage's time
is that of its last attempt: a resumed or requeued stage shows the attempt
that finished it. Records may come from anyone: a missing, mistyped or
backwards time is no time ("–"), never an error.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping

from vlcluster.backends.contract import StageStatus
from vlcluster.backends.run_status import is_gated
from vlcluster.plan import StagePlan

NO_TIME = "–"
# States whose record times belong to the stage as it stands (a pending or
# blocked stage's record, if any, is from an earlier attempt).
TIMED = frozenset({"done", "failed", "gated", "cancelled"})
OUTCOMES = frozenset({"done", "failed", "cancelled"})  # what a stage's record says once its attempt has ended


def stage_seconds(record: Mapping, state: str, now: float | None = None) -> float | None:
    """The wall time of the stage's last attempt; for a running stage, so far.
    An ended attempt's ``duration_s`` (measured on a monotonic clock by the
    process that ran it) wins over ``ended - started``, which a jump of the
    wall clock in between would stretch or turn negative."""
    measured = record.get("duration_s")
    if state in TIMED and _is_time(measured) and 0 <= measured:
        return float(measured)
    started, ended = record.get("started"), record.get("ended")
    if not _is_time(started):
        return None
    if state == "running":
        ended = time.time() if now is None else now
    elif state not in TIMED or not _is_time(ended):
        return None
    seconds = ended - started
    return seconds if 0 <= seconds < math.inf else None  # backwards, or overflowing: a forged record


def _is_time(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def format_seconds(seconds: float | None) -> str:
    """``12.3 s``, ``9 min 3 s``, ``2 h 5 min``; ``–`` when there is no time."""
    if seconds is None:
        return NO_TIME
    if round(seconds, 1) < 60:  # 59.97 s is "1 min 0 s", not "60.0 s"
        return f"{seconds:.1f} s"
    whole = round(seconds)
    if whole < 3600:
        return f"{whole // 60} min {whole % 60} s"
    return f"{whole // 3600} h {whole % 3600 // 60} min"


def outcome(record: Mapping) -> str | None:
    """How the stage's last attempt ended (``gated`` for a merge stopped by its
    gate), or None when its record holds no outcome (it never started)."""
    state = record.get("state")
    if state not in OUTCOMES:
        return None
    return "gated" if is_gated(StageStatus(state), dict(record)) else state


def closing_line(name: str, plans: list[StagePlan], records: Mapping[str, Mapping], wall_s: float, ok: bool) -> str:
    """What a submit that waited for its run prints last, e.g. ``run quickstart
    finished in 28 min 12 s: 13 stages (11 ran, 2 already done); slowest: vlpt
    9 min 3 s, seed 8 min 40 s``; on failure ``failed after …: stage X failed; …``.
    ``records`` are the stages' records after the submit, ``ok`` its verdict."""
    ran = {plan.name: outcome(records.get(plan.name, {})) for plan in plans if plan.runs}
    ran = {stage: ended for stage, ended in ran.items() if ended is not None}
    already_done = sum(not plan.runs for plan in plans)
    not_started = len(plans) - already_done - len(ran)
    counts = f"{len(ran)} ran, {already_done} already done" + (f", {not_started} not started" if not_started else "")
    parts = [f"{len(plans)} stage{'s' if len(plans) != 1 else ''} ({counts})"]
    slowest = slowest_stages(ran, records)
    if slowest:
        parts.append("slowest: " + ", ".join(f"{stage} {format_seconds(seconds)}" for stage, seconds in slowest))
    unfinished = [describe_unfinished(ran, word) for word in ("failed", "gated", "cancelled")]
    unfinished = [text for text in unfinished if text]
    if ok:
        return f"run {name} finished in {format_seconds(wall_s)}: " + "; ".join(parts)
    return f"run {name} failed after {format_seconds(wall_s)}: " + "; ".join(unfinished + parts)


def slowest_stages(ran: Mapping[str, str], records: Mapping[str, Mapping], count: int = 2) -> list[tuple[str, float]]:
    timed = [(stage, stage_seconds(records[stage], ended)) for stage, ended in ran.items()]
    return sorted(((stage, seconds) for stage, seconds in timed if seconds is not None), key=lambda item: -item[1])[:count]


def describe_unfinished(ran: Mapping[str, str], word: str) -> str:
    stages = [stage for stage, ended in ran.items() if ended == word]
    if not stages:
        return ""
    return f"stage{'s' if len(stages) > 1 else ''} {', '.join(stages)} {word}"
