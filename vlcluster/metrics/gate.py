"""Mergeability gate: refuse to merge a model whose experts are too far apart,
before any fine-tuning compute is spent on it."""

from __future__ import annotations

from pathlib import Path

from vlcluster.metrics.distance import checkpoint_distances


class GateClosed(Exception):
    """The source model failed the gate; the stage ends with a clear status."""


def gate_verdict(weights: Path, metric: str, limit: float) -> dict:
    """The gate's metric measured on ``weights`` and whether it is within ``limit``."""
    value = checkpoint_distances(weights)["overall"][metric]
    return {"metric": metric, "value": value, "max": limit, "passed": value <= limit}


def closed_reason(verdict: dict) -> str:
    return f"mergeability gate closed: {verdict['metric']} {verdict['value']:.4g} > max {verdict['max']:g}"
