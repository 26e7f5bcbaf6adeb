"""The ``data`` stage: build the synthetic benchmark into the stage directory."""

from __future__ import annotations

import logging
import time

from vlcluster.context import StageContext
from vlcluster.data.synthetic import build_dataset
from vlcluster.outputs import finish_stage

log = logging.getLogger("vlcluster.data")


def run_data_stage(ctx: StageContext) -> None:
    spec = ctx.spec
    started = time.perf_counter()

    def progress(split: str, done: int, total: int) -> None:
        log.info("%s: %d/%d shards", split, done, total)

    summary = build_dataset(
        str(ctx.dir.root), spec.n_train, spec.n_val, spec.shard_size, spec.image_size, spec.seed, progress=progress
    )
    elapsed = time.perf_counter() - started
    log.info("wrote %d train and %d val samples in %.1f s", spec.n_train, spec.n_val, elapsed)
    finish_stage(ctx, {**summary, "seconds": elapsed})
