"""Run under torchrun with 2 gloo ranks by tests/unit/test_precision.py: an fp16
FSDP2 model whose gradient overflows on one rank's shard only.

Writes ``rank_R.json`` into the directory given as argv[1]: per step
whether the parameters changed and the loss scale after it."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from vlcluster.train.precision import Precision


def main(out: Path) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 2))
    precision = Precision("fp16", torch.device("cpu"))
    policy = MixedPrecisionPolicy(param_dtype=precision.param_dtype(), reduce_dtype=torch.float32)
    for layer in (model[0], model[2]):
        fully_shard(layer, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    record = {"compute_dtype": None, "steps": []}
    for step in range(3):
        x = torch.randn(4, 8, generator=torch.Generator().manual_seed(step * 10 + rank))
        output = model(x)
        record["compute_dtype"] = str(output.dtype)
        optimizer.zero_grad(set_to_none=True)
        precision.backward(output.float().pow(2).mean())
        first = next(model.parameters())
        if step == 1 and rank == 1:  # an overflow in rank 1's gradient shard only
            first.grad.to_local().view(-1)[0] = float("inf")
        before = [p.detach().full_tensor().clone() for p in model.parameters()]
        stepped = precision.step(optimizer)
        changed = any(not torch.equal(b, p.detach().full_tensor()) for b, p in zip(before, model.parameters()))
        record["steps"].append({"stepped": stepped, "changed": changed, "scale": precision.loss_scale})
    record["skipped_steps"] = precision.skipped_steps
    (out / f"rank_{rank}.json").write_text(json.dumps(record))
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
