"""Which task dataset a stage reads: its ``data: {from: STAGE}`` names an import
stage, or a data stage that wrote ``tasks/<task>`` beside its pre-training shards."""

from __future__ import annotations

from pathlib import Path

from vlcluster.stages.context import StageContext


def task_dataset_dir(ctx: StageContext, source: str, task: str) -> Path:
    """Where the stage ``source`` keeps ``task``'s dataset: an import stage's directory,
    or ``tasks/<task>`` inside a synthetic data stage."""
    root = ctx.upstream_dir(source).root
    return root / "tasks" / task if ctx.pipeline.stages[source].kind == "data" else root


def stage_task_data(ctx: StageContext, task: str):
    """The ``TaskData`` of ``task`` that the stage reads."""
    from vlcluster.tasks.dataset import DatasetError, read_task_data

    data = ctx.spec.data
    where = f"stages.{ctx.name}.data"
    if data.from_ is None:
        raise DatasetError(f"{where}: a task stage reads an import stage or a data stage: give data: {{from: STAGE}}")
    return read_task_data(task_dataset_dir(ctx, data.from_, task), task, where)
