"""Mergeability gate: refuse to merge a model whose experts are too far apart,
before any fine-tuning compute is spent on it."""

from __future__ import annotations

import logging
from pathlib import Path

from vlcluster.metrics.distance import checkpoint_distances

log = logging.getLogger("vlcluster.gate")


class GateClosed(Exception):
    """The source model failed the gate; the stage ends with a clear status."""


def check_gate(ctx, weights: Path) -> dict:
    """Measure the gate's metric; record and raise :class:`GateClosed` when it is over the limit."""
    gate = ctx.spec.gate
    value = checkpoint_distances(weights)["overall"][gate.metric]
    verdict = {"metric": gate.metric, "value": value, "max": gate.max, "passed": value <= gate.max}
    if not verdict["passed"]:
        reason = f"mergeability gate closed: {gate.metric} {value:.4g} > max {gate.max:g}"
        ctx.dir.write_state(reason=reason, gate=verdict)
        raise GateClosed(reason)
    ctx.dir.write_state(reason=None, gate=verdict)
    log.info("mergeability gate open: %s %.4g <= %g", gate.metric, value, gate.max)
    return verdict
