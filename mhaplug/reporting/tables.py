"""The text of a comparison: the run table, its legend, the notes that spell out its short cells, and the summary
lines with the equivalence check's verdict.

The table fits :data:`TABLE_WIDTH` columns: runs are numbered (:func:`short_names`, in the order of their names) and
a legend below it gives each number's run name (a sweep job's overrides) with the best val loss, peak memory and
wall time; notes under the legend give in full the audit and check cells the table shortens. The ``audit`` column
is the run's step-0 mask audit: ``pass``, or ``FAIL`` (the notes list the checks that failed); invalid runs are
expected to fail it (``exp. FAIL``).
"""

from __future__ import annotations

import math
import re
import sys
from collections.abc import Callable, Mapping, Sequence

from mhaplug.common import SUMMARY_FILE
from mhaplug.reporting.runs import (
    Finding,
    Run,
    SortKey,
    audit_failures,
    diverged_runs,
    divergence_text,
    final_loss,
    fmt_delta,
    mismatch_text,
)

__all__ = [
    "HEADER",
    "LEGEND_HEADER",
    "TABLE_WIDTH",
    "audit_cell",
    "format_legend",
    "format_table",
    "legend_rows",
    "note_lines",
    "short_names",
    "summary_lines",
    "table_rows",
]


def audit_cell(run: Run) -> str:
    """The ``audit`` column: ``pass``, ``FAIL: <checks>`` (a valid run: a mask bug), ``expected FAIL: <checks>`` (an
    invalid run, wrong on purpose), ``pass (invalid run)`` (its wrong mask changed nothing here), or ``-``."""
    if run.audit_passed is None:
        return "-"
    if run.audit_passed:
        return "pass" if run.valid else "pass (invalid run)"
    return ("FAIL: " if run.valid else "expected FAIL: ") + ", ".join(run.audit_failed)


HEADER = (
    "run",
    "strategy",
    "layout",
    "padding",
    "batching",
    "final val",
    "real tok/s",
    "speed-up",
    "pad",
    "audit",
    "check",
)


NUMERIC = frozenset({0, 5, 6, 7, 8})  # right-aligned columns


LEGEND_HEADER = ("run", "best val", "peak MB", "wall s", "run name")


LEGEND_NUMERIC = frozenset({0, 1, 2, 3})


TABLE_WIDTH = 120  # what the table is laid out to fit, in characters (run numbers up to 999)


# The audit and check cells of the table, short enough for TABLE_WIDTH; note_lines gives the full text where a short
# cell drops something (the checks that failed, deltas, the runs compared with, a checkpoint path).
EXPECTED_FAIL = "exp. FAIL"


CHECK_CELLS: dict[str, str] = {
    "alone": "-",
    "no_key": "not compared",
    "divergence": "expected divergence",
    "invalid_equal": "invalid but equal",
    "invalid_alone": "invalid, alone",
    "incomplete": "incomplete",
}


NOTELESS = (
    "ok",
    "alone",
    "no_key",
    "invalid_equal",
    "invalid_alone",
)  # statuses whose message names no run, step or path


def short_names(runs: Sequence[Run]) -> dict[str, str]:
    """Each run's number in the table: ``"1"``, ``"2"``, ... in the order of the run names, whatever ``--sort``,
    so a number means the same run in the table, the legend, the notes and the plot."""
    return {name: str(i) for i, name in enumerate(sorted(r.name for r in runs), start=1)}


def table_rows(
    runs: Sequence[Run],
    findings: Sequence[Finding],
    *,
    baseline: Run | None = None,
    sort: SortKey = "name",
    names: Mapping[str, str] | None = None,
) -> list[tuple[str, ...]]:
    """The cells of :func:`format_table`, one tuple per run in ``sort`` order (columns :data:`HEADER`)."""
    names = short_names(runs) if names is None else names
    by_run = {f.run: f for f in findings}
    keys = {
        "name": lambda r: (r.name,),
        "val_loss": lambda r: (
            not math.isfinite(final_loss(r)),
            final_loss(r) if math.isfinite(final_loss(r)) else 0.0,
            r.name,
        ),
        "tokens": lambda r: (r.real_tokens_per_sec is None, -(r.real_tokens_per_sec or 0.0), r.name),
    }
    if sort not in keys:
        raise ValueError(f"sort must be one of {sorted(keys)}, got {sort!r}")
    base = baseline.real_tokens_per_sec if baseline else None
    rows = []
    for r in sorted(runs, key=keys[sort]):
        speed_up = r.real_tokens_per_sec / base if base and r.real_tokens_per_sec is not None else None
        finding = by_run.get(r.name)
        rows.append(
            (
                names[r.name],
                r.strategy or "-",
                r.layout or "-",
                (r.padding_side if r.layout != "packed" else None) or "-",  # packed rows pad at a row's end
                r.batching or "-",
                _num(r.final_val_loss, "{:.4f}"),
                _num(r.real_tokens_per_sec, "{:,.0f}"),
                _num(speed_up, "{:.2f}x"),
                _num(None if r.pad_fraction is None else 100 * r.pad_fraction, "{:.1f}%"),
                _audit_short(r),
                "-" if finding is None else _check_short(finding, r, names),
            )
        )
    return rows


