"""Benchmark charts: where time-to-ready goes per mode and image, and how it grows.

The suite's chart (`stacked_bars`): a table of medians hides the one thing a reader
of the README wants to see at a glance: how much of a start is waiting for the image
(pull) and how much is the application itself (start), and how far each mode is from
what the link physically allows. Each image gets its own panel (their scales differ by
an order of magnitude) with one stacked bar per mode and the physical limit drawn
across it. A further row of panels can follow (the suite's new-version scenario: one
panel per image version).

The scale-up benchmark's chart (`lines_with_ranges`): seconds until every container
is ready against how many were started together, one line per mode, so the slope (how
a mode copes with a crowd) is what the eye sees.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

PULL_COLOR = "#4c72b0"
START_COLOR = "#dd8452"
LIMIT_COLOR = "#2ca02c"


@dataclass(frozen=True)
class Bar:
    """One mode of one image: median seconds until the pull returned, and until ready."""

    mode: str
    pull_seconds: float
    ready_seconds: float


@dataclass(frozen=True)
class Panel:
    """One image: its bars, and the physical limit (None when it could not be computed)."""

    image: str
    bars: Sequence[Bar]
    limit_seconds: float | None


def stacked_bars(rows: Sequence[Sequence[Panel]], path: Path, title: str) -> Path:
    """Draw each row of panels side by side, rows one below the other, into a PNG at
    ``path``; returns ``path``.

    The start segment is ready minus pull: for lazy modes the pull returns early and the
    application's start absorbs the fetching, which is exactly the shift to show.
    """
    rows = [row for row in rows if row]
    if not rows:
        raise ValueError("nothing to draw")
    plt = _pyplot()
    columns = max(len(row) for row in rows)
    width = max(4.0, 2.2 + 0.75 * max(len(p.bars) for row in rows for p in row))
    figure, axes = plt.subplots(
        len(rows),
        columns,
        figsize=(width * columns, 4.8 * len(rows)),
        squeeze=False,
        constrained_layout=True,
    )
    for axes_row, row in zip(axes, rows, strict=True):
        for axis, panel in zip(axes_row, row, strict=False):
            _draw_panel(axis, panel)
        for axis in axes_row[len(row) :]:
            axis.set_visible(False)
        axes_row[0].set_ylabel("seconds (median)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="outside lower center", ncols=3, frameon=False)
    figure.suptitle(title, fontsize=10)
    return _save(figure, path)


def _pyplot() -> Any:
    """matplotlib's pyplot on the Agg backend (no display on a node or in CI).

    Imported here, not at the top: `accelctl` imports this module, and every other
    command of it would pay the second matplotlib takes to load.
    """
    import matplotlib

    matplotlib.use("Agg")  # must precede pyplot
    import matplotlib.pyplot as plt

    return plt


def _save(figure: Figure, path: Path) -> Path:
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def _draw_panel(axis: Axes, panel: Panel) -> None:
    positions = range(len(panel.bars))
    pulls = [bar.pull_seconds for bar in panel.bars]
    starts = [max(0.0, bar.ready_seconds - bar.pull_seconds) for bar in panel.bars]
    axis.bar(positions, pulls, color=PULL_COLOR, label="pull")
    axis.bar(positions, starts, bottom=pulls, color=START_COLOR, label="start (until ready)")
    for x, bar in zip(positions, panel.bars, strict=True):
        axis.annotate(
            f"{bar.ready_seconds:.1f}",
            (x, bar.ready_seconds),
            ha="center",
            va="bottom",
            fontsize=8,
            xytext=(0, 2),
            textcoords="offset points",
        )
    if panel.limit_seconds is not None:
        axis.axhline(
            panel.limit_seconds,
            color=LIMIT_COLOR,
            linestyle="--",
            linewidth=1,
            label="physical limit",
        )
    axis.set_xticks(list(positions), [bar.mode for bar in panel.bars], rotation=35, ha="right")
    axis.set_title(panel.image, fontsize=10)
    axis.margins(y=0.12)


@dataclass(frozen=True)
class Point:
    """One x of a line: the median y and the range the repetitions spread over."""

    x: float
    y: float
    low: float
    high: float


@dataclass(frozen=True)
class Line:
    """One mode's curve."""

    label: str
    points: Sequence[Point]


def lines_with_ranges(
    lines: Sequence[Line], path: Path, title: str, x_label: str, y_label: str
) -> Path:
    """Medians joined by lines, min-max as error bars, one line per label; a PNG at
    ``path``. For a figure that grows with a parameter (seconds to ready against the
    number of containers started), where the slope is the point."""
    if not any(line.points for line in lines):
        raise ValueError("nothing to draw")
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(6.4, 4.4), constrained_layout=True)
    for line in lines:
        points = sorted(line.points, key=lambda point: point.x)
        if not points:
            continue
        xs = [point.x for point in points]
        ys = [point.y for point in points]
        spread = [
            [point.y - point.low for point in points],
            [point.high - point.y for point in points],
        ]
        axis.errorbar(xs, ys, yerr=spread, marker="o", capsize=3, label=line.label)
        for point in points:
            axis.annotate(
                f"{point.y:.1f}",
                (point.x, point.y),
                fontsize=8,
                xytext=(4, 4),
                textcoords="offset points",
            )
    xs = sorted({point.x for line in lines for point in line.points})
    axis.set_xticks(xs, [f"{x:g}" for x in xs])
    axis.set_xlabel(x_label)
    axis.set_ylabel(y_label)
    axis.set_ylim(bottom=0)
    axis.margins(x=0.1)
    axis.grid(alpha=0.3)
    axis.legend(frameon=False)
    axis.set_title(title, fontsize=10)
    return _save(figure, path)
