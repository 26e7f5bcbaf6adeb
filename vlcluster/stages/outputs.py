"""Stage outputs: the result record and the done-marker (a stage's model is
written with :mod:`vlcluster.model.files`)."""

from __future__ import annotations

from typing import Any

from vlcluster.stages.rundir import StageDir, read_json, write_json_atomic


def finish_stage(ctx, result: dict[str, Any]) -> None:
    """Record the result, then the done-marker (last, so 'done' implies all outputs exist)."""
    write_json_atomic(ctx.dir.result_file, {"stage": ctx.name, "kind": ctx.spec.kind, **result})
    ctx.dir.mark_done(ctx.spec_hash)


def read_result(stage: StageDir) -> dict | None:
    """The stage's result record; None when missing or not a JSON object (damaged)."""
    record = read_json(stage.result_file)
    return record if isinstance(record, dict) else None
