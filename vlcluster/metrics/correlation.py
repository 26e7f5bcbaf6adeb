"""Does a metric predict the merge drop? Pearson correlation across runs.

A point is one modality-specific model: its mergeability metrics (a metrics
stage's result) and the drop merging caused (score of the unmerged model
minus score of the merged one, both from eval stages after fine-tuning).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

from vlcluster.metrics import METRICS

# What a merge drop can be measured with: score name -> the eval result keys it
# averages. ``retrieval`` is the mean of TR and IR (the paper's COCO drop). The
# report stage's ``drop_score`` and ``vlcluster report --score`` accept these names.
DROP_SCORES: dict[str, tuple[str, ...]] = {
    "retrieval": ("tr", "ir"),
    "tr": ("tr",),
    "ir": ("ir",),
    "vqa_acc": ("vqa_acc",),
}


def number(result: dict, key: str, role: str) -> float:
    """``result[key]`` as a finite number; a damaged result.json is one clear error."""
    value = result.get(key) if isinstance(result, dict) else None
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise ValueError(f"result.json of the {role} stage: {key!r} is missing or not a finite number")
    return float(value)


def score_of(result: dict, score: str, role: str = "eval") -> float:
    """A score of an eval result: the mean of its parts in :data:`DROP_SCORES` (any other name: itself)."""
    parts = DROP_SCORES.get(score, (score,))
    return sum(number(result, key, role) for key in parts) / len(parts)


def pearson(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Pearson r; NaN when it is undefined (fewer than 2 points, a constant
    series, or a missing value). Checked here because ``statistics.correlation``
    returns 0.0 for a constant series on some Python versions."""
    xs, ys = list(xs), list(ys)
    if len(xs) < 2 or len(set(xs)) < 2 or len(set(ys)) < 2 or any(math.isnan(v) for v in (*xs, *ys)):
        return float("nan")
    try:
        return statistics.correlation(xs, ys)
    except statistics.StatisticsError:
        return float("nan")


def correlation_table(points: dict[str, dict], score: str) -> tuple[str, dict[str, float]]:
    """``points``: label -> {"metrics": overall metrics, "drop": float}. Markdown + r per metric."""
    drops = [point["drop"] for point in points.values()]
    correlations = {name: pearson([p["metrics"][name] for p in points.values()], drops) for name in METRICS}
    lines = [
        f"### Mergeability vs merge drop ({score})", "",
        "| run | " + " | ".join(METRICS) + " | drop |", "|---|" + "---:|" * (len(METRICS) + 1),
    ]
    for label, point in points.items():
        cells = [f"{point['metrics'][name]:.4g}" for name in METRICS] + [f"{point['drop']:.2f}"]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines.append("| Pearson r | " + " | ".join(f"{correlations[name]:.3f}" for name in METRICS) + " | |")
    return "\n".join(lines), correlations


def point(metrics_result: dict, merged: dict, unmerged: dict, score: str) -> dict:
    overall = metrics_result.get("overall") if isinstance(metrics_result, dict) else None
    if not isinstance(overall, dict):
        raise ValueError("result.json of the metrics stage: no 'overall' object")
    metrics = {name: number(overall, name, "metrics") for name in METRICS}
    return {"metrics": metrics, "drop": score_of(unmerged, score, "unmerged eval") - score_of(merged, score, "merged eval")}
