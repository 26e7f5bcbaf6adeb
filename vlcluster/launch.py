"""The command line that runs one stage, shared by every backend."""

from __future__ import annotations

import sys
from dataclasses import dataclass

from vlcluster.stages.kinds import DISTRIBUTED_KINDS


@dataclass(frozen=True)
class Rendezvous:
    """Static multi-node rendezvous: every node runs one torchrun, ranks are
    ``node_rank * procs_per_node + local_rank``."""

    nnodes: int
    node_rank: int | str  # a str only when rendered for --dry-run ("$SLURM_NODEID")
    master_addr: str
    master_port: int | str


def is_distributed(kind: str) -> bool:
    return kind in DISTRIBUTED_KINDS


def stage_command(
    kind: str, run_dir: str, stage: str, procs_per_node: int, python: str = sys.executable,
    rendezvous: Rendezvous | None = None,
) -> list[str]:
    """Training and grams stages start under torchrun (one process per rank on this
    node); every other stage is a single Python process."""
    entry = ["-m", "vlcluster.run", run_dir, stage]
    if not is_distributed(kind):
        return [python, *entry]
    torchrun = [python, "-m", "torch.distributed.run", f"--nproc_per_node={procs_per_node}"]
    if rendezvous is None or rendezvous.nnodes == 1:
        return [*torchrun[:3], "--standalone", "--nnodes=1", *torchrun[3:], *entry]
    return [
        *torchrun[:3], f"--nnodes={rendezvous.nnodes}", f"--node_rank={rendezvous.node_rank}", *torchrun[3:],
        f"--master_addr={rendezvous.master_addr}", f"--master_port={rendezvous.master_port}", *entry,
    ]