def format_table(
    runs: Sequence[Run],
    findings: Sequence[Finding],
    *,
    baseline: Run | None = None,
    sort: SortKey = "name",
    markdown: bool = False,
    names: Mapping[str, str] | None = None,
) -> str:
    """The comparison table, runs by number (:func:`short_names`): aligned plain text, or Markdown
    (``markdown=True``). Each line fits :data:`TABLE_WIDTH` columns for run numbers up to 999 and the values of a
    sweep (losses below 100, peak memory and tokens/s below 10 million)."""
    rows = table_rows(runs, findings, baseline=baseline, sort=sort, names=names)
    return _render(HEADER, rows, NUMERIC, markdown=markdown)


def legend_rows(runs: Sequence[Run], *, names: Mapping[str, str] | None = None) -> list[tuple[str, ...]]:
    """The cells of :func:`format_legend`, in run-number order (columns :data:`LEGEND_HEADER`)."""
    names = short_names(runs) if names is None else names
    return [
        (
            names[r.name],
            _num(r.best_val_loss, "{:.4f}"),
            _num(r.peak_memory_mb, "{:.1f}"),
            _num(r.wall_time_s, "{:.1f}"),
            r.name,
        )
        for r in _by_number(runs, names)
    ]


def format_legend(runs: Sequence[Run], *, markdown: bool = False, names: Mapping[str, str] | None = None) -> str:
    """The legend under the table: each run number's run name (a sweep job's overrides), best val loss, peak
    memory and wall time."""
    return _render(LEGEND_HEADER, legend_rows(runs, names=names), LEGEND_NUMERIC, markdown=markdown)


def note_lines(
    runs: Sequence[Run], findings: Sequence[Finding], *, names: Mapping[str, str] | None = None
) -> list[str]:
    """``"<run number>: <text>"`` for each run whose audit or check cell the table shortens, in run-number order:
    the audit's failed checks, and the check's full message (deltas and the runs compared with, by number; the
    checkpoint to resume from) where it names a run, a step or a path (not for :data:`NOTELESS` statuses)."""
    names = short_names(runs) if names is None else names
    by_run = {f.run: f for f in findings}
    lines = []
    for r in _by_number(runs, names):
        parts = [f"audit {audit_cell(r)}"] if r.audit_passed is False else []
        finding = by_run.get(r.name)
        if finding is not None and finding.status not in NOTELESS:
            full = _check_full(finding, names)
            if full != _check_short(finding, r, names):
                parts.append(full)
        if parts:
            lines.append(f"{names[r.name]}: " + "; ".join(parts))
    return lines


def _by_number(runs: Sequence[Run], names: Mapping[str, str]) -> list[Run]:
    return sorted(runs, key=lambda run: _number_first(names[run.name]))


def _number_first(text: str) -> tuple[int, str]:
    number = re.match(r"\d+", text)
    return (int(number.group()) if number else sys.maxsize, text)


def _audit_short(run: Run) -> str:
    if run.audit_passed is None:
        return "-"
    if run.audit_passed:
        return "pass"
    return "FAIL" if run.valid else EXPECTED_FAIL


def _check_short(finding: Finding, run: Run, names: Mapping[str, str]) -> str:
    status = finding.status
    if status == "ok":
        return f"ok ({finding.group_size} equivalent)"
    if status == "mismatch":
        listed = "MISMATCH vs " + ", ".join(names.get(o, o) for o in finding.others)
        return listed if len(listed) <= len(CHECK_CELLS["divergence"]) else f"MISMATCH ({len(finding.others)} runs)"
    if status == "interrupted":
        return f"interrupted, step {run.steps}"
    if status == "diverged":
        if run.status == "diverged":
            return f"DIVERGED, step {run.diverged_at_step}"
        return f"DIVERGED, val {run.final_val_loss}"  # finished, with a NaN or inf final val loss
    return CHECK_CELLS.get(status, finding.message)


def _check_full(finding: Finding, names: Mapping[str, str]) -> str:
    """The finding's message, naming the runs it compares with by number."""
    if finding.status == "mismatch":
        return mismatch_text([names.get(o, o) for o in finding.others], finding.deltas)
    if finding.status == "divergence":
        return divergence_text(finding.deltas[0], names.get(finding.others[0], finding.others[0]))
    return finding.message


