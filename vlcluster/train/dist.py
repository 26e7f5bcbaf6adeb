"""Process-group set-up and tear-down for stages started by torchrun."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

from vlcluster.errors import EXIT_OK


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def pick_device(requested: str, local_rank: int) -> torch.device:
    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("train.device is 'cuda' but no CUDA device is visible")
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def init_distributed(requested_device: str) -> DistEnv:
    """Join the process group torchrun describes in the environment; a plain
    ``python`` start is a world of one and needs no process group."""
    rank = int(os.environ.get("RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = pick_device(requested_device, local_rank)
    if world_size > 1 or "TORCHELASTIC_RUN_ID" in os.environ:
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", device_id=device if device.type == "cuda" else None)
    return DistEnv(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def sharded_run() -> bool:
    """Whether FSDP2 shards the model: only where there is something to shard
    across. A world of one trains the plain module (FSDP2 would only add a
    gather and a copy per block call) with mixed precision by autocast."""
    return dist.is_initialized() and dist.get_world_size() > 1


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def gather_objects(value: object) -> list:
    """``value`` of every rank, in rank order, on every rank (a world of one: ``[value]``)."""
    if not dist.is_initialized():
        return [value]
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def exit_process(code: int) -> None:
    """End a rank without running interpreter teardown.

    gloo ranks sometimes abort in static destructors after all work is done
    ("terminate called without an active exception"), which torchrun reports
    as a failed stage. Leaving the group cleanly and then ``os._exit`` skips
    those destructors, so a finished stage always exits with its real code.
    """
    if dist.is_initialized():
        if code == EXIT_OK:
            dist.barrier()
        dist.destroy_process_group()
    from vlcluster.storage.retries import log_retries

    log_retries()  # os._exit skips the atexit hook that would log the storage retries
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
