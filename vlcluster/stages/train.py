"""The ``pretrain`` and ``finetune`` stages: their spec models; the spec -> a recipe (what is
trained), the model configuration and the run's settings, then the trainer
(``vlcluster.train.loop``) on every rank under torchrun.

The model configuration is the size preset + spec overrides + what the data
dictates (vocabulary, answers, resolution), and the init stage's positions
where the spec does not choose them.
"""

from __future__ import annotations

import json
import logging
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, model_validator

from vlcluster.jobspec.models import CheckpointSpec, DataSpec, InitSpec, ModelSpec, StageBase, TaskName, TrainSpec
from vlcluster.jobspec.references import Reference

if TYPE_CHECKING:  # the job-file model imports this module for its specs: torch comes with the trainer
    from vlcluster.model import MultiwayTransformer
    from vlcluster.model.config import ModelConfig
    from vlcluster.stages.context import StageContext
    from vlcluster.train.loop import Recipe, TrainingRun

log = logging.getLogger("vlcluster.train")

# What a stage started from another stage's model keeps of it unless its own spec sets it:
# the weights only load into (and compute the same function in) a model built so.
INHERITED_FIELDS = ("position", "relative_bias", "layer_scale")


class TrainStageBase(StageBase):
    model: ModelSpec = ModelSpec()
    data: DataSpec
    train: TrainSpec
    init: InitSpec | None = None
    checkpoint: CheckpointSpec = CheckpointSpec()

    @model_validator(mode="after")
    def _batch_fits_ranks(self) -> TrainStageBase:
        sizes = self.train.rank_batch_sizes(self.resources.world_size)
        if self.train.micro_batch_size is not None:
            from vlcluster.train.accumulate import plan_micro_batches

            plan_micro_batches(sizes, self.train.micro_batch_size, rank=0)
        return self

    def references(self) -> list[Reference]:
        return (self.init.references() if self.init is not None else []) + self.data.references()


class PretrainStage(TrainStageBase):
    """Seed pre-training (arch agnostic) or VL pre-training (arch specific,
    ``init`` from the seed stage)."""

    kind: Literal["pretrain"]


class FinetuneStage(TrainStageBase):
    """Downstream fine-tuning: VQA head plus contrastive retrieval by default."""

    kind: Literal["finetune"]
    init: InitSpec
    train: TrainSpec
    task: TaskName | None = Field(
        None, description="one downstream task (its head, loss and route; data from an import or data stage); "
        "unset: the multi-task fine-tune of loss_weights"
    )

    @model_validator(mode="after")
    def _finetune_has_task_loss(self) -> FinetuneStage:
        weights = self.train.loss_weights
        if self.task is None and weights.vqa == 0 and weights.itc == 0:
            raise ValueError("fine-tuning needs a task loss: set task, or loss_weights.vqa and/or loss_weights.itc")
        return self


def data_image_size(ctx: StageContext) -> int | None:
    """Resolution of the synthetic data when the stage reads a data stage."""
    source = ctx.spec.data.from_
    return ctx.pipeline.stages[source].image_size if source else None


def inherited_structure(ctx: StageContext) -> dict[str, Any]:
    """How the init stage's model encodes positions and whether it scales its residual
    branches: a stage started from it keeps that (its weights only load so), e.g. a base
    model trained before base became relative, or a seed with BEiT's layer scale."""
    from vlcluster.model.files import read_model_config

    init = getattr(ctx.spec, "init", None)
    if init is None or init.from_ is None:
        return {}
    source = read_model_config(ctx.upstream_dir(init.from_).root)
    return {name: getattr(source, name) for name in INHERITED_FIELDS}


def build_model_config(ctx: StageContext, vocab_size: int, num_answers: int) -> ModelConfig:
    from vlcluster.model.config import preset

    model = ctx.spec.model
    overrides = {**inherited_structure(ctx), **model.overrides(), "vocab_size": vocab_size, "num_answers": num_answers}
    image_size = model.image_size or data_image_size(ctx)
    if image_size:
        overrides["image_size"] = image_size
    return preset(model.size, model.arch, **overrides)


# ---- what is trained ---------------------------------------------------------


def task_recipe(ctx: StageContext) -> tuple[Recipe, ModelConfig]:
    """A ``finetune`` stage with ``task:``: the task's recipe and a configuration
    with the init model's text vocabulary (its embedding must load)."""
    from vlcluster.model.files import read_model_config
    from vlcluster.stages.task_data import stage_task_data
    from vlcluster.tasks.finetune import TaskTraining
    from vlcluster.tasks.registry import get_task

    spec, where = ctx.spec, f"stages.{ctx.name}.data"
    task = get_task(spec.task)
    recipe = TaskTraining(task, stage_task_data(ctx, task.name), spec.data.shuffle_buffer, spec.data.shuffle_run, where)
    init = read_model_config(ctx.upstream_dir(spec.init.from_).root)
    vocab = recipe.encoder.vocab_size if recipe.encoder else init.vocab_size
    if vocab != init.vocab_size:
        raise ValueError(
            f"stages.{ctx.name}: the dataset's tokenizer has {vocab} tokens, the model of stage "
            f"{spec.init.from_!r} was trained with {init.vocab_size}: import the data with the "
            "pre-training tokenizer (--tokenizer)"
        )
    return recipe, build_model_config(ctx, vocab, 0)


