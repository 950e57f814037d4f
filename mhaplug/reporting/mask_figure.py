"""The figure of :mod:`mhaplug.show`: one column per layout, one row per mask, a cell grid per panel.

:class:`Grid` holds the cells one panel plots and :func:`draw` plots nothing else. Colour says what a cell means
for the kernel (the query in the row may use the key in the column, or not); the text in a cell is the value the
tensor holds there, so the polarity of each API shows: ``T`` is grey (masked) in the MHA masks and blue (attends)
in SDPA's keep mask. matplotlib's object API (``Figure`` + Agg canvas): no pyplot state.
"""

from __future__ import annotations

import math
import os
import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from mhaplug.common import atomic_path

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = [
    "COLOURS",
    "DPI",
    "KERNEL_PANELS",
    "MAX_LENGTH",
    "NAN",
    "PANELS",
    "ROW_TITLES",
    "WIDTH",
    "ZEROED",
    "Grid",
    "Section",
    "cell_colours",
    "check_out",
    "draw",
    "figure_size",
    "row_heights",
    "write_png",
]

KERNEL_PANELS = ("torch_mha", "merged_bool", "merged_additive", "causal_kpm", "causal_only", "flex")
PANELS = ("key_padding_mask", "attn_mask", *KERNEL_PANELS)  # the figure's rows, top to bottom
ZEROED, NAN = "\u21920", "NaN"  # written after a query row with no key: mhaplug's output there (->0), torch's
DPI = 100
WIDTH = 11.0  # inches: 1100 px; at README width (~900 px) a cell is still 12 px and its text legible
COLOURS = {"attends": "#2c7fb8", "masked": "#d4d4d4", "flag": "#efefef", "opened": "#fdae6b"}
TEXT = {"attends": "white", "masked": "#505050", "flag": "#909090", "opened": "#7f2704"}
ROW_TITLES = {
    "key_padding_mask": "key_padding_mask (B, S), bool: True = pad, ignored as a key by every query",
    "attn_mask": "attn_mask (L, S), bool, the MHA argument: True = the query (row) may NOT attend the key (column)",
    "torch_mha": "nn.MultiheadAttention merges both into one float (B*H, L, S) mask for SDPA: the union of 'masked' "
    "(-inf)",
    "merged_bool": "merged_bool -> SDPA: one bool keep mask (B, 1, L, S): True = MAY attend (the opposite of MHA's "
    "True)",
    "merged_additive": "merged_additive -> SDPA: one float mask (B, 1, L, S), added to the scores: 0 = attend, "
    "-inf = masked",
    "causal_kpm": "causal_kpm -> SDPA is_causal=True + a (B, 1, 1, S) keep vector (drawn on top): no (L, S) tensor",
    "causal_only": "causal_only -> SDPA is_causal=True alone: no padding mask (correct with right padding only)",
    "flex": "flex -> FlexAttention BlockMask from mask_mod(b, h, q, kv) (True = may attend), evaluated on every cell",
}
LEGEND = {
    "attends": "attends: the query (row) uses the key (column)",
    "masked": "masked by a mask tensor",
    "flag": "masked by is_causal=True (a flag: no tensor)",
    "opened": "query with no key, opened for the kernel only (no NaN); its output is set to 0",
}
READING = (
    "Cell text: the value the tensor holds (T / F, 0 / -inf); no text: no tensor there.   "
    f"{ZEROED}: mhaplug sets that query's output to 0.   {NAN}: torch's output for a query with no key "
    "(need_weights=True)."
)


