"""Training runs that record the sample keys each rank trained on, per step
(``VLCLUSTER_RECORD_KEYS``), and those records read back."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.support import REPO

def submit(job_file: str, run_dir: Path, keys_dir: Path, **popen) -> subprocess.Popen:
    env = {**os.environ, "VLCLUSTER_RECORD_KEYS": str(keys_dir)}
    command = [sys.executable, "-m", "vlcluster.cli", "submit", job_file, "--run-dir", str(run_dir)]
    return subprocess.Popen(command, cwd=REPO, env=env, text=True, **popen)


def run(job_file: str, run_dir: Path, keys_dir: Path) -> str:
    process = submit(job_file, run_dir, keys_dir, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    output, _ = process.communicate(timeout=600)
    assert process.returncode == 0, output
    return output


def recorded(keys_dir: Path, rank: int) -> list[tuple[int, list[str]]]:
    path = keys_dir / f"keys_rank{rank}.txt"
    lines = path.read_text().splitlines() if path.exists() else []
    return [(int(line.split()[0]), line.split()[1:]) for line in lines]
