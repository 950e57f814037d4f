"""Train the decoder LM: ``python train.py`` (defaults), ``python train.py attention=merged_bool data.layout=packed``,
``python train.py -m experiment=mask_ablation`` (the whole ablation),
``python train.py ckpt_path=<run>/checkpoints/last.ckpt`` (resume: writes on in ``<run>``).

``train(cfg)`` does one whole run from its config, the part tests call: it validates the config, builds the data,
model and Trainer, fits, and writes the run's summary.json into its folder. ``main`` is the thin Hydra entry point
around it (exit codes, refusals in one line, sweeps).

Exit codes of ``python train.py``: 0 finished (or skipped on purpose: skipped.txt), 1 crashed (Hydra prints the
traceback), 2 a setting that cannot train, an unknown option of a group or value of a choice on the command line,
or a data file or tokenizer that cannot be read (one line on stderr, no run folder left; ``HYDRA_FULL_ERROR=1``
prints the traceback above it), 3 diverged (NaN or inf train/loss), 143
interrupted by SIGTERM (checkpoint saved, resume with ``ckpt_path``). A sweep (``-m``) runs every job and exits with
the largest code of its jobs; SIGTERM stops it at once with 143.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shlex
import shutil
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import hydra
import pytorch_lightning as pl
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import LearningRateMonitor, ProgressBar
from pytorch_lightning.loggers import CSVLogger
from pytorch_lightning.utilities.exceptions import SIGTERMException

from mhaplug.common import METRICS_FILE, SKIPPED_FILE, SUMMARY_FILE, ConfigError, write_atomic
from mhaplug.training.callbacks import MaskAudit
from mhaplug.training.config import SkipRun, register_configs, validate
from mhaplug.training.hparams import run_results
from mhaplug.training.lifecycle import CheckpointOnSigterm, DivergedError, ValidateAtEnd
from mhaplug.training.overrides import check_overrides  # shared with python -m mhaplug.show
from mhaplug.training.quiet import silence_known_noise

log = logging.getLogger("mhaplug.train")

EXIT_REFUSED, EXIT_DIVERGED, EXIT_INTERRUPTED = 2, 3, 143  # 143 = 128 + SIGTERM, what a shell reports for it

# Settings that do not change the computation when the masks are right: runs that differ only in these
# must reach the same loss (mhaplug.compare checks it). Whole sections, then single knobs of a section.
_NOT_IN_EQUIVALENCE = {"attention", "paths", "logger", "callbacks", "hydra", "on_invalid", "task_name", "ckpt_path"}
_KNOBS_NOT_IN_EQUIVALENCE = {
    "data": ("padding_side", "num_workers", "num_proc", "cache_dir"),
    "model": ("strategy", "padding_side"),  # attention.strategy and data.padding_side, interpolated
    "trainer": (
        "accelerator",
        "devices",
        "strategy",
        "num_nodes",
        "enable_progress_bar",
        "default_root_dir",
        "logger",
        "callbacks",
    ),
}


def equivalence_key(cfg: DictConfig) -> str:
    container = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    assert isinstance(container, dict)
    kept = {k: v for k, v in container.items() if k not in _NOT_IN_EQUIVALENCE}
    for section, knobs in _KNOBS_NOT_IN_EQUIVALENCE.items():
        kept[section] = {k: v for k, v in (kept.get(section) or {}).items() if k not in knobs}
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _run_name() -> str:
    if HydraConfig.initialized():
        name = HydraConfig.get().job.override_dirname
        return name or "default"
    return "default"


def train(cfg: DictConfig) -> dict[str, Any]:
    """Validate, build data, model and trainer from ``cfg``, fit, and write ``summary.json``; return it."""
    invalid_reason = validate(cfg)
    if invalid_reason:
        log.warning("running an INVALID combination on purpose (on_invalid=run): %s", invalid_reason)
    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)

    datamodule = instantiate(cfg.data, _convert_="all")  # seeded by data.seed, not the global generators
    datamodule.prepare_data()
    datamodule.setup("fit")
    pl.seed_everything(
        cfg.seed, workers=True, verbose=False
    )  # after the data, so that data refused by its checks logs nothing
    model = instantiate(cfg.model, _convert_="all")  # vocab, positions and strategy: configs/model/small.yaml
    callbacks = [instantiate(c) for c in (cfg.callbacks or {}).values() if c is not None]
    for callback in callbacks:
        if isinstance(callback, MaskAudit):
            callback.expected_failure = invalid_reason  # a run wrong on purpose records its failure, never raises
    # cfg.logger maps a name to a logger config, as cfg.callbacks does (logger=null or {}: no logger at all)
    loggers = [instantiate(c) for c in (cfg.logger or {}).values() if c is not None]
    if not loggers:  # Lightning's LearningRateMonitor refuses a Trainer without a logger; it has nowhere to write
        callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
    if not cfg.trainer.get("enable_progress_bar", True):  # Lightning refuses a progress bar callback then
        callbacks = [c for c in callbacks if not isinstance(c, ProgressBar)]
    if not any(isinstance(c, ValidateAtEnd) for c in callbacks):  # every run ends with a val/loss of its weights
        callbacks.append(ValidateAtEnd())
    trainer: pl.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)

    start = time.perf_counter()
    outcome: dict[str, Any] = {"status": "finished"}
    try:
        trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.ckpt_path)
    except SIGTERMException:  # a SystemExit (code 0) from Lightning's loops: CheckpointOnSigterm saved the state
        saved = next((c.saved_path for c in callbacks if isinstance(c, CheckpointOnSigterm)), None)
        outcome = {"status": "interrupted", "resume_ckpt_path": None if saved is None else str(saved)}
    except DivergedError as err:
        outcome = {"status": "diverged", "diverged_at_step": err.step}
    wall = time.perf_counter() - start

    summary = _summary(cfg, trainer, datamodule, wall, invalid_reason, outcome)
    if trainer.is_global_zero:
        write_atomic(output_dir / SUMMARY_FILE, json.dumps(summary, indent=2))  # never a half-written summary
        _print_summary(summary, output_dir, compare_dir=_compare_dir(output_dir))
    return summary


def _compare_dir(output_dir: Path) -> Path:
    """What ``mhaplug.compare`` should read after this run: the sweep's folder for a job of a sweep (its jobs are
    the runs to compare), else this run's own folder (other runs under outputs/ may have nothing to do with it)."""
    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        return Path(HydraConfig.get().sweep.dir)
    return output_dir


