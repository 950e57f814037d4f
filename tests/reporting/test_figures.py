"""mhaplug.reporting.figures: the plot's fixed colours and line styles, the throughput bars' order and labels, the
legend outside the axes, and the one-file HTML page; run folders written by tests/reporting/conftest.py's fixtures."""

from __future__ import annotations

import base64
import math
import re
from collections.abc import Callable
from pathlib import Path

import pytest
from matplotlib.colors import to_hex

from mhaplug import compare
from mhaplug.attention import STRATEGIES
from mhaplug.reporting import figures
from mhaplug.reporting.runs import choose_baseline, load_runs
from mhaplug.reporting.tables import short_names

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Bars top to bottom for the committed ablation: padded rows, then packed rows, fastest first in each; run numbers
# are the table's (tests/reporting/test_compare.py prints the legend).
ABLATION_BARS = [
    ("padded", ["6", "12", "3", "7", "5", "4", "10", "16", "13", "2", "9", "15", "18", "19"]),
    ("packed", ["8", "1", "11", "14", "17"]),
]


def test_each_strategy_has_one_fixed_colour() -> None:
    assert figures.STRATEGY_COLORS == {
        "auto": "#1f77b4",
        "reference": "#000000",
        "torch_mha": "#d62728",
        "merged_bool": "#ff7f0e",
        "merged_additive": "#8c564b",
        "causal_kpm": "#2ca02c",
        "causal_only": "#9467bd",
        "flex": "#e377c2",
    }
    assert sorted(figures.STRATEGY_COLORS) == sorted(STRATEGIES)  # every strategy, no other
    colours = [figures.strategy_color(s) for s in STRATEGIES]
    assert len(set(colours)) == len(STRATEGIES) == 8
    assert figures.strategy_color("my_new_strategy") == figures.OTHER_COLOR == "#7f7f7f"
    assert figures.OTHER_COLOR not in colours


def test_each_layout_and_padding_side_has_one_line_style() -> None:
    assert figures.LINE_STYLES == {
        ("padded", "right"): "-",
        ("padded", "left"): "--",
        ("packed", None): "-.",  # packed rows pad at a row's end, whatever data.padding_side says
    }
    assert figures.line_style("padded", "left") == "--"
    assert figures.line_style("packed", "right") == figures.line_style("packed", "left") == "-."
    assert figures.layout_label("packed", "right") == "packed"
    assert figures.layout_label("padded", "left") == "padded, left"
    assert figures.line_style("jagged", "right") == figures.OTHER_LINE_STYLE == (0, (1, 1))


def test_moving_average() -> None:
    assert figures.moving_average([1.0, 2.0, 3.0, 4.0, 10.0], 1) == [1.5, 2.0, 3.0, pytest.approx(17 / 3), 7.0]
    assert figures.moving_average([1.0, 2.0, 3.0], 0) == [1.0, 2.0, 3.0]
    smoothed = figures.moving_average([1.0, math.nan, 3.0], 1)  # NaN stays where it is, and enters no mean
    assert smoothed[0] == 1.0 and math.isnan(smoothed[1]) and smoothed[2] == 3.0
    with pytest.raises(ValueError, match="half_window must be >= 0, got -1"):
        figures.moving_average([1.0], -1)


def test_throughput_bars_are_grouped_by_layout_then_sorted(
    make_run: Callable[..., Path], make_ablation: Callable[[Path], Path], tmp_path: Path
) -> None:
    make_ablation(tmp_path)
    # Named to sort after the ablation's runs (20, 21, 22), which keep their numbers.
    make_run(tmp_path, "27", summary=False, hydra_overrides=["trainer.max_steps=5"])  # incomplete: no bar
    make_run(tmp_path, "28", tokens=None, key="x", run_name="trainer.seed=1")  # finished without tokens/s: no bar
    make_run(tmp_path, "29", tokens=99_000.0, key="y", run_name="trainer.seed=2", layout="jagged")  # last group
    runs = load_runs(tmp_path)
    names = short_names(runs)
    groups = [(layout, [names[r.name] for r in members]) for layout, members in figures.throughput_groups(runs)]
    assert groups == [*ABLATION_BARS, ("jagged", ["22"])]

    # The labels: the table's run number, the strategy and, for padded rows, the padding side; layouts as headers.
    fig = figures.figure([r for r in runs if r.layout != "jagged"])
    speed_ax = fig.axes[2]
    assert [t.get_text() for t in speed_ax.get_yticklabels()] == [
        "padded rows",
        "6  causal_only (left)",
        "12  merged_bool (left)",
        "3  auto (right)",
        "7  causal_only (right)",
        "5  causal_kpm (right)",
        "4  causal_kpm (left)",
        "10  merged_additive (right)",
        "16  reference (right)",
        "13  merged_bool (right)",
        "2  auto (left)",
        "9  merged_additive (left)",
        "15  reference (left)",
        "18  torch_mha (left)",
        "19  torch_mha (right)",
        "packed rows",
        "8  merged_additive",
        "1  auto",
        "11  merged_bool",
        "14  reference",
        "17  torch_mha",
    ]
    bars = speed_ax.patches  # hatched: the invalid runs 6, 18 and 17, in bar order
    assert [bar.get_hatch() or "" for bar in bars] == ["//", *[""] * 11, "//", "", "", "", "", "", "//"]
    assert [to_hex(bar.get_facecolor()) for bar in bars[:3]] == ["#9467bd", "#ff7f0e", "#1f77b4"]  # by strategy


