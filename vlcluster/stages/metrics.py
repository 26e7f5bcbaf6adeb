"""The ``metrics`` stage: mergeability of a modality-specific checkpoint,
written to ``result.json`` and TensorBoard (overall at step 0, per layer as
a curve over the layer index)."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Literal

from pydantic import Field

from vlcluster.jobspec.models import StageBase
from vlcluster.jobspec.references import Reference, model_reference
from vlcluster.metrics import METRICS
from vlcluster.stages.outputs import finish_stage
from vlcluster.storage.paths import local_copy

if TYPE_CHECKING:
    from vlcluster.stages.context import StageContext

log = logging.getLogger("vlcluster.metrics")


class MetricsStage(StageBase):
    kind: Literal["metrics"]
    source: str = Field(description="stage holding the modality-specific checkpoint")
    density: float = Field(0.5, gt=0, lt=1, description="TSSD: fraction of entries kept by magnitude")

    def references(self) -> list[Reference]:
        return model_reference("source", self.source)


def write_tensorboard(log_dir, result: dict) -> None:
    from vlcluster.tracking import forward_metrics
    from vlcluster.train.tb import MetricsWriter

    writer = MetricsWriter(log_dir, enabled=True, forward=forward_metrics())
    writer.add({f"mergeability/{name}": result["overall"][name] for name in METRICS}, step=0)
    for layer, values in result["layers"].items():
        writer.add({f"mergeability_per_layer/{name}": values[name] for name in METRICS}, step=int(layer))
    writer.close()


def run(ctx: StageContext) -> None:
    from vlcluster.metrics.distance import checkpoint_distances, format_metrics

    spec = ctx.spec
    result = checkpoint_distances(local_copy(ctx.upstream_dir(spec.source).model_weights), spec.density)
    write_tensorboard(ctx.dir.tensorboard, result)
    log.info("mergeability of %s:\n%s", spec.source, format_metrics(result))
    finish_stage(ctx, {"source": spec.source, "density": spec.density, **result})
