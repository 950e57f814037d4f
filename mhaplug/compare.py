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

The table fits 120 columns: runs are numbered (:func:`short_names`, in the order of their names) and a legend
below it gives each number's run name (a sweep job's overrides) with the best val loss, peak memory and wall time;
notes under the legend give in full the audit and check cells the table shortens. ``--plot`` and ``--html`` (one
self-contained file: the tables and the plot) come from :mod:`mhaplug.report`.

The ``audit`` column is the run's step-0 mask audit (:mod:`mhaplug.audit`, in ``summary.json``): ``pass``, or
``FAIL`` (the notes list the checks that failed). A valid run that failed it has a mask bug (exit code 1); invalid
runs are expected to fail it (``exp. FAIL``). Exit codes: 0 fine, 1 mismatch, a valid run that failed the audit or
diverged, 2 bad input.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import re
import sys
from collections import Counter, defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from mhaplug.util import write_atomic

__all__ = [
    "Finding",
    "Run",
    "audit_cell",
    "audit_failures",
    "check_equivalence",
    "choose_baseline",
    "diverged_runs",
    "format_legend",
    "format_table",
    "legend_rows",
    "load_runs",
    "main",
    "note_lines",
    "read_curve",
    "short_names",
    "summary_lines",
    "table_rows",
]

SUMMARY_FILE = "summary.json"
METRICS_FILE = "metrics.csv"
SKIPPED_FILE = "skipped.txt"  # written by train.py for a combination skipped as invalid (on_invalid=skip/run)
# Keys the table and the check cannot do without; the other numbers may be absent or null (shown as "-").
REQUIRED_KEYS = (
    "run_name",
    "strategy",
    "layout",
    "padding_side",
    "batching",
    "valid",
    "equivalence_key",
    "final_val_loss",
)
NUMBER_KEYS = (
    "final_val_loss",
    "best_val_loss",
    "real_tokens_per_sec",
    "pad_fraction",
    "peak_memory_mb",
    "wall_time_s",
    "steps",
    "diverged_at_step",
)
RUN_STATUSES = ("finished", "interrupted", "diverged")  # summary.json's "status" (absent in older runs: finished)
SortKey = Literal["val_loss", "tokens", "name"]
Status = Literal[
    "ok", "alone", "mismatch", "divergence", "invalid_equal", "invalid_alone", "incomplete", "interrupted", "diverged"
]


@dataclass(frozen=True)
class Run:
    """One run directory. ``complete`` is False without ``summary.json``: then only ``name``, ``path``,
    ``metrics_csv(s)`` and ``steps`` (the last step logged to metrics.csv, if any) are known. ``metrics_csvs`` are
    the run's attempts, oldest first (one unless it was resumed); ``metrics_csv`` the latest. ``status``:
    ``finished``, ``interrupted`` (SIGTERM; ``resume_ckpt_path``) or ``diverged`` (at ``diverged_at_step``)."""

    name: str
    path: Path
    complete: bool = True
    strategy: str = ""
    layout: str = ""
    padding_side: str = ""
    batching: str = ""
    valid: bool = True
    equivalence_key: str = ""
    final_val_loss: float | None = None
    best_val_loss: float | None = None
    real_tokens_per_sec: float | None = None
    pad_fraction: float | None = None
    peak_memory_mb: float | None = None
    wall_time_s: float | None = None
    steps: int | None = None
    metrics_csv: Path | None = None
    metrics_csvs: tuple[Path, ...] = ()
    status: str = "finished"
    diverged_at_step: int | None = None
    resume_ckpt_path: str | None = None
    audit_passed: bool | None = None  # None: no audit in summary.json (an older run, or no MaskAudit callback)
    audit_failed: tuple[str, ...] = ()  # the audit's failed checks
    summary: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)


@dataclass(frozen=True)
class Finding:
    """The check result for one run: ``message`` is its "check" cell. ``others`` are the runs it was
    compared with and ``deltas`` this run's final val loss minus theirs (mismatches: every offending pair;
    invalid runs: the valid run of their key they are measured against)."""

    run: str
    status: Status
    message: str
    others: tuple[str, ...] = ()
    deltas: tuple[float, ...] = ()
    group_size: int = 0


