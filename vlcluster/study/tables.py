"""Markdown tables of a study: Table 1 (every arm), Table 2 (merge knobs), Table 5 (distances vs drop)."""

from __future__ import annotations

import math

from vlcluster.study import views
from vlcluster.study.lineage import Arm


def cell(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, float):
        return f"{value:.2f}" if abs(value) >= 0.01 or value == 0 else f"{value:.3g}"
    return str(value)


def markdown(header: list[str], rows: list[list], numeric_from: int) -> str:
    rule = ["---" if i < numeric_from else "---:" for i in range(len(header))]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(rule) + "|"]
    lines += ["| " + " | ".join(cell(value) for value in row) + " |" for row in rows]
    return "\n".join(lines)


def arms_table(arms: list[Arm]) -> str:
    """Table 1 shape: every evaluated model with where it came from."""
    names = views.score_names(arms)
    header = ["model", "arch", "K_seed", "K_VL", "merge", "run / eval stage", *map(views.label, names)]
    rows = [
        [arm.role, arm.arch, arm.k_seed, arm.k_vl, arm.merge.describe() if arm.merge else None,
         f"{arm.run} / {arm.eval_stage}", *(arm.scores.get(name) for name in names)]
        for arm in views.table1_order(arms)
    ]
    return markdown(header, rows, numeric_from=6)


def series_table(series: views.Series) -> str:
    xs = sorted({x for points in series.lines.values() for x in points}, key=_sortable)
    header = [series.x_label, *series.lines]
    rows = [[x, *(series.lines[line].get(x) for line in series.lines)] for x in xs]
    return markdown(header, rows, numeric_from=1)


def drop_table(points: list[views.DropPoint], correlations: dict[str, dict[str, float]], drop_score: str) -> str:
    header = ["merged model", "merge", "K_seed", *views.DISTANCES, f"drop ({views.label(drop_score)})"]
    rows = [
        [f"{p.arm.run} / {p.arm.eval_stage}", p.arm.merge.describe(), p.arm.k_seed,
         *(p.distances.get(d) for d in views.DISTANCES), p.drop]
        for p in sorted(points, key=lambda p: (p.arm.merge.describe(), p.arm.k_seed or 0))
    ]
    rows += [[f"Pearson r ({setting})", "", "", *(r[d] for d in views.DISTANCES), ""] for setting, r in correlations.items()]
    return markdown(header, rows, numeric_from=2)


def _sortable(x):
    return (0, x, "") if isinstance(x, (int, float)) else (1, 0, str(x))
