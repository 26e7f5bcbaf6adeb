"""Model configuration of a training stage: size preset + spec overrides +
what the data dictates (vocabulary, answers, resolution), and the init
stage's positions where the spec does not choose them."""

from __future__ import annotations

from typing import Any

from vlcluster.stages.context import StageContext
from vlcluster.model.config import ModelConfig, preset
from vlcluster.model.files import read_model_config

POSITION_FIELDS = ("position", "relative_bias")


def data_image_size(ctx: StageContext) -> int | None:
    """Resolution of the synthetic data when the stage reads a data stage."""
    source = ctx.spec.data.from_
    return ctx.pipeline.stages[source].image_size if source else None


def inherited_positions(ctx: StageContext) -> dict[str, Any]:
    """How the init stage's model encodes positions: a stage started from it keeps that
    (its weights only load so), e.g. a base model trained before base became relative."""
    init = getattr(ctx.spec, "init", None)
    if init is None or init.from_ is None:
        return {}
    source = read_model_config(ctx.upstream_dir(init.from_).root)
    return {name: getattr(source, name) for name in POSITION_FIELDS}


def build_model_config(ctx: StageContext, vocab_size: int, num_answers: int) -> ModelConfig:
    model = ctx.spec.model
    overrides = {**inherited_positions(ctx), **model.overrides(), "vocab_size": vocab_size, "num_answers": num_answers}
    image_size = model.image_size or data_image_size(ctx)
    if image_size:
        overrides["image_size"] = image_size
    return preset(model.size, model.arch, **overrides)