@dataclass(frozen=True)
class Grid:
    """The cells of one panel, as :func:`draw` plots them: rows are queries (batch rows in the padding panel),
    columns are keys.

    Attributes:
        caption: this panel's own note (its row of the figure says what the mask is).
        attends: (R, C) bool, True where the kernel may use the key for the query: the cell colour.
        values: (R, C) the tensor the code holds (bool or float), written in the cells; None where there is no
            such tensor (``is_causal=True`` is a flag).
        flag_masked: (R, C) bool, masked by the ``is_causal=True`` flag (no tensor), or None.
        vector: (C,) the keep vector handed with ``is_causal`` (this row of the (B, 1, 1, S) mask), drawn on top.
        marked_rows: (R,) bool, queries that may attend no key: ``mark`` is written after them; or None.
        mark: :data:`ZEROED` (mhaplug sets their output to 0) or :data:`NAN` (torch's, with ``need_weights=True``).
        refused: the error raised instead; the panel shows it and no cells.
        boundaries: positions where a document (or the padding of a packed row) starts, drawn as lines.
    """

    caption: str
    attends: Tensor | None = None
    values: Tensor | None = None
    flag_masked: Tensor | None = None
    vector: Tensor | None = None
    marked_rows: Tensor | None = None
    mark: str = ""
    refused: str | None = None
    boundaries: tuple[int, ...] = ()

    @property
    def opened(self) -> Tensor | None:
        """(R, C) cells the kernel sees unmasked only so that it computes no NaN (the row's output is set to 0)."""
        if self.attends is None or self.marked_rows is None or self.mark != ZEROED:
            return None
        return self.attends & self.marked_rows[:, None]


@dataclass(frozen=True)
class Section:
    """One layout's column of the figure: its name, its batch, the row b its (L, S) panels show, the token text
    (B, L) for the axes (None: positions), the panels by :data:`PANELS` name, and what ``auto`` dispatched to."""

    name: str
    batch: Mapping[str, Any]
    row: int
    tokens: list[list[str]] | None
    grids: dict[str, Grid]
    auto_dispatch: str | None


def _cell(length: int) -> float:
    return min(0.15, 2.4 / max(length, 1))  # inches


# The longest row the figure draws: its cells are 2.4 / 32 inches, 7.5 px, as high as their 5.5 pt text. Past it the
# text cannot be read, and the figure still writes one per cell (7 panels x 3 layouts x L x L: L = 160 took 71 s).
MAX_LENGTH = 32


def row_heights(batch_size: int, length: int, panels: Sequence[str] = PANELS) -> list[float]:
    """Inches of each figure row: the header, then one per panel row (the (B, S) padding panel is short; the
    attn_mask row carries the key tokens on top; causal_kpm has its keep vector and a gap above the grid)."""
    cell = _cell(length)
    heights = [1.3]
    for panel in panels:
        if panel == "key_padding_mask":
            heights.append(1.05 + cell * batch_size)
        else:
            heights.append(0.5 + cell * length + {"attn_mask": 0.5, "causal_kpm": 2 * cell}.get(panel, 0.0))
    return heights


def figure_size(batch_size: int, length: int, panels: Sequence[str] = PANELS) -> tuple[float, float]:
    """(width, height) in inches of the figure for B rows of L tokens; times :data:`DPI`, its PNG's pixels."""
    return WIDTH, round(sum(row_heights(batch_size, length, panels)), 2)


