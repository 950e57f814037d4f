"""ThroughputMonitor in a real Trainer on a tiny LitDecoderLM: what it logs per optimizer step equals what the batches
literally hold, on a fake clock that makes step times exact; peak_memory_mb. (MaskAudit: tests/training/test_audit.py;
the lifecycle callbacks: tests/training/test_lifecycle.py; HParamsSummary: tests/training/test_logging.py.)"""

from __future__ import annotations

import types
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from mhaplug.data.collate import PadCollator
from mhaplug.training import callbacks as callbacks_module
from mhaplug.training.callbacks import ThroughputMonitor, peak_memory_mb
from mhaplug.training.lit import LitDecoderLM

VOCAB = 50
METRICS = (
    "train/real_tokens_per_sec",
    "train/padded_tokens_per_sec",
    "train/pad_fraction",
    "train/step_time_s",
    "train/peak_memory_mb",
)
PAUSE = 100.0  # fake seconds spent in validation and between epochs: never step time
BATCH = 1.0  # fake seconds per training micro-batch


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Ticker(pl.Callback):
    """Placed before the monitor: each training micro-batch costs BATCH, validation and an epoch change PAUSE."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.validations_mid_step = 0

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.clock.now += BATCH

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.clock.now += PAUSE
        self.validations_mid_step += pl_module._step["micro"] > 0  # LitDecoderLM is between two micro-batches

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.clock.now += PAUSE


class Recorder(pl.Callback):
    """Placed after the monitor: the literal counts of every batch trained, grouped by optimizer step, and the
    metrics logged when a step ends."""

    def __init__(self) -> None:
        self.steps: dict[int, list[tuple[int, int]]] = {}  # global step at the batch's start -> [(real, padded)]
        self.logged: list[dict[str, float]] = []
        self._step = 0

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._step = trainer.global_step
        real = int((~batch["key_padding_mask"]).sum())  # from the masks, not from the num_* keys
        self.steps.setdefault(self._step, []).append((real, batch["input_ids"].numel()))

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step != self._step:
            self.logged.append({name: float(trainer.callback_metrics[name]) for name in METRICS})


def rows() -> list[list[int]]:
    generator = torch.Generator().manual_seed(0)
    lengths = [9, 3, 6, 1, 5, 7, 2, 4, 8, 11, 3, 6, 10, 1, 5]  # batches of 3: 5 batches, each with padding
    return [torch.randint(1, VOCAB, (n,), generator=generator).tolist() for n in lengths]


def without_counts(batch: dict[str, Any]) -> dict[str, Any]:
    """A user's collator: no num_* keys, so LitDecoderLM counts the batch itself."""
    return {k: v for k, v in batch.items() if not k.startswith("num_")}


def fit(
    tmp_path: Path,
    monitor: ThroughputMonitor,
    clock: FakeClock,
    *,
    max_steps: int,
    accumulate: int = 2,
    collate: Any = None,
    ckpt_path: str | None = None,
) -> tuple[pl.Trainer, Ticker, Recorder]:
    torch.manual_seed(0)
    model = LitDecoderLM(
        vocab_size=VOCAB,
        max_positions=32,
        d_model=32,
        num_heads=2,
        num_layers=1,
        d_ff=64,
        layout="padded",
        warmup_steps=0,
        accumulate_grad_batches=accumulate,
    )
    loader = DataLoader(rows(), batch_size=3, collate_fn=collate or PadCollator(padding_side="left"))
    ticker, recorder = Ticker(clock), Recorder()
    trainer = pl.Trainer(
        max_steps=max_steps,
        accelerator="cpu",
        devices=1,
        callbacks=[ticker, monitor, recorder],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        val_check_interval=3,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        default_root_dir=tmp_path,
    )
    trainer.fit(model, train_dataloaders=loader, val_dataloaders=loader, ckpt_path=ckpt_path)
    return trainer, ticker, recorder