def _summary(
    cfg: DictConfig, trainer: pl.Trainer, datamodule: Any, wall: float, invalid: str | None, outcome: dict[str, Any]
) -> dict[str, Any]:
    """What the run did. ``status``: ``finished``, ``interrupted`` (SIGTERM: ``steps`` is where it stopped and
    ``resume_ckpt_path`` the checkpoint saved there) or ``diverged`` (``diverged_at_step``: the step metrics.csv
    logged the first NaN or inf train/loss at)."""
    checkpoint = next((c for c in trainer.checkpoint_callbacks), None)
    csv_logger = next((lg for lg in trainer.loggers if isinstance(lg, CSVLogger)), None)  # what compare reads
    metrics_csv = None
    if csv_logger is not None:
        metrics_csv = os.path.relpath(Path(csv_logger.log_dir) / METRICS_FILE, cfg.paths.output_dir)
    status = outcome["status"]
    results = run_results(trainer)
    return {
        "run_name": _run_name(),
        "status": status,
        "interrupted": status == "interrupted",
        "diverged": status == "diverged",
        "diverged_at_step": outcome.get("diverged_at_step"),
        "resume_ckpt_path": outcome.get("resume_ckpt_path"),
        "resumed_from": cfg.ckpt_path,
        "strategy": str(cfg.attention.strategy),  # Choice members as plain strs
        "layout": str(cfg.data.layout),
        "padding_side": str(cfg.data.padding_side),
        "batching": str(cfg.data.batching),
        "valid": invalid is None,
        "invalid_reason": invalid,
        "equivalence_key": equivalence_key(cfg),
        # final/best val loss, final train loss, tokens/s, pad fraction, peak memory, steps: one definition, which
        # HParamsSummary logs for TensorBoard too
        **results,
        "wall_time_s": wall,
        "metrics_csv": metrics_csv,
        "checkpoint_dir": str(Path(checkpoint.dirpath)) if checkpoint is not None and checkpoint.dirpath else None,
        "data": dict(datamodule.stats),
        "audit": _audit(trainer),
        "no_val_loss": _no_val_loss(trainer, status) if results["final_val_loss"] is None else None,
    }


def _no_val_loss(trainer: pl.Trainer, status: str) -> str:
    """Why a run has no val/loss, as the summary line says it in place of the loss."""
    if trainer.limit_val_batches == 0:
        return f"validation off: trainer.limit_val_batches={trainer.limit_val_batches}"
    every, epoch = trainer.check_val_every_n_epoch, trainer.current_epoch + 1
    if every is not None and epoch < every:
        return f"not validated: trainer.check_val_every_n_epoch={every}, and the run ended in epoch {epoch}"
    if status != "finished":
        return f"{status} before its first validation"
    if not trainer.enable_validation:
        return "validation off: no validation batches (or no validation_step)"
    return "no validation ran"