def draw(
    sections: Sequence[Section], *, title: str | None = None, highlight: Mapping[str, str] | None = None
) -> Figure:
    """The figure of ``sections``, one column each, one row per :data:`PANELS` entry.

    ``title``: a line under the heading (the data and settings). ``highlight``: ``column`` (a section name) and
    ``strategy`` (a panel row) to mark as the configured ones.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # Agg: no display, no pyplot global state
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    if not sections:
        raise ValueError("sections is empty; give at least one mhaplug.reporting.mask_figure.Section")
    highlight = dict(highlight or {})
    batch_size = max(s.batch["key_padding_mask"].shape[0] for s in sections)
    length = max(s.batch["key_padding_mask"].shape[1] for s in sections)
    fig = Figure(figsize=figure_size(batch_size, length), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    header, *rows = fig.subfigures(len(PANELS) + 1, 1, height_ratios=row_heights(batch_size, length))
    header.suptitle(
        "What reaches attention: key_padding_mask vs attn_mask, and what each mask strategy hands its kernel",
        fontsize=11,
        fontweight="bold",
    )
    if title:
        header.text(0.5, 0.7, title, ha="center", va="center", fontsize=8, color="#404040")
    handles = [Patch(facecolor=COLOURS[k], edgecolor="#999999", label=LEGEND[k]) for k in LEGEND]
    header.legend(handles=handles, loc="center", ncols=2, fontsize=7.5, frameon=False, bbox_to_anchor=(0.5, 0.4))
    header.text(0.5, 0.06, READING, ha="center", va="center", fontsize=7, color="#404040")
    for panel, subfig in zip(PANELS, rows):
        configured = panel == highlight.get("strategy")
        subfig.suptitle(
            ROW_TITLES[panel] + ("   [the configured strategy]" if configured else ""),
            fontsize=8.5,
            fontweight="bold" if configured else "normal",
            x=0.01,
            ha="left",
        )
        for ax, sec in zip(subfig.subplots(1, len(sections), squeeze=False)[0], sections):
            if panel == "key_padding_mask":
                _draw_padding(ax, sec, configured=sec.name == highlight.get("column"))
            else:
                tokens = sec.tokens[sec.row] if sec.tokens else None
                _draw_grid(ax, sec.grids[panel], tokens, key_labels=panel == "attn_mask")
    return fig


def cell_colours(grid: Grid) -> Tensor:
    """(R, C, 3) RGB in [0, 1] of ``grid``'s cells: attends, masked, masked by the causal flag, or opened."""
    from matplotlib.colors import to_rgb

    if grid.attends is None:
        raise ValueError("a refused panel has no cells")
    kind = torch.zeros(grid.attends.shape, dtype=torch.long)  # 0: masked
    if grid.flag_masked is not None:
        kind[grid.flag_masked & ~grid.attends] = 1
    kind[grid.attends] = 2
    if grid.opened is not None:
        kind[grid.opened] = 3
    palette = torch.tensor([to_rgb(COLOURS[k]) for k in ("masked", "flag", "attends", "opened")])
    return palette[kind]


def _text(value: bool | float) -> str:
    if isinstance(value, bool):
        return "T" if value else "F"
    return "\u2212\u221e" if value == -math.inf else f"{value:g}"  # the minus sign and infinity: -inf


def _write_cells(ax: Axes, grid: Grid, top: int = 0) -> None:
    """Each cell's value as text, coloured to read on its cell."""
    if grid.values is None or grid.attends is None:
        return
    opened = grid.opened
    for (r, c), value in zip(
        torch.cartesian_prod(*map(torch.arange, grid.values.shape)).tolist(), grid.values.flatten().tolist()
    ):
        kind = "opened" if opened is not None and opened[r, c] else "attends" if grid.attends[r, c] else "masked"
        # in_layout=False: thousands of texts that the constrained layout need not measure
        ax.text(c, r + top, _text(value), ha="center", va="center", fontsize=5.5, color=TEXT[kind], in_layout=False)


def _cell_lines(ax: Axes, rows: int, cols: int) -> None:
    ax.hlines([r - 0.5 for r in range(rows + 1)], -0.5, cols - 0.5, color="white", linewidth=0.6)
    ax.vlines([c - 0.5 for c in range(cols + 1)], -0.5, rows - 0.5, color="white", linewidth=0.6)
    ax.tick_params(length=0, pad=1.5)
    for spine in ax.spines.values():
        spine.set_visible(False)


def _draw_padding(ax: Axes, sec: Section, *, configured: bool) -> None:
    grid = sec.grids["key_padding_mask"]
    assert grid.attends is not None
    batch_size, length = grid.attends.shape
    ax.imshow(cell_colours(grid).numpy(), interpolation="nearest", aspect="equal")
    _write_cells(ax, grid)
    _cell_lines(ax, batch_size, length)
    ax.set_yticks(range(batch_size), [f"b={b}" for b in range(batch_size)], fontsize=6)
    ax.set_xticks(range(length), [str(s) for s in range(length)], fontsize=5.5)
    ax.add_patch(_rectangle((-0.5, sec.row - 0.5), length, 1))
    if "document_ids" in sec.batch:  # a bar where each document starts
        ids = sec.batch["document_ids"]
        starts = torch.nonzero((ids[:, 1:] != ids[:, :-1]) & (ids[:, 1:] >= 0)).tolist()
        for b, s in starts:
            ax.plot([s + 0.5, s + 0.5], [b - 0.5, b + 0.5], color="black", linewidth=1.4)
    ax.set_title(sec.name + ("  (configured)" if configured else ""), fontsize=9.5, fontweight="bold", pad=13)
    ax.annotate(grid.caption, (0.5, 1.0), xycoords="axes fraction", xytext=(0, 3), textcoords="offset points",
                ha="center", va="bottom", fontsize=6.5)  # fmt: skip


