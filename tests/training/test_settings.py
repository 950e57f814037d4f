"""The Trainer's settings in the schema (configs/trainer/, TrainerSchema): typed, checked before any data is read,
refused in one line; and every run validates at its last step (ValidateAtEnd), resumed runs included."""

from __future__ import annotations

import csv
import inspect
import json
import re
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import pytorch_lightning as pl
from hydra import compose, initialize_config_dir
from lightning_fabric.connector import _PRECISION_INPUT_STR, _PRECISION_INPUT_STR_ALIAS
from omegaconf import DictConfig, OmegaConf

import train as train_script
from mhaplug.common import ConfigError
from mhaplug.training.config import PRECISION_ALIASES, PRECISIONS, TrainerSchema, validate

ROOT = Path(__file__).resolve().parents[2]
FAST = ["debug=fast", "trainer.enable_progress_bar=false", "trainer.accelerator=cpu"]


def config(tmp_path: Path, *overrides: str) -> DictConfig:
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        return compose(
            config_name="train",
            overrides=[f"paths.output_dir={tmp_path}", f"data.cache_dir={tmp_path.parent / 'cache'}", *overrides],
        )


def val_losses(csv_path: Path) -> list[tuple[int, float]]:
    with csv_path.open() as f:
        return [(int(r["step"]), float(r["val/loss"])) for r in csv.DictReader(f) if r.get("val/loss")]


def test_the_trainer_schema_is_lightning_s_parameters_with_its_defaults() -> None:
    """Every typed Trainer setting is a ``pl.Trainer`` parameter with Lightning's default; ``precision`` names what
    Lightning's None means. The precisions accepted are Lightning's own names."""
    node = OmegaConf.structured(TrainerSchema)
    schema = {k: node._get_node(k)._value() for k in node if k != "_target_"}
    lightning = inspect.signature(pl.Trainer.__init__).parameters
    assert {k: v for k, v in schema.items() if k != "precision"} == {
        k: lightning[k].default for k in schema if k != "precision"
    }
    assert (schema["precision"], lightning["precision"].default) == ("32-true", None)
    assert set(PRECISIONS) == set(typing.get_args(_PRECISION_INPUT_STR))
    assert set(PRECISION_ALIASES) == set(typing.get_args(_PRECISION_INPUT_STR_ALIAS))


def test_trainer_precision_is_set_without_a_plus(tmp_path: Path) -> None:
    """issue 21: ``trainer.precision=bf16-mixed`` (the README's override) was ``Key 'precision' is not in struct``."""
    assert config(tmp_path).trainer.precision == "32-true"
    assert config(tmp_path, "trainer.precision=bf16-mixed").trainer.precision == "bf16-mixed"
    assert config(tmp_path, "trainer=gpu").trainer.precision == "bf16-mixed"
    # the old way in, +trainer.precision=..., which Hydra now refuses (the key exists), is read as the plain override
    assert train_script.check_overrides(["+trainer.precision=bf16-mixed", "+trainer.fast_dev_run=1"]) == [
        "trainer.precision=bf16-mixed",
        "+trainer.fast_dev_run=1",
    ]