def load_runs(runs_dir: str | os.PathLike[str]) -> list[Run]:
    """Every run below ``runs_dir`` (searched recursively), complete ones first, each group sorted by path.

    Raises ``FileNotFoundError`` when ``runs_dir`` is missing or holds no run, ``ValueError`` naming the file
    and the key when a summary.json is malformed.
    """
    root = Path(runs_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"runs directory {str(root)!r} does not exist or is not a directory")
    done: list[Path] = []
    started: set[Path] = set()
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        if SKIPPED_FILE in filenames:
            dirnames.clear()  # skipped on purpose: neither a run nor an incomplete one
            continue
        if SUMMARY_FILE in filenames:
            done.append(here)
        if ".hydra" in dirnames:
            started.add(here)
        if METRICS_FILE in filenames:
            started.add(_run_dir_of_metrics(here / METRICS_FILE, root))
    # A crashed run's logger folder sits below its .hydra folder: keep only the outermost directory, and
    # nothing that is, or holds, a finished run.
    started = {d for d in started if not any(d == o or o in d.parents or d in o.parents for o in done)}
    started = {d for d in started if not any(o in d.parents for o in started)}
    if not done and not started and not skipped_runs(root):
        raise FileNotFoundError(
            f"no runs found under {str(root)!r}: looked in every subdirectory for {SUMMARY_FILE} (finished "
            f"runs) and for .hydra/ or {METRICS_FILE} without {SUMMARY_FILE} (incomplete runs)"
        )
    runs = [_load_summary(d / SUMMARY_FILE, root) for d in sorted(done)]
    runs += [_incomplete_run(d, root) for d in sorted(started)]
    # Names identify runs in the check column; the same overrides in two sweeps must stay distinguishable.
    counts = Counter(r.name for r in runs)
    return [replace(r, name=f"{r.name} ({_rel(r.path, root)})") if counts[r.name] > 1 else r for r in runs]


def read_curve(
    csv_path: str | os.PathLike[str] | Sequence[str | os.PathLike[str]], column: str = "val/loss"
) -> list[tuple[int, float]]:
    """``(step, value)`` for every row of a Lightning CSVLogger metrics.csv where ``column`` is filled in
    (Lightning writes train and val metrics on different rows, so most rows leave a column empty).

    Given the metrics.csv of a run's attempts, oldest first (:attr:`Run.metrics_csvs`), one curve: each attempt's
    rows replace the earlier attempts' from its first logged step on (the step it resumed at, where
    :class:`mhaplug.callbacks.ResumeMarker` logs ``resumed_at_step``); the earlier rows past it were trained after
    the checkpoint it resumed from, and lost."""
    paths = [csv_path] if isinstance(csv_path, (str, os.PathLike)) else list(csv_path)
    points: list[tuple[int, float]] = []
    for path in paths:
        first, own = _read_points(path, column)
        if first is not None:
            points = [p for p in points if p[0] < first]
        points += own
    return points


def _read_points(csv_path: str | os.PathLike[str], column: str) -> tuple[int | None, list[tuple[int, float]]]:
    """The first step of any row of one metrics.csv, and ``(step, value)`` of the rows that fill ``column``."""
    first, points = None, []
    with open(csv_path, newline="") as f:
        for line, row in enumerate(csv.DictReader(f), start=2):
            value, step = row.get(column), row.get("step")
            try:
                if step:
                    first = int(float(step)) if first is None else min(first, int(float(step)))
                if value and step:
                    points.append((int(float(step)), float(value)))
            except ValueError as err:
                raise ValueError(f"{csv_path}, line {line}: step {step!r}, {column} {value!r}: {err}") from err
    return first, points


