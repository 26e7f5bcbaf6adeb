"""PNG figures of a study (matplotlib, Agg backend: no display needed on a cluster node)."""

from __future__ import annotations

import io
import math
from pathlib import Path

from vlcluster.study import views


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _grid(count: int):
    plt = _pyplot()
    columns = min(count, 3)
    rows = math.ceil(count / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(5 * columns, 3.8 * rows), squeeze=False)
    for extra in axes.flat[count:]:
        extra.set_visible(False)
    return plt, fig, list(axes.flat)


def line_figure(panels: list[views.Series], title: str, path: Path, categorical: bool = False) -> Path:
    """One panel per score; one line per series label; missing points stay gaps."""
    plt, fig, axes = _grid(len(panels))
    for ax, series in zip(axes, panels):
        xs = sorted({x for points in series.lines.values() for x in points}, key=str if categorical else None)
        positions = list(range(len(xs))) if categorical else xs
        for name, points in series.lines.items():
            ys = [points.get(x) for x in xs]
            ax.plot(positions, [math.nan if y is None else y for y in ys], marker="o", label=name)
        if categorical:
            ax.set_xticks(positions, [str(x) for x in xs], rotation=20)
        ax.set_title(series.title, fontsize=10)
        ax.set_xlabel(series.x_label)
        ax.set_ylabel(series.title.split(" vs ")[0].split(" by ")[0])
        ax.grid(alpha=0.3)
    _figure_legend(fig, axes)
    return _save(plt, fig, title, path)


def bar_figure(panels: list[views.Series], title: str, path: Path) -> Path:
    """Grouped bars: one group per category (architecture), one bar per series label.
    A series with no score at all in a panel gets no slot there (a setting only one
    architecture has would otherwise fill every other group with n/a marks)."""
    plt, fig, axes = _grid(len(panels))
    names = list(dict.fromkeys(name for series in panels for name in series.lines))
    for ax, series in zip(axes, panels):
        categories = list(next(iter(series.lines.values()), {}).keys())
        shown = [name for name in names if any(v is not None for v in series.lines.get(name, {}).values())]
        width = 0.8 / max(len(shown), 1)
        for i, name in enumerate(shown):
            heights = [series.lines[name].get(c) for c in categories]
            positions = [j + i * width for j in range(len(categories))]
            index = names.index(name)  # the same colour (and hatch past ten series) in every panel
            style = _series_style(index)
            ax.bar(positions, [0 if h is None else h for h in heights], width, label=name, color=style["color"], hatch=style["hatch"])
            for x, h in zip(positions, heights):
                if h is None:  # a missing arm is marked, never drawn as a zero score
                    ax.text(x, 0, "n/a", ha="center", va="bottom", fontsize=7, rotation=90)
        ax.set_xticks([j + width * (len(shown) - 1) / 2 for j in range(len(categories))], categories, rotation=20)
        ax.set_title(series.title, fontsize=10)
        ax.set_ylabel(series.title.split(" by ")[0])
        ax.grid(alpha=0.3, axis="y")
    _figure_legend(fig, axes)
    return _save(plt, fig, title, path)


def _figure_legend(fig, axes) -> None:
    """One legend under the panels, off the data, of every series any panel drew
    (panels may show different ones)."""
    entries = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            entries.setdefault(label, handle)
    fig.legend(list(entries.values()), list(entries), loc="lower center", ncol=min(len(entries), 3), fontsize=8, frameon=False)


def drop_figure(points: list[views.DropPoint], correlations: dict, drop_score: str, path: Path) -> Path:
    """Table 5 as scatter plots: each distance against the merge drop, a fitted line and r per merge setting."""
    plt, fig, axes = _grid(len(views.DISTANCES))
    settings = sorted({p.arm.merge.describe() for p in points})
    for ax, distance in zip(axes, views.DISTANCES):
        for index, setting in enumerate(settings):
            style = _series_style(index)
            group = [p for p in points if p.arm.merge.describe() == setting and distance in p.distances]
            xs, ys = [p.distances[distance] for p in group], [p.drop for p in group]
            ax.scatter(xs, ys, label=setting, color=style["color"], marker=style["marker"])
            fit = _line_fit(xs, ys)
            if fit is not None:
                slope, intercept = fit
                ends = [min(xs), max(xs)]
                ax.plot(ends, [slope * x + intercept for x in ends], linestyle="--", color=style["color"])
                r = correlations.get(setting, {}).get(distance, math.nan)
                # r beside its line's right end, in its colour: the legend is shared by every panel
                ax.annotate(f"r = {r:.2f}", (ends[1], slope * ends[1] + intercept), color=style["color"],
                            fontsize=8, xytext=(4, 0), textcoords="offset points", va="center")
        ax.set_xlabel(distance.upper() if distance != "cosine" else "cosine dissimilarity")
        ax.set_ylabel(f"merge drop: {views.label(drop_score)}")
        ax.ticklabel_format(axis="x", style="sci", scilimits=(-2, 3))  # TSSD is ~1e-4: no overlapping decimals
        ax.grid(alpha=0.3)
    _figure_legend(fig, axes)
    return _save(plt, fig, "Mergeability metrics vs merge drop (Table 5)", path)


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


def _save(plt, fig, title: str, path: Path) -> Path:
    fig.suptitle(title)
    legend_rows = max((len(legend.get_texts()) + 2) // 3 for legend in fig.legends) if fig.legends else 0
    fig.tight_layout(rect=(0, 0.05 * legend_rows, 1, 1))
    image = io.BytesIO()
    fig.savefig(image, format="png", dpi=110)
    plt.close(fig)
    path.write_bytes(image.getvalue())  # one write: works for s3:// run dirs too
    return path
