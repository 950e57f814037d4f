"""What a run logs besides the CSV log that mhaplug.compare reads: ``logger=tensorboard`` writes TensorBoard's event
file alongside it, and HParamsSummary puts each run's settings and results there for TensorBoard's HParams view.
Event files are read back as TensorBoard reads them and compared with the run's CSV log, checkpoint and summary.json."""

from __future__ import annotations

import csv
import math
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import metadata, plugin_data_pb2

import train as train_script
from mhaplug.data import TextDataModule
from mhaplug.training.callbacks import ThroughputMonitor
from mhaplug.training.hparams import HParamsSummary, run_results
from mhaplug.training.lifecycle import DivergedError, StopOnNonFiniteLoss
from mhaplug.training.lit import LitDecoderLM

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


# ----------------------------------------------------------------------------------------------------------
# HParamsSummary in a Trainer: the settings and results of a real fit, in TensorBoard's event file
# ----------------------------------------------------------------------------------------------------------

SETTINGS = [
    "strategy",
    "layout",
    "padding_side",
    "batch_size",
    "max_tokens",
    "vocab_size",
    "d_model",
    "compile",
    "precision",
    "max_steps",
    "world_size",
]


def read_tensorboard(log_dir: Path) -> tuple[dict[str, Any], list[str], dict[str, list[tuple[int, float]]]]:
    """(hparams of the session, metric names of the experiment, every scalar tag's (step, value)s) of the event
    file in ``log_dir``, as TensorBoard's HParams and Scalars views read them."""
    (events,) = log_dir.glob("events.out.tfevents.*")
    accumulator = EventAccumulator(str(events), size_guidance={"scalars": 0})
    accumulator.Reload()
    content = accumulator.PluginTagToContent(metadata.PLUGIN_NAME)
    start = plugin_data_pb2.HParamsPluginData.FromString(content[metadata.SESSION_START_INFO_TAG])
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content[metadata.EXPERIMENT_TAG]).experiment
    hparams = {
        name: getattr(value, value.WhichOneof("kind")) for name, value in start.session_start_info.hparams.items()
    }
    scalars = {tag: [(e.step, e.value) for e in accumulator.Scalars(tag)] for tag in accumulator.Tags()["scalars"]}
    return hparams, [m.name.tag for m in experiment.metric_infos], scalars