def _rectangle(xy: tuple[float, float], width: float, height: float) -> Any:
    from matplotlib.patches import Rectangle

    return Rectangle(xy, width, height, fill=False, edgecolor="black", linewidth=1.3)


def _draw_grid(ax: Axes, grid: Grid, tokens: list[str] | None, *, key_labels: bool) -> None:
    if grid.refused is not None:
        ax.axis("off")
        ax.text(0.5, 0.5, textwrap.fill(grid.refused, 44), ha="center", va="center", fontsize=6.5,
                color="#a50f15", transform=ax.transAxes)  # fmt: skip
        return
    assert grid.attends is not None
    length = grid.attends.shape[1]
    rgb, top = cell_colours(grid), 0
    if grid.vector is not None:  # the keep vector in a row of its own, a blank row under it
        vector = Grid("", grid.vector[None], grid.vector[None])
        rgb, top = torch.cat([cell_colours(vector), torch.ones(1, length, 3), rgb]), 2
        _write_cells(ax, vector)
    ax.imshow(rgb.numpy(), interpolation="nearest", aspect="equal")
    _write_cells(ax, grid, top)
    _cell_lines(ax, grid.attends.shape[0] + top, length)
    labels = tokens or [str(i) for i in range(length)]
    ax.set_yticks(range(top + len(labels)), (["keep vector", ""] if top else []) + labels, fontsize=5.5)
    if key_labels:  # keys are labelled once, on top of the first (L, S) row: every panel below lines up with it
        ax.set_xticks(range(length), labels, fontsize=5.5, rotation=90)
        ax.xaxis.tick_top()
    else:
        ax.set_xticks([])
    if grid.marked_rows is not None:
        colour = "#a50f15" if grid.mark == NAN else TEXT["opened"]
        for r in torch.nonzero(grid.marked_rows).flatten().tolist():
            ax.text(length - 0.2, r + top, grid.mark, ha="left", va="center", fontsize=5.5, color=colour, clip_on=False)
    for p in grid.boundaries:  # document blocks
        ax.plot([p - 0.5, p - 0.5], [top - 0.5, top + length - 0.5], color="black", linewidth=1.0)
        ax.plot([-0.5, length - 0.5], [top + p - 0.5, top + p - 0.5], color="black", linewidth=1.0)
    ax.set_xlim(-0.5, length - 0.5)
    ax.set_ylim(top + length - 0.5, -0.5)
    ax.set_title(grid.caption, fontsize=6.5, pad=2)


def check_out(out: str | os.PathLike[str]) -> Path:
    """``out`` as a path a PNG can be written to (its folder exists, it is not a folder), or a ValueError naming it."""
    path = Path(out)
    if path.is_dir():
        raise ValueError(f"--out {str(out)!r} is a directory; give a file name such as {str(path / 'masks.png')!r}")
    if not path.parent.is_dir():
        raise ValueError(f"--out {str(out)!r}: the folder {str(path.parent)!r} does not exist")
    return path


def write_png(figure: Figure, out: str | os.PathLike[str]) -> Path:
    """Save ``figure`` as a PNG at ``out``, atomically (a temporary file in the same folder, then ``os.replace``):
    a reader never sees half a picture. Return the path."""
    import numpy as np
    from PIL import Image  # a dependency of matplotlib's

    path = check_out(out)
    figure.canvas.draw()
    # A palette of 64 colours, no dithering: the figure is flat colours and text, and the PNG is a quarter of the
    # RGBA one with no visible change.
    image = Image.fromarray(np.asarray(figure.canvas.buffer_rgba())).convert("RGB")
    image = image.quantize(colors=64, method=Image.Quantize.FASTOCTREE, dither=Image.Dither.NONE)
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG", optimize=True)
    return path
