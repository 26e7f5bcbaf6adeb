"""The ``eval`` stage: a model's scores on the tasks of ``tasks``, written to result.json.

A task reads its own dataset (``dataset.json``: an import stage, or a data
stage that writes the task) when ``data.from`` names one; otherwise the
image-caption validation shards, which VQA and retrieval can read. Either way
the task registry's task makes the batches and keeps the score.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, model_validator

from vlcluster.jobspec.models import DataSpec, StageBase, TaskName
from vlcluster.jobspec.references import Reference, model_reference

if TYPE_CHECKING:
    from vlcluster.stages.context import StageContext

log = logging.getLogger("vlcluster.eval")


class EvalStage(StageBase):
    kind: Literal["eval"]
    source: str | None = Field(None, description="stage whose model is evaluated")
    step: int | None = Field(
        None, ge=0, description="with source: that training stage's checkpoint at this step instead of its output "
        "(one of the checkpoints it keeps: checkpoint.keep)",
    )
    model_file: str | None = Field(
        None, description="a model file made before the run instead of a stage (local or s3://): a stage or converted "
        "directory, checkpoints/step_N of a training stage, or the model.safetensors of one of them",
    )
    data: DataSpec
    tasks: list[TaskName] = Field(
        default_factory=lambda: ["vqa", "retrieval"],
        description="downstream tasks scored: on the task's own dataset when data.from names an import stage, or a data "
        "stage that writes the task (its tasks); else on the image-caption validation shards (vqa, retrieval)",
    )
    batch_size: int = Field(128, gt=0)
    split: str = Field("val", description="split of a task's own dataset")

    @model_validator(mode="before")
    @classmethod
    def _one_form(cls, values: Any) -> Any:
        if isinstance(values, dict) and "task" in values:
            task = values["task"]
            raise ValueError(
                f"task: {task} is written tasks: [{task}]: an eval stage lists the tasks it scores under tasks, "
                "each on its own dataset when data.from names an import stage or a data stage that writes the task"
            )
        return values

    @model_validator(mode="after")
    def _one_model(self) -> EvalStage:
        if (self.source is None) == (self.model_file is None):
            raise ValueError("give exactly one of 'source' (a stage) or 'model_file' (a model file or directory)")
        if self.step is not None and self.source is None:
            raise ValueError("'step' picks a checkpoint of the stage named by 'source'")
        return self

    def references(self) -> list[Reference]:
        return self.data.references() + model_reference("source", self.source)

    @property
    def model_label(self) -> str:
        if self.source is None:
            return str(self.model_file)
        return self.source if self.step is None else f"{self.source} at step {self.step}"


def reads_own_dataset(ctx: StageContext, task: str) -> bool:
    source = ctx.spec.data.from_
    if source is None:
        return False
    producer = ctx.pipeline.stages[source]
    return producer.kind == "import" or task in getattr(producer, "tasks", ())


def run(ctx: StageContext) -> None:
    from vlcluster.data.quality import DataQuality, check_bad_fraction
    from vlcluster.stages.outputs import finish_stage

    spec = ctx.spec
    own = [task for task in spec.tasks if reads_own_dataset(ctx, task)]
    if len(own) > 1:
        raise ValueError(
            f"stages.{ctx.name}.tasks: {', '.join(own)} each read their own dataset: give each its own eval stage "
            "(a report row joins several)"
        )
    image_caption = [task for task in spec.tasks if task not in own]
    state, config = evaluated_model(ctx)
    quality = DataQuality()
    result: dict = {}
    if image_caption:
        result |= image_caption_scores(ctx, state, config, image_caption, quality)
    if own:
        result |= own_dataset_scores(ctx, state, config, own[0], quality)
    check_bad_fraction(quality.bad_total, quality.read, spec.data.max_bad_fraction, final=True)
    result["model"] = model_record(spec) | {"arch": config.arch}
    result["data"] = quality.summary(spec.data.max_bad_fraction)
    on = f" on {own[0]}" if own and not image_caption else ""
    log.info("%s%s: %s", spec.model_label, on, ", ".join(f"{k} {v:.2f}" for k, v in result.items() if isinstance(v, float)))
    finish_stage(ctx, result)


def evaluated_model(ctx: StageContext) -> tuple[dict, Any]:
    """The weights and config of the stage named by ``source``, or of the model
    file named by ``model_file`` (read as every command reads one)."""
    from vlcluster.model.files import read_model
    from vlcluster.model.load import locate_model

    spec = ctx.spec
    if spec.source is None:
        found = locate_model(spec.model_file)
    elif spec.step is None:
        return read_model(ctx.upstream_dir(spec.source))
    else:
        found = locate_model(training_checkpoint(ctx, spec.source, spec.step))
    return found.tensors(), found.config


def model_record(spec: EvalStage) -> dict:
    if spec.source is None:
        return {"model_file": spec.model_file}
    return {"stage": spec.source} | ({} if spec.step is None else {"step": spec.step})


def training_checkpoint(ctx: StageContext, source: str, step: int) -> Path:
    """``source``'s checkpoint directory at ``step``; one paragraph when the
    stage keeps none there (the ones it keeps are named)."""
    from vlcluster.storage.paths import run_path
    from vlcluster.train.checkpoint_index import complete_checkpoints, step_dir_name

    settings = getattr(ctx.pipeline.stages[source], "checkpoint", None)
    if settings is None:
        raise ValueError(f"stages.{ctx.name}.step: {source!r} is a {ctx.pipeline.stages[source].kind} stage; "
                         "only training stages write checkpoints")
    root = run_path(settings.dir) if settings.dir else ctx.upstream_dir(source).checkpoints
    kept = [ckpt.step for ckpt in complete_checkpoints(root)]
    if step not in kept:
        raise ValueError(f"stages.{ctx.name}.step: {source!r} keeps no checkpoint at step {step} in {root} "
                         f"(it has {', '.join(map(str, kept)) or 'none'}; checkpoint.every and checkpoint.keep decide)")
    return root / step_dir_name(step)


def own_dataset_scores(ctx: StageContext, state: dict, config, name: str, quality) -> dict:
    """One task's metric on a split of its dataset."""
    from vlcluster.stages.task_data import stage_task_data
    from vlcluster.tasks.finetune import task_encoder
    from vlcluster.tasks.registry import get_task
    from vlcluster.tasks.task_eval import evaluate_task, task_model

    spec = ctx.spec
    task = get_task(name)
    where = f"stages.{ctx.name}"
    data = stage_task_data(ctx, task.name)
    urls = data.shards(spec.split, f"{where}.data")
    model = task_model(state, config, task, data.info, where)
    result = evaluate_task(model, task, data.info, task_encoder(task, data, f"{where}.data"), urls, spec.batch_size, quality)
    return result | {"task": task.name, "split": spec.split, "chance": task.chance(data.info)}


def image_caption_scores(ctx: StageContext, state: dict, config, tasks: list[str], quality) -> dict:
    """VQA and retrieval on the validation shards of the image-caption data."""
    from vlcluster.data.tokenizer import TextEncoder
    from vlcluster.tasks.evaluate import evaluate, load_model

    model = load_model(state, config)
    sources = ctx.data_sources(ctx.spec.data)
    if not sources.val:
        raise ValueError(f"stages.{ctx.name}.data: no validation shards (data.val)")
    encoder = TextEncoder(sources.tokenizer)
    answers = json.loads(Path(sources.answers).read_text()) if sources.answers else []
    return evaluate(model, encoder, answers, sources.val, tasks, ctx.spec.batch_size, quality, sources.fields)
