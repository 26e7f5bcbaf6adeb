"""PNG figures of a study (matplotlib, Agg backend: no display needed on a cluster node)."""

from __future__ import annotations

import math
from pathlib import Path

from vlcluster.plotting import panel_grid, save_figure
from vlcluster.study import views
from vlcluster.study.stats import Interval


def _value(cell: Interval | None) -> float:
    return math.nan if cell is None else cell.estimate


def _error(cells: list[Interval | None]) -> list[list[float]]:
    """Asymmetric error bars (below, above) from each cell's interval; none where there is no interval."""
    below = [c.estimate - c.low if c is not None and c.defined else math.nan for c in cells]  # NaN: no bar, no cap
    above = [c.high - c.estimate if c is not None and c.defined else math.nan for c in cells]
    return [below, above]


def _bar_note(fig, panels) -> None:
    """Say under the legend what the error bars are (replicates or one run's items)."""
    bases = {c.basis for series in panels for points in series.lines.values() for c in points.values()
             if isinstance(c, Interval) and c.defined}
    text = {"replicates": "t interval over replicates", "paired replicates": "t interval over replicates",
            "items (bootstrap)": "bootstrap over evaluation items (one run: narrower than replicates)"}
    shown = sorted({text.get(b, b) for b in bases})
    note = "Error bars: 95 % " + "; ".join(shown) if shown else "No error bars: one run per point, no per-item results"
    fig.text(0.01, 0.005, note, fontsize=7, ha="left", va="bottom", color="0.3")


def line_figure(panels: list[views.Series], title: str, path: Path, categorical: bool = False) -> Path:
    """One panel per score; one line per series label; missing points stay gaps."""
    plt, fig, axes = panel_grid(len(panels))
    for ax, series in zip(axes, panels):
        xs = sorted({x for points in series.lines.values() for x in points}, key=str if categorical else None)
        positions = list(range(len(xs))) if categorical else xs
        span = (max(positions) - min(positions)) if len(positions) > 1 else 1.0
        for index, (name, points) in enumerate(series.lines.items()):
            cells = [points.get(x) for x in xs]
            style = _series_style(index)
            # each series a little to the side: error bars of series at one x stay apart
            dodge = (index - (len(series.lines) - 1) / 2) * 0.012 * span
            ax.errorbar([x + dodge for x in positions], [_value(c) for c in cells], yerr=_error(cells), marker=style["marker"],
                        color=style["color"], capsize=3, label=name)
        if categorical:
            ax.set_xticks(positions, [str(x) for x in xs], rotation=20)
        ax.set_title(series.title, fontsize=10)
        ax.set_xlabel(series.x_label)
        ax.set_ylabel(series.title.split(" vs ")[0].split(" by ")[0])
        ax.grid(alpha=0.3)
    _figure_legend(fig, axes)
    _bar_note(fig, panels)
    return save_figure(plt, fig, title, path)


def bar_figure(panels: list[views.Series], title: str, path: Path) -> Path:
    """Grouped bars: one group per category (architecture), one bar per series label.
    A series with no score at all in a panel gets no slot there (a setting only one
    architecture has would otherwise fill every other group with n/a marks)."""
    plt, fig, axes = panel_grid(len(panels))
    names = list(dict.fromkeys(name for series in panels for name in series.lines))
    for ax, series in zip(axes, panels):
        categories = list(next(iter(series.lines.values()), {}).keys())
        shown = [name for name in names if any(v is not None for v in series.lines.get(name, {}).values())]
        width = 0.8 / max(len(shown), 1)
        for i, name in enumerate(shown):
            cells = [series.lines[name].get(c) for c in categories]
            heights = [None if cell is None else cell.estimate for cell in cells]
            positions = [j + i * width for j in range(len(categories))]
            index = names.index(name)  # the same colour (and hatch past ten series) in every panel
            style = _series_style(index)
            ax.bar(positions, [0 if h is None else h for h in heights], width, label=name, color=style["color"], hatch=style["hatch"],
                   yerr=_error(cells), capsize=3, error_kw={"elinewidth": 1})
            for x, h in zip(positions, heights):
                if h is None:  # a missing arm is marked, never drawn as a zero score
                    ax.text(x, 0, "n/a", ha="center", va="bottom", fontsize=7, rotation=90)
        ax.set_xticks([j + width * (len(shown) - 1) / 2 for j in range(len(categories))], categories, rotation=20)
        ax.set_title(series.title, fontsize=10)
        ax.set_ylabel(series.title.split(" by ")[0])
        ax.grid(alpha=0.3, axis="y")
    _figure_legend(fig, axes)
    _bar_note(fig, panels)
    return save_figure(plt, fig, title, path)