def test_plot_legend_sits_outside_the_axes_and_keys_colours_lines_and_hatching(
    make_ablation: Callable[[Path], Path], tmp_path: Path
) -> None:
    runs = load_runs(make_ablation(tmp_path))
    fig = figures.figure(runs, baseline=choose_baseline(runs))
    fig.canvas.draw()
    (legend,) = fig.legends
    assert [t.get_text() for t in legend.get_texts()] == [
        "strategy (colour)",
        "auto",
        "reference",
        "torch_mha",
        "merged_bool",
        "merged_additive",
        "causal_kpm",
        "causal_only",
        "layout, padding (line)",
        "padded, right",
        "padded, left",
        "packed",
        "runs",
        "invalid, kept to teach\n(valid: false)",
        "speed-up 1.00x: run 19",
    ]
    box = legend.get_window_extent()
    assert [box.overlaps(ax.get_window_extent()) for ax in fig.axes] == [False, False, False]
    assert [ax.get_title() for ax in fig.axes] == [
        "train loss (equivalent runs coincide; teaching runs thin, on top)",
        "validation loss",
        "throughput, by layout, fastest first",
    ]


def test_plot_writes_a_png(make_run: Callable[..., Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make_run(tmp_path, "0", strategy="torch_mha", final=5.0, tokens=1000.0)
    make_run(tmp_path, "1", strategy="causal_only", final=5.25, valid=False)
    make_run(tmp_path, "2", summary=False)
    target = tmp_path / "report" / "ablation.png"
    assert compare.main([str(tmp_path), "--plot", str(target)]) == 0
    assert f"plot: {target}" in capsys.readouterr().out
    data = target.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    assert len(data) > 20_000
    assert [p.name for p in target.parent.iterdir()] == ["ablation.png"]  # no temp file left behind


def test_a_finished_run_without_metrics_warns(make_run: Callable[..., Path], tmp_path: Path) -> None:
    run_dir = make_run(tmp_path, "0")
    (run_dir / "csv" / "version_0" / "metrics.csv").unlink()
    runs = load_runs(tmp_path)
    with pytest.warns(UserWarning, match=r"attention=merged_bool,data.padding_side=right: no metrics.csv at .*"):
        figures.figure(runs)


def test_html_report_is_one_small_self_contained_file(
    make_ablation: Callable[[Path], Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    runs_dir = make_ablation(tmp_path / "sweep")
    out = tmp_path / "out"
    png, page = out / "ablation.png", out / "ablation.html"
    assert compare.main([str(runs_dir), "--plot", str(png), "--html", str(page)]) == 0
    assert capsys.readouterr().out.splitlines()[-2:] == [f"plot: {png}", f"html: {page}"]
    assert sorted(p.name for p in out.iterdir()) == ["ablation.html", "ablation.png"]  # no temp file left behind
    text = page.read_text()
    assert len(page.read_bytes()) < 1_000_000
    # The table: a row per run, the run number titled with its run name, the strategy with its plot colour.
    assert text.count("<tr") == 1 + 19 + 1 + 19  # table and legend, each with a header row
    assert (
        '<tr class="invalid"><td class="n" title="attention=causal_only,data.layout=padded,data.padding_side=left">6'
        '</td><td><span class="swatch" style="background:#9467bd"></span>causal_only</td><td>padded</td><td>left'
        '</td><td>random</td><td class="n">6.5227</td><td class="n">17,475</td><td class="n">1.35x</td>'
        '<td class="n">73.6%</td><td>exp. FAIL</td><td>expected divergence</td></tr>'
    ) in text
    assert "<li>6: audit expected FAIL: padding, loss; expected divergence: -0.008 vs 15</li>" in text
    assert "<li>equivalence: 2 group(s), 16 valid runs, all within 0.001</li>" in text
    # The plot, embedded: the same PNG as --plot wrote.
    (embedded,) = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', text)
    assert base64.b64decode(embedded) == png.read_bytes()
    # Nothing outside the file: no links, scripts, stylesheets or images from elsewhere.
    assert re.findall(r"https?://|<script|<link|<iframe|@import|url\(", text) == []
    assert re.findall(r'src="(?!data:)', text) == []
