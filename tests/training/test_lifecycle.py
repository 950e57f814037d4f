"""The lifecycle callbacks in a real Trainer. CheckpointOnSigterm with a real SIGTERM: the stop waits for the optimizer
step and the validation in progress, and the checkpoint resumes exactly (ResumeMarker: the logs of both attempts read
as one). (StopOnNonFiniteLoss: tests/training/test_logging.py and tests/test_train.py.)"""

from __future__ import annotations

import csv
import json
import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import CSVLogger
from pytorch_lightning.utilities.exceptions import SIGTERMException

from mhaplug.data import TextDataModule
from mhaplug.reporting.runs import read_curve
from mhaplug.training.callbacks import BatchLog
from mhaplug.training.lifecycle import CheckpointOnSigterm, ResumeMarker
from mhaplug.training.lit import LitDecoderLM


class SigtermAt(pl.Callback):
    """Sends this process a real SIGTERM when training batch ``batch`` (1-based, over the fit) starts, or with
    ``in_validation`` when the first validation batch after it starts."""

    def __init__(self, batch: int, *, in_validation: bool = False) -> None:
        self.batch, self.in_validation = batch, in_validation
        self.batches, self.sent = 0, False

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self.batches += 1
        if self.batches == self.batch and not self.in_validation:
            self._send()

    def on_validation_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if self.in_validation and self.batches >= self.batch and not self.sent:
            self._send()

    def _send(self) -> None:
        self.sent = True
        os.kill(os.getpid(), signal.SIGTERM)


class ValidationBatches(pl.Callback):
    def __init__(self) -> None:
        self.seen = 0

    def on_validation_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self.seen += 1


def fit_lm(
    tiny_data: Callable[..., TextDataModule],
    tiny_model: Callable[..., LitDecoderLM],
    tmp_path: Path,
    name: str,
    *,
    extra: list[pl.Callback] = (),
    ckpt_path: Path | None = None,
    logger_dir: Path | None = None,
) -> tuple[pl.Trainer, LitDecoderLM, CheckpointOnSigterm]:
    """8 optimizer steps of 2 micro-batches (batch 4 of synthetic documents); validation (3 batches) every 4 batches,
    between two steps."""
    pl.seed_everything(0, workers=True)
    data = tiny_data(batch_size=4, layout="padded")
    model = tiny_model(layout="padded", warmup_steps=2, accumulate_grad_batches=2)
    on_sigterm = CheckpointOnSigterm(dirpath=str(tmp_path / name))
    logger = CSVLogger(save_dir=logger_dir, name="csv", version=None) if logger_dir else False
    trainer = pl.Trainer(
        max_steps=8,
        max_epochs=-1,
        val_check_interval=4,
        check_val_every_n_epoch=None,
        limit_val_batches=3,
        log_every_n_steps=1,
        accelerator="cpu",
        devices=1,
        callbacks=[on_sigterm, ResumeMarker(), BatchLog(str(tmp_path / f"{name}.jsonl")), *extra],
        logger=logger,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=tmp_path,
    )  # CheckpointOnSigterm is the only Checkpoint: no ModelCheckpoint
    trainer.fit(model, datamodule=data, ckpt_path=ckpt_path)
    return trainer, model, on_sigterm


def batches(path: Path) -> list[tuple[int, str]]:
    return [(r["step"], r["input_ids"]) for r in map(json.loads, path.read_text().splitlines())]


@pytest.mark.parametrize("signal_at", ["first micro-batch of step 3", "validation after step 4"])
def test_sigterm_stops_at_a_step_boundary_with_a_checkpoint_that_resumes_exactly(
    tiny_data: Callable[..., TextDataModule], tiny_model: Callable[..., LitDecoderLM], tmp_path: Path, signal_at: str
) -> None:
    """Lightning alone stops after the micro-batch in progress (half of step 3 trained, and lost at the resume) or
    inside validation; CheckpointOnSigterm finishes the step, or the validation, and saves a checkpoint there."""
    _, full_model, _ = fit_lm(tiny_data, tiny_model, tmp_path, "full", logger_dir=tmp_path / "full_logs")
    expected = batches(tmp_path / "full.jsonl")
    assert [step for step, _ in expected] == [s for s in range(8) for _ in range(2)]

    in_validation = signal_at.startswith("validation")
    sigterm = SigtermAt(8 if in_validation else 5, in_validation=in_validation)
    validation = ValidationBatches()
    with pytest.raises(SIGTERMException):
        fit_lm(tiny_data, tiny_model, tmp_path, "run", extra=[sigterm, validation], logger_dir=tmp_path / "run_logs")
    stop = 4 if in_validation else 3
    assert sigterm.sent
    if in_validation:
        assert validation.seen == 3 + 3  # the validation at step 2, and all of the one signalled
    checkpoint = tmp_path / "run" / "last.ckpt"
    assert torch.load(checkpoint, weights_only=False)["global_step"] == stop
    assert batches(tmp_path / "run.jsonl") == [b for b in expected if b[0] < stop]  # nothing trained is lost

    resumed, resumed_model, _ = fit_lm(
        tiny_data, tiny_model, tmp_path, "run", ckpt_path=checkpoint, logger_dir=tmp_path / "run_logs"
    )
    assert resumed.global_step == 8
    assert batches(tmp_path / "run.jsonl") == expected  # the resume trains exactly the batches not trained yet
    for (name, got), want in zip(resumed_model.state_dict().items(), full_model.state_dict().values(), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6, msg=name)

    # Two logger versions, read as one run: the uninterrupted run's train/loss at every optimizer step.
    attempts = sorted((tmp_path / "run_logs" / "csv").glob("version_*/metrics.csv"))
    assert [p.parent.name for p in attempts] == ["version_0", "version_1"]
    with attempts[1].open() as f:
        first_row = next(csv.DictReader(f))
    assert float(first_row["resumed_at_step"]) == stop and int(first_row["step"]) == 2 * stop  # logger steps: batches
    full_curve = read_curve(tmp_path / "full_logs" / "csv" / "version_0" / "metrics.csv", "train/loss")
    run_curve = read_curve(attempts, "train/loss")
    assert dict(run_curve) == pytest.approx({s: v for s, v in full_curve if s in dict(run_curve)}, abs=1e-6)
    assert per_step(run_curve) == pytest.approx(per_step(full_curve), abs=1e-6) and len(per_step(full_curve)) == 8


def per_step(curve: list[tuple[int, float]]) -> list[float]:
    """One value per optimizer step: with manual accumulation Lightning logs a step's loss again on the next
    micro-batch (which a resumed attempt, starting at a step, does not)."""
    values = [v for _, v in curve]
    return [v for i, v in enumerate(values) if i == 0 or v != values[i - 1]]
