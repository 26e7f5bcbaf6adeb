"""Helpers for the benchmarks: random `size: base` checkpoints and timed subprocesses."""

from __future__ import annotations

import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

PYTHON = sys.executable


@dataclass(frozen=True)
class Timing:
    wall_s: float  # whole command, interpreter start and imports included
    max_rss_gb: float
    work_s: float | None  # the part the command itself reports (after imports)


def timed(command: list[str]) -> Timing:
    """Run ``command`` under /usr/bin/time -v; a line ``WORK <seconds>`` on stdout is its work time."""
    result = subprocess.run(["/usr/bin/time", "-v", *command], capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stdout}\n{result.stderr[-3000:]}")
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (?:(\d+):)?(\d+):([\d.]+)", result.stderr)
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", result.stderr)[1])
    work = re.search(r"^WORK ([\d.]+)$", result.stdout, re.M)
    wall_s = int(wall[1] or 0) * 3600 + int(wall[2]) * 60 + float(wall[3])
    return Timing(wall_s, rss_kb / 2**20, float(work[1]) if work else None)


def best_of(command: list[str], runs: int) -> Timing:
    """The fastest of ``runs`` (after one warm-up run, so the page cache is warm for every contender)."""
    timed(command)
    return min((timed(command) for _ in range(runs)), key=lambda t: t.wall_s)


def write_random_checkpoint(out: Path, size: str, arch: str, seed: int = 0) -> int:
    """Random-weight checkpoint (model.safetensors + model.json); returns the parameter count."""
    import torch

    from vlcluster.model import MultiwayTransformer, preset
    from vlcluster.model.files import write_model
    from vlcluster.stages.rundir import StageDir

    config = preset(size, arch)
    with torch.device("meta"):
        shapes = {key: value.shape for key, value in MultiwayTransformer(config).state_dict().items()}
    generator = torch.Generator().manual_seed(seed)
    state = {key: torch.randn(shape, generator=generator) * 0.02 for key, shape in shapes.items()}
    write_model(StageDir(out), state, config, {"benchmark": "random weights"})
    return sum(value.numel() for value in state.values())