def _load_summary(path: Path, root: Path) -> Run:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err
    # ValueError: a file's content is a bad value, not a programming error
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")  # noqa: TRY004
    missing = [key for key in REQUIRED_KEYS if key not in data]
    if missing:
        raise ValueError(f"{path}: missing key {', '.join(map(repr, missing))} (required: {', '.join(REQUIRED_KEYS)})")
    # ValueError: a file's content is a bad value, not a programming error
    if not isinstance(data["valid"], bool):
        raise ValueError(f"{path}: key 'valid' must be true or false, got {data['valid']!r}")  # noqa: TRY004
    status = data.get("status", "finished")
    if status not in RUN_STATUSES:
        raise ValueError(f"{path}: key 'status' must be one of {', '.join(RUN_STATUSES)}; got {status!r}")
    for key in NUMBER_KEYS:
        value = data.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise ValueError(f"{path}: key {key!r} must be a number or null, got {value!r}")
    numbers: dict[str, Any] = {key: None if data.get(key) is None else float(data[key]) for key in NUMBER_KEYS}
    for key in ("steps", "diverged_at_step"):
        numbers[key] = None if numbers[key] is None else int(numbers[key])
    texts = {key: str(data[key]) for key in ("strategy", "layout", "padding_side", "batching", "equivalence_key")}
    audit = data.get("audit")
    if audit is not None and not (
        isinstance(audit, dict) and isinstance(audit.get("passed"), bool) and isinstance(audit.get("failed", []), list)
    ):
        raise ValueError(
            f"{path}: key 'audit' must be null or an object with 'passed': true|false and a list "
            f"'failed', got {audit!r}"
        )
    run_dir = path.parent
    metrics = run_dir / data["metrics_csv"] if data.get("metrics_csv") else _find_metrics(run_dir)
    resume = data.get("resume_ckpt_path")
    return Run(
        name=str(data["run_name"]) or _rel(run_dir, root),
        path=run_dir,
        valid=data["valid"],
        **texts,
        **numbers,
        metrics_csv=metrics,
        metrics_csvs=_attempts(metrics),
        status=status,
        resume_ckpt_path=None if resume is None else str(resume),
        summary=data,
        audit_passed=None if audit is None else audit["passed"],
        audit_failed=() if audit is None else tuple(map(str, audit.get("failed", []))),
    )


def _incomplete_run(run_dir: Path, root: Path) -> Run:
    name = _rel(run_dir, root)
    overrides = run_dir / ".hydra" / "overrides.yaml"
    if overrides.is_file():  # Hydra's own record of the command line, e.g. ["attention=flex", ...]
        import yaml  # a dependency of hydra-core's omegaconf

        items = yaml.safe_load(overrides.read_text())
        if isinstance(items, list) and items:
            name = ",".join(map(str, items))
    metrics = _find_metrics(run_dir)
    attempts = _attempts(metrics)
    steps = [step for step, _ in read_curve(attempts, "step")]
    return Run(
        name=name,
        path=run_dir,
        complete=False,
        metrics_csv=metrics,
        metrics_csvs=attempts,
        steps=max(steps, default=None),
    )


def _run_dir_of_metrics(csv_path: Path, root: Path) -> Path:
    # CSVLogger writes <run dir>/<logger name>/version_<n>/metrics.csv.
    run_dir = csv_path.parent.parent.parent if re.fullmatch(r"version_\d+", csv_path.parent.name) else csv_path.parent
    return run_dir if run_dir == root or root in run_dir.parents else root


