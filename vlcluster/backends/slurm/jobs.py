"""What SLURM says about a run's jobs: states from accounting (sacct), the
stage states they mean, and cancelling. Plain subprocess calls, no submitit,
so `status` stays light."""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass

from vlcluster.backends.contract import StageStatus
from vlcluster.failure import describe as describe_failure
from vlcluster.plan import StagePlan

ACTIVE = frozenset({"PENDING", "RUNNING", "REQUEUED", "RESIZING", "SUSPENDED", "CONFIGURING", "COMPLETING", "REQUEUE_HOLD", "REQUEUE_FED"})


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
    """States from accounting (one sacct call, array elements as ``123_4``),
    completed from the live queue for jobs slurmdbd has not recorded yet
    (right after a submit)."""
    if not job_ids or shutil.which("sacct") is None:
        return {}
    states = _parse(_run(["sacct", "-X", "-n", "-P", "-D", "-j", ",".join(job_ids), "-o", "JobID,State,ExitCode,Reason"]))
    states.update(_unstarted_array_elements([job_id for job_id in job_ids if job_id not in states]))
    missing = set(job_ids) - set(states)
    if missing:
        queued = _parse(_run(["squeue", "-h", "--me", "-o", "%i|%T|0:0|%r"]))
        states.update({job_id: queued[job_id] for job_id in missing if job_id in queued})
    return {job_id: states[job_id] for job_id in job_ids if job_id in states}


def _unstarted_array_elements(job_ids: list[str]) -> dict[str, JobState]:
    """An array cancelled before any task started is recorded only under its
    bare id ("49"), never as "49_0": elements take the array's state."""
    arrays = sorted({job_id.split("_")[0] for job_id in job_ids if "_" in job_id})
    if not arrays:
        return {}
    recorded = _parse(_run(["sacct", "-X", "-n", "-P", "-j", ",".join(arrays), "-o", "JobID,State,ExitCode,Reason"]))
    found = {}
    for job_id in job_ids:
        array = recorded.get(job_id.split("_")[0])
        if array is not None:
            found[job_id] = JobState(job_id, array.state, array.exit_code, array.reason)
    return found


def _run(command: list[str]) -> str:
    return subprocess.run(command, capture_output=True, text=True, timeout=30).stdout


def _parse(table: str) -> dict[str, JobState]:
    states: dict[str, JobState] = {}
    for line in table.splitlines():
        fields = line.split("|")
        if len(fields) < 4:
            continue
        job_id, state, exit_code, reason = fields[:4]
        for element in pending_array_elements(job_id):  # "12_[0-2]": array tasks not started yet
            states[element] = JobState(element, state.split()[0], exit_code, reason)
        # sacct -D lists every run of a requeued job; the last line is the current one.
        restarts = states[job_id].restarts + 1 if job_id in states else 0
        states[job_id] = JobState(job_id, state.split()[0], exit_code, reason, restarts)
    return states


def pending_array_elements(job_id: str) -> list[str]:
    match = re.fullmatch(r"(\d+)_\[([\d,\-]+)(%\d+)?\]", job_id)
    if not match:
        return []
    elements = []
    for part in match.group(2).split(","):
        first, _, last = part.partition("-")
        elements += [f"{match.group(1)}_{index}" for index in range(int(first), int(last or first) + 1)]
    return elements


def cancel(job_ids: list[str]) -> None:
    """scancel every id; ids of jobs that already ended are ignored by SLURM."""
    if job_ids:
        subprocess.run(["scancel", *job_ids], capture_output=True, text=True, timeout=30)


def describe_job(plan: StagePlan, record: dict, job: JobState | None) -> StageStatus:
    """A stage submitted to SLURM, from its job's state in accounting."""
    if job is None:
        return StageStatus("unknown", f"job {record.get('job_id')} not in accounting")
    facts = [f"requeued {job.restarts}x"] if job.restarts else []
    if job.state == "PENDING":
        return StageStatus("pending", "; ".join([f"waiting: {job.reason}", *facts]))
    if job.state in {"RUNNING", "COMPLETING"}:
        return StageStatus("running", "; ".join(facts))
    if job.state in {"REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED"}:
        return StageStatus("pending", "; ".join(["requeued", *facts]))
    if job.state == "COMPLETED":  # exited 0 without its done-marker
        return StageStatus("failed", f"no done-marker; log {record.get('log')}")
    exit_code = record.get("returncode", job.exit_code)
    cause = describe_failure(record.get("failure")) if job.state != "CANCELLED" else ""
    return StageStatus("cancelled" if job.state == "CANCELLED" else "failed", "; ".join(filter(None, [
        cause, f"{job.state} exit {exit_code}", *facts, f"log {record.get('log')} (slurm: {record.get('slurm_log')})"])))
