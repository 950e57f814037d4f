"""train.py and configs/: every option composes, bad settings fail at start-up, a real Trainer trains, the loss is
normalised by tokens, and (slow, real subprocesses) kill-and-resume, DDP and the ablation sweep."""

from __future__ import annotations

import csv
import dataclasses
import inspect
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException, MissingConfigException
from omegaconf import DictConfig, OmegaConf

import train as train_script
from mhaplug.attention import CAPABILITIES, STRATEGIES
from mhaplug.common import Choice, ConfigError
from mhaplug.data import TextDataModule
from mhaplug.decoder import DecoderConfig
from mhaplug.reporting.runs import read_curve
from mhaplug.training.config import DataSchema, ModelSchema, SkipRun, validate
from mhaplug.training.lit import LitDecoderLM
from mhaplug.training.run_dirs import checkpoint_run_dir, claim_job_subdir, claim_run_dir

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
SKIP_WHY = "it cannot run at all: on_invalid=run trains only the combinations that run, wrong on purpose"
FAST = ["data=synthetic", "model=tiny", "trainer.enable_progress_bar=false", "trainer.accelerator=cpu"]


def config(tmp_path: Path, *overrides: str) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose(
            config_name="train",
            overrides=[f"paths.output_dir={tmp_path}", f"data.cache_dir={tmp_path.parent / 'cache'}", *overrides],
        )


def metrics(run_dir: Path) -> list[dict[str, str]]:
    with (run_dir / "csv" / "version_0" / "metrics.csv").open() as f:
        return list(csv.DictReader(f))


def column(rows: list[dict[str, str]], name: str) -> list[float]:
    """The logged values of ``name`` in order, once per optimizer step: in manual optimisation Lightning's
    logger step counts batches, and with accumulation it writes a step's value again on the next batch."""
    values = [float(r[name]) for r in rows if r.get(name)]
    return [v for i, v in enumerate(values) if i == 0 or v != values[i - 1]]


# ----------------------------------------------------------------------------------------------------------
# Composition and start-up validation
# ----------------------------------------------------------------------------------------------------------

OPTIONS = sorted(
    (group.name, option.stem)
    for group in CONFIGS.iterdir()
    if group.is_dir() and group.name not in ("hydra", "paths")
    for option in group.glob("*.yaml")
)


@pytest.mark.parametrize(("group", "option"), OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_config_option_composes_and_validates(tmp_path: Path, group: str, option: str) -> None:
    extra = ["data.path=corpus.txt"] if (group, option) in (("data", "text_files"), ("data", "hf")) else []
    if group == "attention" and not (CAPABILITIES[option].document_masks and CAPABILITIES[option].empty_rows_zero):
        extra.append("data.layout=padded")  # the default layout is packed, which these strategies cannot train
    cfg = config(tmp_path, f"{group}={option}", *extra)
    assert (
        cfg.data._target_ == "mhaplug.data.TextDataModule" and cfg.model._target_ == "mhaplug.training.lit.LitDecoderLM"
    )
    if (group, option) == ("attention", "flex") and not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="attention=flex trains on CUDA only"):
            validate(cfg)
    else:
        assert validate(cfg) is None
        if group == "attention":
            assert cfg.attention.strategy == option


def _defaults(parameters: dict[str, Any]) -> dict[str, Any]:
    return {name: (str(value) if isinstance(value, Choice) else value) for name, value in parameters.items()}


def test_the_schema_is_the_settings_of_the_classes_it_instantiates() -> None:
    """One definition: DataSchema is TextDataModule's parameters, ModelSchema is DecoderConfig's fields and then
    LitDecoderLM's own, with the same names, order and defaults; the YAML files set only what differs."""

    def schema(cls: type) -> dict[str, Any]:
        node = OmegaConf.structured(cls)
        return {k: node._get_node(k)._value() for k in node if k != "_target_"}

    def signature(fn: Any) -> dict[str, Any]:
        params = inspect.signature(fn).parameters.values()
        return {p.name: p.default for p in params if p.kind == p.KEYWORD_ONLY}

    assert _defaults(schema(DataSchema)) == signature(TextDataModule.__init__)
    decoder = {f.name: f.default for f in dataclasses.fields(DecoderConfig)}
    model = _defaults(schema(ModelSchema))
    assert decoder.pop("vocab_size") is dataclasses.MISSING and model.pop("vocab_size") == "???"  # from the data
    lit = signature(LitDecoderLM.__init__)
    assert model == {**decoder, **lit, "betas": list(lit["betas"])}  # a ListConfig holds the tuple as a list
    assert list(model) == [*decoder, *lit]


def test_the_default_run_s_data_is_text_data_module_s_defaults(tmp_path: Path) -> None:
    """``python train.py`` and ``TextDataModule()`` read the same data the same way: the default data config sets
    nothing its class does not default to (on e38e940 stdlib_docs.yaml set layout=packed over TextDataModule's
    padded), and LitDecoderLM records the same layout when nothing says otherwise."""
    data = OmegaConf.to_container(config(tmp_path).data, resolve=True, enum_to_str=True)
    assert data.pop("_target_") == "mhaplug.data.TextDataModule"
    data.pop("cache_dir")  # set by this file's config(): the tests' own cache
    defaults = {p.name: p.default for p in inspect.signature(TextDataModule.__init__).parameters.values()}
    assert data == {name: defaults[name] for name in data}
    assert defaults["layout"] == inspect.signature(LitDecoderLM.__init__).parameters["layout"].default == "packed"


def test_the_model_takes_vocabulary_positions_and_strategy_from_the_config(tmp_path: Path) -> None:
    """What train.py once wired by hand is interpolated when the config is composed (configs/model/small.yaml)."""
    cfg = config(tmp_path, "model=tiny", "data.vocab_size=1000", "data.max_length=96", "attention=merged_bool")
    model = OmegaConf.to_container(cfg.model, resolve=True, enum_to_str=True)
    assert {k: model[k] for k in ("vocab_size", "max_positions", "strategy", "layout", "padding_side", "batching")} == {
        "vocab_size": 1000,
        "max_positions": 96,
        "strategy": "merged_bool",
        "layout": "packed",
        "padding_side": "right",
        "batching": "random",
    }
    assert (model["d_model"], model["lr"]) == (32, 3e-3)  # tiny's own, and DecoderConfig's / LitDecoderLM's default


