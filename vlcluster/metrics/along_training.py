"""Distances between the V and L experts along training: one row per saved
checkpoint of a stage (``checkpoints/step_N``), as a table and a PNG figure.

This is the series behind the paper's Table 5 (how far the experts drift
apart as VL pre-training goes on). Each checkpoint is read lazily through
the same reader and metrics as ``vlcluster metrics`` on one model.
"""

from __future__ import annotations

from pathlib import Path

from vlcluster.metrics import METRICS
from vlcluster.metrics.distance import checkpoint_distances
from vlcluster.model.load import locate_model
from vlcluster.storage.paths import local_copy
from vlcluster.train.checkpoint_index import complete_checkpoints


def distances_along_training(stage_dir: Path, density: float = 0.5) -> list[dict]:
    """``[{"step": N, "l2": …, "cosine": …, "ssd": …, "tssd": …}, …]``, oldest first."""
    checkpoints = complete_checkpoints(stage_dir / "checkpoints")
    if not checkpoints:
        raise ValueError(f"{stage_dir}: no finished training checkpoints under checkpoints/ (step_N with meta.json); "
                         "give a training stage's directory (a stage with checkpoint.every set keeps them)")
    rows = []
    for checkpoint in checkpoints:
        model = locate_model(checkpoint.path)
        overall = checkpoint_distances(local_copy(model.weights), density, model.prefix)["overall"]
        rows.append({"step": checkpoint.step, **{name: overall[name] for name in METRICS}})
    return rows


def format_along_training(rows: list[dict]) -> str:
    lines = ["| step | " + " | ".join(METRICS) + " |", "|---:|" + "---:|" * len(METRICS)]
    lines += [f"| {row['step']} | " + " | ".join(f"{row[name]:.4g}" for name in METRICS) + " |" for row in rows]
    return "\n".join(lines)


def along_training_figure(rows: list[dict], title: str, path: Path) -> Path:
    """One panel per distance, the step on x (PNG, Agg backend: no display needed)."""
    from vlcluster.plotting import panel_grid, save_figure

    plt, fig, axes = panel_grid(len(METRICS))
    steps = [row["step"] for row in rows]
    for ax, name in zip(axes, METRICS):
        ax.plot(steps, [row[name] for row in rows], marker="o")
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3)
    return save_figure(plt, fig, title, path)
