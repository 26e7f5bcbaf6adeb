"""What SLURM says about a run's jobs: states from accounting (sacct), and
cancelling. Plain subprocess calls, no submitit, so `status` stays light."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass

ACTIVE = frozenset({"PENDING", "RUNNING", "REQUEUED", "RESIZING", "SUSPENDED", "CONFIGURING", "COMPLETING", "REQUEUE_HOLD", "REQUEUE_FED"})
UNSUCCESSFUL = frozenset({"FAILED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE", "PREEMPTED"})


@dataclass(frozen=True)
class JobState:
    job_id: str
    state: str  # sacct's State, first word ("CANCELLED by 0" -> CANCELLED)
    exit_code: str
    reason: str
    restarts: int = 0  # how often it was requeued

    @property
    def active(self) -> bool:
        return self.state in ACTIVE


def job_states(job_ids: list[str]) -> dict[str, JobState]:
    """One sacct call for every job (array elements as ``123_4``)."""
    if not job_ids or shutil.which("sacct") is None:
        return {}
    result = subprocess.run(
        ["sacct", "-X", "-n", "-P", "-D", "-j", ",".join(job_ids), "-o", "JobID,State,ExitCode,Reason"],
        capture_output=True, text=True, timeout=30,
    )
    states: dict[str, JobState] = {}
    for line in result.stdout.splitlines():
        fields = line.split("|")
        if len(fields) < 4:
            continue
        job_id, state, exit_code, reason = fields[:4]
        # -D lists every run of a requeued job; the last line is the current one.
        restarts = states[job_id].restarts + 1 if job_id in states else 0
        states[job_id] = JobState(job_id, state.split()[0], exit_code, reason, restarts)
    return states


def cancel(job_ids: list[str]) -> None:
    if job_ids:
        subprocess.run(["scancel", *job_ids], check=True, capture_output=True, text=True, timeout=30)
