"""The command line that runs one stage, shared by every backend."""

from __future__ import annotations

import sys

from vlcluster.spec.models import DISTRIBUTED_KINDS


def is_distributed(kind: str) -> bool:
    return kind in DISTRIBUTED_KINDS


def stage_command(kind: str, run_dir: str, stage: str, procs_per_node: int, python: str = sys.executable) -> list[str]:
    """Training and grams stages start under torchrun (one process per rank on this
    node); every other stage is a single Python process."""
    entry = ["-m", "vlcluster.run", run_dir, stage]
    if not is_distributed(kind):
        return [python, *entry]
    return [python, "-m", "torch.distributed.run", "--standalone", "--nnodes=1", f"--nproc_per_node={procs_per_node}", *entry]