def _audit(trainer: pl.Trainer) -> dict[str, Any] | None:
    """The step-0 mask audit of the run (``MaskAudit.report.as_dict()``), or None without the callback."""
    report = next((c.report for c in trainer.callbacks if isinstance(c, MaskAudit)), None)
    return None if report is None else report.as_dict()


def _print_summary(summary: dict[str, Any], output_dir: Path, *, compare_dir: Path) -> None:
    def fmt(value: Any, spec: str) -> str:
        return "n/a" if value is None else format(value, spec)

    what = {
        "finished": f"mhaplug run finished: {summary['steps']} steps",
        "interrupted": f"mhaplug run INTERRUPTED by SIGTERM at step {summary['steps']}",
        "diverged": f"mhaplug run DIVERGED: train/loss NaN or inf at step {summary['diverged_at_step']}",
    }[summary["status"]]
    lines = [
        "",
        (
            f"{what} in {_seconds(summary['wall_time_s'])} (attention={summary['strategy']}, {_layout_words(summary)}, "
            f"batching={summary['batching']})"
        ),
        f"  val/loss {_val_loss_words(summary)}, train/loss {fmt(summary['final_train_loss'], '.4f')}",
        (
            f"  real tokens/s {fmt(summary['real_tokens_per_sec'], ',.0f')}, "
            f"pad fraction {fmt(summary['pad_fraction'], '.1%')}, "
            f"peak memory {fmt(summary['peak_memory_mb'], ',.0f')} MB"
        ),
        f"  {_audit_line(summary['audit'], valid=summary['valid'])}",
        f"  logs: {output_dir}  checkpoints: {summary['checkpoint_dir']}",
        f"  compare runs: python -m mhaplug.compare {compare_dir}",
    ]
    if (summary.get("data") or {}).get("split_warning"):
        lines.insert(2, f"  WARNING: {summary['data']['split_warning']}")
    if not summary["valid"]:
        lines.insert(2, f"  INVALID on purpose: {summary['invalid_reason']}")
    if summary["status"] == "interrupted":
        lines.insert(
            2,
            f"  checkpoint saved: {summary['resume_ckpt_path']}; resume (writes on in this folder): "
            f"python train.py {_resume_command(summary['resume_ckpt_path'])}",
        )
    elif summary["status"] == "diverged":
        lines.insert(
            2,
            "  stopped there, no checkpoint of the diverged weights saved: lower model.lr, or resume "
            "from an earlier checkpoint",
        )
    print("\n".join(lines), flush=True)


def _seconds(wall: float) -> str:
    """``41 s``; ``0.4 s`` under ten seconds, where whole seconds would say a short run took none."""
    return f"{wall:.0f} s" if wall >= 10 else f"{wall:.1f} s"


def _val_loss_words(summary: dict[str, Any]) -> str:
    """``2.3456 (best 2.3012, on 21,034 tokens)``, or ``n/a (<why>)`` for a run that never validated."""
    if summary["final_val_loss"] is None:
        return f"n/a ({summary.get('no_val_loss') or 'not validated'})"
    return f"{summary['final_val_loss']:.4f} (best {summary['best_val_loss']:.4f}{_validated(summary['data'])})"


def _validated(data: dict[str, Any]) -> str:
    """How much each validation reads: ``, on 21,034 tokens`` (``of 5,120,332 held out`` when capped by
    ``data.val_max_tokens``)."""
    if "val_tokens" not in data:
        return ""
    held_out = data.get("val_tokens_held_out", data["val_tokens"])
    capped = f" of {held_out:,} held out" if held_out > data["val_tokens"] else ""
    return f", on {data['val_tokens']:,} tokens{capped}"


def _layout_words(summary: dict[str, Any]) -> str:
    """The layout as the summary line shows it: the padding side of padded rows (packed rows are filled from the
    left and padded only at their end, whatever data.padding_side says)."""
    if summary["layout"] == "packed":
        return "layout=packed"
    return f"layout={summary['layout']}, padding={summary['padding_side']}"