def _render(header: Sequence[str], rows: Sequence[Sequence[str]], numeric: frozenset[int], *, markdown: bool) -> str:
    if markdown:
        rows = [tuple(cell.replace("|", "\\|") for cell in row) for row in rows]
    widths = [max(map(len, column)) for column in zip(header, *rows)]

    def line(cells: Sequence[str]) -> str:
        padded = [c.rjust(w) if i in numeric else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))]
        return ("| " + " | ".join(padded) + " |") if markdown else "  ".join(padded).rstrip()

    if markdown:  # "---:" right-aligns the numbers
        rule = "|" + "|".join("-" * (w + 1) + (":" if i in numeric else "-") for i, w in enumerate(widths)) + "|"
    else:
        rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(header), rule, *map(line, rows)])


def summary_lines(
    runs: Sequence[Run],
    findings: Sequence[Finding],
    *,
    tolerance: float = 1e-3,
    baseline: Run | None = None,
    names: Mapping[str, str] | None = None,
) -> list[str]:
    """The lines printed last: the equivalence check (the MISMATCH line names every offending pair), the audit,
    the runs with a null equivalence_key, and the invalid, diverged (train/loss, or final val loss), interrupted
    and incomplete runs. Runs are named by ``names`` (the table's numbers) where given, else by their run names."""
    label: Callable[[str], str] = (lambda name: names.get(name, name)) if names else (lambda name: name)

    def listed(items: Sequence[str], sep: str = ", ") -> str:  # by run number where runs are numbered
        return sep.join(sorted(items, key=_number_first) if names else items)

    lines = []
    if baseline is not None:
        which = f"run {label(baseline.name)}" if names else baseline.name
        lines.append(f"speed-up: real tokens/s relative to {which} ({baseline.real_tokens_per_sec:,.0f})")
    pairs = {
        tuple(sorted((f.run, o))): abs(d)
        for f in findings
        if f.status == "mismatch"
        for o, d in zip(f.others, f.deltas)
    }
    groups = {f.run: f.group_size for f in findings if f.status in ("ok", "mismatch")}
    if pairs:
        listed = "; ".join(
            f"{label(a)} vs {label(b)} ({fmt_delta(d).lstrip('+')})" for (a, b), d in sorted(pairs.items())
        )
        lines.append(
            f"MISMATCH: {len(pairs)} pair(s) of equivalent valid runs differ in final val loss by more "
            f"than {tolerance:g}: {listed}. Same equivalence_key = same computation: a mask bug."
        )
    elif groups:
        keys = {r.equivalence_key for r in runs if r.name in groups}
        lines.append(f"equivalence: {len(keys)} group(s), {len(groups)} valid runs, all within {tolerance:g}")
    else:
        lines.append("equivalence: no two valid runs share an equivalence_key; nothing to compare")
    keyless = [label(f.run) for f in findings if f.status == "no_key"]
    if keyless:
        lines.append(f"{len(keyless)} valid run(s) with a null equivalence_key, not compared: " + listed(keyless))
    failed = audit_failures(runs)
    if failed:
        lines.append(
            f"AUDIT FAILED: {len(failed)} valid run(s) failed the step-0 mask audit: "
            + listed([f"{label(r.name)} ({', '.join(r.audit_failed)})" for r in failed], "; ")
            + ". Pads, later tokens or other documents reach real positions: a mask bug."
        )
    audited = [r for r in runs if r.complete and r.audit_passed is not None]
    if audited and not failed:
        passed = sum(r.valid and bool(r.audit_passed) for r in audited)
        expected = sum(not r.valid and not r.audit_passed for r in audited)
        lines.append(
            f"mask audit: {passed} valid run(s) passed"
            + (f", {expected} invalid run(s) failed as expected" if expected else "")
        )
    invalid = [label(f.run) for f in findings if f.status in ("divergence", "invalid_equal", "invalid_alone")]
    if invalid:
        lines.append(
            f"{len(invalid)} invalid run(s) kept for teaching (valid=false), never a failure: " + listed(invalid)
        )
    stopped = [r for r in diverged_runs(runs) if r.status == "diverged"]
    if stopped:
        lines.append(
            f"DIVERGED: {len(stopped)} valid run(s) stopped at a NaN or inf train/loss: "
            + listed([f"{label(r.name)} (step {r.diverged_at_step})" for r in stopped], "; ")
        )
    finished = [r for r in diverged_runs(runs) if r.status != "diverged"]
    if finished:
        lines.append(
            f"DIVERGED: {len(finished)} valid run(s) finished with a NaN or inf final val/loss: "
            + listed([f"{label(r.name)} ({r.final_val_loss})" for r in finished], "; ")
        )
    interrupted = [label(r.name) for r in runs if r.complete and r.status == "interrupted"]
    if interrupted:
        lines.append(
            f"{len(interrupted)} interrupted run(s) (SIGTERM), not compared until resumed: " + listed(interrupted)
        )
    incomplete = [label(r.name) for r in runs if not r.complete]
    if incomplete:
        lines.append(f"{len(incomplete)} incomplete run(s) without {SUMMARY_FILE}: " + listed(incomplete))
    return lines


def _num(value: float | None, spec: str) -> str:
    return "-" if value is None else spec.format(value)
