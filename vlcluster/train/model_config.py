"""Model configuration of a training stage: size preset + spec overrides +
what the data dictates (vocabulary, answers, resolution)."""

from __future__ import annotations

from vlcluster.context import StageContext
from vlcluster.model.config import ModelConfig, preset


def data_image_size(ctx: StageContext) -> int | None:
    """Resolution of the synthetic data when the stage reads a data stage."""
    source = ctx.spec.data.from_
    return ctx.pipeline.stages[source].image_size if source else None


def build_model_config(ctx: StageContext, vocab_size: int, num_answers: int) -> ModelConfig:
    model = ctx.spec.model
    overrides = {**model.overrides(), "vocab_size": vocab_size, "num_answers": num_answers}
    image_size = model.image_size or data_image_size(ctx)
    if image_size:
        overrides["image_size"] = image_size
    return preset(model.size, model.arch, **overrides)
