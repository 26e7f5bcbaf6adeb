"""What the trainer needs to resume on another topology and to train on the
batches the canonical data order gives it.

- ``resharded_loader_state``: the data position is global (the same in every
  saving rank's record); bad-data counts are per rank, so on another number
  of ranks rank 0 continues from the sum of all saving ranks' counts and the
  others from zero, which keeps the run's totals.
- ``StepBatches``: a rank's batch of a step is its slice of the global batch
  less the bad samples dropped from it, so ranks agree on every step's sizes
  (ITC gathers that many rows from each) before it runs.
"""

from __future__ import annotations

import hashlib

import torch
import torch.distributed as dist

from vlcluster.data.quality import BadDataError, DataQuality
from vlcluster.train.accumulate import MicroBatch, plan_micro_batches
from vlcluster.train.checkpoint import LoadedCheckpoint
from vlcluster.train.dist import DistEnv


def resharded_loader_state(loaded: LoadedCheckpoint, rank: int) -> tuple[dict, DataQuality | None]:
    """The loader state and bad-data counts rank ``rank`` continues from."""
    state = loaded.rank_info["loader"]
    if loaded.saved_rank_info is None:
        return state, None
    if rank != 0:
        return state, DataQuality()
    saved = [info.get("loader", {}).get("quality", {}) for info in loaded.saved_rank_info]
    return state, DataQuality.total(DataQuality.from_state(quality) for quality in saved)


def hash_seed(*parts: object) -> int:
    """A 63-bit seed from ``parts``, the same in every process."""
    return int.from_bytes(hashlib.sha256(":".join(map(str, parts)).encode()).digest()[:8], "big") >> 1


class StepBatches:
    """The micro-batch plan of each step, from the batch sizes every rank actually has."""

    def __init__(self, rank_sizes: list[int], micro_batch_size: int | None, env: DistEnv, planned: list[MicroBatch]) -> None:
        self.rank_sizes, self.micro_batch_size, self.env, self.planned = list(rank_sizes), micro_batch_size, env, planned

    def sizes(self, size: int) -> list[int]:
        if not dist.is_initialized() or self.env.world_size == 1:
            return [size]
        mine = torch.tensor([size], dtype=torch.int64, device=self.env.device)
        every = [torch.zeros_like(mine) for _ in range(self.env.world_size)]
        dist.all_gather(every, mine)
        return [int(value.item()) for value in every]

    def plan(self, size: int) -> list[MicroBatch]:
        sizes = self.sizes(size)
        if sizes == self.rank_sizes:
            return self.planned
        try:
            return plan_micro_batches(sizes, self.micro_batch_size, self.env.rank)
        except ValueError as exc:
            raise BadDataError(
                f"bad samples left a step with per-rank batches of {sizes} (of {self.rank_sizes}): {exc}. "
                "Raise train.batch_size or repair the data"
            ) from None
