"""Apply FSDP2 to the training objective (model code stays parallelism-free)."""

from __future__ import annotations

import torch
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

from vlcluster.train.dist import sharded_run
from vlcluster.train.objective import Objective


def parallelize(objective: Objective, param_dtype: torch.dtype | None) -> Objective:
    """Shard every transformer block, then the root (embeddings, final norm,
    heads). Blocks are called several times per step (image, text, fusion);
    FSDP2 gathers them per call and reduces their gradients once.

    ``param_dtype`` (bf16/fp16, or None for float32) is what forward and
    backward compute in; the sharded float32 parameters stay the optimizer's
    master weights and gradients are reduced in float32."""
    if not sharded_run():
        return objective
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    for block in objective.model.layers:
        fully_shard(block, mp_policy=policy)
    fully_shard(objective, mp_policy=policy)
    return objective


def set_gradient_sync(objective: Objective, enabled: bool) -> None:
    """Whether this backward reduce-scatters gradients (off for all but the
    last micro-batch of a step: FSDP2 keeps accumulating unsharded gradients)."""
    if isinstance(objective, FSDPModule):
        objective.set_requires_gradient_sync(enabled)