@pytest.mark.parametrize("base", [[], ["experiment=mask_ablation"]], ids=["defaults", "mask_ablation"])
def test_the_equivalence_key_ignores_strategy_and_padding_side_but_not_the_computation(
    tmp_path: Path, base: list[str]
) -> None:
    """mhaplug.compare checks that runs with the same equivalence_key reach the same loss. An interpolated key
    (model.strategy: ${attention.strategy}) once gave every job of a sweep its own key: nothing to compare."""
    keys = {
        train_script.equivalence_key(
            config(
                tmp_path / strategy / side,
                *base,
                "data.layout=padded",
                f"attention={strategy}",
                f"data.padding_side={side}",
            )
        )
        for strategy in STRATEGIES
        for side in ("right", "left")
    }
    assert len(keys) == 1, keys
    (key,) = keys
    for change in ("seed=1", "model.d_model=64", "data.layout=packed", "trainer.max_steps=7"):
        assert train_script.equivalence_key(config(tmp_path, *base, "data.layout=padded", change)) != key, change


def test_a_misspelt_key_fails_when_the_config_is_composed(tmp_path: Path) -> None:
    with pytest.raises(ConfigCompositionException, match="batchsize"):
        config(tmp_path, "data.batchsize=8")
    with pytest.raises(ConfigCompositionException, match="dmodel"):
        config(tmp_path, "model.dmodel=64")


def test_a_bad_choice_fails_when_the_config_is_composed_listing_the_allowed_values(tmp_path: Path) -> None:
    """Choices are typed in the schema (mhaplug.common.Choice): OmegaConf refuses another value at composition, from
    an override or a file, naming the allowed ones; train.py's pre-flight says the same in one line (exit 2)."""
    allowed = ", ".join(STRATEGIES)  # the one list of strategies (mhaplug.attention), in its order
    with pytest.raises(ConfigCompositionException, match="attention.strategy=fast") as failed:
        config(tmp_path, "attention.strategy=fast")
    assert f"Invalid value 'fast', expected one of [{allowed}]" in str(failed.value.__cause__)
    with pytest.raises(MissingConfigException, match="attention/fast"):
        config(tmp_path, "attention=fast")
    with pytest.raises(ConfigCompositionException) as failed:
        config(tmp_path, "data.batching=grouped")
    assert "Invalid value 'grouped', expected one of [random, length_grouped, token_budget]" in str(
        failed.value.__cause__
    )
    with pytest.raises(ConfigCompositionException):
        config(tmp_path, "on_invalid=sometimes")
    for key, expected in (
        (
            "attention.strategy=fast",
            f"attention.strategy=fast is not valid; allowed: {allowed} (or pick one with attention=NAME)",
        ),
        ("data.batching=grouped", "data.batching=grouped is not valid; allowed: random, length_grouped, token_budget"),
        ("data.layout=padded,ragged", "data.layout=ragged is not valid; allowed: padded, packed"),
        ("data.source=web", "data.source=web is not valid; allowed: stdlib_docs, synthetic, text_files, hf"),
        ("model.padding_side=up", "model.padding_side=up is not valid; allowed: right, left"),
        ("on_invalid=sometimes", "on_invalid=sometimes is not valid; allowed: error, skip, run"),
    ):
        with pytest.raises(ConfigError, match=f"^{re.escape(expected)}$"):
            train_script.check_overrides([key])
    fine = ["data.layout=packed", "attention.strategy=merged_bool", "model.d_model=64", "data.padding_side=left"]
    assert train_script.check_overrides(fine) == fine


def test_an_unknown_option_of_a_group_is_one_line_before_hydra_runs(tmp_path: Path) -> None:
    """``group=option`` overrides are checked against configs/<group>/*.yaml (every value of a sweep too): one line
    naming the group, the value and the options, exit 2. Schemas are no options (the primary schema types the tree)."""
    strategies = "auto, causal_kpm, causal_only, flex, merged_additive, merged_bool, reference, torch_mha"
    message = f"attention=fast is not an option of attention; allowed: {strategies} (the files in configs/attention/)"
    for args in (["attention=fast"], ["-m", "attention=auto,fast"], ["--multirun", "attention=choice(auto,fast)"]):
        with pytest.raises(ConfigError, match=re.escape(message)):
            train_script.check_overrides(args)
    with pytest.raises(ConfigError, match="attention=attention_schema is not an option of attention"):
        train_script.check_overrides(["attention=attention_schema"])
    with pytest.raises(MissingConfigException, match="attention/attention_schema"):
        config(tmp_path, "attention=attention_schema")  # not selectable through Hydra either
    with pytest.raises(ConfigError, match=r"^data=hf_x is not an option of data; allowed: hf, stdlib_docs, synthetic,"):
        train_script.check_overrides(["+data=hf_x", "model.d_model=64"])
    fine = ["-m", "attention=auto,merged_bool", "data.layout=padded", "trainer=glob(*)", "~debug", "hydra.run.dir=x"]
    assert train_script.check_overrides(fine) == fine
    assert train_script.check_overrides(["logger=null", "model=tiny"]) == ["~logger", "model=tiny"]
    assert train_script.check_overrides(["-cd", "/elsewhere", "attention=fast"]) == [
        "-cd",
        "/elsewhere",
        "attention=fast",
    ]

    refused = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "attention=fast"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert (refused.returncode, refused.stderr.splitlines(), refused.stdout) == (2, [f"train.py: error: {message}"], "")
    assert list(tmp_path.iterdir()) == []  # no run folder


