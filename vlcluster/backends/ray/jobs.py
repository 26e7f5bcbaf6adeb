"""What Ray says about a run's jobs (for ``status``, ``cancel`` and a second
``submit``), from the records the Ray backend keeps in ``state.json``
(``backend: ray``, ``job_id``: the submission id, ``address``: the
dashboard). Ray is imported only when a run has Ray records."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from vlcluster.backends.contract import StageStatus
from vlcluster.failure import describe as describe_failure

# Recorded states whose job may still be queued or running.
LIVE = frozenset({"submitted", "running"})


def ray_records(records: dict[str, dict]) -> dict[str, dict]:
    return {name: r for name, r in records.items() if r.get("backend") == "ray" and r.get("job_id") and r.get("address")}


def live_by_address(records: dict[str, dict]) -> dict[str, list[str]]:
    """Dashboard address -> stages whose recorded job may still be queued or running there."""
    by_address: dict[str, list[str]] = defaultdict(list)
    for name, record in ray_records(records).items():
        if record.get("state") in LIVE:
            by_address[record["address"]].append(name)
    return by_address


def client_for(address: str):
    """A client, or None when nothing answers there (e.g. the private
    cluster of a run that has ended)."""
    from vlcluster.extras import require

    client_class = require("ray.job_submission", "a run of the Ray backend").JobSubmissionClient
    try:
        return client_class(address)
    except (ConnectionError, RuntimeError, ValueError):
        return None


def job_statuses(records: dict[str, dict]) -> dict[str, str | None]:
    """Stage -> Ray job status ("PENDING", "RUNNING", "SUCCEEDED", "FAILED",
    "STOPPED"), or None where the cluster does not answer or forgot the job.
    Only records that may still be live are asked about."""
    statuses: dict[str, str | None] = {}
    for address, names in live_by_address(records).items():
        client = client_for(address)
        for name in names:
            statuses[name] = _status(client, records[name]["job_id"]) if client else None
    return statuses


def _status(client, job_id: str) -> str | None:
    try:
        return str(client.get_job_status(job_id).value)
    except (RuntimeError, ConnectionError):
        return None


def active_jobs(client, records: dict[str, dict]) -> dict[str, str]:
    """Stage -> job id of the jobs still pending or running on this client's cluster."""
    active = {}
    for name, record in ray_records(records).items():
        if record.get("state") in LIVE and _status(client, record["job_id"]) in {"PENDING", "RUNNING"}:
            active[name] = record["job_id"]
    return active


def stop(records: dict[str, dict]) -> list[str]:
    """Stop the live jobs of these records; the stages whose job was stopped."""
    stopped = []
    for address, names in live_by_address(records).items():
        client = client_for(address)
        if client is None:
            continue
        for name in names:
            try:
                if client.stop_job(records[name]["job_id"]):
                    stopped.append(name)
            except RuntimeError:
                continue  # the cluster no longer knows the job
    return stopped


def job_logs(record: dict) -> str | None:
    """The job's log as Ray keeps it (for a run directory not shared with the
    node that ran the stage)."""
    client = client_for(record["address"]) if record.get("address") else None
    if client is None:
        return None
    try:
        return client.get_job_logs(record["job_id"])
    except RuntimeError:
        return None


def describe_job(record: dict, job_status: str | None, log_file: Path) -> StageStatus:
    """A stage run as a Ray job: the live job status where the stage may
    still run, its recorded outcome otherwise."""
    recorded = record.get("state")
    facts = []
    if record.get("worker_restarts"):
        facts.append(f"workers restarted {record['worker_restarts']}x")
    if recorded in LIVE:
        recorded = {"PENDING": "pending", "RUNNING": "running", "STOPPED": "cancelled", "FAILED": "failed",
                    "SUCCEEDED": "failed"}.get(job_status or "", "interrupted")
        if job_status is None:
            facts.append(f"Ray at {record.get('address')} does not know the job")
        elif job_status == "SUCCEEDED":
            facts.append("no done-marker")
    if recorded == "failed":
        facts.insert(0, describe_failure(record.get("failure")))
    if recorded in {"failed", "cancelled"}:
        facts.append(f"exit {record['returncode']}" if record.get("returncode") is not None else "")
        facts.append(record.get("ray_message") or "")
        facts.append(f"log {log_file}")
    state = recorded if recorded in {"pending", "running", "failed", "cancelled", "interrupted", "blocked"} else "pending"
    return StageStatus(state, "; ".join(fact for fact in facts if fact))
