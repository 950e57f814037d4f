"""The run folders the reporting tests read, written as training writes them: ``make_run`` one run, ``make_ablation``
the committed CPU ablation, ``equivalent`` three runs of one computation."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

CSV_HEADER = "epoch,step,train/loss,train/pad_fraction,train/real_tokens_per_sec,val/loss,val/ppl\n"


def write_run(
    runs_dir: Path,
    rel: str,
    *,
    strategy: str = "merged_bool",
    final: float = 5.0,
    key: str = "k1",
    valid: bool = True,
    padding_side: str = "right",
    tokens: float | None = 1000.0,
    summary: bool = True,
    hydra_overrides: list[str] | None = None,
    audit_failed: list[str] | None = None,
    **extra: Any,
) -> Path:
    """One run directory as training writes it: metrics.csv (train and val on separate rows, like Lightning's
    CSVLogger) and, unless ``summary=False`` (a crashed run), summary.json, with a mask audit that passed (failed
    ``audit_failed`` checks if given; ``audit=None`` in ``extra``: a run without one)."""
    run_dir = runs_dir / rel
    metrics = run_dir / "csv" / "version_0" / "metrics.csv"
    metrics.parent.mkdir(parents=True)
    metrics.write_text(
        CSV_HEADER + f"0,49,6.1,0.4,{tokens},,\n0,49,,,,5.5,244.7\n"
        f"0,99,5.2,0.4,{tokens},,\n0,99,,,,{final},{math.exp(final):.1f}\n"
    )
    if hydra_overrides is not None:
        (run_dir / ".hydra").mkdir()
        (run_dir / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in hydra_overrides))
    if summary:
        data = {
            "run_name": f"attention={strategy},data.padding_side={padding_side}",
            "strategy": strategy,
            "layout": "padded",
            "padding_side": padding_side,
            "batching": "random",
            "valid": valid,
            "equivalence_key": key,
            "final_val_loss": final,
            "best_val_loss": final - 0.01,
            "final_train_loss": 5.2,
            "real_tokens_per_sec": tokens,
            "padded_tokens_per_sec": 2000.0,
            "pad_fraction": 0.375,
            "peak_memory_mb": 512.3,
            "wall_time_s": 61.2,
            "steps": 100,
            "metrics_csv": "csv/version_0/metrics.csv",
            "audit": audit_summary(audit_failed or []),
            **extra,
        }
        (run_dir / "summary.json").write_text(json.dumps(data))
    return run_dir


def audit_summary(failed: list[str]) -> dict[str, Any]:
    """The ``audit`` entry of summary.json as MaskAudit writes it (fewer checks)."""
    checks = {
        name: {
            "passed": name not in failed,
            "max_change": 0.5 if name in failed else 0.0,
            "threshold": 1e-5,
            "positions": 40,
            "moved": 12 if name in failed else 0,
            "detail": "pad ids",
        }
        for name in ("padding", "causality")
    }
    return {
        "passed": not failed,
        "failed": failed,
        "checks": checks,
        "skipped": {},
        "call": "LitDecoderLM.model (DecoderLM)",
        "tolerance": 1e-4,
        "forwards": 3,
        "seconds": 0.01,
    }


# The committed CPU ablation (benchmarks/results/ablation-cpu-2cores.md), as the first release laid it out: sweep job
# folders numbered 0..27 (the skipped combinations among them), each run named by its overrides in summary.json.
# (folder, strategy, layout, padding side, valid, final val loss, real tokens/s, failed audit checks)
ABLATION = [
    ("0", "auto", "padded", "right", True, 6.5312, 15443, []),
    ("1", "auto", "packed", "right", True, 6.3225, 17319, []),
    ("2", "auto", "padded", "left", True, 6.5312, 14264, []),
    ("4", "reference", "padded", "right", True, 6.5312, 14404, []),
    ("5", "reference", "packed", "right", True, 6.3225, 16788, []),
    ("6", "reference", "padded", "left", True, 6.5312, 13887, []),
    ("8", "torch_mha", "padded", "right", True, 6.5312, 12965, []),
    (
        "9",
        "torch_mha",
        "packed",
        "right",
        False,
        6.3225,
        16259,
        ["finite", "padding", "loss", "causality", "documents"],
    ),
    ("10", "torch_mha", "padded", "left", False, 6.5312, 13115, ["finite", "padding", "loss", "causality"]),
    ("12", "merged_bool", "padded", "right", True, 6.5312, 14399, []),
    ("13", "merged_bool", "packed", "right", True, 6.3225, 17194, []),
    ("14", "merged_bool", "padded", "left", True, 6.5312, 16215, []),
    ("16", "merged_additive", "padded", "right", True, 6.5312, 14462, []),
    ("17", "merged_additive", "packed", "right", True, 6.3225, 18781, []),
    ("18", "merged_additive", "padded", "left", True, 6.5312, 14240, []),
    ("20", "causal_kpm", "padded", "right", True, 6.5312, 14557, []),
    ("22", "causal_kpm", "padded", "left", True, 6.5312, 14510, []),
    ("24", "causal_only", "padded", "right", True, 6.5312, 14687, []),
    ("26", "causal_only", "padded", "left", False, 6.5227, 17475, ["padding", "loss"]),
]


def write_ablation(runs_dir: Path) -> Path:
    """The 19 runs of :data:`ABLATION` (and one skipped combination) with their real, long run names."""
    for folder, strategy, layout, side, valid, final, tokens, failed in ABLATION:
        write_run(
            runs_dir,
            folder,
            strategy=strategy,
            final=final,
            key=layout,
            valid=valid,
            padding_side=side,
            tokens=float(tokens),
            audit_failed=failed,
            run_name=f"attention={strategy},data.layout={layout},data.padding_side={side}",
            layout=layout,
            pad_fraction=0.001 if layout == "packed" else 0.736,
        )
    (runs_dir / "3").mkdir()
    (runs_dir / "3" / "skipped.txt").write_text("attention=auto,data.layout=packed,data.padding_side=left: ...\n")
    return runs_dir


@pytest.fixture
def make_run() -> Callable[..., Path]:
    """:func:`write_run`: ``make_run(runs_dir, rel, **fields)`` writes one run folder and returns it."""
    return write_run


@pytest.fixture
def make_ablation() -> Callable[[Path], Path]:
    """:func:`write_ablation`: ``make_ablation(runs_dir)`` writes the committed ablation's 19 runs there."""
    return write_ablation


@pytest.fixture
def equivalent(tmp_path: Path) -> Path:
    """Three strategies, one computation, losses within 1e-3 of each other."""
    write_run(tmp_path, "0", strategy="torch_mha", final=5.0, tokens=1000.0)
    write_run(tmp_path, "1", strategy="merged_bool", final=5.0004, tokens=1500.0)
    write_run(tmp_path, "2", strategy="causal_kpm", final=5.0008, tokens=2500.0, padding_side="left")
    return tmp_path
