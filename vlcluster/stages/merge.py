"""The ``merge`` stage: one modality-specific model merged into an agnostic one
(:func:`vlcluster.merge.apply.merge_checkpoint`), behind the mergeability gate
when the spec sets one."""

from __future__ import annotations

import logging
from pathlib import Path

from vlcluster.merge.apply import merge_checkpoint
from vlcluster.metrics.gate import GateClosed, closed_reason, gate_verdict
from vlcluster.stages.context import StageContext
from vlcluster.stages.outputs import finish_stage
from vlcluster.storage.paths import local_copy

log = logging.getLogger("vlcluster.merge")


def check_gate(ctx: StageContext, weights: Path) -> dict:
    """Measure the gate's metric; record it in the stage's state and raise
    :class:`GateClosed` when it is over the limit (``status`` shows it as gated)."""
    gate = ctx.spec.gate
    verdict = gate_verdict(weights, gate.metric, gate.max)
    if not verdict["passed"]:
        reason = closed_reason(verdict)
        ctx.dir.write_state(reason=reason, gate=verdict)
        raise GateClosed(reason)
    ctx.dir.write_state(reason=None, gate=verdict)
    log.info("mergeability gate open: %s %.4g <= %g", gate.metric, verdict["value"], gate.max)
    return verdict


def run(ctx: StageContext) -> None:
    spec = ctx.spec
    source = ctx.upstream_dir(spec.source).root
    gate = check_gate(ctx, local_copy(source / "model.safetensors")) if spec.gate else None
    params = spec.method_values()
    record = merge_checkpoint(
        source, ctx.dir.root, spec.method, params,
        base=ctx.upstream_dir(spec.seed).root if spec.seed else None,
        grams=ctx.upstream_dir(spec.grams).root if spec.grams else None,
        provenance={"stage": ctx.name, "sources": {"source": spec.source, "seed": spec.seed, "grams": spec.grams}},
    )
    log.info("merged %s (%s) with %s %s -> agnostic", spec.source, record["source_arch"], spec.method, params)
    finish_stage(ctx, {"method": spec.method, "params": params, "source": spec.source, "tensors": record["tensors"], "gate": gate})