def test_a_hub_dataset_without_a_hub_is_one_line_exit_2(tmp_path: Path) -> None:
    """data=hf with a hub name and no hub to reach (HF_ENDPOINT refuses connections: offline on any machine): one
    line naming data.path, exit 2, no run folder; not Hydra's chained traceback after minutes of retries."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "data=hf", "data.path=no-such-user/no-such-dataset", "model=tiny"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "HF_ENDPOINT": "http://127.0.0.1:9", "MHAPLUG_CACHE": str(tmp_path / "cache")},
        check=False,
    )
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.splitlines() == [
        (
            "train.py: error: data.path='no-such-user/no-such-dataset': the Hugging Face hub (http://127.0.0.1:9) "
            "cannot be reached and the dataset is not in the local cache; download it once with network access (it "
            "is cached then), or point data.path at a local copy (a directory, or data=text_files)"
        )
    ]
    assert not (tmp_path / "outputs" / "train" / "runs").exists() or not list(
        (tmp_path / "outputs/train/runs").iterdir()
    )


INVALID = [
    (
        ["attention=torch_mha", "data.layout=padded", "data.padding_side=left"],
        "attention=torch_mha with data.padding_side=left: .*returns NaN",
        True,
    ),
    (["attention=torch_mha", "data.layout=packed"], "attention=torch_mha with data.layout=packed: .*returns NaN", True),
    (
        ["attention=causal_only", "data.layout=padded", "data.padding_side=left"],
        "attention=causal_only ignores the padding mask.*Use attention=causal_kpm, or data.padding_side=right",
        True,
    ),
    (
        ["attention=causal_kpm", "data.layout=packed"],
        "attention=causal_kpm applies a plain causal mask.*Use attention=.*merged_bool",
        False,
    ),
    (["attention=causal_only", "data.layout=packed"], "attention=causal_only applies a plain causal mask", False),
    (
        ["data.layout=packed", "data.padding_side=left", "attention=merged_bool"],
        "data.padding_side=left has no effect with data.layout=packed",
        False,
    ),
    (["data.batching=token_budget"], r"data.batching=token_budget needs data.max_tokens .* data.max_tokens=4096", None),
    (
        ["trainer.accumulate_grad_batches=4"],
        "trainer.accumulate_grad_batches must stay 1.*model.accumulate_grad_batches=4",
        None,
    ),
]


@pytest.mark.parametrize(("overrides", "message", "runnable"), INVALID)
def test_invalid_combinations_fail_before_training(
    tmp_path: Path, overrides: list[str], message: str, runnable: bool | None
) -> None:
    with pytest.raises(ConfigError, match=message):
        validate(config(tmp_path, *overrides))
    if runnable is None:
        return  # a plain bad value: no on_invalid policy applies
    with pytest.raises(SkipRun, match=message) as skipped:
        validate(config(tmp_path, *overrides, "on_invalid=skip"))
    assert skipped.value.why == "on_invalid=skip"
    if runnable:
        reason = validate(config(tmp_path, *overrides, "on_invalid=run"))  # runs, on purpose, and says why
        assert reason is not None and re.search(message, reason)
    else:
        with pytest.raises(SkipRun) as skipped:
            validate(config(tmp_path, *overrides, "on_invalid=run"))
        assert skipped.value.why == (
            "it cannot run at all: on_invalid=run trains only the combinations that run, wrong on purpose"
        )  # what the sweep's log says


BAD_VALUES = [
    ("data.max_length=1", r"data.max_length=1 cannot train: .* use data.max_length >= 2"),
    ("data.max_length=0", r"data.max_length=0 cannot train: .* use data.max_length >= 2"),
    ("data.max_length=-8", r"data.max_length=-8 cannot train: .* use data.max_length >= 2"),
    (
        "data.vocab_size=257",
        (
            r"data.vocab_size=257 is too small for the byte-level BPE .* 256 byte tokens and 2 special "
            r"tokens.* use data.vocab_size >= 258 .*or data.tokenizer_path="
        ),
    ),
    ("data.batch_size=0", r"data.batch_size=0 cannot train: use data.batch_size >= 1"),
    (
        "data.batching=token_budget data.max_tokens=10 data.layout=padded",  # was refused after the data was read
        r"data.max_tokens=10 cannot hold one row of data.max_length=64 tokens: use data.max_tokens >= 64, e.g. ",
    ),
    (
        "trainer.val_check_interval=0",
        (
            r"trainer.val_check_interval=0 cannot schedule validation: use a whole number of "
            r"training batches >= 1, e.g. trainer.val_check_interval=100"
        ),
    ),
    (
        "trainer.val_check_interval=0.5",
        r"trainer.val_check_interval=0.5 cannot schedule validation: use a whole number",
    ),
    ("model.lr=-0.001", r"model.lr=-0.001 cannot train: use a learning rate > 0, e.g. model.lr=3e-3"),
    ("model.lr=nan", r"model.lr=nan cannot train"),
    (
        "seed=-1",
        (
            r"seed=-1 is outside the seeds numpy takes \(Lightning would silently use 0 instead\): use "
            r"0 <= seed <= 4294967295, e.g. seed=0"
        ),
    ),
    ("data.seed=4294967296", r"data.seed=4294967296 is outside the seeds numpy takes"),
    (
        "data.max_documents=0",
        (
            r"data.max_documents=0 leaves too few documents .* use data.max_documents >= 2, or "
            r"data.max_documents=null for all of them"
        ),
    ),
]


@pytest.mark.parametrize(("override", "message"), BAD_VALUES, ids=[o for o, _ in BAD_VALUES])
def test_settings_that_cannot_train_are_refused_before_any_data_is_read(
    tmp_path: Path, override: str, message: str
) -> None:
    cfg = config(tmp_path, "data=synthetic", *override.split(), f"data.cache_dir={tmp_path / 'cache'}")
    with pytest.raises(ConfigError, match=message) as refused:
        train_script.train(cfg)
    assert "\n" not in str(refused.value)  # one line
    assert not (tmp_path / "cache").exists() and not (tmp_path / "summary.json").exists()  # nothing read, nothing run


def test_the_smallest_settings_that_train_are_accepted(tmp_path: Path) -> None:
    validate(
        config(
            tmp_path,
            "data.max_length=2",
            "data.vocab_size=258",
            "data.batch_size=1",
            "trainer.val_check_interval=1",
            "seed=4294967295",
            "data.max_documents=2",
        )
    )
    validate(
        config(tmp_path, "data.vocab_size=100", "data.tokenizer_path=tok.json")
    )  # a given tokenizer: data.py checks
    validate(config(tmp_path, "trainer.check_val_every_n_epoch=1", "trainer.val_check_interval=0.5"))  # per epoch


# ----------------------------------------------------------------------------------------------------------
# Run folders
# ----------------------------------------------------------------------------------------------------------


def test_run_folders_are_claimed_never_shared(tmp_path: Path) -> None:
    now = datetime(2026, 1, 2, 3, 4, 5, 678_901)
    first = claim_run_dir(tmp_path / "runs", now=now, pid=42)
    second = claim_run_dir(tmp_path / "runs", now=now, pid=42)  # the same millisecond and pid (another host)
    assert Path(first).name == "2026-01-02_03-04-05.678_42" and Path(second).name == "2026-01-02_03-04-05.678_42-2"
    assert Path(first).is_dir() and Path(second).is_dir()

    sweep = tmp_path / "sweep"
    assert claim_job_subdir(sweep, 0, "attention=auto,data.layout=padded") == "attention=auto,data.layout=padded"
    assert claim_job_subdir(sweep, 3, "attention=auto,data.layout=padded") == "attention=auto,data.layout=padded_job3"
    assert claim_job_subdir(sweep, 4, "") == "job4"  # no override to name it (experiment=... is excluded)
    assert claim_job_subdir(sweep, 5, "data.path=/data/a.txt") == "data.path=_data_a.txt"  # one level, always
    long_a, long_b = claim_job_subdir(sweep, 6, "x=" + "a" * 300), claim_job_subdir(sweep, 7, "x=" + "a" * 299 + "b")
    assert len(long_a) == len(long_b) == 120 and long_a != long_b
    assert sorted(p.name for p in sweep.iterdir()) == sorted(
        [
            "attention=auto,data.layout=padded",
            "attention=auto,data.layout=padded_job3",
            "job4",
            "data.path=_data_a.txt",
            long_a,
            long_b,
        ]
    )

    assert checkpoint_run_dir(f"{first}/checkpoints/last.ckpt") == first
    assert checkpoint_run_dir(tmp_path / "elsewhere" / "model.ckpt") is None and checkpoint_run_dir(None) is None


def test_hydra_run_dir_is_a_new_folder_or_the_resumed_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """configs/hydra/default.yaml through Hydra: a new folder per composed config, read as often as Hydra and
    Lightning's DDP launcher read it; ckpt_path=<run>/checkpoints/last.ckpt resumes into <run>."""
    monkeypatch.chdir(tmp_path)
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose(config_name="train", overrides=["attention=merged_bool"], return_hydra_config=True)
        again = compose(config_name="train", overrides=["attention=merged_bool"], return_hydra_config=True)
    run = cfg.hydra.run.dir
    assert re.fullmatch(rf"outputs/train/runs/\d{{4}}-\d\d-\d\d_\d\d-\d\d-\d\d\.\d{{3}}_{os.getpid()}(-\d+)?", run)
    assert cfg.hydra.run.dir == run and again.hydra.run.dir != run  # once per config, never shared
    assert len(list((tmp_path / "outputs" / "train" / "runs").iterdir())) == 2
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        resumed = compose(
            config_name="train", overrides=[f"ckpt_path={run}/checkpoints/last.ckpt"], return_hydra_config=True
        )
        sweep = compose(
            config_name="train",
            overrides=["attention=merged_bool", "data.cache_dir=/x", "hydra.job.num=3"],
            return_hydra_config=True,
        )
    assert resumed.hydra.run.dir == run and len(list((tmp_path / "outputs" / "train" / "runs").iterdir())) == 2
    assert re.fullmatch(r"outputs/train/multiruns/[\d_.-]+", sweep.hydra.sweep.dir)
    assert sweep.hydra.sweep.subdir == "attention=merged_bool"  # data.cache_dir is in exclude_keys
    assert (tmp_path / sweep.hydra.sweep.dir / "attention=merged_bool").is_dir()