def _find_metrics(run_dir: Path) -> Path | None:
    found = sorted(run_dir.rglob(METRICS_FILE), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None  # the newest, should a resumed run have several versions


def _attempts(csv_path: Path | None) -> tuple[Path, ...]:
    """Every attempt's metrics.csv beside ``csv_path`` (``<logger>/version_<n>/metrics.csv``, by ``n``), or just it."""
    if csv_path is None:
        return ()
    if not re.fullmatch(r"version_\d+", csv_path.parent.name):
        return (csv_path,)
    versions = {
        p
        for p in csv_path.parent.parent.glob(f"version_*/{METRICS_FILE}")
        if re.fullmatch(r"version_\d+", p.parent.name)
    }
    return tuple(sorted(versions | {csv_path}, key=lambda p: int(p.parent.name.removeprefix("version_"))))


def _rel(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix() if path != root else (root.resolve().name or str(root))


def check_equivalence(runs: Sequence[Run], tolerance: float = 1e-3) -> list[Finding]:
    """One :class:`Finding` per run, in the order of ``runs``.

    Valid runs with the same ``equivalence_key`` are compared pairwise: a pair whose final val loss differs
    by more than ``tolerance`` (absolute; a NaN always differs) is a ``mismatch``, a mask bug. An invalid
    run is measured against one valid run of its key (preferring the same padding side, then strategy
    ``reference``, then the first by name): ``divergence`` as expected, or ``invalid_equal`` when it does not.
    """
    if not tolerance >= 0:
        raise ValueError(f"tolerance must be a number >= 0, got {tolerance!r}")
    groups: dict[str, list[Run]] = defaultdict(list)
    for run in runs:
        if _finished(run) and run.valid:
            groups[run.equivalence_key].append(run)
    findings = []
    for run in runs:
        group = groups.get(run.equivalence_key, []) if _finished(run) else []
        if not run.complete:
            last = "" if run.steps is None else f", last logged step {run.steps}"
            findings.append(Finding(run.name, "incomplete", f"incomplete: no {SUMMARY_FILE}{last}"))
        elif run.status == "interrupted":
            findings.append(
                Finding(
                    run.name,
                    "interrupted",
                    f"interrupted at step {run.steps} (SIGTERM): resume with ckpt_path={run.resume_ckpt_path}",
                )
            )
        elif run.status == "diverged":
            findings.append(
                Finding(run.name, "diverged", f"DIVERGED: train/loss NaN or inf at step {run.diverged_at_step}")
            )
        elif run.valid:
            others = [o for o in group if o is not run]
            bad = [(o.name, _loss(run) - _loss(o)) for o in others if not abs(_loss(run) - _loss(o)) <= tolerance]
            if bad:
                names, deltas = zip(*bad)
                text = _mismatch_text(names, deltas)
                findings.append(Finding(run.name, "mismatch", text, names, deltas, len(group)))
            elif others:
                findings.append(Finding(run.name, "ok", f"ok ({len(group)} equivalent runs)", group_size=len(group)))
            else:
                findings.append(Finding(run.name, "alone", "-", group_size=1))
        elif group:
            ref = min(group, key=lambda o: (o.padding_side != run.padding_side, o.strategy != "reference", o.name))
            delta = _loss(run) - _loss(ref)
            if abs(delta) <= tolerance:
                status, text = "invalid_equal", "invalid but equal (the wrong mask changed nothing here)"
            else:
                status, text = "divergence", _divergence_text(delta, ref.name)
            findings.append(Finding(run.name, status, text, (ref.name,), (delta,), len(group)))
        else:
            findings.append(Finding(run.name, "invalid_alone", "invalid (no valid run with its equivalence_key)"))
    return findings


def _mismatch_text(others: Sequence[str], deltas: Sequence[float]) -> str:
    return "MISMATCH vs " + ", ".join(f"{name} ({_fmt_delta(d)})" for name, d in zip(others, deltas))


def _divergence_text(delta: float, ref: str) -> str:
    return f"expected divergence: {_fmt_delta(delta)} vs {ref}"


def _finished(run: Run) -> bool:
    return run.complete and run.status == "finished"


def diverged_runs(runs: Sequence[Run]) -> list[Run]:
    """Valid runs whose train/loss became NaN or inf: the comparison of their group is missing a member."""
    return [r for r in runs if r.complete and r.valid and r.status == "diverged"]


def choose_baseline(runs: Sequence[Run], name: str | None = None) -> Run | None:
    """The run speed-ups are relative to: ``name`` if given, else the slowest valid ``torch_mha`` run (what
    users have today), else the slowest valid run; None when no run reports real tokens/s."""
    timed = [r for r in runs if r.complete and r.real_tokens_per_sec]
    if name is not None:
        for run in timed:
            if run.name == name:
                return run
        raise ValueError(
            f"--baseline {name!r} is not a finished run with real_tokens_per_sec; "
            f"choose one of {[r.name for r in timed]}"
        )
    valid = [r for r in timed if r.valid]
    pool = [r for r in valid if r.strategy == "torch_mha"] or valid
    return min(pool, key=lambda r: r.real_tokens_per_sec or 0.0, default=None)


def audit_cell(run: Run) -> str:
    """The ``audit`` column: ``pass``, ``FAIL: <checks>`` (a valid run: a mask bug), ``expected FAIL: <checks>`` (an
    invalid run, wrong on purpose), ``pass (invalid run)`` (its wrong mask changed nothing here), or ``-``."""
    if run.audit_passed is None:
        return "-"
    if run.audit_passed:
        return "pass" if run.valid else "pass (invalid run)"
    return ("FAIL: " if run.valid else "expected FAIL: ") + ", ".join(run.audit_failed)


def audit_failures(runs: Sequence[Run]) -> list[Run]:
    """Valid runs that failed the mask audit: each has a mask bug."""
    return [r for r in runs if r.complete and r.valid and r.audit_passed is False]


def _loss(run: Run) -> float:
    return math.nan if run.final_val_loss is None else run.final_val_loss


def _fmt_delta(delta: float) -> str:
    # Three decimals read well down to 0.005; smaller differences (tight tolerances) need the exponent.
    return f"{delta:+.1e}" if abs(delta) < 5e-3 else f"{delta:+.3f}"


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
    "divergence": "expected divergence",
    "invalid_equal": "invalid but equal",
    "invalid_alone": "invalid, alone",
    "incomplete": "incomplete",
}
NOTELESS = ("ok", "alone", "invalid_equal", "invalid_alone")  # statuses whose message names no run, step or path


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
        "val_loss": lambda r: (not math.isfinite(_loss(r)), _loss(r) if math.isfinite(_loss(r)) else 0.0, r.name),
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
                r.padding_side or "-",
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
        return f"DIVERGED, step {run.diverged_at_step}"
    return CHECK_CELLS.get(status, finding.message)


def _check_full(finding: Finding, names: Mapping[str, str]) -> str:
    """The finding's message, naming the runs it compares with by number."""
    if finding.status == "mismatch":
        return _mismatch_text([names.get(o, o) for o in finding.others], finding.deltas)
    if finding.status == "divergence":
        return _divergence_text(finding.deltas[0], names.get(finding.others[0], finding.others[0]))
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
    and the invalid, diverged, interrupted and incomplete runs. Runs are named by ``names`` (the table's numbers)
    where given, else by their run names."""
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
            f"{label(a)} vs {label(b)} ({_fmt_delta(d).lstrip('+')})" for (a, b), d in sorted(pairs.items())
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
    diverged = diverged_runs(runs)
    if diverged:
        lines.append(
            f"DIVERGED: {len(diverged)} valid run(s) stopped at a NaN or inf train/loss: "
            + listed([f"{label(r.name)} (step {r.diverged_at_step})" for r in diverged], "; ")
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


def skipped_runs(runs_dir: str | os.PathLike[str]) -> list[str]:
    """The reasons train.py wrote for combinations it skipped as invalid, one line per skipped run."""
    return sorted(p.read_text().strip() for p in Path(runs_dir).rglob(SKIPPED_FILE))


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
            from mhaplug import report  # matplotlib: imported only when a picture is asked for

            title = f"mhaplug runs: {args.runs_dir}"
            png = report.figure_png(runs, title=title, baseline=baseline, names=names)
            if args.plot:
                print(f"plot: {write_atomic(args.plot, png)}")
            if args.html:
                page = report.html_report(
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
                print(f"html: {write_atomic(args.html, page)}")
    except (OSError, ValueError) as err:
        print(f"mhaplug.compare: error: {err}", file=sys.stderr)
        return 2
    return 1 if any(f.status == "mismatch" for f in findings) or audit_failures(runs) or diverged_runs(runs) else 0


if __name__ == "__main__":
    sys.exit(main())