def _resume_command(ckpt_path: str | None) -> str:
    """This run's command-line overrides with ``ckpt_path`` set to ``ckpt_path``, quoted for a POSIX shell (and for
    Hydra: a sweep job's folder name holds ``=`` and ``,``)."""
    task = list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []
    kept = [o for o in task if not o.lstrip("+~").startswith("ckpt_path=")]
    value = str(ckpt_path)
    if not re.fullmatch(r"[\w/\\+.$%*@?|-]+", value):  # what Hydra's grammar takes unquoted
        value = f'"{value}"'
    return " ".join(shlex.quote(o) for o in [*kept, f"ckpt_path={value}"])


def _audit_line(audit: dict[str, Any] | None, *, valid: bool) -> str:
    if audit is None:
        return "mask audit: not run (no MaskAudit callback)"
    if audit["passed"]:
        checks = ", ".join(audit["checks"])
        return f"mask audit: passed ({checks}; {audit['forwards']} forwards, {audit['seconds'] * 1e3:.0f} ms)"
    return f"mask audit: FAILED {', '.join(audit['failed'])}" + ("" if valid else " (as expected: invalid on purpose)")


register_configs()
# At import, not in main(): DDP's children re-run or import this file, and each must be as quiet as rank 0.
silence_known_noise()

_exit_code = 0  # the largest exit code of this process's runs (a sweep runs several jobs in one process)
_sweep_dir: Path | None = None


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg: DictConfig) -> float | None:
    """One run, or one job of a sweep. A refused setting or a divergence sets the exit code and lets a sweep go on
    to its next job; SIGTERM ends the process at once (a preempted sweep stops)."""
    global _exit_code, _sweep_dir
    output_dir = Path(cfg.paths.output_dir)
    hydra_cfg = HydraConfig.get()
    sweep = hydra_cfg.mode == RunMode.MULTIRUN
    if sweep:
        _sweep_dir = Path(hydra_cfg.sweep.dir)
    hydra_files = {name for name in (hydra_cfg.output_subdir, f"{hydra_cfg.job.name}.log") if name}
    try:
        summary = train(cfg)
    except SkipRun as skipped:
        log.warning("skipped: %s (%s)", skipped, skipped.why)
        output_dir.mkdir(parents=True, exist_ok=True)
        write_atomic(output_dir / SKIPPED_FILE, f"{_run_name()}: {skipped}\n")
        return None
    except ConfigError as err:  # a setting, or a data file or tokenizer (DataError), that cannot train
        # One line, no traceback: Hydra would print one for an exception that reaches it, and exit 1.
        _refuse(err, job=f"job {hydra_cfg.job.num} ({_run_name()}): " if sweep else "")
        _discard_if_empty(output_dir, hydra_files)
        _exit_code = max(_exit_code, EXIT_REFUSED)
        return None
    except BaseException:
        _discard_if_empty(output_dir, hydra_files)  # failed before it wrote anything: no empty folder left
        raise
    if summary["status"] == "interrupted":
        raise SystemExit(EXIT_INTERRUPTED)
    if summary["status"] == "diverged":
        _exit_code = max(_exit_code, EXIT_DIVERGED)
    return summary["final_val_loss"]  # for Hydra sweepers that optimise a value


def _refuse(err: ConfigError, *, job: str = "") -> None:
    """``err`` as one line on stderr, ``train.py: error: <job><message>``; with ``HYDRA_FULL_ERROR=1`` (Hydra's own
    switch for its tracebacks) the traceback first, for a refusal that looks wrong."""
    if os.environ.get("HYDRA_FULL_ERROR") == "1":  # the value Hydra checks for
        traceback.print_exception(err, file=sys.stderr)
    print(f"train.py: error: {job}{' '.join(str(err).splitlines())}", file=sys.stderr, flush=True)


def _discard_if_empty(folder: Path, own: set[str]) -> None:
    """Remove ``folder`` if it holds nothing but ``own`` (what Hydra writes into every run folder: ``.hydra/`` and the
    job's log; ``multirun.yaml`` in a sweep's): a run refused or failed before it wrote anything leaves no folder.
    A folder with anything else in it (a resumed run's checkpoints and logs) is left as it is."""
    if not folder.is_dir() or not set(os.listdir(folder)) <= own:
        return
    for name in own:
        path = folder / name
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
    folder.rmdir()


if __name__ == "__main__":
    try:
        sys.argv[1:] = check_overrides(sys.argv[1:])
    except ConfigError as err:
        _refuse(err)
        sys.exit(EXIT_REFUSED)
    main()
    if _sweep_dir is not None:
        _discard_if_empty(_sweep_dir, {"multirun.yaml"})  # every job refused
    sys.exit(_exit_code)