def test_compare_hint_names_the_sweep_of_a_job_and_the_folder_of_a_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After a run the summary's "compare runs" hint names that run's folder; after a job of a sweep, the sweep's
    folder (its jobs are the runs to compare), never the parent of all runs."""
    from hydra.core.hydra_config import HydraConfig

    monkeypatch.chdir(tmp_path)
    assert train_script._compare_dir(tmp_path / "run") == tmp_path / "run"  # no Hydra: a run of its own
    for mode, expected in (("RUN", tmp_path / "outputs/train/runs/this_run"), ("MULTIRUN", "sweep")):
        with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
            overrides = [f"hydra.mode={mode}", "hydra.sweep.dir=outputs/train/multiruns/the_sweep"]
            cfg = compose(config_name="train", overrides=overrides, return_hydra_config=True)
        HydraConfig.instance().set_config(cfg)
        try:
            got = train_script._compare_dir(tmp_path / "outputs/train/runs/this_run")
        finally:
            HydraConfig.instance().cfg = None
        assert got == (Path("outputs/train/multiruns/the_sweep") if expected == "sweep" else expected)


# ----------------------------------------------------------------------------------------------------------
# A real Trainer
# ----------------------------------------------------------------------------------------------------------


def test_train_debug_run_writes_logs_checkpoints_and_summary(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = config(tmp_path, "debug=fast", *FAST)
    summary = train_script.train(cfg)
    assert json.loads((tmp_path / "summary.json").read_text()) == summary
    assert summary["steps"] == 6 and summary["strategy"] == cfg.attention.strategy and summary["valid"] is True
    assert math.log(512) * 0.8 < summary["final_val_loss"] < math.log(512) * 1.05  # near uniform after 6 steps
    assert summary["best_val_loss"] <= summary["final_val_loss"]
    assert 0.0 < summary["pad_fraction"] < 1.0 and summary["real_tokens_per_sec"] > 0
    rows = metrics(tmp_path)
    assert len(column(rows, "train/loss")) == 6 and len(column(rows, "val/loss")) == 2
    for name in (
        "val/ppl",
        "train/real_tokens_per_sec",
        "train/padded_tokens_per_sec",
        "train/pad_fraction",
        "train/peak_memory_mb",
        "lr-AdamW/pg1",
    ):
        assert column(rows, name), name
    assert column(rows, "val/ppl")[-1] == pytest.approx(math.exp(column(rows, "val/loss")[-1]), rel=1e-5)
    restored = LitDecoderLM.load_from_checkpoint(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert restored.hparams.strategy == cfg.attention.strategy and restored.hparams.vocab_size == 512
    assert type(restored.hparams.strategy) is str and restored.model.config.d_model == 32  # plain values only
    assert {type(v) for v in restored.hparams.values()} <= {str, int, float, bool, tuple}
    out = capsys.readouterr().out
    assert "mhaplug run finished: 6 steps" in out and "pad fraction" in out and str(tmp_path) in out
    assert " s (attention=auto, layout=packed, batching=random)\n" in out  # no padding side: packed rows have none
    assert f"\n  compare runs: python -m mhaplug.compare {tmp_path}\n" in out  # this run, not its neighbours
    audit = summary["audit"]  # step 0, by the MaskAudit callback of configs/callbacks/default.yaml
    assert audit["passed"] is True and audit["failed"] == [] and audit["call"] == "LitDecoderLM.model (DecoderLM)"
    assert list(audit["checks"]) == ["finite", "padding", "loss", "causality", "documents"]  # packed: the default
    assert column(rows, "audit/passed") == [1.0]
    assert re.search(
        r"\n  mask audit: passed \(finite, padding, loss, causality, documents; 4 forwards, \d+ ms\)\n", out
    )


def test_bf16_mixed_trains_on_the_cpu_and_lands_near_float32(tmp_path: Path) -> None:
    """``trainer.precision=bf16-mixed``: Lightning's CPU autocast around the fused loss (bf16 matmuls, float32
    softmax) trains the same steps to nearly the same loss as float32."""
    runs = {}
    for precision in ("32-true", "bf16-mixed"):
        cfg = config(tmp_path / precision, "debug=fast", *FAST, f"trainer.precision={precision}")
        runs[precision] = train_script.train(cfg)
    fp32, bf16 = runs["32-true"], runs["bf16-mixed"]
    assert fp32["steps"] == bf16["steps"] == 6
    assert math.isfinite(bf16["final_val_loss"]) and bf16["final_val_loss"] != fp32["final_val_loss"]  # bf16 ran
    assert bf16["final_val_loss"] == pytest.approx(fp32["final_val_loss"], abs=0.02)


def test_a_teaching_run_records_its_audit_failure_and_trains(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """causal_only with left padding (on_invalid=run): the audit fails at step 0, as it should, and the run goes on."""
    cfg = config(
        tmp_path,
        "debug=fast",
        *FAST,
        "attention=causal_only",
        "data.layout=padded",
        "data.padding_side=left",
        "on_invalid=run",
        "trainer.max_steps=2",
        "trainer.val_check_interval=2",
    )
    summary = train_script.train(cfg)
    assert summary["valid"] is False and summary["steps"] == 2
    assert summary["audit"]["passed"] is False and summary["audit"]["failed"] == ["padding", "loss"]
    assert summary["audit"]["checks"]["causality"]["passed"] is True  # causal_only is causal: only padding leaks
    out = capsys.readouterr().out
    assert "  mask audit: FAILED padding, loss (as expected: invalid on purpose)\n" in out
    assert " s (attention=causal_only, layout=padded, padding=left, batching=random)\n" in out


def test_every_logger_of_the_logger_mapping_logs_and_the_summary_finds_the_csv_one(tmp_path: Path) -> None:
    """cfg.logger maps names to logger configs, as cfg.callbacks does: every non-null entry logs, in any order, and
    summary.json's metrics_csv is the CSVLogger's file (not whichever logger comes first)."""
    short = ["debug=fast", *FAST, "trainer.max_steps=2", "trainer.val_check_interval=2"]
    tensorboard = "pytorch_lightning.loggers.TensorBoardLogger"
    cfg = config(
        tmp_path,
        *short,
        "~logger",
        f"+logger.tb._target_={tensorboard}",
        "+logger.tb.save_dir=${paths.output_dir}",
        "+logger.tb.name=tb",
        "+logger.my_csv._target_=pytorch_lightning.loggers.CSVLogger",
        "+logger.my_csv.save_dir=${paths.output_dir}",
        "+logger.my_csv.name=my_csv",
        "+logger.off=null",
    )
    assert list(cfg.logger) == ["tb", "my_csv", "off"]
    summary = train_script.train(cfg)
    assert summary["metrics_csv"] == os.path.join("my_csv", "version_0", "metrics.csv")
    assert len(column(list(csv.DictReader((tmp_path / summary["metrics_csv"]).open())), "train/loss")) == 2
    assert list((tmp_path / "tb" / "version_0").glob("events.out.tfevents.*"))

    for off in ("~logger", "logger.csv=null"):  # no logger at all: no LearningRateMonitor either (it needs one)
        folder = tmp_path / off.strip("~").replace(".", "_").replace("=", "_")
        bare = train_script.train(config(folder, *short, off))
        assert bare["metrics_csv"] is None and bare["steps"] == 2
        assert sorted(p.name for p in folder.iterdir()) == ["checkpoints", "summary.json"]


def test_without_the_throughput_monitor_the_summary_says_n_a(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = config(
        tmp_path,
        "debug=fast",
        *FAST,
        "~callbacks.throughput_monitor",
        "trainer.max_steps=2",
        "trainer.val_check_interval=2",
    )
    summary = train_script.train(cfg)
    assert summary["steps"] == 2 and summary["final_train_loss"] is not None
    for key in ("real_tokens_per_sec", "padded_tokens_per_sec", "pad_fraction", "peak_memory_mb"):
        assert summary[key] is None, key
    assert not column(metrics(tmp_path), "train/pad_fraction")  # LitDecoderLM itself logs train/loss only
    out = capsys.readouterr().out
    assert "  real tokens/s n/a, pad fraction n/a, peak memory n/a MB\n" in out
    assert re.search(r"\nmhaplug run finished: 2 steps in \d\.\d s \(", out)  # tenths under 10 s, never "in 0 s"


def test_a_tiny_split_is_a_warning_line_in_the_summary(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("one short line of text to train on\n\nand another one\n")
    cfg = config(
        tmp_path / "run", "debug=fast", *FAST[1:], "data=text_files", f"data.path={corpus}", "trainer.max_steps=1",
        "data.max_length=16", "data.vocab_size=258",
    )  # fmt: skip
    with pytest.warns(UserWarning, match="tiny data split"):
        summary = train_script.train(cfg)
    warning = summary["data"]["split_warning"]
    assert warning.startswith("tiny data split: ")
    assert f"\n  WARNING: {warning}\n" in capsys.readouterr().out


@pytest.mark.parametrize("log_every_n_steps", [1, 5])
def test_a_run_whose_loss_becomes_nan_stops_and_says_where(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], log_every_n_steps: int
) -> None:
    """model.lr=1e6: train/loss is finite, about 1e12, then NaN at the third step. Read at every step, or every 5th
    (no sync per step), the run stops, names step 2 (where metrics.csv logged the NaN: its steps count from 0), and
    writes no checkpoint of NaN weights: with 5, the validation after step 3 (val/loss NaN) would save one, and
    ModelCheckpoint takes a first score even when it is NaN."""
    cfg = config(tmp_path, "debug=fast", *FAST, "model.lr=1e6", f"trainer.log_every_n_steps={log_every_n_steps}")
    summary = train_script.train(cfg)
    assert json.loads((tmp_path / "summary.json").read_text(), parse_constant=str) == json.loads(
        json.dumps(summary), parse_constant=str
    )
    assert summary["status"] == "diverged" and summary["diverged"] is True and summary["interrupted"] is False
    assert summary["diverged_at_step"] == 2 and summary["steps"] == 3  # the third optimizer step logs at step 2
    assert not list(tmp_path.glob("checkpoints/*.ckpt"))
    if log_every_n_steps == 1:  # logged, NaN included, and nothing after it (not even the validation due at step 3)
        rows = metrics(tmp_path)
        losses = column(rows, "train/loss")
        assert len(losses) == 3 and math.isfinite(losses[1]) and math.isnan(losses[2]) and not column(rows, "val/loss")
        assert [int(r["step"]) for r in rows if r["train/loss"]][2] == summary["diverged_at_step"]
    assert "mhaplug run DIVERGED: train/loss NaN or inf at step 2 in " in capsys.readouterr().out


def test_loss_is_normalised_by_the_tokens_of_the_whole_step(tmp_path: Path) -> None:
    """batch 8 vs. two accumulated micro-batches of 4 (the same rows): the same step losses and final model.
    A mean of per-batch means would weight the two halves equally whatever their token counts."""
    base = ["debug=fast", *FAST, "data.synthetic_max_words=40", "trainer.max_steps=4", "trainer.val_check_interval=8"]
    whole = train_script.train(config(tmp_path / "whole", *base, "data.batch_size=8"))
    split = train_script.train(
        config(
            tmp_path / "split",
            *base,
            "data.batch_size=4",
            "model.accumulate_grad_batches=2",
            "trainer.val_check_interval=16",
        )
    )
    whole_loss, split_loss = (
        column(metrics(tmp_path / "whole"), "train/loss"),
        column(metrics(tmp_path / "split"), "train/loss"),
    )
    assert len(whole_loss) == len(split_loss) == 4
    torch.testing.assert_close(torch.tensor(split_loss), torch.tensor(whole_loss), atol=1e-5, rtol=1e-5)
    assert split["final_val_loss"] == pytest.approx(whole["final_val_loss"], abs=1e-5)


# ----------------------------------------------------------------------------------------------------------
# Real subprocesses: kill and resume, DDP, the ablation sweep
# ----------------------------------------------------------------------------------------------------------


def run_train(*overrides: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "train.py", *overrides],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        check=False,
    )


def wait_for(condition: Any, what: str, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while not condition():
        if time.time() > deadline:
            raise TimeoutError(f"waited {timeout} s for {what}")
        time.sleep(0.05)


def logged_batches(path: Path) -> list[tuple[int, str]]:
    """BatchLog's (global step, hash of input_ids) of every batch trained (whole lines only: it may be writing one)."""
    lines = path.read_text().split("\n")[:-1] if path.exists() else []
    return [(r["step"], r["input_ids"]) for r in map(json.loads, lines)]


