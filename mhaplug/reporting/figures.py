"""The plot of :mod:`mhaplug.compare` (``--plot FILE.png``, and the picture in ``--html FILE.html``), one PNG::

    +--------------------+----------------------+---------+
    | train loss / step  | real tokens/s        | legend  |
    +--------------------+ per run, grouped by  | (keys   |
    | val loss / step    | layout, fastest first| below)  |
    +--------------------+----------------------+---------+

- colour = strategy, from the fixed :data:`STRATEGY_COLORS`: a strategy has the same colour in every plot;
- line style = layout and padding side (:data:`LINE_STYLES`);
- ``X`` markers on the curves and hatched bars = invalid runs, kept to teach (``valid: false``); faded curves and
  dotted hatching = runs that did not finish (interrupted, diverged, incomplete);
- train loss: a centred moving average over the logged steps, the raw values thin behind it.

Runs are labelled by their numbers in the table (:func:`mhaplug.reporting.tables.short_names`); the legend under the
table gives their run names. Equivalent runs compute the same losses, so their curves lie on top of each other.
Files are written atomically (a temporary file beside the target, then ``os.replace``).
"""

from __future__ import annotations

import io
import math
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from mhaplug.common import write_atomic
from mhaplug.reporting.runs import Run, read_curve
from mhaplug.reporting.tables import short_names

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = [
    "LAYOUT_ORDER",
    "LINE_STYLES",
    "STRATEGY_COLORS",
    "figure",
    "figure_png",
    "layout_label",
    "layout_side",
    "line_style",
    "moving_average",
    "plot",
    "strategy_color",
    "throughput_groups",
]

# One colour per strategy (mhaplug.attention.STRATEGIES; a test keeps them in step), fixed so that a strategy looks
# the same in every plot. Matplotlib's tab10 colours; black for the ground truth; grey is left for anything else.
STRATEGY_COLORS: dict[str, str] = {
    "auto": "#1f77b4",  # blue
    "reference": "#000000",  # black
    "torch_mha": "#d62728",  # red: what users have today
    "merged_bool": "#ff7f0e",  # orange
    "merged_additive": "#8c564b",  # brown
    "causal_kpm": "#2ca02c",  # green
    "causal_only": "#9467bd",  # purple
    "flex": "#e377c2",  # pink
}
OTHER_COLOR = "#7f7f7f"  # a strategy this table does not know
# (layout, padding side) -> matplotlib line style. Packed rows pad only at a row's end, whatever data.padding_side
# says, so packed has one style and no side (None): :func:`layout_side`.
LINE_STYLES: dict[tuple[str, str | None], str] = {
    ("padded", "right"): "-",
    ("padded", "left"): "--",
    ("packed", None): "-.",
}
OTHER_LINE_STYLE = (0, (1, 1))  # densely dotted
LAYOUT_ORDER = ("padded", "packed")  # throughput groups, top to bottom; other layouts follow by name
INVALID_HATCH, UNFINISHED_HATCH = "//", ".."
LINE_WIDTH, THIN_LINE_WIDTH = 2.4, 1.2  # valid runs; teaching runs, drawn over them
RAW_COLOR = "#c8c8c8"  # train loss before the moving average
UNFINISHED_ALPHA = 0.45


def strategy_color(strategy: str) -> str:
    """The fixed colour of ``strategy`` (:data:`STRATEGY_COLORS`), grey for a strategy not in it."""
    return STRATEGY_COLORS.get(strategy, OTHER_COLOR)


def layout_side(layout: str | None, padding_side: str | None) -> tuple[str | None, str | None]:
    """(layout, padding side) as the plot tells them apart: packed rows have no side (they pad at a row's end)."""
    return (layout, None) if layout == "packed" else (layout, padding_side)


def layout_label(layout: str | None, padding_side: str | None) -> str:
    """``padded, left``; ``packed`` alone."""
    layout, side = layout_side(layout, padding_side)
    return f"{layout}" if side is None else f"{layout}, {side}"


