"""What a cluster does to a long run, each against the real component and
each compared with the uninterrupted run (``tiny_reference``: the two-rank
TINY_TRAINING_JOB of tests/conftest.py):

- a full disk during a two-rank checkpoint write (a real tmpfs run
  directory filled mid-run, then freed): the stage fails naming the cause,
  no checkpoint is half-committed, the resubmit ends bitwise identical;
- a preemption storm on SLURM: the same job ``scontrol requeue``d several
  times in a row; it checkpoints and comes back every time and ends bitwise
  identical without a resubmit;
- a whole SLURM job SIGKILLed (``scancel --signal=KILL --full``): no rank
  outlives it, the resubmit resumes from the newest committed checkpoint
  and ends bitwise identical.

The S3 outage trial lives in tests/faults/test_s3_faults.py beside its
server and proxy. Results: docs/reliability.md.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.faults.test_kill_resume import (
    assert_bitwise, cli, committed_steps, fresh_run, logged_step, rank_pids, resumed_from, seed_status, slurm_job,
    wait_for_job, wait_for_step,
)

pytestmark = pytest.mark.slow

VLCLUSTER_FRAME = re.compile(r'File ".*/vlcluster/')
FREE_AFTER_FILL = 512 << 10  # room for log lines and records, not for a checkpoint (~11 MB)


@pytest.fixture
def small_disk(tmp_path):
    """A 256 MiB tmpfs of this test's own, unmounted at the end."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256m", "tmpfs", str(mount)],
                                           capture_output=True).returncode:
        pytest.skip("needs a tmpfs mount (root)")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=True)


def fill(disk: Path, leave: int) -> Path:
    """Take every block of ``disk`` but ``leave`` bytes, at once."""
    stats = os.statvfs(disk)
    filler = disk / "filler"
    with open(filler, "wb") as handle:
        os.posix_fallocate(handle.fileno(), 0, stats.f_bavail * stats.f_frsize - leave)
    return filler


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
        code = process.wait(timeout=300)
    first = (tmp_path / "first.log").read_text()
    assert code == 1 and "seed: failed (exit 1)" in first, first
    assert not VLCLUSTER_FRAME.search(first), first  # torchrun prints its own ChildFailedError, never ours
    row = seed_status(run_dir)
    assert " failed " in row and "disk full" in row, row
    committed = committed_steps(run_dir)
    assert committed == [2], committed  # step 4's checkpoint never committed

    filler.unlink()  # space freed
    resumed = cli("submit", str(job), "--run-dir", str(run_dir))
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert resumed_from(resumed.stdout) == 2 and "is damaged" not in resumed.stdout, resumed.stdout
    assert_bitwise(reference_dir, run_dir)
    leftovers = [str(p.relative_to(run_dir)) for p in run_dir.rglob("*") if p.name.endswith(".partial") or p.name.startswith(".")]
    assert leftovers == [".lock"] or leftovers == [], leftovers
    print(f"local, disk full at step {logged_step(run_dir)}'s run: failed naming the disk, resumed from 2, bitwise")
