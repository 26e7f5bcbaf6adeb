"""Stop a training stage cleanly when the cluster asks it to.

SLURM sends SIGTERM on ``scontrol requeue``, on preemption and (through the
submitit wrapper) shortly before the time limit. A handler only sets a flag;
the loop checks it at step boundaries, where every rank agrees (one
all-reduce), saves a checkpoint and exits with ``EXIT_REQUEUE``. The requeued
job resumes from that checkpoint through the ordinary resume path.
"""

from __future__ import annotations

import signal

import torch
import torch.distributed as dist

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopRequested(Exception):
    """Raised out of the loop after the stop checkpoint is on disk."""


class StopFlag:
    def __init__(self) -> None:
        self.requested = False

    def install(self) -> StopFlag:
        for signum in STOP_SIGNALS:
            signal.signal(signum, self._handle)
        return self

    def _handle(self, signum: int, frame) -> None:
        self.requested = True

    def agreed(self, device: torch.device) -> bool:
        """Collective: True on every rank as soon as any rank was signalled,
        so all ranks stop at the same step (the checkpoint is collective)."""
        if not dist.is_initialized():
            return self.requested
        flag = torch.tensor([int(self.requested)], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())
