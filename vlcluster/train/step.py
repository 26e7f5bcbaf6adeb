"""One optimizer step of the objective: micro-batches, host-to-device copies,
mixed precision, (scaled) backward, gradient sync and the update.

Kept apart from the loop so the step's mechanics are tested on their own
(accumulation against the full batch, compile and activation checkpointing
against eager) with the code the trainer runs.
"""

from __future__ import annotations

import torch

from vlcluster.train.accumulate import MicroBatch
from vlcluster.train.batches import Batch
from vlcluster.train.objective import Objective
from vlcluster.train.parallelize import set_gradient_sync
from vlcluster.train.precision import Precision
from vlcluster.train.throughput_meter import ThroughputMeter, batch_shape


class StepRunner:
    def __init__(
        self,
        objective: Objective,
        optimizer: torch.optim.Optimizer,
        precision: Precision,
        device: torch.device,
        micro_batches: list[MicroBatch],
        mask_prob: float,
        meter: ThroughputMeter | None = None,
    ):
        self.objective, self.optimizer, self.precision, self.device = objective, optimizer, precision, device
        self.micro_batches, self.mask_prob, self.meter = micro_batches, mask_prob, meter

    def run(self, batch: Batch, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Forward and backward over the rank's batch, then one update; the outputs averaged over micro-batches."""
        self.optimizer.zero_grad(set_to_none=True)
        totals: dict[str, torch.Tensor] = {}
        last = len(self.micro_batches) - 1
        for index, micro in enumerate(self.micro_batches):
            weight = micro.size / batch.size
            out = self.forward_backward(batch.rows(micro.start, micro.stop), micro, weight, sync=index == last, generator=generator)
            for name, value in out.items():
                totals[name] = totals.get(name, 0) + value.detach() * weight
        self.precision.step(self.optimizer)
        return totals

    def forward_backward(self, part: Batch, micro: MicroBatch, weight: float, sync: bool, generator: torch.Generator) -> dict:
        if self.meter is not None:  # from the host copy: no device sync
            self.meter.record(batch_shape(part, micro.size, sum(micro.rank_sizes), self.mask_prob), micro.size)
        part = part.to(self.device)
        self.objective.rank_sizes = list(micro.rank_sizes)  # ITC gathers this micro-batch from every rank
        set_gradient_sync(self.objective, sync)  # reduce-scatter once, after the last micro-batch
        with self.precision.autocast():
            out = self.objective(part, generator)
        self.precision.backward(out["loss"] * weight)
        return out