def pretrain_recipe(ctx: StageContext) -> tuple[Recipe, ModelConfig]:
    """Pre-training (and the multi-task fine-tune of ``loss_weights``) on image-caption shards."""
    from vlcluster.data.tokenizer import TextEncoder
    from vlcluster.train.pretraining import PretrainRecipe

    sources = ctx.data_sources(ctx.spec.data)
    encoder = TextEncoder(sources.tokenizer)
    answers = json.loads(Path(sources.answers).read_text()) if sources.answers else []
    recipe = PretrainRecipe(sources, encoder, answers, ctx.spec.train)
    return recipe, build_model_config(ctx, encoder.vocab_size, len(answers))


def recipe_of(ctx: StageContext) -> tuple[Recipe, ModelConfig]:
    return task_recipe(ctx) if getattr(ctx.spec, "task", None) else pretrain_recipe(ctx)


# ---- where it starts and where it ends -----------------------------------------


def load_init(ctx: StageContext, model: MultiwayTransformer, is_main: bool) -> None:
    """The stage's ``init``: an external checkpoint, or another stage's model."""
    from vlcluster.model import expand_to_experts, load_into
    from vlcluster.model.external import init_from_checkpoint
    from vlcluster.model.posembed import fit_position_table
    from vlcluster.model.files import read_model

    init = ctx.spec.init
    if init.checkpoint is not None:
        from vlcluster.hub import is_hub, local_snapshot

        source = str(local_snapshot(init.checkpoint, "init.checkpoint")) if is_hub(init.checkpoint) else init.checkpoint
        report = init_from_checkpoint(model, source, init.format)
        if is_main:
            log.info("initialised from checkpoint:\n  %s", "\n  ".join(report.lines()))
        return
    source = init.from_
    state, source_config = read_model(ctx.upstream_dir(source))
    state = fit_position_table(expand_to_experts(state, model), model)  # e.g. 384px fine-tune of a 224px model
    load_into(model, state, allow_missing_prefixes=tuple(f"heads.{name}" for name in model.heads))
    if is_main:
        log.info("initialised from stage %r (%s -> %s)", source, source_config.arch, model.config.arch)


def training_run(ctx: StageContext, is_main: bool) -> TrainingRun:
    """The stage's settings as the trainer takes them."""
    from vlcluster.model.files import write_model
    from vlcluster.stages.outputs import finish_stage
    from vlcluster.stages.progress import report_training_progress
    from vlcluster.storage.paths import run_path
    from vlcluster.tracking import forward_metrics
    from vlcluster.train.loop import TrainingRun

    spec = ctx.spec

    def export(state, config: ModelConfig, step: int, summary: dict) -> None:
        write_model(ctx.dir, state, config, {"stage": ctx.name, "steps": step})
        finish_stage(ctx, summary)

    return TrainingRun(
        name=ctx.name,
        spec_hash=ctx.spec_hash,
        train=spec.train,
        checkpoint_root=run_path(spec.checkpoint.dir) if spec.checkpoint.dir else ctx.dir.checkpoints,
        checkpoint_every=spec.checkpoint.every,
        checkpoint_keep=spec.checkpoint.keep,
        tensorboard=ctx.dir.tensorboard,
        num_workers=spec.data.num_workers,
        cpus_per_node=spec.resources.cpus_per_node,
        ranks_per_node=spec.resources.ranks_per_node,
        max_bad_fraction=spec.data.max_bad_fraction,
        init_weights=(lambda model: load_init(ctx, model, is_main)) if spec.init is not None else None,
        on_log=lambda step, scalars: report_training_progress(ctx, step, scalars),  # progress.json for `vlcluster status`
        export=export,
        forward_metrics=forward_metrics(),
    )


def run(ctx: StageContext) -> None:
    """Entry point of a training stage on every rank; never returns."""
    import torch.distributed as dist

    from vlcluster.data.quality import BadDataError
    from vlcluster.failure import note_failure, peer_lost, said_in_one_paragraph
    from vlcluster.errors import EXIT_FAILED, EXIT_OK, EXIT_REQUEUE
    from vlcluster.model.external import CheckpointError
    from vlcluster.train import checkpoint as ckpt
    from vlcluster.tracking import exit_rank
    from vlcluster.train.dist import init_distributed
    from vlcluster.train.loop import Trainer
    from vlcluster.train.precision import PrecisionError
    from vlcluster.train.preempt import StopFlag, StopRequested

    stop = StopFlag().install()  # before the process group exists: a signal during set-up is kept
    env = init_distributed(ctx.spec.train.device)
    code = EXIT_OK
    try:
        if env.is_main:
            removed = ckpt.discard_foreign(ctx.dir.checkpoints, ctx.spec_hash)
            if removed:
                log.info("removed checkpoints of an earlier spec of this stage (steps %s)", removed)
        if dist.is_initialized():
            dist.barrier()
        recipe, config = recipe_of(ctx)
        trainer = Trainer(training_run(ctx, env.is_main), recipe, config, env, stop)
        summary = trainer.fit()
        trainer.export(summary)
    except StopRequested:
        code = EXIT_REQUEUE
    except (BadDataError, CheckpointError, PrecisionError) as exc:
        note_failure(ctx.dir, exc)
        log.error("%s", exc)
        code = EXIT_FAILED
    except BaseException as exc:  # noqa: BLE001 - report, then exit with failure below
        named = note_failure(ctx.dir, exc, str(ctx.run_dir))
        if said_in_one_paragraph(named):
            log.error("%s", named[1])
        elif peer_lost(exc):
            log.error("stopping: another rank is gone (%s); its own lines above say why", str(exc).split(". ")[0])
        else:
            traceback.print_exc()
        code = EXIT_FAILED
    exit_rank(code)