REFUSED = [
    (
        "trainer.max_steps=0",
        (
            "trainer.max_steps=0 trains nothing: use a number of optimizer steps >= 1, e.g. trainer.max_steps=300 "
            "(or -1, no step limit, with trainer.max_epochs >= 1)"
        ),
    ),
    (
        "trainer.max_steps=-5",
        (
            "trainer.max_steps=-5 cannot train: use a number of optimizer steps >= 1, e.g. trainer.max_steps=300 "
            "(or -1, no step limit, with trainer.max_epochs >= 1)"
        ),
    ),
    (
        "trainer.max_steps=-1",  # configs/trainer/default.yaml has max_epochs: -1
        (
            "trainer.max_steps=-1 with trainer.max_epochs=-1 never stops (neither limits the run): use "
            "trainer.max_steps >= 1, e.g. trainer.max_steps=300, or trainer.max_epochs >= 1"
        ),
    ),
    (
        "trainer.max_epochs=0",
        (
            "trainer.max_epochs=0 trains nothing: use a number of epochs >= 1, or -1 (no epoch limit: "
            "trainer.max_steps ends the run)"
        ),
    ),
    (
        "trainer.limit_train_batches=0",
        (
            "trainer.limit_train_batches=0 is no number of batches: use a whole number >= 1 or a fraction in (0, 1], "
            "e.g. trainer.limit_train_batches=1.0 (all of them)"
        ),
    ),
    (
        "trainer.limit_val_batches=1.5",
        (
            "trainer.limit_val_batches=1.5 is no number of batches: use a whole number >= 0 or a fraction in [0, 1] "
            "(0 turns validation off), e.g. trainer.limit_val_batches=1.0 (all of them)"
        ),
    ),
    (
        "trainer.check_val_every_n_epoch=0",
        (
            "trainer.check_val_every_n_epoch=0 cannot schedule validation: use a number of epochs >= 1, or null "
            "(trainer.val_check_interval counts batches across epochs)"
        ),
    ),
    (
        "trainer.log_every_n_steps=0",
        (
            "trainer.log_every_n_steps=0 logs no training step (no train/loss in metrics.csv): use "
            "trainer.log_every_n_steps >= 1, e.g. trainer.log_every_n_steps=10"
        ),
    ),
    (
        "trainer.num_nodes=0",
        "trainer.num_nodes=0 cannot train: use a number of machines >= 1, e.g. trainer.num_nodes=1",
    ),
    (
        "trainer.devices=0",
        (
            "trainer.devices=0 names no devices: use a number of devices >= 1 (e.g. trainer.devices=2), -1 (all of "
            "them), auto, or device indices (trainer.devices=[0,1])"
        ),
    ),
    (
        "trainer.precision=fp16",
        (
            "trainer.precision=fp16 is not a precision Lightning takes; allowed: 32-true, bf16-mixed, 16-mixed, "
            "bf16-true, 16-true, 64-true, transformer-engine, transformer-engine-float16 (or the short forms 32, 16, "
            "bf16, 64)"
        ),
    ),
    (
        "trainer.gradient_clip_val=0.5",
        (
            "trainer.gradient_clip_val=0.5 cannot be used: the model clips its own gradients (it steps its optimizer "
            "itself, where Lightning refuses to clip); set model.gradient_clip_val=0.5 and leave "
            "trainer.gradient_clip_val unset"
        ),
    ),
]


@pytest.mark.parametrize(("override", "message"), REFUSED, ids=[o for o, _ in REFUSED])
def test_trainer_settings_that_cannot_train_are_refused_in_one_line(
    tmp_path: Path, override: str, message: str
) -> None:
    with pytest.raises(ConfigError) as refused:
        validate(config(tmp_path, override))
    assert str(refused.value) == message


def test_trainer_settings_that_train_are_accepted(tmp_path: Path) -> None:
    for overrides in (
        ["trainer.max_steps=1"],
        ["trainer.max_steps=-1", "trainer.max_epochs=2"],
        ["trainer.limit_val_batches=0", "trainer.limit_train_batches=0.5", "trainer.log_every_n_steps=1"],
        ["trainer.devices=[0,1]", "trainer.num_nodes=2", "trainer.precision=bf16-mixed"],
        ["trainer.devices=-1", "trainer.gradient_clip_val=0"],
        ["trainer.devices='0,1'", "trainer.precision=32"],
    ):
        assert validate(config(tmp_path, *overrides)) is None, overrides


