"""Each run's settings and results, logged for TensorBoard's HParams view.

The HParams view lays the runs of a sweep side by side: a row per run, a column per setting (strategy, layout,
padding side, ...) and per result (``summary/final_val_loss``, ...), sortable and filterable, with each row linked to
its run's scalars. :class:`HParamsSummary` writes a run's row; :func:`run_results` is what the fit reached, under the
keys of summary.json. The results are logged once, when the fit ends (or diverges), because only then are they
final: the best validation loss, the whole run's throughput and peak memory are not known before, and a row logged
at the start would hold placeholders (Lightning's ``hp_metric``, which ``configs/logger/tensorboard.yaml`` turns off).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import TensorBoardLogger

from mhaplug.training.callbacks import ThroughputMonitor
from mhaplug.training.lifecycle import DivergedError

__all__ = ["HParamsSummary", "run_results"]


def run_results(trainer: pl.Trainer) -> dict[str, float | int | None]:
    """What a fit reached, under the keys of summary.json (None where nothing was logged)::

        final_val_loss, final_train_loss   the last logged val/loss and train/loss
        best_val_loss                      the first ModelCheckpoint's best score, else the last val/loss
        real_tokens_per_sec, padded_tokens_per_sec, pad_fraction   ThroughputMonitor.rates() (the whole run)
        peak_memory_mb                     the last logged train/peak_memory_mb
        steps                              trainer.global_step

    The numbers ``train.py`` writes to summary.json under the same keys; :class:`HParamsSummary` logs them.
    """
    metrics = trainer.callback_metrics

    def last(name: str) -> float | None:
        value = metrics.get(name)
        return None if value is None else float(value)

    checkpoint = next((c for c in trainer.checkpoint_callbacks if isinstance(c, ModelCheckpoint)), None)
    best = None if checkpoint is None else checkpoint.best_model_score
    monitor = next((c for c in trainer.callbacks if isinstance(c, ThroughputMonitor)), None)
    rates = monitor.rates() if monitor is not None else dict.fromkeys(ThroughputMonitor().rates())
    return {
        "final_val_loss": last("val/loss"),
        "best_val_loss": float(best) if best is not None else last("val/loss"),
        "final_train_loss": last("train/loss"),
        **rates,  # real_tokens_per_sec, padded_tokens_per_sec, pad_fraction
        "peak_memory_mb": last("train/peak_memory_mb"),
        "steps": trainer.global_step,
    }


class HParamsSummary(pl.Callback):
    """Log a run's settings with its results to every TensorBoard logger of the Trainer, once the fit is over, so that
    TensorBoard's HParams view shows the runs of a sweep side by side: a row per run, a column per setting
    (strategy, layout, padding side, ...) and per result (``summary/final_val_loss``, ...), sortable and filterable.

    ``settings`` names the values to log. Each is looked up in the Trainer (``precision``, ``max_steps``,
    ``world_size``), the LightningModule's hyper-parameters (what the model was built with) and the DataModule's, in
    that order; a name none of them has is an error at the start of the fit. ``None`` (the default) logs every
    hyper-parameter of the module and the DataModule. The results are those of :func:`run_results`, logged as
    ``summary/<name>`` (``<name>``: the key in summary.json), NaN included; a result that is None (no validation
    ran) is left out. Every run writes its own experiment summary and TensorBoard takes its columns from one of
    them: runs compared together should log the same settings (a sweep's jobs do).

    Logged through Lightning's ``TensorBoardLogger.log_hyperparams(params, metrics)``: the HParams plugin's
    experiment, session-start and session-end summaries in the run's event file, and the results as scalars at the
    last step. Give the logger ``default_hp_metric=False``, or Lightning writes a first session with a meaningless
    ``hp_metric`` when the fit starts. A fit that ends normally or diverges (:class:`DivergedError`: the run is
    over, its row shows the NaN) logs; one stopped by SIGTERM does not: the resumed attempt logs when it ends (in
    the logger's next version). Other loggers (the CSV log that mhaplug.compare reads) are left untouched; without a
    TensorBoard logger this callback does nothing.
    """

    def __init__(self, *, settings: Sequence[str] | None = None) -> None:
        if isinstance(settings, str):
            raise TypeError(f"settings must be a list of names, got the string {settings!r}")
        self.settings = None if settings is None else list(settings)

    @staticmethod
    def _loggers(trainer: pl.Trainer) -> list[TensorBoardLogger]:
        return [logger for logger in trainer.loggers if isinstance(logger, TensorBoardLogger)]

    def params(self, trainer: pl.Trainer) -> dict[str, Any]:
        """The settings of this fit, as logged: ``{name: value}`` in the order of ``settings`` (None: every
        hyper-parameter of the module and the DataModule, by name)."""
        datamodule = getattr(trainer, "datamodule", None)
        sources: list[Mapping[str, Any]] = [
            {"precision": trainer.precision, "max_steps": trainer.max_steps, "world_size": trainer.world_size},
            trainer.lightning_module.hparams,
            getattr(datamodule, "hparams", None) or {},
        ]
        names = self.settings
        if names is None:
            names = sorted({k for source in sources[1:] for k in source})
        missing = [name for name in names if not any(name in source for source in sources)]
        if missing:
            available = sorted({k for source in sources for k in source})
            raise ValueError(
                f"HParamsSummary(settings=...): {missing} are neither Trainer settings nor hyper-parameters of the "
                f"LightningModule or DataModule; available: {', '.join(available)}"
            )
        searched = sources if self.settings is not None else sources[1:]
        params = {name: next(source[name] for source in searched if name in source) for name in names}
        # torch's hparams summary would log a bool as the number 0 or 1: as a word, the HParams view filters it by
        # name. Lightning turns other values that are not numbers or strings (None, tuples) into their str().
        return {k: str(v) if isinstance(v, bool) else v for k, v in params.items()}

    def metrics(self, trainer: pl.Trainer) -> dict[str, float]:
        """The results of this fit, as logged: ``{"summary/<name>": value}``, None left out."""
        return {f"summary/{name}": float(value) for name, value in run_results(trainer).items() if value is not None}

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._loggers(trainer):
            self.params(trainer)  # a misspelt setting fails now, not after hours of training

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._log(trainer)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if isinstance(exception, DivergedError):
            self._log(trainer)

    def _log(self, trainer: pl.Trainer) -> None:
        loggers = self._loggers(trainer)
        if not loggers:
            return
        params, metrics = self.params(trainer), self.metrics(trainer)
        for logger in loggers:  # rank 0 only (log_hyperparams is rank_zero_only)
            logger.log_hyperparams(params, metrics, step=trainer.global_step)
            logger.save()  # flush, so the event file holds the summary even if the process is killed next
