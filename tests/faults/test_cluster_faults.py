"""What a cluster does to a long run, each against the real component and
each compared with the uninterrupted run (``tiny_reference``: the two-rank
TINY_TRAINING_JOB of tests/support/jobs.py):

- a full disk during a two-rank checkpoint write (a real tmpfs run
  directory filled mid-run, then freed): the stage fails naming the cause,
  no checkpoint is half-committed, the resubmit ends bitwise identical;
- a preemption storm on SLURM: the same job ``scontrol requeue``d several
  times in a row (2 by default, 5 on a 12-step run under heavy); it checkpoints and comes back every time and ends bitwise
  identical without a resubmit;
- a whole SLURM job SIGKILLed (``scancel --signal=KILL --full``): no rank
  outlives it, the resubmit resumes from the newest committed checkpoint
  and ends bitwise identical.

The S3 outage trial lives in tests/faults/test_s3_faults.py beside its
server and proxy. Results: docs/reliability.md.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support import REPO
from tests.support.cli import cli
from tests.support.disk import FREE_AFTER_FILL, fill
from tests.support.trials import (
    assert_bitwise, committed_steps, fresh_run, logged_step, queue_on_slurm, rank_pids, resumed_from, seed_status, slurm_job,
    wait_for_job, wait_for_job_active, wait_for_step,
)

pytestmark = pytest.mark.slow

VLCLUSTER_FRAME = re.compile(r'File ".*/vlcluster/')
def test_a_full_disk_during_a_two_rank_checkpoint_then_freed_resumes_bitwise(tiny_reference, small_disk, tmp_path):
    job, reference_dir = tiny_reference
    run_dir = small_disk / "run"
    fresh_run(reference_dir, run_dir)
    with open(tmp_path / "first.log", "w") as log:
        process = subprocess.Popen([sys.executable, "-m", "vlcluster.cli", "submit", str(job), "--run-dir", str(run_dir)],
                                   stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
        deadline = time.monotonic() + 300
        while committed_steps(run_dir) != [2]:  # step 2's checkpoint committed: fill before step 4's
            assert process.poll() is None and time.monotonic() < deadline, (tmp_path / "first.log").read_text()
            time.sleep(0.05)
        filler = fill(small_disk, FREE_AFTER_FILL)
        filled_after = logged_step(run_dir)
        code = process.wait(timeout=300)
    first = (tmp_path / "first.log").read_text()
    assert code == 1 and "seed: failed (exit 1)" in first, first
    assert not VLCLUSTER_FRAME.search(first), first  # torchrun prints its own ChildFailedError, never ours
    row = seed_status(run_dir)
    assert " failed " in row and "disk full" in row, row
    committed = committed_steps(run_dir)  # [2], or [2, 4] when step 4 was written before the disk filled
    assert committed[0] == 2, committed

    filler.unlink()  # space freed
    resumed = cli("submit", str(job), "--run-dir", str(run_dir))
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert resumed_from(resumed.stdout) == committed[-1] and "is damaged" not in resumed.stdout, resumed.stdout
    assert_bitwise(reference_dir, run_dir)
    leftovers = [str(p.relative_to(run_dir)) for p in run_dir.rglob("*") if p.name.endswith(".partial") or p.name.startswith(".")]
    assert leftovers == [".lock"] or leftovers == [], leftovers
    print(f"local, disk filled after step {filled_after}: failed naming the disk, resumed from {committed[-1]}, bitwise")


# ---- SLURM (tools/slurm-local) ------------------------------------------------

RESTART_HEADER = re.compile(r"slurm job \S+ \(restart (\d+)\)")


def restarts_with_a_step(log_file: Path, steps: int) -> tuple[int, int]:
    """The highest restart of the job that has logged a training step (-1:
    none yet), and the last step logged."""
    try:
        text = log_file.read_text()
    except FileNotFoundError:
        return -1, -1
    logged = [int(step) for step in re.findall(rf"step (\d+)/{steps} ", text)]
    for start in reversed(list(RESTART_HEADER.finditer(text))):
        if re.compile(rf"step \d+/{steps} ").search(text, start.end()):
            return int(start.group(1)), logged[-1]
    return -1, logged[-1] if logged else -1


def preemption_storm(reference, tmp_path: Path, requeues: int, steps: int = 6) -> dict:
    """`scontrol requeue` of the same job as soon as each restart has trained a step."""
    job, reference_dir = reference
    run_dir = tmp_path / "run"
    job_id = queue_on_slurm(job, reference_dir, run_dir)
    log_file = run_dir / "seed" / "logs" / "stage.log"
    deadline = time.monotonic() + 120 + 40 * requeues
    for restart in range(requeues):
        # A step logged by this restart means its job runs: asking SLURM too (sacct, about a second) lost
        # the race on an idle machine, where the six steps take about five seconds.
        while not (restarts_with_a_step(log_file, steps)[0] == restart and restarts_with_a_step(log_file, steps)[1] < steps - 1):
            assert time.monotonic() < deadline, log_file.read_text() if log_file.exists() else "no log"
            assert not (run_dir / "seed" / "_SUCCESS").exists(), f"finished after {restart} requeues: make the storm faster"
            time.sleep(0.05)
        subprocess.run(["scontrol", "requeue", job_id], check=True)
    state = wait_for_job(job_id, timeout=max(1, deadline - time.monotonic()))
    assert state.state == "COMPLETED" and state.restarts >= requeues, state
    log = log_file.read_text()
    saved = [int(step) for step in re.findall(r"stop requested: checkpoint at step (\d+)", log)]
    resumed = [int(step) for step in re.findall(r"resuming from checkpoint step_(\d+)", log)]
    assert resumed == saved, (saved, resumed)  # every restart resumed where the stop saved: no work lost
    assert len(saved) == requeues, log
    assert_bitwise(reference_dir, run_dir)
    assert " done " in seed_status(run_dir)
    return {"requeues": requeues, "saved": saved, "restarts": state.restarts}


@pytest.mark.usefixtures("slurm_cluster")
def test_a_preemption_storm_checkpoints_and_resumes_every_time_bitwise(tiny_reference, tmp_path):
    outcome = preemption_storm(tiny_reference, tmp_path, requeues=2)
    print(f"slurm, {outcome['requeues']} requeues in a row: saved and resumed at steps {outcome['saved']}, bitwise")


@pytest.mark.heavy
@pytest.mark.usefixtures("slurm_cluster")
def test_a_longer_preemption_storm_resumes_bitwise(tmp_path):
    """Five requeues need more steps than TINY_TRAINING_JOB's 6: a 12-step
    version of it, against an uninterrupted local run of its own."""
    from tests.support.jobs import TINY_TRAINING_JOB

    job = tmp_path / "long.yaml"
    job.write_text(TINY_TRAINING_JOB.replace("steps: 6", "steps: 12"))
    reference = cli("submit", str(job), "--run-dir", str(tmp_path / "reference"))
    assert reference.returncode == 0, reference.stdout + reference.stderr
    outcome = preemption_storm((job, tmp_path / "reference"), tmp_path, requeues=5, steps=12)
    print(f"slurm, {outcome['requeues']} requeues in a row: saved and resumed at steps {outcome['saved']}, bitwise")


@pytest.mark.usefixtures("slurm_cluster")
def test_a_whole_slurm_job_sigkilled_leaves_no_rank_and_the_resubmit_resumes_bitwise(tiny_reference, tmp_path):
    job, reference_dir = tiny_reference
    run_dir = tmp_path / "run"
    first_job = queue_on_slurm(job, reference_dir, run_dir)
    killed_after = wait_for_step(run_dir, 3, lambda: wait_for_job_active(first_job))
    subprocess.run(["scancel", "--signal=KILL", "--full", first_job], check=True)
    state = wait_for_job(first_job, timeout=120)
    assert state.state in {"CANCELLED", "FAILED"}, state
    deadline = time.monotonic() + 30
    while rank_pids(run_dir) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert rank_pids(run_dir) == [], "ranks outlived their SIGKILLed job"
    row = seed_status(run_dir)
    assert " running " not in row and " done " not in row, row
    shown = next(state for state in ("cancelled", "failed", "interrupted", "unknown") if f" {state} " in row)
    committed = committed_steps(run_dir)

    again = cli("submit", str(job), "--backend", "slurm", "--run-dir", str(run_dir))
    assert again.returncode == 0, again.stdout + again.stderr
    second_job = slurm_job(run_dir)
    assert second_job != first_job and "data: skipped (done)" in again.stdout
    assert wait_for_job(second_job, timeout=300).state == "COMPLETED"
    log = (run_dir / "seed" / "logs" / "stage.log").read_text()
    assert resumed_from(log) == (committed[-1] if committed else None), log
    assert_bitwise(reference_dir, run_dir)
    print(f"slurm job SIGKILLed after step {killed_after} ({state.state}): status '{shown}', "
          f"resumed from {committed[-1] if committed else 0}, bitwise")
