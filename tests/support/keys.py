"""Training runs that record the sample keys each rank trained on, per step
(``VLCLUSTER_RECORD_KEYS``), and those records read back."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.support import REPO
from tests.support.processes import live_processes_mentioning

def submit(job_file: str, run_dir: Path, keys_dir: Path, **popen) -> subprocess.Popen:
    env = {**os.environ, "VLCLUSTER_RECORD_KEYS": str(keys_dir)}
    command = [sys.executable, "-m", "vlcluster.cli", "submit", job_file, "--run-dir", str(run_dir)]
    return subprocess.Popen(command, cwd=REPO, env=env, text=True, **popen)


def run(job_file: str, run_dir: Path, keys_dir: Path) -> str:
    process = submit(job_file, run_dir, keys_dir, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    output, _ = process.communicate(timeout=600)
    assert process.returncode == 0, output
    return output


def submit_then_kill(job_file: str, run_dir: Path, keys_dir: Path, after_steps: int, log_file: Path) -> list[int]:
    """Submit, SIGKILL the whole submit (its session: torchrun, ranks, loader
    workers) once rank 0 has recorded ``after_steps`` steps, and wait up to 20 s
    for its processes to go; the pids that still mention ``run_dir`` (none expected)."""
    with open(log_file, "w") as log:
        process = submit(job_file, run_dir, keys_dir, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 300
        while len(recorded(keys_dir, 0)) < after_steps:
            assert process.poll() is None, log_file.read_text()
            assert time.monotonic() < deadline, "training did not reach the kill step"
            time.sleep(0.05)
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    deadline = time.monotonic() + 20
    while live_processes_mentioning(str(run_dir)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return live_processes_mentioning(str(run_dir))


def recorded(keys_dir: Path, rank: int) -> list[tuple[int, list[str]]]:
    path = keys_dir / f"keys_rank{rank}.txt"
    lines = path.read_text().splitlines() if path.exists() else []
    return [(int(line.split()[0]), line.split()[1:]) for line in lines]
