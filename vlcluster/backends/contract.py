"""What every backend provides, and the one vocabulary of stage states.

A backend answers for the stages it ran: ``describe`` turns their records
(``state.json``) and what the cluster says into a :class:`StageStatus`;
``logs`` and ``cancel`` do what the CLI's commands of the same names ask.
What does not depend on the backend — done, gated, blocked, the resume
point, progress — is decided once, in :mod:`vlcluster.backends.run_status`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from vlcluster.graph import Graph
from vlcluster.plan import StagePlan

# The states `vlcluster status` shows, on every backend.
STATES = (
    "pending",      # not started yet (queued, or waiting for its upstream)
    "running",      # with progress where the stage writes it
    "done",
    "skipped",      # done before this submit
    "stale",        # done for an older spec; re-runs on the next submit
    "failed",       # with exit code and log
    "blocked",      # never started: an upstream stage failed, was gated or is blocked
    "gated",        # a merge stopped by its mergeability gate
    "cancelled",
    "interrupted",  # its process is gone without an outcome (killed submit, lost node)
    "unknown",      # the cluster no longer knows the job
)


@dataclass(frozen=True)
class StageStatus:
    state: str
    detail: str = ""
    job: str = ""  # e.g. "slurm 123", "ray vlcluster-x-1a2b"

    def __post_init__(self) -> None:
        if self.state not in STATES:
            raise ValueError(f"unknown stage state {self.state!r}")


class Backend(Protocol):
    name: str
    queues: bool  # submit returns once every job is queued (no driver stays alive)
    rendered_file: str  # the file `vlcluster render -o DIR` writes render's text to

    def validate(self, graph: Graph, source: str) -> None:
        """Raise SpecError if the pipeline cannot run on this backend."""

    def render(self, graph: Graph, plans: list[StagePlan], run_dir: Path) -> str:
        """What submit would hand the cluster (e.g. sbatch scripts); empty when nothing is generated."""

    def submit(self, graph: Graph, plans: list[StagePlan], run_dir: Path) -> bool:
        """Run (or queue) every stage that is not done; True if all succeeded."""

    def describe(self, plans: list[StagePlan], records: dict[str, dict], run_dir: Path) -> dict[str, StageStatus]:
        """The state of each of these stages (not done, last run by this backend)."""

    def logs(self, run_dir: Path, stage: str, record: dict) -> str:
        """The stage's log text; SpecError when there is none."""

    def cancel(self, run_dir: Path, records: dict[str, dict]) -> list[str]:
        """Stop the queued or running jobs of these stages; the stages stopped."""