def _figure_legend(fig, axes) -> None:
    """One legend under the panels, off the data, of every series any panel drew
    (panels may show different ones)."""
    entries = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            entries.setdefault(label, handle)
    if not entries:  # nothing drawn (e.g. Table 5 of one K_seed): no legend, rather than one of no columns
        return
    fig.legend(list(entries.values()), list(entries), loc="lower center", bbox_to_anchor=(0.5, 0.025),
               ncol=min(len(entries), 3), fontsize=8, frameon=False)


def drop_figure(points: list[views.DropPoint], correlations: dict, drop_score: str, path: Path) -> Path:
    """Table 5 as scatter plots, one panel per distance: every replicate a faint point, the mean per
    K_seed with its 95 % intervals (distance and drop), a fitted line and r per merge setting.
    Settings at one K_seed only (a knob sweep) have one distance: they would stack on one x and
    say nothing about a correlation, so they stay in the table."""
    groups = views.drop_groups(points, drop_score)
    spans = {setting: {k for (s, k) in groups if s == setting} for setting, _ in groups}
    settings = sorted(setting for setting, ks in spans.items() if len(ks) > 1)
    plt, fig, axes = panel_grid(len(views.DISTANCES))
    for column, (ax, distance) in enumerate(zip(axes, views.DISTANCES)):
        fits: list[tuple[str, float]] = []
        for index, setting in enumerate(settings):
            style = _series_style(index)
            group = [p for p in points if p.arm.merge.describe() == setting and distance in p.distances]
            xs, ys = [p.distances[distance] for p in group], [p.drop for p in group]
            ax.scatter(xs, ys, color=style["color"], marker=style["marker"], alpha=0.3, s=14)
            means = [(groups[(setting, k)][1][distance], groups[(setting, k)][0]) for k in sorted(spans[setting], key=lambda k: k or 0)
                     if distance in groups[(setting, k)][1] and groups[(setting, k)][0] is not None]
            mx, my = [m[0] for m in means], [m[1] for m in means]
            ax.errorbar([c.estimate for c in mx], [c.estimate for c in my], xerr=_error(mx), yerr=_error(my), fmt=style["marker"],
                        color=style["color"], capsize=3, label=setting)
            fit = _line_fit(xs, ys)
            if fit is not None:
                slope, intercept = fit
                ends = [min(xs), max(xs)]
                ax.plot(ends, [slope * x + intercept for x in ends], linestyle="--", color=style["color"])
                fits.append((style["color"], correlations.get(setting, {}).get(distance, math.nan)))
        _r_legend(ax, fits)
        ax.set_xlabel(distance.upper() if distance != "cosine" else "cosine dissimilarity")
        if column % 2 == 0:  # one y label per row: long labels would run into the panel on the left
            ax.set_ylabel(f"merge drop ({views.label(drop_score).split(' (')[0]})")
        ax.ticklabel_format(axis="x", style="sci", scilimits=(-2, 3))  # TSSD is ~1e-4: no overlapping decimals
        ax.grid(alpha=0.3)
    _figure_legend(fig, axes)
    fig.text(0.01, 0.005, "Faint: one replicate each; solid: mean per K_seed with 95 % intervals; r over the replicate points",
             fontsize=7, ha="left", va="bottom", color="0.3")
    return save_figure(plt, fig, "Mergeability metrics vs merge drop (Table 5)", path)


def _r_legend(ax, fits: list[tuple[str, float]]) -> None:
    """Each fitted line's r in a small legend of the panel, placed where it hides no point. Its
    handles are not drawn on the axes, so the figure's shared legend does not collect them."""
    if fits:
        from matplotlib.lines import Line2D

        handles = [Line2D([], [], color=color, linestyle="--") for color, _ in fits]
        ax.legend(handles, [f"r = {r:.2f}" for _, r in fits], loc="best", fontsize=8, handlelength=1.5, framealpha=0.85)


def _series_style(index: int) -> dict:
    """Ten colours, then another marker (points) or hatch (bars): more series than
    colours stay distinguishable."""
    cycle = index // 10 % 5
    return {"color": f"C{index % 10}", "marker": "osD^v"[cycle], "hatch": ["", "//", "..", "xx", "--"][cycle]}


def _line_fit(xs: list[float], ys: list[float]) -> tuple[float, float] | None:
    """Least-squares line; None when it is undefined (fewer than 2 distinct x)."""
    if len(set(xs)) < 2:
        return None
    mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys)) / sum((x - mean_x) ** 2 for x in xs)
    return slope, mean_y - slope * mean_x

