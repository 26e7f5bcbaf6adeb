"""Kill-and-resume trials on the two-rank training stage of TINY_TRAINING_JOB
(tests/support/jobs.py): start it from a reference run, wait for a step, kill
a rank, and check the resumed run against the reference bitwise. The seeded
campaign's random steps are drawn here, in one order, for every backend."""

from __future__ import annotations

import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from tests.support import REPO
from tests.support.cli import cli
from tests.support.processes import live_processes_mentioning
from vlcluster.storage.tensorfile import load_tensors

STEPS = 6  # TINY_TRAINING_JOB's seed stage
STEP_LINE = re.compile(r"step (\d+)/6 ")


def fresh_run(reference_dir: Path, run_dir: Path) -> None:
    """The reference run with its data stage done and its training stage never started."""
    shutil.copytree(reference_dir, run_dir)
    shutil.rmtree(run_dir / "seed")


def logged_step(run_dir: Path) -> int:
    try:
        steps = STEP_LINE.findall((run_dir / "seed" / "logs" / "stage.log").read_text())
    except FileNotFoundError:
        return -1
    return int(steps[-1]) if steps else -1


def rank_pids(run_dir: Path) -> list[int]:
    """The stage's rank processes (not torchrun, not the submitter)."""
    pids = live_processes_mentioning(f"vlcluster.run {run_dir} seed")
    return [pid for pid in pids if b"torch.distributed.run" not in Path(f"/proc/{pid}/cmdline").read_bytes()
            and b"torchrun" not in Path(f"/proc/{pid}/cmdline").read_bytes()]


def wait_for_step(run_dir: Path, step: int, alive, timeout: float = 600) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        seen = logged_step(run_dir)
        if seen >= step and len(rank_pids(run_dir)) == 2:
            return seen
        assert alive(), f"the run ended before step {step}: {(run_dir / 'seed' / 'logs' / 'stage.log').read_text()}"
        time.sleep(0.05)
    raise AssertionError(f"step {step} not reached in {timeout} s")


def kill_one_rank(run_dir: Path) -> int:
    victim = max(rank_pids(run_dir))  # either rank will do; the newer pid is usually rank 1
    os.kill(victim, signal.SIGKILL)
    return victim


def assert_bitwise(reference_dir: Path, run_dir: Path) -> None:
    expected = load_tensors(reference_dir / "seed" / "model.safetensors")
    recovered = load_tensors(run_dir / "seed" / "model.safetensors")
    assert expected.keys() == recovered.keys()
    differing = [key for key in expected if not torch.equal(expected[key], recovered[key])]
    assert differing == [], differing


def resumed_from(log: str) -> int | None:
    found = re.findall(r"resuming from checkpoint step_(\d+)", log)
    return int(found[-1]) if found else None


def committed_steps(run_dir: Path) -> list[int]:
    return sorted(int(p.name.split("_")[1]) for p in (run_dir / "seed" / "checkpoints").glob("step_*[0-9]")
                  if (p / "meta.json").is_file())


def seed_status(run_dir: Path) -> str:
    status = cli("status", str(run_dir), env={"COLUMNS": "400"})  # one line per stage, its whole detail on it
    assert status.returncode == 0, status.stderr
    return next(line for line in status.stdout.splitlines() if " seed " in line)


def slurm_job(run_dir: Path) -> str:
    from vlcluster.stages.rundir import read_json

    return read_json(run_dir / "seed" / "state.json")["job_id"]


def queue_on_slurm(job: Path, reference_dir: Path, run_dir: Path) -> str:
    """The reference run with its training stage removed, submitted to SLURM: the training job's id."""
    fresh_run(reference_dir, run_dir)
    queued = cli("submit", str(job), "--backend", "slurm", "--run-dir", str(run_dir))
    assert queued.returncode == 0, queued.stdout + queued.stderr
    return slurm_job(run_dir)


def wait_for_job(job_id: str, timeout: float = 600):
    from vlcluster.backends.slurm.jobs import job_states

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = job_states([job_id]).get(job_id)
        if state is not None and not state.active:
            return state
        time.sleep(0.5)
    raise AssertionError(f"slurm job {job_id} still active after {timeout} s")


def wait_for_job_active(job_id: str) -> bool:
    from vlcluster.backends.slurm.jobs import job_states

    state = job_states([job_id]).get(job_id)
    return state is None or state.active


def ray_trial(cluster, reference, tmp_path: Path, at_step: int) -> dict:
    from vlcluster.stages.rundir import read_json

    job, reference_dir = reference
    run_dir = tmp_path / "run"
    fresh_run(reference_dir, run_dir)
    with open(tmp_path / "submit.log", "w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "vlcluster.cli", "submit", str(job), "--backend", "ray", "--run-dir", str(run_dir),
             "--address", cluster.gcs_address], stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
        killed_at = wait_for_step(run_dir, at_step, lambda: process.poll() is None)
        committed = committed_steps(run_dir)
        kill_one_rank(run_dir)
        assert process.wait(timeout=600) == 0, (tmp_path / "submit.log").read_text()
    log = (run_dir / "seed" / "logs" / "stage.log").read_text()
    assert "restarting the ranks (1/3)" in log
    assert read_json(run_dir / "seed" / "state.json")["worker_restarts"] == 1
    # A checkpoint may commit between the look and the kill: the resume is from that one or a newer one.
    assert (resumed_from(log) or 0) >= (committed[-1] if committed else 0), log
    assert_bitwise(reference_dir, run_dir)
    return {"killed_after_step": killed_at, "resumed_from": resumed_from(log) or 0}


CAMPAIGN = random.Random(18)  # seeded: the same "random" steps on every run of the campaign
LOCAL_TRIALS = [(what, CAMPAIGN.randint(1, STEPS - 1)) for what in ("rank", "submit") for _ in range(3)]
SLURM_TRIALS = [CAMPAIGN.randint(1, STEPS - 1) for _ in range(3)]
RAY_TRIALS = [CAMPAIGN.randint(1, STEPS - 1) for _ in range(3)]