class PauseAfterCheckpoint(pl.Callback):
    """For a child process the test kills: at the first batch after the checkpoint of ``step`` was saved, write
    ``marker`` atomically (``os.replace``: the test never reads part of it) and wait to be killed. The test then
    kills a process that writes nothing, so ``last.ckpt`` is whole (Lightning writes it in place, not atomically)."""

    def __init__(self, step: int, marker: str) -> None:
        self.step, self.marker = step, Path(marker)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, idx: int) -> None:
        if trainer.global_step >= self.step:
            tmp = self.marker.with_name(self.marker.name + ".tmp")
            tmp.write_text(str(trainer.global_step))
            os.replace(tmp, self.marker)
            time.sleep(600)  # until SIGKILL


@pytest.mark.slow
def test_sigkill_then_sigterm_mid_epoch_and_resume_match_an_uninterrupted_run(
    run_compare: Callable[..., subprocess.CompletedProcess[str]], tmp_path: Path
) -> None:
    """One run, three attempts: SIGKILL after the checkpoint of step 20 (while the process waits, so that no file is
    half-written), resumed; SIGTERM a few steps after the resume (exit 143, checkpoint at that very step, summary
    "interrupted"), resumed again to step 50. Every resume writes on in the run's folder (no hydra.run.dir given), to
    a new logger version; together the attempts train exactly the batches of an uninterrupted run, log every step
    once (as compare reads them), keep tracking the best checkpoint, and end with its loss."""
    common = [
        *FAST,
        "data.synthetic_documents=400",
        "trainer.max_steps=50",
        "trainer.val_check_interval=10",
        "trainer.log_every_n_steps=1",
        f"data.cache_dir={tmp_path / 'cache'}",
        "+callbacks.batch_log._target_=mhaplug.training.callbacks.BatchLog",
    ]
    full = run_train(
        *common, f"hydra.run.dir={tmp_path / 'full'}", f"+callbacks.batch_log.path={tmp_path / 'full.jsonl'}"
    )
    assert full.returncode == 0, full.stderr[-3000:]
    expected = logged_batches(tmp_path / "full.jsonl")

    run_dir = tmp_path / "run"
    last = run_dir / "checkpoints" / "last.ckpt"
    marker = tmp_path / "paused_at_step"
    killed = subprocess.Popen(
        [
            sys.executable,
            "train.py",
            *common,
            f"hydra.run.dir={run_dir}",
            f"+callbacks.batch_log.path={tmp_path / 'killed.jsonl'}",
            "+callbacks.pause._target_=tests.test_train.PauseAfterCheckpoint",  # importable from the repository root
            "+callbacks.pause.step=20",
            f"+callbacks.pause.marker={marker}",
        ],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_for(marker.exists, "the checkpoint of step 20")  # written atomically, after last.ckpt was saved
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    killed_at = torch.load(last, weights_only=False)["global_step"]
    assert marker.read_text() == "20" and killed_at == 20  # a validation's checkpoint, mid-epoch (46 batches)

    def resume(name: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [sys.executable, "train.py", *common, f"ckpt_path={last}", f"+callbacks.batch_log.path={tmp_path / name}"],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )

    terminated = resume("terminated.jsonl")
    wait_for(lambda: len(logged_batches(tmp_path / "terminated.jsonl")) >= 3, "three steps after the resume")
    terminated.send_signal(signal.SIGTERM)
    out, err = terminated.communicate(timeout=240)
    assert terminated.returncode == 143, err[-3000:]
    interrupted = json.loads((run_dir / "summary.json").read_text())
    stopped_at = interrupted["steps"]
    assert interrupted["status"] == "interrupted" and interrupted["interrupted"] is True and killed_at < stopped_at < 50
    assert interrupted["resume_ckpt_path"] == str(last) and interrupted["resumed_from"] == str(last)
    assert (
        torch.load(last, weights_only=False)["global_step"] == stopped_at
    )  # saved at that step, not the last validation
    assert f"mhaplug run INTERRUPTED by SIGTERM at step {stopped_at}" in out and f"ckpt_path={last}" in out
    assert logged_batches(tmp_path / "terminated.jsonl") == [b for b in expected if killed_at <= b[0] < stopped_at]

    final = resume("final.jsonl")
    out, err = final.communicate(timeout=240)
    assert final.returncode == 0, err[-3000:]
    assert logged_batches(tmp_path / "final.jsonl") == [b for b in expected if b[0] >= stopped_at]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "cache",
        "final.jsonl",
        "full",
        "full.jsonl",
        "killed.jsonl",
        "paused_at_step",
        "run",
        "terminated.jsonl",
    ]  # no other run folder
    full_summary = json.loads((tmp_path / "full" / "summary.json").read_text())
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["steps"] == full_summary["steps"] == 50
    assert summary["final_val_loss"] == pytest.approx(full_summary["final_val_loss"], abs=1e-6)
    assert summary["best_val_loss"] == pytest.approx(full_summary["best_val_loss"], abs=1e-6)
    # ModelCheckpoint's state came back with each resume: one best checkpoint and last.ckpt, named as in the full run
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == sorted(
        p.name for p in (tmp_path / "full" / "checkpoints").iterdir()
    )

    # Each attempt logged to its own version, none overwritten; read together they are the full run's log.
    attempts = sorted((run_dir / "csv").glob("version_*/metrics.csv"))
    assert [p.parent.name for p in attempts] == ["version_0", "version_1", "version_2"]
    assert min(s for s, _ in read_curve(attempts[0], "train/loss")) == 0  # the first attempt's steps are kept
    for name in ("train/loss", "val/loss"):
        got, want = (
            read_curve(attempts, name),
            read_curve(tmp_path / "full" / "csv" / "version_0" / "metrics.csv", name),
        )
        assert [s for s, _ in got] == [s for s, _ in want] and len(want) >= 5, name
        assert [v for _, v in got] == pytest.approx([v for _, v in want], abs=1e-6), name
    report = run_compare(tmp_path)
    assert report.returncode == 0, report.stdout + report.stderr
    # the resumed run is one run, equal to the full one
    assert "equivalence: 1 group(s), 2 valid runs, all within 0.001\n" in report.stdout


