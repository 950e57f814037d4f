"""Compare training runs: a table of loss, speed and padding waste, an equivalence check, and a plot.

Usage::

    python -m mhaplug.compare RUNS_DIR [--plot FILE.png] [--html FILE.html] [--tolerance 1e-3]
                                       [--sort val_loss|tokens|name] [--baseline NAME] [--markdown]

A run is a directory anywhere below RUNS_DIR (a Hydra multirun directory, say) that holds ``summary.json``,
written by training when a run ends, and the Lightning CSVLogger ``metrics.csv`` it names. A directory with
a ``.hydra/`` folder or a ``metrics.csv`` but no ``summary.json`` is listed as incomplete (crashed or still
running), never silently dropped. A run resumed in its folder logged each attempt to its own logger version
(``csv/version_0/``, ``csv/version_1/``, ...): it is one run, whose curves take each step from the latest attempt
that logged it (:func:`read_curve`). A run stopped by SIGTERM (``"status": "interrupted"``) is listed with the
checkpoint to resume from and not compared; one whose train/loss became NaN or inf (``"diverged"``) is listed with
the step.

The equivalence check is the point of the tool. Runs with the same ``equivalence_key`` are the same
computation (same data, model, seed, steps, layout and batching): a correct mask strategy or padding side
cannot change the result, so valid runs of one key whose final val loss differs by more than ``--tolerance``
reveal a mask bug, and the exit code is 1. Invalid runs (``valid: false``, kept to teach, such as
``causal_only`` with left padding, where real queries attend to pad keys) are expected to diverge: their
difference is shown and never fails.

Runs are read by :mod:`mhaplug.reporting.runs`; the table fits 120 columns, its runs numbered, with a legend and
notes below it (:mod:`mhaplug.reporting.tables`). ``--plot`` and ``--html`` (one self-contained file: the tables and
the plot) come from :mod:`mhaplug.reporting.figures` and :mod:`mhaplug.reporting.page`.

The ``audit`` column is the run's step-0 mask audit (:mod:`mhaplug.training.audit`, in ``summary.json``): ``pass``, or
``FAIL`` (the notes list the checks that failed). A valid run that failed it has a mask bug (exit code 1); invalid
runs are expected to fail it (``exp. FAIL``). Exit codes: 0 fine, 1 mismatch, a valid run that failed the audit or
diverged, 2 bad input.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from mhaplug.common import write_atomic
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
    """Run the command line; returns the exit code (0 fine, 1 equivalence mismatch, 2 bad input)."""
    parser = argparse.ArgumentParser(prog="python -m mhaplug.compare", description=__doc__.split("\n\n")[0])
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
            title = f"mhaplug runs: {args.runs_dir}"
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
