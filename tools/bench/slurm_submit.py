#!/usr/bin/env python3
"""Wall time of `vlcluster submit jobs/quickstart.yaml --backend slurm` next
to the same number of raw `sbatch` calls chained with afterok.

    tools/slurm-local up && eval "$(tools/slurm-local env)"
    .venv/bin/python tools/bench/slurm_submit.py [--repeat 3]

Every job is cancelled right after it is queued, so nothing runs.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def timed(command: list[str]) -> tuple[float, str]:
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, check=True)
    return time.perf_counter() - started, result.stdout


def vlcluster_submit(run_dir: Path) -> tuple[float, int]:
    elapsed, out = timed([sys.executable, "-m", "vlcluster.cli", "submit", "jobs/quickstart.yaml", "--backend", "slurm", "--run-dir", str(run_dir)])
    subprocess.run([sys.executable, "-m", "vlcluster.cli", "cancel", str(run_dir)], capture_output=True, cwd=REPO, check=True)
    return elapsed, out.count("submitted as job")


def raw_sbatch(count: int) -> float:
    ids: list[str] = []
    started = time.perf_counter()
    for _ in range(count):
        dependency = [f"--dependency=afterok:{ids[-1]}", "--kill-on-invalid-dep=yes"] if ids else []
        result = subprocess.run(["sbatch", "--parsable", "--output=/dev/null", *dependency, "--wrap", "true"],
                                capture_output=True, text=True, check=True)
        ids.append(result.stdout.strip().split(";")[0])
    elapsed = time.perf_counter() - started
    subprocess.run(["scancel", *ids], check=True)
    return elapsed


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    ours, raw, jobs = [], [], 0
    with tempfile.TemporaryDirectory() as scratch:
        for attempt in range(args.repeat):
            elapsed, jobs = vlcluster_submit(Path(scratch) / f"run{attempt}")
            ours.append(elapsed)
            raw.append(raw_sbatch(jobs))
    ours_s, raw_s = statistics.median(ours), statistics.median(raw)
    print(f"vlcluster submit ({jobs} stages, CLI process wall time): {ours_s:.2f} s (median of {args.repeat})")
    print(f"{jobs} raw sbatch calls chained with afterok:                 {raw_s:.2f} s")
    print(f"ratio: {ours_s / raw_s:.1f}x; goal < 3 s: {'met' if ours_s < 3 else 'NOT met'}")
    return 0 if ours_s < 3 else 1


if __name__ == "__main__":
    sys.exit(main())
