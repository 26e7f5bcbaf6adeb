"""A node's wall clock jumps (an NTP step, a VM resumed from a snapshot)
in the middle of a stage: two hours back, then a rank is SIGKILLed.

Every process of the run reads its wall clock through a ``sitecustomize``
that adds the offset written in a file (the processes' own clocks, not the
kernel's: vlcluster's records all come from Python's ``time.time``; the
collectives' timeouts and the throughput meter use monotonic clocks, which a
real step of the wall clock does not move either). The stage must fail with
its cause, `status` must show the attempt's real duration (not a negative
or missing one), and the resubmit must resume from the newest checkpoint and
end bitwise equal to the uninterrupted run.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time

import pytest

from tests.support import REPO
from tests.support.trials import (
    assert_bitwise, committed_steps, fresh_run, kill_one_rank, resumed_from, seed_status, wait_for_step,
)

pytestmark = pytest.mark.slow

SITECUSTOMIZE = '''
import os
import time

_OFFSET_FILE = os.environ.get("VLCLUSTER_TEST_CLOCK_OFFSET_FILE")
_wall = time.time


def _shifted() -> float:
    try:
        with open(_OFFSET_FILE) as handle:
            return _wall() + float(handle.read() or 0)
    except (OSError, ValueError):
        return _wall()


if _OFFSET_FILE:
    time.time = _shifted
'''
JUMP_S = -7200.0


def test_a_clock_jumping_back_mid_stage_keeps_times_and_cause_and_the_resume_is_bitwise(tiny_reference, tmp_path):
    job, reference_dir = tiny_reference
    run_dir = tmp_path / "run"
    fresh_run(reference_dir, run_dir)
    shim = tmp_path / "clock"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text(SITECUSTOMIZE)
    offset = tmp_path / "offset"
    offset.write_text("0")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(shim), str(REPO), os.environ.get("PYTHONPATH", "")]),
           "VLCLUSTER_TEST_CLOCK_OFFSET_FILE": str(offset)}
    submit = [sys.executable, "-m", "vlcluster.cli", "submit", str(job), "--run-dir", str(run_dir)]
    with open(tmp_path / "first.log", "w") as log:
        process = subprocess.Popen(submit, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env)
        wait_for_step(run_dir, 3, lambda: process.poll() is None)
        began = time.monotonic()
        offset.write_text(str(JUMP_S))  # every process of the node sees its clock two hours back
        committed = committed_steps(run_dir)
        kill_one_rank(run_dir)
        code = process.wait(timeout=120)
        took = time.monotonic() - began
    first = (tmp_path / "first.log").read_text()
    assert code == 1 and "seed: failed (exit 1)" in first, first
    closing = re.search(r"run faults failed after ([\d.]+) s", first)
    assert closing and float(closing.group(1)) < 120, first  # the submit's own time, on a monotonic clock
    row = seed_status(run_dir)
    assert " failed " in row and "killed by SIGKILL" in row, row
    cells = [cell.strip() for cell in row.split("│")]  # stage, kind, job, state, time, detail
    shown = re.fullmatch(r"(?:(\d+) min )?([\d.]+) s", cells[5])  # the attempt's duration, not "–"
    assert shown and 0 < 60 * int(shown.group(1) or 0) + float(shown.group(2)) < 120 + took, row

    resumed = subprocess.run(submit, capture_output=True, text=True, cwd=REPO, env=env, timeout=600)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert resumed_from(resumed.stdout) == (committed[-1] if committed else None), resumed.stdout
    assert_bitwise(reference_dir, run_dir)
    print(f"clock stepped {JUMP_S:+.0f} s mid-stage, then a rank SIGKILLed: status time {cells[5]!r}, "
          f"resumed from step {resumed_from(resumed.stdout)}, bitwise")
