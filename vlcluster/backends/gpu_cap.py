"""Holding a pipeline to ``limits.gpus``, for the backends that queue or
start stages side by side (SLURM, Ray)."""

from __future__ import annotations

from pathlib import Path

from vlcluster.graph import Graph
from vlcluster.errors import SpecError
from vlcluster.schedule import CapError, CapShape, shape_for_cap


def cap_shape(graph: Graph, names: list[str], run_dir: Path | None, source: str = "") -> CapShape | None:
    """How the stages that run are held to ``limits.gpus`` (None without a cap); the estimates
    (``estimate.py``) only choose which GPU slots each job takes."""
    cap = graph.pipeline.limits.gpus
    if not cap:
        return None
    from vlcluster.estimate import estimate, jobs_of

    estimates = estimate(graph, run_dir) if run_dir is not None else {}
    try:
        return shape_for_cap(jobs_of(graph, estimates, names), cap)
    except CapError as exc:
        raise SpecError(f"{source or graph.pipeline.name}: {exc}") from None