def line_style(layout: str, padding_side: str | None) -> str | tuple[int, tuple[int, int]]:
    """The line style of a layout and padding side (:data:`LINE_STYLES`), densely dotted for others."""
    return LINE_STYLES.get(layout_side(layout, padding_side), OTHER_LINE_STYLE)


def moving_average(values: Sequence[float], half_window: int) -> list[float]:
    """Centred moving average: the mean of ``values[i - half_window : i + half_window + 1]``, clipped at the ends
    (``half_window=0``: the values themselves). Non-finite values stay where they are and enter no mean."""
    if half_window < 0:
        raise ValueError(f"half_window must be >= 0, got {half_window!r}")
    out = []
    for i, value in enumerate(values):
        near = [v for v in values[max(0, i - half_window) : i + half_window + 1] if math.isfinite(v)]
        out.append(sum(near) / len(near) if math.isfinite(value) and near else value)
    return out


def throughput_groups(runs: Sequence[Run]) -> list[tuple[str, list[Run]]]:
    """The throughput bars, top to bottom: finished or stopped runs that report real tokens/s, grouped by layout
    (:data:`LAYOUT_ORDER`, then other layouts by name), fastest first within a group (ties by name)."""
    timed = [r for r in runs if r.complete and r.real_tokens_per_sec is not None]
    layouts = sorted(
        {r.layout for r in timed},
        key=lambda x: (LAYOUT_ORDER.index(x), "") if x in LAYOUT_ORDER else (len(LAYOUT_ORDER), x),
    )
    return [
        (
            layout,
            sorted((r for r in timed if r.layout == layout), key=lambda r: (-(r.real_tokens_per_sec or 0.0), r.name)),
        )
        for layout in layouts
    ]