@pytest.mark.parametrize("counted_by", ["collator", "module"])
def test_logs_each_optimizer_step_from_the_batches_literal_counts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, counted_by: str
) -> None:
    """5 batches an epoch, 2 per step: steps of batches [0 1] [2 3] [4] (the epoch's end) and [0 1] of the next epoch;
    validation after batch 2, in the middle of step 2."""
    clock = FakeClock()
    monkeypatch.setattr(callbacks_module, "time", types.SimpleNamespace(perf_counter=clock))
    monitor = ThroughputMonitor()
    collate = None if counted_by == "collator" else lambda rows: without_counts(PadCollator(padding_side="left")(rows))
    trainer, ticker, recorder = fit(tmp_path, monitor, clock, max_steps=4, collate=collate)
    assert trainer.global_step == 4 and ticker.validations_mid_step >= 1
    assert [len(batches) for batches in recorder.steps.values()] == [2, 2, 1, 2]
    assert len(recorder.logged) == 4  # once per optimizer step
    peaks = []
    for batches, logged in zip(recorder.steps.values(), recorder.logged, strict=True):
        real, padded = sum(r for r, _ in batches), sum(p for _, p in batches)
        seconds = BATCH * len(batches)  # validation and the epoch change are not step time
        assert logged["train/step_time_s"] == seconds
        assert logged["train/pad_fraction"] == pytest.approx(1 - real / padded)
        assert logged["train/real_tokens_per_sec"] == pytest.approx(real / seconds)
        assert logged["train/padded_tokens_per_sec"] == pytest.approx(padded / seconds)
        peaks.append(logged["train/peak_memory_mb"])
    assert 0 < peaks[0] and peaks == sorted(peaks)  # the process's peak so far
    trained = [count for batches in recorder.steps.values() for count in batches]
    real, padded = sum(r for r, _ in trained), sum(p for _, p in trained)
    assert monitor.totals == {"real_tokens": real, "padded_tokens": padded, "train_time_s": 7 * BATCH, "steps": 4}
    assert monitor.rates() == pytest.approx(
        {"real_tokens_per_sec": real / 7, "padded_tokens_per_sec": padded / 7, "pad_fraction": 1 - real / padded}
    )


def test_a_resumed_run_continues_the_totals_saved_in_its_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = FakeClock()
    monkeypatch.setattr(callbacks_module, "time", types.SimpleNamespace(perf_counter=clock))
    first = ThroughputMonitor()
    trainer, _, _ = fit(tmp_path, first, clock, max_steps=5, accumulate=1)  # one epoch
    trainer.save_checkpoint(tmp_path / "step5.ckpt")
    assert first.totals["steps"] == 5 and first.totals["train_time_s"] == 5 * BATCH
    resumed = ThroughputMonitor()
    trainer, _, recorder = fit(
        tmp_path, resumed, clock, max_steps=7, accumulate=1, ckpt_path=str(tmp_path / "step5.ckpt")
    )
    assert trainer.global_step == 7 and list(recorder.steps) == [5, 6]  # steps after the checkpoint's
    trained = [count for batches in recorder.steps.values() for count in batches]
    assert resumed.totals == {
        "real_tokens": first.totals["real_tokens"] + sum(r for r, _ in trained),
        "padded_tokens": first.totals["padded_tokens"] + sum(p for _, p in trained),
        "train_time_s": 7 * BATCH,
        "steps": 7,
    }


def test_rates_are_none_before_the_first_step() -> None:
    assert ThroughputMonitor().rates() == {
        "real_tokens_per_sec": None,
        "padded_tokens_per_sec": None,
        "pad_fraction": None,
    }


def test_peak_memory_reads_cuda_allocations_on_cuda_and_peak_rss_elsewhere(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device: 3 * 2**20)
    assert peak_memory_mb(torch.device("cuda", 0)) == 3.0
    assert peak_memory_mb(torch.device("cpu")) > 10  # this process's peak RSS: torch alone is more than 10 MiB


def test_a_batch_that_is_not_a_dict_is_refused_with_the_fix() -> None:
    monitor = ThroughputMonitor()
    trainer = types.SimpleNamespace(global_step=0)
    with pytest.raises(TypeError, match="counts tokens of dict batches .* got a tuple; remove the callback"):
        monitor.on_train_batch_end(trainer, None, None, (torch.zeros(2, 3),), 0)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------------------------------
# CheckpointOnSigterm and ResumeMarker: a real SIGTERM to this process, and a resume from its checkpoint
# ----------------------------------------------------------------------------------------------------------
