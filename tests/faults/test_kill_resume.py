"""Kill-and-resume trials on every backend: a two-rank training stage
(TINY_TRAINING_JOB in tests/support/jobs.py) is SIGKILLed at a random step,
either one rank or the whole submission, then resumed. Every trial must end
with weights bitwise identical to the uninterrupted run, resume from the
newest committed checkpoint, and redo nothing finished before (the data
stage stays done).

Documented outcomes (docs/reliability.md):
- local, a rank killed: torchrun stops the other rank, the stage fails
  (``status``: failed, exit code), the next submit resumes.
- local, the submit's process group killed: ``status`` says interrupted,
  the next submit resumes.
- SLURM, a rank killed: the job fails (sacct FAILED), ``status`` says
  failed, the next submit queues the stage again and it resumes.
- Ray, a rank killed: the stage restarts its ranks in place (up to 3
  times) and resumes without a resubmit.

The default run has a local and a SLURM trial (a rank killed after step 3);
Ray's default run kills a rank of the quickstart (tests/e2e/test_ray.py).
``-m heavy`` runs the seeded random-step campaign on every backend (the Ray
trials live in tests/e2e/test_ray.py, beside its cluster, and compare with an
uninterrupted Ray run: Ray's thread count rounds differently, see there).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support import REPO
from tests.support.cli import cli
from tests.support.trials import (
    LOCAL_TRIALS, SLURM_TRIALS, assert_bitwise, committed_steps, fresh_run, kill_one_rank, queue_on_slurm, rank_pids, resumed_from,
    seed_status, slurm_job, wait_for_job, wait_for_job_active, wait_for_step,
)

pytestmark = pytest.mark.slow


# ---- the local backend ------------------------------------------------------


def local_trial(reference, tmp_path: Path, at_step: int, what: str) -> dict:
    job, reference_dir = reference
    run_dir = tmp_path / "run"
    fresh_run(reference_dir, run_dir)
    with open(tmp_path / "first.log", "w") as log:
        process = subprocess.Popen([sys.executable, "-m", "vlcluster.cli", "submit", str(job), "--run-dir", str(run_dir)],
                                   stdout=log, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True)
        killed_at = wait_for_step(run_dir, at_step, lambda: process.poll() is None)
        if what == "rank":
            kill_one_rank(run_dir)
        else:
            os.killpg(process.pid, signal.SIGKILL)
        code = process.wait(timeout=120)
    first = (tmp_path / "first.log").read_text()
    committed = committed_steps(run_dir)
    if what == "rank":
        assert code == 1, first
        assert "seed: failed (exit 1)" in first, first
        row = seed_status(run_dir)
        assert " failed " in row and "killed by SIGKILL" in row, row  # the cause, from torchrun's report
    else:
        deadline = time.monotonic() + 30
        while rank_pids(run_dir) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert rank_pids(run_dir) == [], "ranks outlived the killed submit"
        assert " interrupted " in seed_status(run_dir)
    assert not (run_dir / "seed" / "_SUCCESS").exists()

    resumed = cli("submit", str(job), "--run-dir", str(run_dir))
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "data: skipped (done)" in resumed.stdout
    assert resumed_from(resumed.stdout) == (committed[-1] if committed else None)
    assert_bitwise(reference_dir, run_dir)
    return {"killed_after_step": killed_at, "resumed_from": committed[-1] if committed else 0}


def test_a_killed_rank_fails_the_local_stage_and_the_resubmit_resumes_bitwise(tiny_reference, tmp_path):
    outcome = local_trial(tiny_reference, tmp_path, at_step=3, what="rank")
    print(f"local rank SIGKILL after step {outcome['killed_after_step']}: resumed from {outcome['resumed_from']}, bitwise")


@pytest.mark.heavy
@pytest.mark.parametrize(("what", "at_step"), LOCAL_TRIALS)
def test_local_sigkill_at_random_steps_resumes_bitwise(tiny_reference, tmp_path, what, at_step):
    outcome = local_trial(tiny_reference, tmp_path, at_step, what)
    print(f"local {what} SIGKILL after step {outcome['killed_after_step']}: resumed from {outcome['resumed_from']}, bitwise")


# ---- SLURM (tools/slurm-local) ------------------------------------------------


def slurm_trial(reference, tmp_path: Path, at_step: int) -> dict:
    job, reference_dir = reference
    run_dir = tmp_path / "run"
    first_job = queue_on_slurm(job, reference_dir, run_dir)
    killed_at = wait_for_step(run_dir, at_step, lambda: wait_for_job_active(first_job))
    kill_one_rank(run_dir)
    state = wait_for_job(first_job)
    assert state.state == "FAILED", state
    row = seed_status(run_dir)
    assert " failed " in row and "killed by SIGKILL" in row, row
    committed = committed_steps(run_dir)

    again = cli("submit", str(job), "--backend", "slurm", "--run-dir", str(run_dir))
    assert again.returncode == 0, again.stdout + again.stderr
    assert "data: skipped (done)" in again.stdout
    second_job = slurm_job(run_dir)
    assert second_job != first_job
    assert wait_for_job(second_job).state == "COMPLETED"
    log = (run_dir / "seed" / "logs" / "stage.log").read_text()
    assert resumed_from(log) == (committed[-1] if committed else None), log
    assert_bitwise(reference_dir, run_dir)
    return {"killed_after_step": killed_at, "resumed_from": committed[-1] if committed else 0}


@pytest.mark.usefixtures("slurm_cluster")
def test_a_killed_rank_fails_the_slurm_job_and_the_resubmit_resumes_bitwise(tiny_reference, tmp_path):
    outcome = slurm_trial(tiny_reference, tmp_path, at_step=3)
    print(f"slurm rank SIGKILL after step {outcome['killed_after_step']}: resumed from {outcome['resumed_from']}, bitwise")


@pytest.mark.heavy
@pytest.mark.usefixtures("slurm_cluster")
@pytest.mark.parametrize("at_step", SLURM_TRIALS)
def test_slurm_rank_sigkill_at_random_steps_resumes_bitwise(tiny_reference, tmp_path, at_step):
    outcome = slurm_trial(tiny_reference, tmp_path, at_step)
    print(f"slurm rank SIGKILL after step {outcome['killed_after_step']}: resumed from {outcome['resumed_from']}, bitwise")


# ---- Ray (the local head of tests/e2e/test_ray.py, which runs these trials) ------