def figure(
    runs: Sequence[Run],
    *,
    title: str | None = None,
    baseline: Run | None = None,
    names: Mapping[str, str] | None = None,
) -> Figure:
    """The plot as a matplotlib :class:`~matplotlib.figure.Figure` on an Agg canvas (no pyplot, no display)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names = short_names(runs) if names is None else names
    if title is None:
        title = Path(os.path.commonpath([r.path for r in runs])).name if runs else "mhaplug runs"
    groups = throughput_groups(runs)
    bar_rows = sum(len(members) + 1 for _, members in groups)
    fig = Figure(figsize=(16, max(8.0, 1.6 + 0.34 * bar_rows)), layout="constrained")
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(2, 2, width_ratios=(5, 4))
    train_ax = fig.add_subplot(grid[0, 0])
    val_ax = fig.add_subplot(grid[1, 0], sharex=train_ax)
    speed_ax = fig.add_subplot(grid[:, 1])
    smoothing = _loss_panels(runs, train_ax, val_ax)
    _throughput_panel(groups, speed_ax, baseline=baseline, names=names)
    _legend(fig, runs, smoothing=smoothing, baseline=baseline, names=names)
    fig.suptitle(title)
    return fig


def figure_png(
    runs: Sequence[Run],
    *,
    title: str | None = None,
    baseline: Run | None = None,
    names: Mapping[str, str] | None = None,
    dpi: int = 100,
) -> bytes:
    """:func:`figure` as PNG bytes."""
    buffer = io.BytesIO()
    figure(runs, title=title, baseline=baseline, names=names).savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


def plot(
    runs: Sequence[Run],
    path: str | os.PathLike[str],
    *,
    title: str | None = None,
    baseline: Run | None = None,
    names: Mapping[str, str] | None = None,
) -> Path:
    """Write :func:`figure` to ``path`` as a PNG, atomically; returns the path written."""
    return write_atomic(path, figure_png(runs, title=title, baseline=baseline, names=names))


def _unfinished(run: Run) -> bool:
    return not run.complete or run.status != "finished"


def _loss_panels(runs: Sequence[Run], train_ax: Axes, val_ax: Axes) -> int:
    """Draw train and val loss per run; returns the moving average's largest half window (0: none)."""
    # Runs of one equivalence_key compute the same losses: their curves coincide, and the last one drawn shows.
    # Valid runs first, the ground truth (reference) last of them; then the teaching runs, thinner, so that one that
    # coincides shows as a thin line inside a thick one; then unfinished runs.
    ordered = sorted(runs, key=lambda r: (_unfinished(r), not r.valid, r.strategy == "reference", r.name))
    smoothing, drawn = 0, {"train/loss": 0, "val/loss": 0}
    for r in ordered:
        if r.metrics_csv is None or not r.metrics_csv.is_file():
            if r.complete:
                warnings.warn(f"{r.name}: no metrics.csv at {r.metrics_csv or r.path}; no loss curve", stacklevel=3)
            continue
        style = {
            "linewidth": LINE_WIDTH if r.valid else THIN_LINE_WIDTH,
            "color": strategy_color(r.strategy),
            "linestyle": line_style(r.layout, r.padding_side),
            "alpha": UNFINISHED_ALPHA if _unfinished(r) else 1.0,
        }
        invalid = {"marker": "X", "markersize": 7, "markeredgewidth": 0} if not r.valid else {}
        train = read_curve(r.metrics_csvs or r.metrics_csv, "train/loss")
        if train:
            steps, losses = zip(*train)
            half = len(train) // 20  # a tenth of the run: smooths the batches' noise, keeps the shape
            smoothing = max(smoothing, half)
            if half:  # grey: the raw values of coinciding runs stack into one grey line, not a mix of colours
                train_ax.plot(steps, losses, color=RAW_COLOR, linewidth=0.6, zorder=1)
            every = max(1, len(train) // 6)
            train_ax.plot(steps, moving_average(losses, half), markevery=every, **style, **invalid)
            drawn["train/loss"] += 1
        val = read_curve(r.metrics_csvs or r.metrics_csv, "val/loss")
        if val:
            steps, losses = zip(*val)
            val_ax.plot(steps, losses, **style, **(invalid or {"marker": "o", "markersize": 3}))
            drawn["val/loss"] += 1
    train_ax.set(ylabel="train loss", title="train loss (equivalent runs coincide; teaching runs thin, on top)")
    val_ax.set(xlabel="step", ylabel="val loss", title="validation loss")
    for ax, column in ((train_ax, "train/loss"), (val_ax, "val/loss")):
        ax.grid(alpha=0.3)
        if not drawn[column]:
            ax.text(0.5, 0.5, f"no {column} in any metrics.csv", ha="center", transform=ax.transAxes)
    return smoothing


def _throughput_panel(
    groups: Sequence[tuple[str, Sequence[Run]]], ax: Axes, *, baseline: Run | None, names: Mapping[str, str]
) -> None:
    batchings = {r.batching for _, members in groups for r in members}
    labels, bold, y = [], [], 0
    fastest = max((r.real_tokens_per_sec or 0.0 for _, members in groups for r in members), default=0.0)
    base = baseline.real_tokens_per_sec if baseline is not None else None
    for layout, members in groups:
        labels.append(f"{layout or '-'} rows")
        bold.append(True)
        y += 1
        for r in members:
            tokens = r.real_tokens_per_sec or 0.0
            hatch = INVALID_HATCH if not r.valid else UNFINISHED_HATCH if _unfinished(r) else ""
            ax.barh(y, tokens, color=strategy_color(r.strategy), hatch=hatch, edgecolor="white", linewidth=0)
            text = f" {tokens:,.0f}" + (f"  {tokens / base:.2f}x" if base else "")
            ax.text(tokens, y, text, va="center", fontsize="small")
            side = r.padding_side if r.layout != "packed" else ""  # packed rows pad only at a row's end
            extra = [x for x in (side, r.batching if len(batchings) > 1 else "") if x]
            labels.append(f"{names.get(r.name, r.name)}  {r.strategy}" + (f" ({', '.join(extra)})" if extra else ""))
            bold.append(False)
            y += 1
    if not labels:
        ax.text(0.5, 0.5, "no run reports real tokens/s", ha="center", transform=ax.transAxes)
    ax.set_yticks(range(len(labels)), labels)
    for tick, is_header in zip(ax.get_yticklabels(), bold):
        if is_header:
            tick.set_fontweight("bold")
    ax.tick_params(axis="y", length=0)
    ax.set_ylim(len(labels) - 0.5, -0.5)  # first group on top
    if base:
        ax.axvline(base, color="#555555", linestyle=":", linewidth=1)
    ax.set_xlim(0, 1.3 * fastest if fastest else 1)
    ax.xaxis.set_major_formatter(lambda value, _: f"{value / 1000:g}k")
    ax.grid(axis="x", alpha=0.3)
    ax.set(xlabel="real tokens/s (padding excluded)", title="throughput, by layout, fastest first")
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)


