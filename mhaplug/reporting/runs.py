"""Training runs read from their folders, and the equivalence check between them.

A run is a directory anywhere below the folder searched (a Hydra multirun directory, say) that holds
``summary.json``, written by training when a run ends, and the Lightning CSVLogger ``metrics.csv`` it names. A
directory with a ``.hydra/`` folder or a ``metrics.csv`` but no ``summary.json`` is listed as incomplete (crashed or
still running), never silently dropped. A run resumed in its folder logged each attempt to its own logger version
(``csv/version_0/``, ``csv/version_1/``, ...): it is one run, whose curves take each step from the latest attempt
that logged it (:func:`read_curve`). A run stopped by SIGTERM (``"status": "interrupted"``) is listed with the
checkpoint to resume from and not compared; one whose train/loss became NaN or inf (``"diverged"``) is listed with
the step (the one metrics.csv logged the loss at), and a valid run that finished with a NaN or inf final val loss is
listed as diverged too.

The equivalence check (:func:`check_equivalence`) is the point of comparing runs. Runs with the same
``equivalence_key`` are the same computation (same data, model, seed, steps, layout and batching): a correct mask
strategy or padding side cannot change the result, so valid runs of one key whose final val loss differs by more
than the tolerance reveal a mask bug. Invalid runs (``valid: false``, kept to teach, such as ``causal_only`` with
left padding, where real queries attend to pad keys) are expected to diverge: their difference is shown and never
fails. A run whose ``equivalence_key`` is null is compared with none. The step-0 mask audit of each run
(:mod:`mhaplug.training.audit`) is in its ``summary.json``.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from mhaplug.common import METRICS_FILE, SKIPPED_FILE, SUMMARY_FILE

__all__ = [
    "Finding",
    "Run",
    "audit_failures",
    "check_equivalence",
    "choose_baseline",
    "diverged_runs",
    "final_loss",
    "load_runs",
    "read_curve",
    "skipped_runs",
]

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
STEP_KEYS = ("steps", "diverged_at_step")  # whole numbers: a JSON inf (1e999), NaN or 2.5 is a damaged file
RUN_STATUSES = ("finished", "interrupted", "diverged")  # summary.json's "status" (absent in older runs: finished)
SortKey = Literal["val_loss", "tokens", "name"]
Status = Literal[
    "ok",
    "alone",
    "no_key",
    "mismatch",
    "divergence",
    "invalid_equal",
    "invalid_alone",
    "incomplete",
    "interrupted",
    "diverged",
]


@dataclass(frozen=True)
class Run:
    """One run directory. ``complete`` is False without ``summary.json``: then only ``name``, ``path``,
    ``metrics_csv(s)`` and ``steps`` (the last step logged to metrics.csv, if any) are known. ``metrics_csvs`` are
    the run's attempts, oldest first (one unless it was resumed); ``metrics_csv`` the latest. ``status``:
    ``finished``, ``interrupted`` (SIGTERM; ``resume_ckpt_path``) or ``diverged`` (at ``diverged_at_step``).
    ``equivalence_key`` None (null in summary.json): comparable with no other run."""

    name: str
    path: Path
    complete: bool = True
    strategy: str = ""
    layout: str = ""
    padding_side: str = ""
    batching: str = ""
    valid: bool = True
    equivalence_key: str | None = ""
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
    :class:`mhaplug.training.lifecycle.ResumeMarker` logs ``resumed_at_step``); the earlier rows past it were trained
    after the checkpoint it resumed from, and lost."""
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
            if not step:
                continue
            number = _whole(step)
            if number is None:
                raise ValueError(f"{csv_path}, line {line}: step must be a whole number, got {step!r}")
            first = number if first is None else min(first, number)
            if value:
                try:
                    points.append((number, float(value)))
                except ValueError:
                    raise ValueError(f"{csv_path}, line {line}: {column} must be a number, got {value!r}") from None
    return first, points


