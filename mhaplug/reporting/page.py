"""The one-file HTML page of :mod:`mhaplug.compare` (``--html FILE.html``): the summary, the table, the notes, the
plot as a base64 PNG and the legend, with no external asset (no script, stylesheet or image outside the file)."""

from __future__ import annotations

import base64
import html
from collections.abc import Mapping, Sequence

from mhaplug.reporting.figures import strategy_color
from mhaplug.reporting.runs import Finding, Run, SortKey
from mhaplug.reporting.tables import (
    HEADER,
    LEGEND_HEADER,
    LEGEND_NUMERIC,
    NUMERIC,
    legend_rows,
    short_names,
    table_rows,
)

__all__ = ["html_report"]

STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
th, td { padding: 2px 8px; border-bottom: 1px solid #ddd; text-align: left; white-space: nowrap; }
.n { text-align: right; font-variant-numeric: tabular-nums; }
tr.invalid td { color: #555; font-style: italic; }
tr.bad td { background: #fde2e2; }
.swatch { display: inline-block; width: 0.8em; height: 0.8em; margin-right: 0.4em; vertical-align: -0.05em; }
img { max-width: 100%; }
"""


BAD_STATUSES = ("mismatch", "diverged")


def html_report(
    runs: Sequence[Run],
    findings: Sequence[Finding],
    *,
    png: bytes,
    title: str = "mhaplug runs",
    baseline: Run | None = None,
    sort: SortKey = "name",
    names: Mapping[str, str] | None = None,
    notes: Sequence[str] = (),
    summary: Sequence[str] = (),
) -> str:
    """One self-contained HTML page: ``summary`` (the check's verdict), the table (a run number's title is its run
    name; invalid runs in italics, runs that fail the check or the audit in red), ``notes``, the ``png`` embedded
    as base64, and the legend. No script, stylesheet or image outside the file."""
    names = short_names(runs) if names is None else names
    by_number = {names[r.name]: r for r in runs}
    status = {f.run: f.status for f in findings}

    def row_class(run: Run) -> str:
        if status.get(run.name) in BAD_STATUSES or (run.valid and run.audit_passed is False):
            return "bad"
        return "" if run.valid else "invalid"

    def table(header: Sequence[str], rows: Sequence[Sequence[str]], numeric: frozenset[int], strategy: int) -> str:
        out = ["<table>", "<tr>" + "".join(_cell("th", h, i in numeric) for i, h in enumerate(header)) + "</tr>"]
        for row in rows:
            run = by_number[row[0]]
            cells = []
            for i, value in enumerate(row):
                if i == 0:
                    cells.append(f'<td class="n" title="{html.escape(run.name)}">{html.escape(value)}</td>')
                elif i == strategy:
                    swatch = f'<span class="swatch" style="background:{strategy_color(run.strategy)}"></span>'
                    cells.append(f"<td>{swatch}{html.escape(value)}</td>")
                else:
                    cells.append(_cell("td", value, i in numeric))
            css = row_class(run)
            out.append((f'<tr class="{css}">' if css else "<tr>") + "".join(cells) + "</tr>")
        return "\n".join([*out, "</table>"])

    main = table(HEADER, table_rows(runs, findings, baseline=baseline, sort=sort, names=names), NUMERIC, 1)
    legend = table(LEGEND_HEADER, legend_rows(runs, names=names), LEGEND_NUMERIC, -1)
    image = base64.b64encode(png).decode("ascii")
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        f'<head>\n<meta charset="utf-8">\n<title>{html.escape(title)}</title>\n<style>{STYLE}</style>\n</head>',
        "<body>",
        f"<h1>{html.escape(title)}</h1>",
        _list(summary),
        main,
        _list(notes),
        f'<img alt="loss curves and throughput per run" src="data:image/png;base64,{image}">',
        "<h2>Runs</h2>",
        legend,
        "</body>",
        "</html>",
    ]
    return "\n".join(p for p in parts if p) + "\n"


def _cell(tag: str, value: str, numeric: bool) -> str:
    return f'<{tag} class="n">{html.escape(value)}</{tag}>' if numeric else f"<{tag}>{html.escape(value)}</{tag}>"


def _list(lines: Sequence[str]) -> str:
    return "<ul>\n" + "\n".join(f"<li>{html.escape(line)}</li>" for line in lines) + "\n</ul>" if lines else ""
