"""Kill-and-resume trials on every backend: a two-rank training stage
(TINY_TRAINING_JOB in tests/conftest.py) is SIGKILLed at a random step,
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
Ray's default run kills a rank of the quickstart (tests/test_ray.py).
``-m heavy`` runs the seeded random-step campaign on every backend (the Ray
trials live in tests/test_ray.py, beside its cluster, and compare with an
uninterrupted Ray run: Ray's thread count rounds differently, see there).
"""

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

import pytest
import torch

from tests.support import REPO
from tests.support.cli import cli
from tests.support.processes import live_processes_mentioning
from vlcluster.storage.tensorfile import load_tensors

pytestmark = pytest.mark.slow

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
    status = cli("status", str(run_dir))
    assert status.returncode == 0, status.stderr
    return next(line for line in status.stdout.splitlines() if " seed " in line)


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


CAMPAIGN = random.Random(18)  # seeded: the same "random" steps on every run of the campaign
LOCAL_TRIALS = [(what, CAMPAIGN.randint(1, STEPS - 1)) for what in ("rank", "submit") for _ in range(3)]


@pytest.mark.heavy
@pytest.mark.parametrize(("what", "at_step"), LOCAL_TRIALS)
def test_local_sigkill_at_random_steps_resumes_bitwise(tiny_reference, tmp_path, what, at_step):
    outcome = local_trial(tiny_reference, tmp_path, at_step, what)
    print(f"local {what} SIGKILL after step {outcome['killed_after_step']}: resumed from {outcome['resumed_from']}, bitwise")


# ---- SLURM (tools/slurm-local) ------------------------------------------------


def slurm_job(run_dir: Path) -> str:
    from vlcluster.stages.rundir import read_json

    return read_json(run_dir / "seed" / "state.json")["job_id"]


def wait_for_job(job_id: str, timeout: float = 600):
    from vlcluster.backends.slurm_queue import job_states

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = job_states([job_id]).get(job_id)
        if state is not None and not state.active:
            return state
        time.sleep(0.5)
    raise AssertionError(f"slurm job {job_id} still active after {timeout} s")


def slurm_trial(reference, tmp_path: Path, at_step: int) -> dict:
    job, reference_dir = reference
    run_dir = tmp_path / "run"
    fresh_run(reference_dir, run_dir)
    queued = cli("submit", str(job), "--backend", "slurm", "--run-dir", str(run_dir))
    assert queued.returncode == 0, queued.stdout + queued.stderr
    first_job = slurm_job(run_dir)
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


def wait_for_job_active(job_id: str) -> bool:
    from vlcluster.backends.slurm_queue import job_states

    state = job_states([job_id]).get(job_id)
    return state is None or state.active


SLURM_TRIALS = [CAMPAIGN.randint(1, STEPS - 1) for _ in range(3)]


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


# ---- Ray (the local head of tests/test_ray.py, which runs these trials) ------


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


RAY_TRIALS = [CAMPAIGN.randint(1, STEPS - 1) for _ in range(3)]