def test_a_value_of_the_wrong_type_is_one_line_before_hydra_runs() -> None:
    """Hydra would print a multi-line composition error and exit 1 (and ``trainer.max_steps=abc`` once reached
    Lightning: ``TypeError("'<' not supported between instances of 'str' and 'int'")``)."""
    for arg, message in (
        ("trainer.max_steps=abc", "trainer.max_steps=abc is not valid; trainer.max_steps takes an int"),
        ("trainer.max_steps=null", "trainer.max_steps=null is not valid; trainer.max_steps takes an int"),
        (
            "trainer.limit_val_batches=all",
            "trainer.limit_val_batches=all is not valid; trainer.limit_val_batches takes an int, a float or null",
        ),
        (
            "trainer.enable_progress_bar=maybe",
            (
                "trainer.enable_progress_bar=maybe is not valid; trainer.enable_progress_bar takes a bool (true or "
                "false) or null"
            ),
        ),
        ("data.batch_size=8.5", "data.batch_size=8.5 is not valid; data.batch_size takes an int"),
    ):
        with pytest.raises(ConfigError, match=f"^{re.escape(message)}$"):
            train_script.check_overrides([arg])
    with pytest.raises(ConfigError, match=r"^trainer.max_steps=x is not valid"):
        train_script.check_overrides(["-m", "trainer.max_steps=10,x"])  # each value of a sweep
    fine = ["trainer.max_steps=10", "trainer.limit_val_batches=0.5", "trainer.max_steps=${seed}", "-m", "seed=1,2"]
    assert train_script.check_overrides(fine) == fine


def test_train_py_refuses_trainer_settings_in_one_line_exit_2_and_leaves_no_run_folder(tmp_path: Path) -> None:
    for arg, message in (
        ("trainer.max_steps=abc", "trainer.max_steps=abc is not valid; trainer.max_steps takes an int"),
        ("trainer.max_steps=0", REFUSED[0][1]),  # once: exit 0, "0 steps" and a run folder
    ):
        refused = subprocess.run(
            [sys.executable, str(ROOT / "train.py"), arg, "data=synthetic", f"data.cache_dir={tmp_path / 'cache'}"],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert (refused.returncode, refused.stderr.splitlines(), refused.stdout) == (
            2,
            [f"train.py: error: {message}"],
            "",
        )
        runs = tmp_path / "outputs" / "train" / "runs"
        assert not runs.exists() or list(runs.iterdir()) == []  # no run folder
        assert not (tmp_path / "cache").exists()  # no data read


def test_a_run_validates_at_its_last_step_and_a_resumed_run_logs_on_from_there(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``debug=fast`` validates every 3 steps: a run of 4 ended with the val loss of step 3 (``max_steps=2``: none at
    all, ``val/loss n/a (best n/a)``). Now it validates at step 4 too, checkpoints there, and a run resumed from
    that last.ckpt logs its first step after it (Lightning counts the step of a validation it scheduled itself)."""
    run = tmp_path / "run"
    summary = train_script.train(config(run, *FAST, "trainer.max_steps=4"))
    first = run / "csv" / "version_0" / "metrics.csv"
    losses = val_losses(first)
    assert [step for step, _ in losses] == [2, 3]  # logger steps of global steps 3 and 4
    assert summary["final_val_loss"] == pytest.approx(losses[-1][1]) and summary["no_val_loss"] is None
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        "last.ckpt",
        f"step000004-val_loss{losses[-1][1]:.4f}.ckpt",
    ]

    resumed = train_script.train(
        config(run, *FAST, "trainer.max_steps=5", f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}")
    )
    assert resumed["steps"] == 5
    with (run / "csv" / "version_1" / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["step"] for r in rows if r.get("resumed_at_step")] == ["4"]
    assert [r["step"] for r in rows if r.get("train/loss")] == ["4"]
    assert [step for step, _ in val_losses(run / "csv" / "version_1" / "metrics.csv")] == [4]
    capsys.readouterr()

    off = tmp_path / "off"
    summary = train_script.train(config(off, *FAST, "trainer.max_steps=2", "trainer.limit_val_batches=0"))
    assert summary["final_val_loss"] is None
    assert json.loads((off / "summary.json").read_text())["no_val_loss"] == (
        "validation off: trainer.limit_val_batches=0"
    )
    assert "\n  val/loss n/a (validation off: trainer.limit_val_batches=0), train/loss " in capsys.readouterr().out
