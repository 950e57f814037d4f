"""mhaplug.training.progress: Lightning's bar without ``/-2`` and ``v_num``, on a real fit, against Lightning's own
bar."""

from __future__ import annotations

import io
import re
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import RichProgressBar, TQDMProgressBar
from pytorch_lightning.loggers import CSVLogger
from torch.utils.data import DataLoader, TensorDataset

from mhaplug.training.progress import RichStepProgressBar, StepLines, TQDMStepProgressBar, progress_bar


class _Linear(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        (x,) = batch
        loss = self.layer(x).pow(2).mean()
        self.log("loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _fit(bar: pl.Callback, tmp_path: Path, **trainer: object) -> tuple[pl.Trainer, _Linear]:
    module = _Linear()
    fit = pl.Trainer(
        callbacks=[bar],
        logger=CSVLogger(tmp_path, name="csv"),
        enable_checkpointing=False,
        enable_model_summary=False,
        accelerator="cpu",
        log_every_n_steps=1,
        **trainer,
    )
    loader = DataLoader(TensorDataset(torch.ones(4, 2)), batch_size=2)
    fit.fit(module, loader)
    return fit, module


def test_rich_bar_says_epoch_without_the_minus_two_and_drops_v_num(tmp_path: Path) -> None:
    pytest.importorskip("rich")
    ours, module = _fit(RichStepProgressBar(), tmp_path / "ours", max_steps=5)
    lightning, _ = _fit(RichProgressBar(), tmp_path / "lightning", max_steps=5)
    assert ours.max_epochs == -1  # what max_steps alone gives, and what made Lightning's text "-2"
    bar, reference = ours.progress_bar_callback, lightning.progress_bar_callback
    assert reference._get_train_description(2) == "Epoch 2/-2"
    assert bar._get_train_description(2).rstrip() == "Epoch 2"
    assert len(bar._get_train_description(2)) == len(reference._get_train_description(2))  # the same padding
    assert set(reference.get_metrics(lightning, module)) == {"v_num", "loss"}
    assert set(bar.get_metrics(ours, module)) == {"loss"}


def test_rich_bar_keeps_lightnings_text_when_epochs_are_bounded(tmp_path: Path) -> None:
    pytest.importorskip("rich")
    ours, _ = _fit(RichStepProgressBar(), tmp_path / "ours", max_epochs=3)
    lightning, _ = _fit(RichProgressBar(), tmp_path / "lightning", max_epochs=3)
    # padded to the width of "Validation", as Lightning pads it
    assert ours.progress_bar_callback._get_train_description(1) == "Epoch 1/2 "
    assert lightning.progress_bar_callback._get_train_description(1) == "Epoch 1/2 "


def test_tqdm_bar_drops_v_num(tmp_path: Path) -> None:
    ours, module = _fit(TQDMStepProgressBar(), tmp_path / "ours", max_steps=2)
    lightning, _ = _fit(TQDMProgressBar(), tmp_path / "lightning", max_steps=2)
    assert set(lightning.progress_bar_callback.get_metrics(lightning, module)) == {"v_num", "loss"}
    assert set(ours.progress_bar_callback.get_metrics(ours, module)) == {"loss"}


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_is_the_kind_lightning_would_pick_on_a_terminal_and_lines_elsewhere() -> None:
    pytest.importorskip("rich")
    assert type(progress_bar(_Terminal())) is RichStepProgressBar
    assert type(progress_bar(io.StringIO())) is StepLines  # a log file: a redrawn bar would reach it once, at the end


@pytest.mark.parametrize("accumulate", [1, 2])
def test_step_lines_print_every_n_optimizer_steps_and_the_last(tmp_path: Path, accumulate: int) -> None:
    out = io.StringIO()
    _fit(StepLines(every_n_steps=2, stream=out), tmp_path, max_steps=5, accumulate_grad_batches=accumulate)
    lines = out.getvalue().splitlines()
    assert [line.split("  ")[0] for line in lines] == ["step 2/5 (40%)", "step 4/5 (80%)", "step 5/5 (100%)"]
    assert all(re.fullmatch(r"step \d/5 \(\d+%\)  loss \d+\.\d{4}  0:00:\d\d", line) for line in lines), lines
