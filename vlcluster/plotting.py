"""The figure frame every PNG of vlcluster shares: matplotlib on the Agg
backend (no display on a cluster node), a grid of panels, one write per file.

At the bottom of the package so the study's figures and a metrics stage's
figure along training draw the same way without importing each other.
"""

from __future__ import annotations

import io
import math
from pathlib import Path


def pyplot():
    """matplotlib's pyplot on the Agg backend, imported only when a figure is drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def panel_grid(count: int):
    """pyplot, a figure and ``count`` axes laid out in at most three columns."""
    plt = pyplot()
    columns = 2 if count == 4 else min(count, 3)  # four panels fill 2 x 2, not 2 x 3 with an empty slot
    rows = math.ceil(count / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(5.2 * columns, 3.9 * rows), squeeze=False)
    for extra in axes.flat[count:]:
        extra.set_visible(False)
    return plt, fig, list(axes.flat)


def save_figure(plt, fig, title: str, path: Path) -> Path:
    """Title, lay out with room for the figure legend, write ``path`` as PNG and close the figure."""
    fig.suptitle(title)
    legend_rows = max((len(legend.get_texts()) + 2) // 3 for legend in fig.legends) if fig.legends else 0
    fig.tight_layout(rect=(0, 0.03 + 0.05 * legend_rows, 1, 1))  # room for the legend and the error-bar note
    image = io.BytesIO()
    fig.savefig(image, format="png", dpi=110)
    plt.close(fig)
    path.write_bytes(image.getvalue())  # one write: works for s3:// run dirs too
    return path
