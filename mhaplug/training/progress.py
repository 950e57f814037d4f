"""Lightning's progress bar for a run counted in steps, without the two fields that mean nothing there.

Lightning's rich bar describes the epoch as ``Epoch {current}/{max_epochs - 1}``. A run bounded by
``trainer.max_steps`` has ``max_epochs=-1`` (no epoch limit), so it reads ``Epoch 3/-2``. Both bars also show the
first logger's version, ``v_num: 0.000`` for the CSV log of a new run. :func:`progress_bar` makes the same bar
(rich when ``rich`` is installed, tqdm otherwise, as Lightning chooses) that says ``Epoch 3`` when epochs are
unlimited and leaves the version out: the run's folder, printed at the end, already says where the logs are.

Where stdout is not a terminal (a log file, a batch job), a bar is redrawn in place and reaches the file once, at
the end: there :func:`progress_bar` makes :class:`StepLines` instead, a line every ``trainer.log_every_n_steps``
optimizer steps (and at the last one), ``step 20/300 (7%)  loss 6.1234  val/loss 6.2345  0:00:41``.

``configs/callbacks/default.yaml`` names it; train.py leaves it out when ``trainer.enable_progress_bar=false``,
because Lightning refuses a progress bar callback then.
"""

from __future__ import annotations

import sys
import time
from datetime import timedelta
from importlib.util import find_spec
from typing import Any, TextIO

import pytorch_lightning as pl
from pytorch_lightning.callbacks import ProgressBar, RichProgressBar, TQDMProgressBar

__all__ = ["RichStepProgressBar", "StepLines", "TQDMStepProgressBar", "progress_bar"]


class _WithoutVersion(ProgressBar):
    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        # The override Lightning's own docs give for hiding the version (ProgressBar.get_metrics).
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)
        return items


class RichStepProgressBar(_WithoutVersion, RichProgressBar):
    """Lightning's rich bar; ``Epoch 3`` rather than ``Epoch 3/-2`` when the epochs are unlimited, no ``v_num``."""

    def _get_train_description(self, current_epoch: int) -> str:
        # Lightning's only hook for this text (private). If it is renamed, the bar shows Lightning's own text again;
        # tests/training/test_progress.py fails then.
        description = super()._get_train_description(current_epoch)
        if self.trainer.max_epochs == -1:
            width = len(description)
            description = f"{f'Epoch {current_epoch}':{width}}"
        return description


class TQDMStepProgressBar(_WithoutVersion, TQDMProgressBar):
    """Lightning's tqdm bar (``Epoch 3``, no maximum) without ``v_num``."""


class StepLines(_WithoutVersion):
    """Progress as plain lines, for a log file: every ``every_n_steps`` optimizer steps (default
    ``trainer.log_every_n_steps``) and at the last step, the step, the share of ``max_steps`` done, the progress
    bar's metrics and the time since the fit started. Rank 0 only."""

    def __init__(self, every_n_steps: int | None = None, stream: TextIO | None = None) -> None:
        super().__init__()
        self.every_n_steps, self.stream = every_n_steps, stream
        self._enabled, self._started, self._last_step = True, 0.0, -1

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    @property
    def is_enabled(self) -> bool:
        return self._enabled

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self._started = time.monotonic()

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step  # optimizer steps: the same for every micro-batch of an accumulated step
        every = self.every_n_steps or trainer.log_every_n_steps or 1
        last = trainer.max_steps is not None and step == trainer.max_steps
        if (
            not (self._enabled and trainer.is_global_zero)
            or step in (0, self._last_step)
            or (step % every and not last)
        ):
            return
        self._last_step = step
        print(
            self.line(trainer, pl_module, time.monotonic() - self._started), file=self.stream or sys.stdout, flush=True
        )

    def line(self, trainer: pl.Trainer, pl_module: pl.LightningModule, elapsed: float) -> str:
        """``step 20/300 (7%)  loss 6.1234  val/loss 6.2345  0:00:41`` (``step 20`` when steps are unlimited)."""
        step, total = trainer.global_step, trainer.max_steps
        where = f"step {step}/{total} ({step / total:.0%})" if total and total > 0 else f"step {step}"
        metrics = [f"{name} {_number(value)}" for name, value in self.get_metrics(trainer, pl_module).items()]
        return "  ".join([where, *metrics, str(timedelta(seconds=round(elapsed)))])


def _number(value: Any) -> str:
    if isinstance(value, (int, float)) or (hasattr(value, "item") and getattr(value, "numel", lambda: 0)() == 1):
        return f"{float(value):.4f}"
    return str(value)


def progress_bar(stream: TextIO | None = None) -> ProgressBar:
    """The bar Lightning would make by default (rich if installed, else tqdm), without ``v_num`` and ``/-2``;
    :class:`StepLines` where ``stream`` (default stdout) is not a terminal."""
    if not (stream or sys.stdout).isatty():
        return StepLines(stream=stream)
    return RichStepProgressBar() if find_spec("rich") is not None else TQDMStepProgressBar()
