"""A long stage's progress, as a record in its stage directory.

``<stage>/progress.json`` holds the last reported step, the total, the loss,
the throughput, an ETA and the last checkpoint step. Rank 0 replaces it at
every log step (one atomic write, also on an object store), so
``vlcluster status`` shows the same progress whichever backend runs the
stage; the log lines the stage prints are unchanged (the Ray dashboard's job
log keeps them).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

from vlcluster.stages.rundir import StageDir, read_json, write_json_atomic

T = TypeVar("T")

PROGRESS_FILE = "progress.json"


def progress_file(directory: StageDir):
    return directory.root / PROGRESS_FILE


def write_progress(directory: StageDir, step: int, total: int, *, loss: float | None = None,
                   samples_per_s: float | None = None, samples_per_step: int | None = None,
                   checkpoint_step: int | None = None) -> dict[str, Any]:
    """Replace the stage's progress record; the ETA follows from the throughput."""
    eta_s = None
    if samples_per_s and samples_per_step:
        eta_s = (total - step) * samples_per_step / samples_per_s
    record = {
        "step": step, "steps": total,
        "loss": loss if loss is None or math.isfinite(loss) else str(loss),  # JSON has no nan
        "samples_per_s": samples_per_s, "eta_s": eta_s, "checkpoint_step": checkpoint_step, "at": time.time(),
    }
    write_json_atomic(progress_file(directory), record)
    return record


def report_training_progress(ctx, step: int, scalars: dict[str, float]) -> None:
    """The trainer's log step (rank 0): the record from the scalars it logs."""
    from vlcluster.storage.paths import run_path
    from vlcluster.train.checkpoint_index import latest_checkpoint

    configured = ctx.spec.checkpoint.dir
    saved = latest_checkpoint(run_path(configured) if configured else ctx.dir.checkpoints, ctx.spec_hash)
    write_progress(ctx.dir, step, ctx.spec.train.steps, loss=scalars.get("loss/loss"),
                   samples_per_s=scalars.get("throughput/samples_per_s"), samples_per_step=ctx.spec.train.batch_size,
                   checkpoint_step=saved.step if saved is not None else None)


def reported(steps: Iterable[T], directory: StageDir, total: int, samples_per_step: int, every_s: float = 10.0) -> Iterator[T]:
    """``steps`` unchanged, with the progress record written after a step at
    most every ``every_s`` seconds and after the last one (rank 0 of a
    long stage without a log step of its own, e.g. grams)."""
    started = last = time.perf_counter()
    step = 0
    for step, item in enumerate(steps, start=1):
        yield item
        now = time.perf_counter()
        if now - last >= every_s or step == total:
            write_progress(directory, step, total, samples_per_s=step * samples_per_step / max(now - started, 1e-9),
                           samples_per_step=samples_per_step)
            last = now


def read_progress(directory: StageDir) -> dict | None:
    record = read_json(progress_file(directory))
    return record if isinstance(record, dict) and isinstance(record.get("step"), int) else None


def describe_progress(progress: dict | None) -> str:
    """``step 8/24, loss 9.120, 412 samples/s, ETA 1m05s, checkpoint step 8``."""
    if not progress:
        return ""
    facts = [f"step {progress['step']}/{progress.get('steps', '?')}"]
    loss = progress.get("loss")
    if isinstance(loss, (int, float)):
        facts.append(f"loss {loss:.3f}")
    elif loss is not None:
        facts.append(f"loss {loss}")
    if progress.get("samples_per_s"):
        facts.append(f"{progress['samples_per_s']:.0f} samples/s")
    if progress.get("eta_s") is not None and progress["step"] < progress.get("steps", 0):
        minutes, seconds = divmod(int(progress["eta_s"]), 60)
        facts.append(f"ETA {minutes}m{seconds:02d}s")
    if progress.get("checkpoint_step") is not None:
        facts.append(f"checkpoint step {progress['checkpoint_step']}")
    return ", ".join(facts)
