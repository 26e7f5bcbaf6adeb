"""Soak: one two-rank pre-training run on the local backend that meets
faults drawn at random (seeded, so a run can be replayed) from: one rank
SIGKILLed, the whole submit SIGKILLed, the run directory's disk (a tmpfs)
filled and then freed. After each fault the run is resubmitted; at the end
it must hold the weights of the uninterrupted run, every resume must start
from the newest committed checkpoint, and no fault may cost more than one
checkpoint interval of steps.

The default run meets 3 faults on TINY_TRAINING_JOB (6 steps, a checkpoint
every 2) against ``tiny_reference``; ``-m heavy`` runs 20 faults on a
40-step version of it against an uninterrupted run of its own.
"""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.support import REPO
from tests.support.cli import cli
from tests.support.disk import FREE_AFTER_FILL, fill
from tests.support.jobs import TINY_TRAINING_JOB
from tests.support.trials import assert_bitwise, committed_steps, fresh_run, kill_one_rank, rank_pids

pytestmark = pytest.mark.slow

KINDS = ("rank", "submit", "disk")
EVERY = 2  # TINY_TRAINING_JOB's checkpoint interval


@dataclass
class Soak:
    steps: int
    injected: list[tuple[str, int]] = field(default_factory=list)  # (kind, after step)
    resumed: list[int] = field(default_factory=list)  # where each later attempt started
    lost: list[int] = field(default_factory=list)  # steps trained again after each fault


def steps_logged(text: str, total: int) -> list[int]:
    return [int(step) for step in re.findall(rf"step (\d+)/{total} ", text)]


def attempt(job: Path, run_dir: Path, log_file: Path) -> subprocess.Popen:
    with open(log_file, "w") as log:
        return subprocess.Popen([sys.executable, "-m", "vlcluster.cli", "submit", str(job), "--run-dir", str(run_dir)],
                                stdout=log, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True)


def wait_for(log_file: Path, process: subprocess.Popen, run_dir: Path, total: int, step: int, timeout: float = 300) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        seen = steps_logged(log_file.read_text(), total)
        if seen and seen[-1] >= step and len(rank_pids(run_dir)) == 2:
            return seen[-1]
        if process.poll() is not None:
            return seen[-1] if seen else -1
        time.sleep(0.05)
    raise AssertionError(f"step {step} not reached in {timeout} s: {log_file.read_text()}")


def inject(kind: str, process: subprocess.Popen, run_dir: Path, disk: Path) -> None:
    if kind == "rank":
        kill_one_rank(run_dir)
        process.wait(timeout=120)
    elif kind == "submit":
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=120)
        deadline = time.monotonic() + 30
        while rank_pids(run_dir) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert rank_pids(run_dir) == [], "ranks outlived the killed submit"
    else:
        filler = fill(disk, FREE_AFTER_FILL)
        try:
            process.wait(timeout=300)  # it fails at its next checkpoint (or finishes if none is left)
        finally:
            filler.unlink()  # freed


def soak(job: Path, reference_dir: Path, disk: Path, tmp_path: Path, faults: int, seed: int, steps: int) -> Soak:
    rng = random.Random(seed)
    kinds = [rng.choice(KINDS) for _ in range(faults)]  # drawn first: the same kinds whatever the timing
    # Fault steps spread over the whole run, drawn up front (drawing each one between the last
    # resume and the end crowds every later fault into the last steps).
    planned = sorted(rng.randint(1, steps - 1) for _ in range(faults))
    run_dir = disk / "run"
    fresh_run(reference_dir, run_dir)
    outcome, start = Soak(steps), 0
    for index in range(faults):
        if start >= steps - 1:
            break  # no step left to interrupt
        log_file = tmp_path / f"attempt-{index}.log"
        kind, at_step = kinds[index], max(planned[index], start + 1)
        process = attempt(job, run_dir, log_file)
        reached = wait_for(log_file, process, run_dir, steps, at_step)
        if process.poll() is not None:
            break  # finished (or failed) before the fault: the final attempt below checks
        inject(kind, process, run_dir, disk)
        text = log_file.read_text()
        resumed_here = re.findall(r"resuming from checkpoint step_(\d+)", text)
        assert (int(resumed_here[0]) if resumed_here else 0) == start, text  # resumed where the last fault left it
        assert "is damaged" not in text, text
        outcome.injected.append((kind, reached))
        trained = steps_logged(text, steps)[-1]  # a full disk fails only at the next write
        committed = committed_steps(run_dir)
        start = committed[-1] if committed else 0
        outcome.resumed.append(start)
        outcome.lost.append(trained - start)
    final = cli("submit", str(job), "--run-dir", str(run_dir))
    assert final.returncode == 0, final.stdout + final.stderr
    first_resumed = re.findall(r"resuming from checkpoint step_(\d+)", final.stdout)
    if outcome.resumed:
        assert (int(first_resumed[0]) if first_resumed else 0) == outcome.resumed[-1], final.stdout
    assert "is damaged" not in final.stdout
    assert_bitwise(reference_dir, run_dir)
    return outcome


@pytest.fixture
def tmpfs(small_disk):
    return small_disk


def report(outcome: Soak) -> str:
    return (f"soak ({outcome.steps} steps): {len(outcome.injected)} faults injected {outcome.injected}, "
            f"{len(outcome.injected)} recovered, resumed from {outcome.resumed}, lost steps {outcome.lost} "
            f"(total {sum(outcome.lost)}), final weights bitwise equal")


def test_a_soak_of_three_seeded_faults_ends_bitwise(tiny_reference, tmpfs, tmp_path):
    job, reference_dir = tiny_reference
    outcome = soak(job, reference_dir, tmpfs, tmp_path, faults=3, seed=21, steps=6)  # seed 21: one fault of each kind
    print(report(outcome))
    assert len(outcome.injected) >= 2, outcome  # 6 steps leave room for at least two
    assert all(lost <= EVERY for lost in outcome.lost), outcome


LONG_STEPS = 40


@pytest.mark.heavy
def test_a_long_soak_of_twenty_seeded_faults_ends_bitwise(tmpfs, tmp_path):
    job = tmp_path / "long.yaml"
    job.write_text(TINY_TRAINING_JOB.replace("steps: 6", f"steps: {LONG_STEPS}"))
    reference = cli("submit", str(job), "--run-dir", str(tmp_path / "reference"))
    assert reference.returncode == 0, reference.stdout + reference.stderr
    outcome = soak(job, tmp_path / "reference", tmpfs, tmp_path, faults=20, seed=31, steps=LONG_STEPS)
    print(report(outcome))
    assert len(outcome.injected) >= 15, outcome
    assert all(lost <= EVERY for lost in outcome.lost), outcome
