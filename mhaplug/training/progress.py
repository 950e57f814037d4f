"""Lightning's progress bar for a run counted in steps, without the two fields that mean nothing there.

Lightning's rich bar describes the epoch as ``Epoch {current}/{max_epochs - 1}``. A run bounded by
``trainer.max_steps`` has ``max_epochs=-1`` (no epoch limit), so it reads ``Epoch 3/-2``. Both bars also show the
first logger's version, ``v_num: 0.000`` for the CSV log of a new run. :func:`progress_bar` makes the same bar
(rich when ``rich`` is installed, tqdm otherwise, as Lightning chooses) that says ``Epoch 3`` when epochs are
unlimited and leaves the version out: the run's folder, printed at the end, already says where the logs are.

``configs/callbacks/default.yaml`` names it; train.py leaves it out when ``trainer.enable_progress_bar=false``,
because Lightning refuses a progress bar callback then.
"""

from __future__ import annotations

from importlib.util import find_spec
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import ProgressBar, RichProgressBar, TQDMProgressBar

__all__ = ["RichStepProgressBar", "TQDMStepProgressBar", "progress_bar"]


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


def progress_bar() -> ProgressBar:
    """The bar Lightning would make by default (rich if installed, else tqdm), without ``v_num`` and ``/-2``."""
    return RichStepProgressBar() if find_spec("rich") is not None else TQDMStepProgressBar()
