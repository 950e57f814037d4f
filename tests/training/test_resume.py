"""Exact mid-epoch resume in a real Trainer with DataLoader workers: the same batches and the same val/loss as an
uninterrupted run, and no Lightning warning that the dataloader is not resumable."""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import pytorch_lightning as pl
from pytorch_lightning.callbacks import ModelCheckpoint

from mhaplug.data import TextDataModule
from mhaplug.training.callbacks import BatchLog
from mhaplug.training.lit import LitDecoderLM

MAX_STEPS = 12
CHECKPOINT_STEP = 5  # mid-epoch: an epoch here is 45 batches, and 5 is not a validation step


def fit(
    tiny_data: Callable[..., TextDataModule],
    tiny_model: Callable[..., LitDecoderLM],
    tmp_path: Path,
    name: str,
    *,
    num_workers: int,
    ckpt_path: Path | None = None,
) -> tuple[pl.Trainer, list[tuple[int, str]]]:
    """``MAX_STEPS`` steps of a tiny model on 200 synthetic documents (batch 8), a checkpoint every ``CHECKPOINT_STEP``
    steps; returns the trainer and (global step, hash of input_ids) of every batch trained."""
    pl.seed_everything(0, workers=True)
    data = tiny_data(layout="padded", num_workers=num_workers)
    model = tiny_model(layout="padded", warmup_steps=2)
    checkpoints = ModelCheckpoint(
        dirpath=tmp_path / name, filename="{step}", every_n_train_steps=CHECKPOINT_STEP, save_top_k=-1
    )
    log = tmp_path / f"{name}.jsonl"
    trainer = pl.Trainer(
        max_steps=MAX_STEPS,
        max_epochs=-1,
        val_check_interval=6,
        check_val_every_n_epoch=None,
        accelerator="cpu",
        devices=1,
        callbacks=[checkpoints, BatchLog(str(log))],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=tmp_path,
    )
    trainer.fit(model, datamodule=data, ckpt_path=ckpt_path)
    return trainer, [(r["step"], r["input_ids"]) for r in map(json.loads, log.read_text().splitlines())]


def test_resume_with_workers_sees_the_batches_of_an_uninterrupted_run(
    tiny_data: Callable[..., TextDataModule], tiny_model: Callable[..., LitDecoderLM], tmp_path: Path
) -> None:
    full, expected = fit(tiny_data, tiny_model, tmp_path, "full", num_workers=2)
    assert [step for step, _ in expected] == list(range(MAX_STEPS))
    _, without_workers = fit(tiny_data, tiny_model, tmp_path, "no_workers", num_workers=0)
    assert without_workers == expected  # workers change nothing in what is trained

    checkpoint = tmp_path / "full" / f"step={CHECKPOINT_STEP}.ckpt"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        resumed, seen = fit(tiny_data, tiny_model, tmp_path, "resumed", num_workers=2, ckpt_path=checkpoint)
    assert seen == expected[CHECKPOINT_STEP:]  # the same batches, none skipped, none repeated
    assert float(resumed.callback_metrics["val/loss"]) == pytest.approx(
        float(full.callback_metrics["val/loss"]), abs=1e-6
    )
    assert not [str(w.message) for w in caught if "not resumable" in str(w.message)]
