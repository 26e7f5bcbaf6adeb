"""Apply FSDP2 to the training objective (model code stays parallelism-free)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from vlcluster.train.objective import Objective


def parallelize(objective: Objective, precision: str) -> Objective:
    """Shard every transformer block, then the root (embeddings, final norm,
    heads). Blocks are called several times per step (image, text, fusion);
    FSDP2 gathers them per call and reduces their gradients once."""
    if not dist.is_initialized():
        return objective
    policy = MixedPrecisionPolicy(
        param_dtype=torch.bfloat16 if precision == "bf16" else None,
        reduce_dtype=torch.float32,
    )
    for block in objective.model.layers:
        fully_shard(block, mp_policy=policy)
    fully_shard(objective, mp_policy=policy)
    return objective