def _whole(text: str) -> int | None:
    """``text`` (``"12"``, or ``"12.0"`` as a float column writes it) as an int, or None if it is no whole number
    (``"inf"``, ``"1e400"``, ``"nan"``, ``"9.5"``, ``"x"``)."""
    try:
        number = float(text)
    except ValueError:
        return None
    return int(number) if number.is_integer() else None  # False for inf and NaN


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
    for key in STEP_KEYS:
        if numbers[key] is not None and not numbers[key].is_integer():  # inf, NaN, 2.5: int() would raise or round
            raise ValueError(f"{path}: key {key!r} must be a whole number or null, got {data[key]!r}")
        numbers[key] = None if numbers[key] is None else int(numbers[key])
    texts = {key: str(data[key]) for key in ("strategy", "layout", "padding_side", "batching")}
    key = data["equivalence_key"]
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
        equivalence_key=None if key is None else str(key),  # null: comparable with no other run
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
    by more than ``tolerance`` (absolute; a missing one always differs) is a ``mismatch``, a mask bug. A valid run
    whose final val loss is NaN or inf failed: ``diverged``, as one whose train/loss was, and compared with none. A
    valid run with a null key is compared with none (``no_key``). An invalid run is measured against one valid run
    of its key (preferring the same padding side, then strategy ``reference``, then the first by name):
    ``divergence`` as expected, or ``invalid_equal`` when it does not.
    """
    if not tolerance >= 0:
        raise ValueError(f"tolerance must be a number >= 0, got {tolerance!r}")
    groups: dict[str, list[Run]] = defaultdict(list)
    for run in runs:
        if _finished(run) and run.valid and run.equivalence_key is not None and not _val_diverged(run):
            groups[run.equivalence_key].append(run)
    findings = []
    for run in runs:
        group = groups.get(run.equivalence_key, []) if _finished(run) and run.equivalence_key is not None else []
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
        elif run.valid and _val_diverged(run):
            findings.append(Finding(run.name, "diverged", f"DIVERGED: final val/loss {run.final_val_loss}"))
        elif run.valid and run.equivalence_key is None:
            findings.append(Finding(run.name, "no_key", "not compared: equivalence_key is null", group_size=1))
        elif run.valid:
            others = [o for o in group if o is not run]
            bad = [
                (o.name, final_loss(run) - final_loss(o))
                for o in others
                if not abs(final_loss(run) - final_loss(o)) <= tolerance
            ]
            if bad:
                names, deltas = zip(*bad)
                text = mismatch_text(names, deltas)
                findings.append(Finding(run.name, "mismatch", text, names, deltas, len(group)))
            elif others:
                findings.append(Finding(run.name, "ok", f"ok ({len(group)} equivalent runs)", group_size=len(group)))
            else:
                findings.append(Finding(run.name, "alone", "-", group_size=1))
        elif group:
            ref = min(group, key=lambda o: (o.padding_side != run.padding_side, o.strategy != "reference", o.name))
            delta = final_loss(run) - final_loss(ref)
            if abs(delta) <= tolerance:
                status, text = "invalid_equal", "invalid but equal (the wrong mask changed nothing here)"
            else:
                status, text = "divergence", divergence_text(delta, ref.name)
            findings.append(Finding(run.name, status, text, (ref.name,), (delta,), len(group)))
        else:
            findings.append(Finding(run.name, "invalid_alone", "invalid (no valid run with its equivalence_key)"))
    return findings


def mismatch_text(others: Sequence[str], deltas: Sequence[float]) -> str:
    return "MISMATCH vs " + ", ".join(f"{name} ({fmt_delta(d)})" for name, d in zip(others, deltas))


def divergence_text(delta: float, ref: str) -> str:
    return f"expected divergence: {fmt_delta(delta)} vs {ref}"


def _finished(run: Run) -> bool:
    return run.complete and run.status == "finished"


def _val_diverged(run: Run) -> bool:
    """A finished run whose final val loss is NaN or inf (its train/loss stayed finite, or it would have stopped)."""
    return _finished(run) and run.final_val_loss is not None and not math.isfinite(run.final_val_loss)


def diverged_runs(runs: Sequence[Run]) -> list[Run]:
    """Valid runs whose train/loss became NaN or inf (``status`` ``diverged``), or that finished with a NaN or inf
    final val loss: each failed, and the comparison of its group is missing a member."""
    return [r for r in runs if r.complete and r.valid and (r.status == "diverged" or _val_diverged(r))]


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


def audit_failures(runs: Sequence[Run]) -> list[Run]:
    """Valid runs that failed the mask audit: each has a mask bug."""
    return [r for r in runs if r.complete and r.valid and r.audit_passed is False]


def final_loss(run: Run) -> float:
    return math.nan if run.final_val_loss is None else run.final_val_loss


def fmt_delta(delta: float) -> str:
    # Three decimals read well down to 0.005; smaller differences (tight tolerances) need the exponent.
    return f"{delta:+.1e}" if abs(delta) < 5e-3 else f"{delta:+.3f}"


def skipped_runs(runs_dir: str | os.PathLike[str]) -> list[str]:
    """The reasons train.py wrote for combinations it skipped as invalid, one line per skipped run."""
    return sorted(p.read_text().strip() for p in Path(runs_dir).rglob(SKIPPED_FILE))
