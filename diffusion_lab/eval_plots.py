"""dlab-eval's figures: a panel per score (FID, accuracy, each spatial fidelity) against a swept value, or
a heat-map per score over a grid of two swept values, saved and handed to the run's image loggers."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from diffusion_lab.metrics.spatial_fidelity import SCORES
from diffusion_lab.utils.plots import plt


def panels(row: dict) -> tuple:
    """(figure, {score: axis}): a panel per score a row holds: FID, accuracy, each spatial fidelity."""
    names = ["fid", "accuracy", *(name for name in SCORES.values() if name in row)]
    fig, axes = plt.subplots(1, len(names), figsize=(4.5 * len(names), 3.5), squeeze=False)
    return fig, dict(zip(names, axes[0], strict=True))


def line_panels(series: dict[str, tuple], floors: dict, **axis):
    """(figure, {score: axis}): a panel per score, a line per `series` label -> (xs, rows), `floors`
    (score -> real-data value) dashed; `axis` (xlabel, title, ...) set on every panel."""
    fig, axes = panels(next(iter(series.values()))[1][0])
    for name, ax in axes.items():
        for label, (xs, rows) in series.items():
            ax.plot(xs, [r[name] for r in rows], "o-", label=label)
        if name in floors:
            ax.axhline(floors[name], color="grey", ls="--", label="real data")
        ax.set(ylabel=name, yscale="log" if name == "fid" else "linear", **axis)
        if name in ("accuracy", "stroke_f1", "region_iou"):  # in [0, 1], unlike FID and the PSNRs
            ax.set_ylim(0, 1.02)
    axes["fid"].legend()
    return fig, axes


def _tick(value) -> str:
    return f"{value:g}" if isinstance(value, int | float) else str(value)


def plot_heatmaps(scales: list[dict], rows: list[dict], floors: dict, n: int, suffix: str = " guidance"):
    """A heat-map per score over a grid of two swept values (two conditions' scales; EMA length × guidance),
    each cell's value written in it; an axis is labelled by its key and `suffix`."""
    across, up = scales[0]
    xs, ys = (list(dict.fromkeys(s[name] for s in scales)) for name in (across, up))  # in the order given
    fig, axes = panels(rows[0])
    for name, ax in axes.items():
        grid = np.full((len(ys), len(xs)), np.nan)
        for scale, row in zip(scales, rows, strict=True):
            grid[ys.index(scale[up]), xs.index(scale[across])] = row[name]
        ax.imshow(grid, origin="lower", cmap="viridis", aspect="auto")
        middle = np.nanmean(grid)
        for (i, j), value in np.ndenumerate(grid):
            ax.text(j, i, f"{value:.3g}", ha="center", va="center", color="k" if value > middle else "w")
        floor = f", real data {floors[name]:.3g}" if name in floors else ""
        ax.set(title=f"{name} (N = {n}{floor})", xlabel=f"{across}{suffix}", ylabel=f"{up}{suffix}",
               xticks=range(len(xs)), xticklabels=[_tick(x) for x in xs],
               yticks=range(len(ys)), yticklabels=[_tick(y) for y in ys])  # fmt: skip
    return fig


def save_figure(fig, path: Path, loggers) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    for logger in loggers:  # image loggers get the plot too; CSV keeps the numbers
        if hasattr(logger, "log_image"):
            logger.log_image(f"eval/{path.stem}", images=[str(path)])
        elif hasattr(logger.experiment, "add_figure"):
            logger.experiment.add_figure(f"eval/{path.stem}", fig, close=False)
    plt.close(fig)  # after the loggers: TensorBoard renders the figure itself