def _legend(
    fig: Figure, runs: Sequence[Run], *, smoothing: int, baseline: Run | None, names: Mapping[str, str]
) -> None:
    from matplotlib.legend_handler import HandlerTuple
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    handles: list[object] = []
    labels: list[str] = []
    headers: set[int] = set()

    def section(title: str) -> None:
        headers.add(len(labels))
        handles.append(Line2D([], [], linestyle="none"))
        labels.append(title)

    strategies = {r.strategy for r in runs if r.strategy}
    section("strategy (colour)")
    for strategy in [s for s in STRATEGY_COLORS if s in strategies] + sorted(strategies - set(STRATEGY_COLORS)):
        handles.append(Patch(color=strategy_color(strategy)))
        labels.append(strategy)
    pairs = {layout_side(r.layout, r.padding_side) for r in runs if r.layout}
    section("layout, padding (line)")
    others = sorted(pairs - set(LINE_STYLES), key=lambda p: (str(p[0]), str(p[1])))
    for layout, side in [p for p in LINE_STYLES if p in pairs] + others:
        handles.append(Line2D([], [], color="#444444", linestyle=line_style(layout, side), linewidth=LINE_WIDTH))
        labels.append(layout_label(layout, side))
    section("runs")
    if any(not r.valid for r in runs):
        marker = Line2D([], [], color="#444444", marker="X", markersize=8, linestyle="none")
        hatched = Patch(facecolor="#888888", hatch=INVALID_HATCH, edgecolor="white", linewidth=0)
        handles.append((marker, hatched))
        labels.append("invalid, kept to teach\n(valid: false)")
    if any(_unfinished(r) for r in runs):
        faded = Line2D([], [], color="#444444", alpha=UNFINISHED_ALPHA, linewidth=LINE_WIDTH)
        dotted = Patch(facecolor="#888888", hatch=UNFINISHED_HATCH, edgecolor="white", linewidth=0)
        handles.append((faded, dotted))
        labels.append("not finished (interrupted,\ndiverged, incomplete)")
    if smoothing:
        handles.append(
            (Line2D([], [], color=RAW_COLOR, linewidth=0.6), Line2D([], [], color="#444444", linewidth=LINE_WIDTH))
        )
        labels.append(f"train loss: raw, and mean\nof {2 * smoothing + 1} logged steps")
    if baseline is not None:
        handles.append(Line2D([], [], color="#555555", linestyle=":", linewidth=1))
        labels.append(f"speed-up 1.00x: run {names.get(baseline.name, baseline.name)}")
    legend = fig.legend(
        handles,
        labels,
        loc="outside right upper",
        handler_map={tuple: HandlerTuple(ndivide=None)},
        handlelength=3.2,  # long enough to tell a dash-dot line from a dashed one
        frameon=False,
    )
    for i, text in enumerate(legend.get_texts()):
        if i in headers:
            text.set_fontweight("bold")
