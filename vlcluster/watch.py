"""Watching a run: its stages' states until every one has ended, and a
stage's log as it grows (``status --watch``, ``status --json``, ``logs -f``).

Both read the run directory and ask the backends, as ``status`` and
``logs`` do, so they work for every backend and from any host that sees
the run directory; neither changes anything.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from vlcluster.backends.contract import StageStatus

# States a stage does not leave without a new submit.
ENDED = frozenset({"done", "failed", "gated", "blocked", "cancelled", "interrupted"})


def all_ended(statuses: dict[str, StageStatus]) -> bool:
    return all(status.state in ENDED for status in statuses.values())


def status_record(name: str, plans, statuses: dict[str, StageStatus], run_dir: Path, records: dict[str, dict]) -> dict:
    """``status --json``: every stage with its job, state, detail and the wall time of
    its last attempt (``duration_s``, null where its record holds none), and whether
    the run has ended."""
    from vlcluster.run_times import stage_seconds
    from vlcluster.storage.errors import redact

    stages = []
    for plan in plans:
        status = statuses[plan.name]
        seconds = stage_seconds(records[plan.name], status.state)
        stages.append({"name": plan.name, "kind": plan.kind, "job": status.job, "state": status.state,
                       "detail": status.detail, "duration_s": None if seconds is None else round(seconds, 3)})
    counts: dict[str, int] = {}
    for stage in stages:
        counts[stage["state"]] = counts.get(stage["state"], 0) + 1
    return {"pipeline": name, "run_dir": redact(str(run_dir)), "ended": all_ended(statuses), "counts": counts, "stages": stages}


def follow(path: Path, write: Callable[[str], None], stage_ended: Callable[[], bool], interval: float = 1.0) -> None:
    """Write the log at ``path`` and then what is appended to it, until the
    stage has ended and nothing more arrives (the file may not exist yet)."""
    offset = 0
    while True:
        ended = stage_ended()  # asked before reading: what the stage wrote before it ended is read below
        if path.is_file():
            with path.open("rb") as handle:
                handle.seek(offset)
                chunk = handle.read()
            if chunk:
                offset += len(chunk)
                write(chunk.decode(errors="replace"))
        if ended:
            return
        time.sleep(interval)
