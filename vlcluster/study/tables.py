"""Markdown tables of a study: Table 1 (every arm), Table 2 (merge knobs), Table 5 (distances vs drop)."""

from __future__ import annotations

import math

from vlcluster.study import views
from vlcluster.study.lineage import Arm
from vlcluster.study.stats import Correlation, Interval

# How a cell's interval is marked: a bootstrap over items is the narrower kind (one training run).
INTERVAL_MARK = {"replicates": "", "paired replicates": "", "items (bootstrap)": " ᵇ"}


def number(value: float) -> str:
    return f"{value:.2f}" if abs(value) >= 0.01 or value == 0 else f"{value:.3g}"


def cell(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, Interval):
        if not value.defined:
            return number(value.estimate)
        return f"{number(value.estimate)} ± {number((value.high - value.low) / 2)}{INTERVAL_MARK.get(value.basis, '')}"
    if isinstance(value, Correlation):
        if math.isnan(value.r):
            return "–"
        shown = f" [{value.low:.2f}, {value.high:.2f}]" if math.isfinite(value.low) else ""
        return f"{value.r:.2f}{shown} p={value.p_value:.2g}"
    if isinstance(value, float):
        return number(value)
    return str(value)


INTERVAL_NOTE = ("Cells are mean ± half the 95 % interval: a t interval over replicates (n in the table); "
                 "ᵇ marks a single run's bootstrap over evaluation items, which leaves out run-to-run spread "
                 "and is narrower than a replicate interval would be; a bare number has no interval (one run, no items).")


def markdown(header: list[str], rows: list[list], numeric_from: int) -> str:
    rule = ["---" if i < numeric_from else "---:" for i in range(len(header))]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(rule) + "|"]
    lines += ["| " + " | ".join(cell(value) for value in row) + " |" for row in rows]
    return "\n".join(lines)


def arms_table(arms: list[Arm]) -> str:
    """Table 1 shape: every evaluated setting with where it came from and its replicates."""
    names = views.score_names(arms)
    header = ["model", "arch", "K_seed", "K_VL", "merge", "run / eval stage", "replicates", *map(views.label, names)]
    rows = []
    for (role, arch, k_seed, k_vl, merge), group in views.settings(arms).items():
        replicates = len({arm.replicate for arm in group})
        where = f"{group[0].run} / {group[0].eval_stage}" + (f" (+{len(group) - 1})" if len(group) > 1 else "")
        shown = f"{replicates} ({views.replicate_kind(group)})" if replicates > 1 else 1
        rows.append([role, arch, k_seed, k_vl, merge, where, shown, *(views.cell(group, name) for name in names)])
    return markdown(header, rows, numeric_from=7)


def series_table(series: views.Series) -> str:
    xs = sorted({x for points in series.lines.values() for x in points}, key=_sortable)
    header = [series.x_label, *series.lines]
    rows = [[x, *(series.lines[line].get(x) for line in series.lines)] for x in xs]
    return markdown(header, rows, numeric_from=1)


def drop_table(points: list[views.DropPoint], correlations: dict[str, dict[str, Correlation]], drop_score: str) -> str:
    header = ["merged model", "merge", "K_seed", *views.DISTANCES, f"drop ({views.label(drop_score)})"]
    rows = [
        [f"{p.arm.run} / {p.arm.eval_stage}", p.arm.merge.describe(), p.arm.k_seed,
         *(p.distances.get(d) for d in views.DISTANCES), p.drop]
        for p in sorted(points, key=lambda p: (p.arm.merge.describe(), p.arm.k_seed or 0))
    ]
    rows += [[f"Pearson r ({setting})", "", "", *(r[d] for d in views.DISTANCES), ""] for setting, r in correlations.items()]
    # Replicates are separate points; the interval is Fisher z, p a permutation test over the pairings.
    return markdown(header, rows, numeric_from=2)


def _sortable(x):
    return (0, x, "") if isinstance(x, (int, float)) else (1, 0, str(x))
