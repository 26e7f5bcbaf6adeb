"""Gradient accumulation: a rank's share of the global batch in micro-batches.

``train.micro_batch_size`` caps the samples one forward/backward sees on a
rank. Every rank splits its share into the same number of micro-batches
(the count the largest share needs; ranks' shares differ by at most one
sample), as evenly as possible, so the collectives inside a step (ITC's
all-gather of embeddings, FSDP's gathers) line up across ranks. The
micro-batch losses are weighted by their share of the rank's batch and their
gradients summed before the one optimizer step, which for per-sample mean
losses (VQA, ITM) gives the full batch's gradient.

Semantics for the losses that couple samples, as in other VL pre-training
code bases that accumulate (ALBEF/BLIP style): ITC's in-batch negatives are
the samples of the *micro-batch* on all ranks, not the whole global batch,
and ITM mines its hard negatives within the rank's micro-batch; MLM draws its
masks per micro-batch. So the ITC loss with accumulation is the mean of the
micro-batch ITC losses (fewer, and easier, negatives than one full batch).
Without ``micro_batch_size`` a step is one micro-batch: nothing changes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

MIN_MICRO_BATCH = 2  # ITC needs a negative, ITM samples one from the others


def split_evenly(total: int, parts: int) -> list[int]:
    base, extra = divmod(total, parts)
    return [base + (1 if index < extra else 0) for index in range(parts)]


@dataclass(frozen=True)
class MicroBatch:
    start: int  # rows of the rank's batch
    stop: int
    rank_sizes: tuple[int, ...]  # this micro-batch's size on every rank (ITC's gather)

    @property
    def size(self) -> int:
        return self.stop - self.start


def plan_micro_batches(rank_sizes: list[int], micro_batch_size: int | None, rank: int) -> list[MicroBatch]:
    """This rank's micro-batches; the same count on every rank. Raises ValueError when one would be too small."""
    count = 1 if micro_batch_size is None else math.ceil(max(rank_sizes) / micro_batch_size)
    splits = [split_evenly(size, count) for size in rank_sizes]
    smallest = min(min(sizes) for sizes in splits)
    if smallest < MIN_MICRO_BATCH:
        raise ValueError(
            f"train.micro_batch_size {micro_batch_size} splits the per-rank batches {sorted(set(rank_sizes))} into "
            f"{count} micro-batches, the smallest of {smallest} sample(s); ITC and ITM need at least "
            f"{MIN_MICRO_BATCH} per micro-batch: raise micro_batch_size or batch_size"
        )
    plan, start = [], 0
    for index, size in enumerate(splits[rank]):
        plan.append(MicroBatch(start, start + size, tuple(sizes[index] for sizes in splits)))
        start += size
    return plan