@pytest.mark.slow
def test_runs_started_together_get_their_own_folders_and_exit_codes_say_what_happened(tmp_path: Path) -> None:
    """Default folders (outputs/ under the working directory): two identical runs started at once, each in its own
    folder with its own logs and checkpoints; a refused setting (exit 2, one line, no folder); a sweep with a job
    that diverges and one that is refused (every job runs; exit 3, the largest code of its jobs)."""
    script = [sys.executable, str(ROOT / "train.py"), *FAST, "debug=fast", f"data.cache_dir={tmp_path / 'cache'}"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}

    def start(*overrides: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [*script, *overrides], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
        )

    pair = [start(), start()]
    for process in pair:
        _, err = process.communicate(timeout=300)
        assert process.returncode == 0, err[-3000:]
    runs = sorted((tmp_path / "outputs" / "train" / "runs").iterdir())
    names = [re.fullmatch(r"\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d\.\d{3}_(\d+)", r.name) for r in runs]
    assert len(runs) == 2 and all(names) and {int(n.group(1)) for n in names} == {p.pid for p in pair}  # who ran where
    for run in runs:
        assert json.loads((run / "summary.json").read_text())["steps"] == 6
        assert len(column(metrics(run), "train/loss")) == 6  # its own rows only
        assert not [c.name for c in (run / "checkpoints").iterdir() if re.search(r"-v\d+\.ckpt$", c.name)]

    refused = subprocess.run(
        [*script, "data.max_length=1"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert refused.returncode == 2
    assert refused.stderr.splitlines() == [
        (
            "train.py: error: data.max_length=1 cannot train: a row of L tokens has L-1 next-token targets (1 trains "
            "on nothing and reports loss 0); use data.max_length >= 2, e.g. data.max_length=256"
        )
    ]
    assert sorted((tmp_path / "outputs" / "train" / "runs").iterdir()) == runs  # no folder left behind

    sweep = subprocess.run(
        [*script[:2], "-m", *script[2:], "model.lr=1e6,-1"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
    assert sweep.returncode == 3, sweep.stderr[-3000:]
    assert [line for line in sweep.stderr.splitlines() if "error" in line] == [
        (
            "train.py: error: job 1 (data=synthetic,debug=fast,model.lr=-1,model=tiny): model.lr=-1.0 cannot train: "
            "use a learning rate > 0, e.g. model.lr=3e-3"
        )
    ]
    (sweep_dir,) = (tmp_path / "outputs" / "train" / "multiruns").iterdir()
    assert sorted(p.name for p in sweep_dir.iterdir()) == [
        "data=synthetic,debug=fast,model.lr=1000000.0,model=tiny",
        "multirun.yaml",
    ]
    diverged = json.loads(
        (sweep_dir / "data=synthetic,debug=fast,model.lr=1000000.0,model=tiny" / "summary.json").read_text()
    )
    assert diverged["status"] == "diverged" and diverged["diverged_at_step"] == 2


@pytest.mark.slow
def test_ddp_on_two_cpu_processes_matches_one_process(tmp_path: Path) -> None:
    """Two ranks of batch 4 vs. one process accumulating two batches of 4: the same global step."""
    common = [
        *FAST,
        "data.batch_size=4",
        "trainer.max_steps=8",
        "trainer.val_check_interval=8",
        f"data.cache_dir={tmp_path / 'cache'}",
    ]
    single = run_train(
        *common,
        "model.accumulate_grad_batches=2",
        "trainer.val_check_interval=16",
        f"hydra.run.dir={tmp_path / 'single'}",
    )
    assert single.returncode == 0, single.stderr[-3000:]
    ddp = run_train(
        *common, "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", f"hydra.run.dir={tmp_path / 'ddp'}"
    )
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert "MEMBER: 2/2" in ddp.stdout + ddp.stderr  # two processes really ran
    one = json.loads((tmp_path / "single" / "summary.json").read_text())
    two = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    assert one["steps"] == two["steps"] == 8
    assert two["final_val_loss"] == pytest.approx(one["final_val_loss"], abs=1e-4)


@pytest.mark.slow
def test_quick_ablation_sweep_and_compare(
    run_compare: Callable[..., subprocess.CompletedProcess[str]], tmp_path: Path
) -> None:
    sweep_dir = tmp_path / "sweep"
    result = run_train(
        "-m",
        "experiment=mask_ablation_quick",
        f"hydra.sweep.dir={sweep_dir}",
        f"data.cache_dir={tmp_path / 'cache'}",
        "trainer.accelerator=cpu",
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summaries = [json.loads(p.read_text()) for p in sweep_dir.rglob("summary.json")]
    skipped = list(sweep_dir.rglob("skipped.txt"))
    assert len(summaries) == 7 * 2 + 5  # padded: 7 strategies x 2 sides (two invalid, on purpose); packed: 5
    invalid = sorted(f"{s['strategy']}/{s['layout']}/{s['padding_side']}" for s in summaries if not s["valid"])
    assert invalid == ["causal_only/padded/left", "torch_mha/packed/right", "torch_mha/padded/left"]
    assert len(skipped) == 7 * 2 * 2 - 19  # left padding of packed rows, and causal strategies on packed rows
    strategies = ["auto", "reference", "torch_mha", "merged_bool", "merged_additive", "causal_kpm", "causal_only"]
    assert sorted(p.name for p in sweep_dir.iterdir() if p.is_dir()) == sorted(  # each job's folder says what it runs
        f"attention={strategy},data.layout={layout},data.padding_side={side}"
        for strategy in strategies
        for layout in ("padded", "packed")
        for side in ("right", "left")
    )
    compare = run_compare(sweep_dir, "--plot", str(tmp_path / "ablation.png"))
    assert compare.returncode == 0, compare.stdout + compare.stderr
    assert "expected divergence" in compare.stdout and "MISMATCH" not in compare.stdout
    assert result.stdout.count(f"compare runs: python -m mhaplug.compare {sweep_dir}\n") == len(summaries)
    log = (sweep_dir / "attention=causal_kpm,data.layout=packed,data.padding_side=right" / "train.log").read_text()
    assert "skipped: attention=causal_kpm applies" in log and f"({SKIP_WHY})\n" in log
    assert "equivalence: 2 group(s), 16 valid runs, all within 0.001" in compare.stdout  # padded 12, packed 4
    # The step-0 mask audit: every valid run passed it, every teaching run failed it (and compare says so). The
    # quick model has one layer, so torch_mha's NaN stays in the pad rows (its val loss is right) and only "finite"
    # fails; with two layers it spreads to every check (tests/training/test_audit.py).
    assert all(s["audit"]["passed"] for s in summaries if s["valid"])
    failed = {f"{s['strategy']}/{s['layout']}/{s['padding_side']}": s["audit"]["failed"] for s in summaries}
    assert {run: checks for run, checks in failed.items() if checks} == {
        "causal_only/padded/left": ["padding", "loss"],
        "torch_mha/packed/right": ["finite"],
        "torch_mha/padded/left": ["finite"],
    }
    assert "mask audit: 16 valid run(s) passed, 3 invalid run(s) failed as expected" in compare.stdout
    assert (tmp_path / "ablation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_a_streamed_run_with_two_workers_resumes_after_sigterm_exactly(tmp_path: Path) -> None:
    """data.streaming=true with data.num_workers=2: SIGTERM mid-run (checkpoint at that step), resume to the end;
    the attempts train exactly the batches of an uninterrupted run and reach its val/loss within 1e-5."""
    common = [
        *FAST,
        "data.streaming=true",
        "data.num_workers=2",
        "data.synthetic_documents=3000",
        "data.stream_buffer=256",
        "data.val_max_tokens=2000",
        "trainer.max_steps=40",
        "trainer.val_check_interval=10",
        f"data.cache_dir={tmp_path / 'cache'}",
        "+callbacks.batch_log._target_=mhaplug.training.callbacks.BatchLog",
    ]
    full = run_train(
        *common, f"hydra.run.dir={tmp_path / 'full'}", f"+callbacks.batch_log.path={tmp_path / 'full.jsonl'}"
    )
    assert full.returncode == 0, full.stderr[-3000:]
    expected = logged_batches(tmp_path / "full.jsonl")
    assert len(expected) == 40 and len({h for _, h in expected}) == 40  # batches of the stream, none repeated

    run_dir = tmp_path / "run"
    first = subprocess.Popen(
        [
            sys.executable,
            "train.py",
            *common,
            f"hydra.run.dir={run_dir}",
            f"+callbacks.batch_log.path={tmp_path / 'first.jsonl'}",
        ],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_for(lambda: len(logged_batches(tmp_path / "first.jsonl")) >= 13, "13 streamed steps")
    first.send_signal(signal.SIGTERM)
    _, err = first.communicate(timeout=240)
    assert first.returncode == 143, err[-3000:]
    stopped_at = json.loads((run_dir / "summary.json").read_text())["steps"]
    assert 13 <= stopped_at < 40
    resumed = run_train(
        *common,
        f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}",
        f"+callbacks.batch_log.path={tmp_path / 'r.jsonl'}",
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert logged_batches(tmp_path / "first.jsonl") == expected[:stopped_at]
    assert logged_batches(tmp_path / "r.jsonl") == expected[stopped_at:]
    want = json.loads((tmp_path / "full" / "summary.json").read_text())
    got = json.loads((run_dir / "summary.json").read_text())
    assert got["steps"] == 40 and got["final_val_loss"] == pytest.approx(want["final_val_loss"], abs=1e-5)


@pytest.mark.slow
def test_fsdp_on_two_cpu_ranks_matches_ddp_and_resumes_streamed_from_its_distributed_checkpoint(
    tmp_path: Path,
) -> None:
    """trainer=fsdp (FSDP2 through ModelParallelStrategy, gloo) against trainer=ddp on the same 2 CPU ranks, both
    streamed with a loader worker each: the same val/loss (1e-4). A third run resumes from the fsdp run's distributed
    checkpoint of step 6 (a folder of shards, with every rank's stream position) and ends at its val/loss (1e-5)."""
    common = [
        *FAST,
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "data.batch_size=4",
        "data.streaming=true",
        "data.num_workers=1",
        "data.synthetic_documents=2000",
        "data.stream_buffer=128",
        "data.val_max_tokens=1500",
        "trainer.max_steps=12",
        "trainer.val_check_interval=6",
        f"data.cache_dir={tmp_path / 'cache'}",
    ]
    every = [
        "+callbacks.every._target_=pytorch_lightning.callbacks.ModelCheckpoint",
        f"+callbacks.every.dirpath={tmp_path / 'every'}",
        "+callbacks.every.filename='step{step}'",
        "+callbacks.every.auto_insert_metric_name=false",
        "+callbacks.every.every_n_train_steps=6",
        "+callbacks.every.save_top_k=-1",
    ]
    runs = {
        "ddp": run_train(*common, "trainer=ddp", f"hydra.run.dir={tmp_path / 'ddp'}"),
        "fsdp": run_train(*common, "trainer=fsdp", *every, f"hydra.run.dir={tmp_path / 'fsdp'}"),
    }
    for name, run in runs.items():
        assert run.returncode == 0, name + run.stderr[-3000:]
    step6 = tmp_path / "every" / "step6.ckpt"
    assert sorted(p.name for p in step6.iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp", "meta.pt"]
    resumed = run_train(*common, "trainer=fsdp", f"ckpt_path={step6}", f"hydra.run.dir={tmp_path / 'resumed'}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    ddp, fsdp, again = (json.loads((tmp_path / n / "summary.json").read_text()) for n in ("ddp", "fsdp", "resumed"))
    assert ddp["steps"] == fsdp["steps"] == again["steps"] == 12
    assert fsdp["final_val_loss"] == pytest.approx(ddp["final_val_loss"], abs=1e-4)
    assert again["final_val_loss"] == pytest.approx(fsdp["final_val_loss"], abs=1e-5)
    train_losses = [[float(r["train/loss"]) for r in metrics(tmp_path / n) if r.get("train/loss")] for n in runs]
    assert train_losses[0] == pytest.approx(train_losses[1], abs=1e-4)
