"""Compare training runs: a table of loss, speed and padding waste, an equivalence check, and a plot.

Usage::

    python -m mhaplug.compare RUNS_DIR [--plot FILE.png] [--html FILE.html] [--tolerance 1e-3]
                                       [--sort val_loss|tokens|name] [--baseline NAME] [--markdown]

Every run below RUNS_DIR (a folder with ``summary.json``; one with ``.hydra/`` or ``metrics.csv`` only is listed as
incomplete) is read by :mod:`mhaplug.reporting.runs`, which also checks equivalence: valid runs with the same
``equivalence_key`` are the same computation, so a final val loss that differs by more than ``--tolerance`` is a
mask bug; invalid runs (kept to teach) are expected to differ and never fail. The table (120 columns, runs
numbered), its legend and notes are :mod:`mhaplug.reporting.tables`'; ``--plot`` and ``--html`` (one self-contained
file: the tables and the plot) :mod:`mhaplug.reporting.figures`' and :mod:`mhaplug.reporting.page`'. The ``audit``
column is each run's step-0 mask audit (:mod:`mhaplug.training.audit`).

Exit codes: 0 fine; 1 a mismatch, or a valid run that failed the audit or diverged (a NaN or inf train/loss, or
final val loss); 2 bad input (a missing folder, a damaged summary.json or metrics.csv: one line naming the file).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from mhaplug.common import plain_text, write_atomic
from mhaplug.reporting import figures, page
from mhaplug.reporting.runs import (
    audit_failures,
    check_equivalence,
    choose_baseline,
    diverged_runs,
    load_runs,
    skipped_runs,
)
from mhaplug.reporting.tables import format_legend, format_table, note_lines, short_names, summary_lines

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (0 fine, 1 a mismatch, failed audit or divergence, 2 bad input)."""
    parser = argparse.ArgumentParser(prog="python -m mhaplug.compare", description=plain_text(__doc__.split("\n\n")[0]))
    parser.add_argument("runs_dir", metavar="RUNS_DIR", help="directory searched recursively for runs")
    parser.add_argument("--plot", metavar="FILE.png", help="also write loss curves and throughput bars")
    parser.add_argument("--html", metavar="FILE.html", help="also write one self-contained report: tables and plot")
    parser.add_argument(
        "--tolerance",
        type=float,
        default=1e-3,
        help="largest absolute final val loss difference between equivalent runs (default 1e-3)",
    )
    parser.add_argument("--sort", choices=("val_loss", "tokens", "name"), default="name")
    parser.add_argument("--baseline", metavar="NAME", help="run (name or number) that speed-ups are relative to")
    parser.add_argument("--markdown", action="store_true", help="print the tables as Markdown")
    args = parser.parse_args(argv)
    try:
        runs = load_runs(args.runs_dir)
        findings = check_equivalence(runs, args.tolerance)
        names = short_names(runs)
        by_number = {short: name for name, short in names.items()}
        baseline = choose_baseline(runs, by_number.get(args.baseline, args.baseline))
        print(format_table(runs, findings, baseline=baseline, sort=args.sort, markdown=args.markdown, names=names))
        print()
        print(format_legend(runs, markdown=args.markdown, names=names))
        print()
        notes = note_lines(runs, findings, names=names)
        summary = summary_lines(runs, findings, tolerance=args.tolerance, baseline=baseline, names=names)
        skipped = skipped_runs(args.runs_dir)
        if skipped:
            summary.append(f"{len(skipped)} combination(s) skipped as invalid (see skipped.txt in their folders)")
        bullet = "- " if args.markdown else ""
        if notes:
            print("\n".join(bullet + n for n in notes), end="\n\n")
        print("\n".join(bullet + n for n in summary))
        if args.plot or args.html:
            title = f"mhaplug runs: {Path(args.runs_dir).resolve().name}"  # the sweep's name, never a machine path
            png = figures.figure_png(runs, title=title, baseline=baseline, names=names)
            if args.plot:
                print(f"plot: {write_atomic(args.plot, png)}")
            if args.html:
                html = page.html_report(
                    runs,
                    findings,
                    title=title,
                    baseline=baseline,
                    sort=args.sort,
                    names=names,
                    notes=notes,
                    summary=summary,
                    png=png,
                )
                print(f"html: {write_atomic(args.html, html)}")
    except (OSError, ValueError) as err:
        print(f"mhaplug.compare: error: {err}", file=sys.stderr)
        return 2
    return 1 if any(f.status == "mismatch" for f in findings) or audit_failures(runs) or diverged_runs(runs) else 0


if __name__ == "__main__":
    sys.exit(main())