def fit_logged(
    tiny_data: Callable[..., TextDataModule],
    tiny_model: Callable[..., LitDecoderLM],
    tmp_path: Path,
    *,
    settings: list[str],
    tensorboard: bool = True,
    lr: float = 3e-3,
    max_steps: int = 4,
) -> tuple[pl.Trainer, TextDataModule, ThroughputMonitor]:
    """``max_steps`` optimizer steps of a tiny LitDecoderLM on synthetic packed rows, validated every 2, logged to
    CSV (and TensorBoard), with a ModelCheckpoint, the ThroughputMonitor and HParamsSummary(settings=settings)."""
    pl.seed_everything(0, workers=True)
    data = tiny_data(synthetic_documents=64, layout="packed", batch_size=4)
    data.prepare_data()
    data.setup("fit")
    model = tiny_model(strategy="merged_bool", layout="packed", warmup_steps=0, lr=lr)
    monitor = ThroughputMonitor()
    loggers: list[Any] = [CSVLogger(save_dir=tmp_path, name="csv")]
    if tensorboard:
        loggers.append(TensorBoardLogger(save_dir=tmp_path, name="tensorboard", default_hp_metric=False))
    trainer = pl.Trainer(
        max_steps=max_steps,
        max_epochs=-1,
        val_check_interval=2,
        check_val_every_n_epoch=None,
        limit_val_batches=2,
        log_every_n_steps=1,
        accelerator="cpu",
        devices=1,
        callbacks=[
            ModelCheckpoint(dirpath=tmp_path / "checkpoints", monitor="val/loss", mode="min"),
            StopOnNonFiniteLoss(),
            monitor,
            HParamsSummary(settings=settings),
        ],
        logger=loggers,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(model, datamodule=data)
    return trainer, data, monitor


def csv_rows(tmp_path: Path) -> list[dict[str, str]]:
    with (tmp_path / "csv" / "version_0" / "metrics.csv").open() as f:
        return list(csv.DictReader(f))


def logged(rows: list[dict[str, str]], name: str) -> list[float]:
    return [float(r[name]) for r in rows if r.get(name)]


def test_hparams_summary_writes_the_runs_settings_and_results_for_tensorboards_hparams_view(
    tiny_data: Callable[..., TextDataModule], tiny_model: Callable[..., LitDecoderLM], tmp_path: Path
) -> None:
    trainer, data, monitor = fit_logged(tiny_data, tiny_model, tmp_path, settings=SETTINGS)
    hparams, metric_names, scalars = read_tensorboard(tmp_path / "tensorboard" / "version_0")

    # Settings: the Trainer's (precision, ...), the module's (strategy, vocab_size, ...), the DataModule's
    # (batch_size, max_tokens); numbers as TensorBoard's floats, bools and None as words.
    assert hparams == {
        "strategy": "merged_bool",
        "layout": "packed",
        "padding_side": "right",
        "batch_size": 4.0,
        "max_tokens": "None",
        "vocab_size": float(data.vocab_size),
        "d_model": 32.0,
        "compile": "False",
        "precision": "32-true",
        "max_steps": 4.0,
        "world_size": 1.0,
    }

    # Results: what the CSV log, the checkpoint and the ThroughputMonitor hold, under summary.json's keys.
    rows = csv_rows(tmp_path)
    results = run_results(trainer)
    assert results == {
        "final_val_loss": logged(rows, "val/loss")[-1],
        "best_val_loss": min(logged(rows, "val/loss")),
        "final_train_loss": logged(rows, "train/loss")[-1],
        **monitor.rates(),
        "peak_memory_mb": logged(rows, "train/peak_memory_mb")[-1],
        "steps": 4,
    }
    assert len(logged(rows, "val/loss")) == 2 and None not in results.values()
    tags = [f"summary/{key}" for key in results]
    assert sorted(metric_names) == sorted(tags)  # the HParams view's metric columns
    for key, value in results.items():  # one value each, at the last step (TensorBoard keeps float32)
        assert scalars[f"summary/{key}"] == [(4, float(torch.tensor(value, dtype=torch.float32)))], key
    assert "hp_metric" not in scalars  # default_hp_metric=False: no placeholder session at the start

    # The CSV log (what mhaplug.compare reads) gets none of it.
    assert not [name for name in rows[0] if name.startswith("summary/") or name == "hp_metric"]


def test_hparams_summary_logs_a_diverged_run_with_its_nan(
    tiny_data: Callable[..., TextDataModule], tiny_model: Callable[..., LitDecoderLM], tmp_path: Path
) -> None:
    with pytest.raises(DivergedError) as diverged:
        fit_logged(tiny_data, tiny_model, tmp_path, settings=["strategy", "lr"], lr=1e6, max_steps=8)
    hparams, _, scalars = read_tensorboard(tmp_path / "tensorboard" / "version_0")
    assert hparams == {"strategy": "merged_bool", "lr": 1e6}
    assert diverged.value.step == 1  # the logger step of the first NaN train/loss (the second optimizer step's)
    last_step, last_loss = scalars["train/loss"][-1]
    assert last_step == 1 and math.isnan(last_loss)
    ((at, train_loss),) = scalars["summary/final_train_loss"]  # logged at trainer.global_step: 2 steps trained
    assert at == 2 and math.isnan(train_loss)
    assert scalars["summary/steps"] == [(2, 2.0)]


def test_a_diverged_run_names_the_step_metrics_csv_logged_the_nan_at(
    tiny_data: Callable[..., TextDataModule], tiny_model: Callable[..., LitDecoderLM], tmp_path: Path
) -> None:
    """model.lr=1e6: the second optimizer step's train/loss is NaN; CSVLogger logs it at step 1 (its steps count
    from 0), and that is the step DivergedError (summary.json's diverged_at_step) names: compare and the log agree."""
    with pytest.raises(DivergedError) as diverged:
        fit_logged(tiny_data, tiny_model, tmp_path, settings=["strategy"], tensorboard=False, lr=1e6, max_steps=8)
    trained = [(int(r["step"]), float(r["train/loss"])) for r in csv_rows(tmp_path) if r.get("train/loss")]
    assert [step for step, _ in trained] == [0, 1]
    assert [math.isfinite(loss) for _, loss in trained] == [True, False]
    assert diverged.value.step == 1
    assert str(diverged.value).startswith("train/loss is nan at step 1: training diverged")


def test_hparams_summary_refuses_an_unknown_setting_before_training_and_without_tensorboard_does_nothing(
    tiny_data: Callable[..., TextDataModule], tiny_model: Callable[..., LitDecoderLM], tmp_path: Path
) -> None:
    with pytest.raises(ValueError, match=r"\['strategyy'\] are neither Trainer settings .* available: .*, strategy, "):
        fit_logged(tiny_data, tiny_model, tmp_path / "refused", settings=["strategy", "strategyy"])
    assert not (tmp_path / "refused" / "checkpoints").exists()  # refused at the start: no step, no validation

    trainer, _, _ = fit_logged(tiny_data, tiny_model, tmp_path / "csv_only", settings=["strategyy"], tensorboard=False)
    assert trainer.global_step == 4  # nothing to log to, nothing checked
    assert not [name for name in csv_rows(tmp_path / "csv_only")[0] if name.startswith("summary/")]


def test_hparams_summary_params_come_from_the_trainer_the_module_and_the_datamodule_in_that_order() -> None:
    trainer = SimpleNamespace(
        precision="bf16-mixed",
        max_steps=3,
        world_size=2,
        lightning_module=SimpleNamespace(hparams={"strategy": "flex", "vocab_size": 300, "compile": True}),
        datamodule=SimpleNamespace(hparams={"vocab_size": 4096, "batch_size": 8, "max_steps": 7}),
    )
    chosen = HParamsSummary(settings=["vocab_size", "max_steps", "precision", "batch_size", "compile"])
    assert chosen.params(trainer) == {  # type: ignore[arg-type]
        "vocab_size": 300,
        "max_steps": 3,
        "precision": "bf16-mixed",
        "batch_size": 8,
        "compile": "True",
    }
    every = HParamsSummary().params(trainer)  # type: ignore[arg-type]
    assert every == {"batch_size": 8, "compile": "True", "max_steps": 7, "strategy": "flex", "vocab_size": 300}
    assert list(every) == sorted(every)
    with pytest.raises(TypeError, match="settings must be a list of names, got the string 'strategy'"):
        HParamsSummary(settings="strategy")


# ----------------------------------------------------------------------------------------------------------
# train.py with logger=tensorboard
# ----------------------------------------------------------------------------------------------------------


def config(tmp_path: Path, *overrides: str) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose(
            config_name="train",
            overrides=[f"paths.output_dir={tmp_path}", f"data.cache_dir={tmp_path.parent / 'cache'}", *overrides],
        )


def test_logger_tensorboard_keeps_the_csv_log_and_adds_tensorboard_with_the_summarys_settings_and_results(
    tmp_path: Path,
) -> None:
    cfg = config(
        tmp_path,
        "logger=tensorboard",
        "data=synthetic",
        "model=tiny",
        "attention=merged_bool",
        "data.layout=padded",
        "data.padding_side=left",
        "data.batching=length_grouped",
        "trainer.accelerator=cpu",
        "trainer.enable_progress_bar=false",
        "trainer.max_steps=4",
        "trainer.val_check_interval=2",
        "trainer.log_every_n_steps=1",
    )
    assert list(cfg.logger) == ["csv", "tensorboard"]  # csv first: the Trainer's logger, the progress bar's v_num
    summary = train_script.train(cfg)
    assert summary["status"] == "finished" and summary["steps"] == 4

    # The CSV log, where mhaplug.compare reads it, as with logger=csv.
    assert summary["metrics_csv"] == "csv/version_0/metrics.csv"
    with (tmp_path / summary["metrics_csv"]).open() as f:
        rows = list(csv.DictReader(f))
    assert logged(rows, "val/loss")[-1] == summary["final_val_loss"]
    assert logged(rows, "train/loss")[-1] == summary["final_train_loss"]
    assert not [name for name in rows[0] if name.startswith("summary/") or name == "hp_metric"]

    # TensorBoard: the same curves, and one HParams session with the run's settings and summary.json's results.
    hparams, metric_names, scalars = read_tensorboard(tmp_path / "tensorboard" / "version_0")
    for name in ("train/loss", "val/loss", "train/real_tokens_per_sec"):
        assert [v for _, v in scalars[name]] == [float(torch.tensor(v)) for v in logged(rows, name)], name
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    assert hparams == {
        "strategy": "merged_bool",
        "layout": "padded",
        "padding_side": "left",
        "batching": "length_grouped",
        "batch_size": 8.0,
        "max_tokens": "None",
        "pad_to_multiple_of": "None",
        "max_length": 64.0,
        "source": "synthetic",
        "vocab_size": float(ckpt["hyper_parameters"]["vocab_size"]),  # the model's embedding rows
        "d_model": 32.0,
        "num_heads": 2.0,
        "num_layers": 1.0,
        "d_ff": 64.0,
        "lr": 3e-3,
        "accumulate_grad_batches": 1.0,
        "compile": "False",
        "precision": "32-true",
        "max_steps": 4.0,
        "world_size": 1.0,
    }
    assert {k: hparams[k] for k in ("strategy", "layout", "padding_side", "batching")} == {
        k: summary[k] for k in ("strategy", "layout", "padding_side", "batching")
    }
    results = ("final_val_loss", "best_val_loss", "final_train_loss", "real_tokens_per_sec", "padded_tokens_per_sec")
    results += ("pad_fraction", "peak_memory_mb", "steps")
    assert sorted(metric_names) == sorted(f"summary/{key}" for key in results)
    for key in results:  # float32, as TensorBoard stores scalars
        assert scalars[f"summary/{key}"] == [(4, float(torch.tensor(summary[key], dtype=torch.float32)))], key
