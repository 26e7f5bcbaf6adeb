"""The SLURM test cluster (tools/slurm-local) as the tests drive it: submit a
job file, read each stage's job id, wait until every job has ended, and ask
sacct when each ran."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

from tests.support.cli import cli
from vlcluster.backends.slurm.jobs import job_states
from vlcluster.stages.rundir import read_json

def submit(job: str, run_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    args = ["submit", job, "--backend", "slurm", "--run-dir", str(run_dir)]
    for override in overrides:
        args += ["--set", override]
    return cli(*args)


def job_id(run_dir: Path, stage: str) -> str:
    return read_json(run_dir / stage / "state.json")["job_id"]


def wait_until_finished(run_dir: Path, stages, timeout: float, on_poll=lambda: None) -> dict:
    deadline = time.monotonic() + timeout
    ids = [job_id(run_dir, stage) for stage in stages]
    while time.monotonic() < deadline:
        on_poll()
        states = job_states(ids)
        if len(states) == len(ids) and not any(state.active for state in states.values()):
            return states
        time.sleep(1)
    raise AssertionError(f"jobs still active after {timeout} s: {job_states(ids)}")


def sacct_times(ids: list[str]) -> dict[str, tuple[str, str]]:
    out = subprocess.run(["sacct", "-X", "-n", "-P", "-j", ",".join(ids), "-o", "JobID,Start,End"],
                         capture_output=True, text=True, check=True).stdout
    return {line.split("|")[0]: tuple(line.split("|")[1:3]) for line in out.splitlines()}
