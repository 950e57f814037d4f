"""The schema of ``configs/`` and the start-up checks of a training run.

A ``*Schema`` dataclass here types one group of ``configs/`` (:class:`DataSchema` the ``data`` group,
:class:`ModelSchema` the ``model`` group, ...; :class:`TrainSchema` the whole tree); it is registered with Hydra's
ConfigStore and sits under the YAML files, so a misspelt key (``data.batchsize=8``) fails when the config is
composed, naming the key. The objects the library builds from a config have ``*Config`` names
(:class:`mhaplug.decoder.DecoderConfig`, the architecture). :func:`validate` then checks the values (allowed choices
are listed in the message) and the combinations that would train the wrong thing, before any data is read: each
rejection is one message naming the settings and a valid alternative. The run folders' resolvers, registered here
too, are :mod:`mhaplug.training.run_dirs`'.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import re
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from mhaplug.attention.strategies import CAPABILITIES, DEFAULT_STRATEGY, Strategy, strategies_where
from mhaplug.common import (
    EOS_TOKEN,
    PAD_TOKEN,
    SEED_MAX,
    Batching,
    Choice,
    ConfigError,
    Layout,
    OnInvalid,
    PaddingSide,
    Source,
    round_up,
)
from mhaplug.training.run_dirs import job_subdir_resolver, run_dir_resolver

__all__ = [
    "PRECISIONS",
    "AttentionSchema",
    "DataSchema",
    "ModelSchema",
    "SkipRun",
    "TrainSchema",
    "TrainerSchema",
    "choice_of",
    "invalid_combination",
    "min_vocab_size",
    "register_configs",
    "schema_field",
    "validate",
]


# The schema of configs/: the settings of TextDataModule and LitDecoderLM (with DecoderConfig), typed, so that
# OmegaConf refuses a misspelt key or a value of the wrong type (a choice outside its Choice) when the config is
# composed. Names and defaults are those of the classes the configs instantiate, which are their one definition:
# tests/test_train.py fails when the two differ. The YAML files set only what differs from these defaults.


@dataclass
class DataSchema:
    """:class:`mhaplug.data.TextDataModule`'s parameters."""

    _target_: str = MISSING  # configs/data/stdlib_docs.yaml: mhaplug.data.TextDataModule
    source: Source = Source.stdlib_docs
    path: Any = None  # a str, or a list of them (text_files)
    name: str | None = None
    split: str = "train"
    text_column: str = "text"
    tokenizer_path: str | None = None
    vocab_size: int = 4096
    max_length: int = 256
    layout: Layout = Layout.packed
    padding_side: PaddingSide = PaddingSide.right
    batching: Batching = Batching.random
    batch_size: int = 16
    max_tokens: int | None = None
    pad_to_multiple_of: int | None = None
    val_fraction: float = 0.05
    seed: int = 0
    num_workers: int = 0
    cache_dir: str | None = None
    max_documents: int | None = None
    synthetic_documents: int = 512
    synthetic_max_words: int = 64
    num_proc: int | None = None
    tokenizer_sample_mb: int = 32
    val_max_tokens: int | None = 262_144
    streaming: bool = False
    stream_buffer: int = 4096


@dataclass
class ModelSchema:
    """:class:`mhaplug.training.lit.LitDecoderLM`'s parameters: the :class:`mhaplug.decoder.DecoderConfig` fields (the
    architecture), then the optimiser's and what the run records."""

    _target_: str = MISSING  # configs/model/small.yaml: mhaplug.training.lit.LitDecoderLM
    vocab_size: int = MISSING  # configs/model/small.yaml: ${data.vocab_size}
    max_positions: int = 256
    d_model: int = 128
    num_heads: int = 4
    num_layers: int = 2
    d_ff: int = 512
    dropout: float = 0.0
    attn_dropout: float = 0.0
    strategy: Strategy = Strategy[DEFAULT_STRATEGY]
    tie_weights: bool = True
    compile: bool = False
    lr: float = 3e-3
    weight_decay: float = 0.1
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1
    accumulate_grad_batches: int = 1
    gradient_clip_val: float = 1.0
    layout: Layout = Layout.packed
    padding_side: PaddingSide = PaddingSide.right
    batching: Batching = Batching.random


# Lightning's names for a precision (its _PRECISION_INPUT_STR, then the short forms it also takes,
# _PRECISION_INPUT_STR_ALIAS), written here so that checking a config imports no Lightning; tests/test_train.py
# compares them with Lightning's.
PRECISIONS = (
    "32-true",
    "bf16-mixed",
    "16-mixed",
    "bf16-true",
    "16-true",
    "64-true",
    "transformer-engine",
    "transformer-engine-float16",
)
PRECISION_ALIASES = ("32", "16", "bf16", "64")


@dataclass
class TrainerSchema:
    """The :class:`pytorch_lightning.Trainer` parameters that configs/ sets or a person changes, with Lightning's
    defaults (``precision``: what Lightning's None means); another Trainer parameter is added with
    ``+trainer.<name>=...``. Typed, so ``trainer.max_steps=abc`` fails naming the key; :func:`validate` checks the
    values."""

    _target_: str = MISSING  # configs/trainer/default.yaml: pytorch_lightning.Trainer
    accelerator: str = "auto"
    strategy: Any = "auto"  # a name, or a config to instantiate (configs/trainer/fsdp.yaml)
    devices: Any = "auto"  # a count, -1 (all), auto, or device indices ([0,1] or "0,1")
    num_nodes: int = 1
    precision: str = "32-true"  # one of PRECISIONS or PRECISION_ALIASES
    max_epochs: int | None = None
    max_steps: int = -1
    limit_train_batches: int | float | None = None  # an int counts batches, a float is a fraction of them
    limit_val_batches: int | float | None = None
    val_check_interval: int | float | None = None
    check_val_every_n_epoch: int | None = 1
    num_sanity_val_steps: int | None = None
    log_every_n_steps: int | None = None
    enable_progress_bar: bool | None = None
    enable_model_summary: bool | None = None
    accumulate_grad_batches: int = 1  # must stay 1: the model accumulates (model.accumulate_grad_batches)
    gradient_clip_val: int | float | None = None  # must stay unset: the model clips (model.gradient_clip_val)
    deterministic: Any = None  # true, false or "warn"
    use_distributed_sampler: bool = True
    sync_batchnorm: bool = False


@dataclass
class AttentionSchema:
    strategy: Strategy = Strategy[DEFAULT_STRATEGY]


@dataclass
class TrainSchema:
    data: DataSchema = field(default_factory=DataSchema)
    model: ModelSchema = field(default_factory=ModelSchema)
    attention: AttentionSchema = field(default_factory=AttentionSchema)
    trainer: TrainerSchema = field(default_factory=TrainerSchema)
    logger: Any = None  # name -> logger config, as callbacks
    callbacks: Any = None
    paths: dict[str, Any] = field(default_factory=dict)
    task_name: str = "train"
    seed: int = 0
    ckpt_path: str | None = None
    on_invalid: OnInvalid = OnInvalid.error  # what to do with a combination that cannot train correctly


def choice_of(key: str) -> type[Choice] | None:
    """The :class:`mhaplug.common.Choice` that types ``key`` (dotted, ``data.layout``) in :class:`TrainSchema`, or None
    for a key that is not a choice (or not in the schema)."""
    node: Any = TrainSchema
    for part in key.split("."):
        if not dataclasses.is_dataclass(node):
            return None
        node = typing.get_type_hints(node).get(part)
    return node if isinstance(node, type) and issubclass(node, Choice) else None


def schema_field(key: str) -> tuple[type, str] | None:
    """The schema dataclass holding ``key`` (dotted, ``trainer.max_steps``) and the field's name in it, or None for a
    key that is not a field of :class:`TrainSchema` (an ``Any`` or dict section's key, or no key at all)."""
    node: Any = TrainSchema
    *parents, name = key.split(".")
    for part in parents:
        node = typing.get_type_hints(node).get(part) if dataclasses.is_dataclass(node) else None
    if not (dataclasses.is_dataclass(node) and name in typing.get_type_hints(node)):
        return None
    return node, name


def register_configs() -> None:
    """Register the structured configs with Hydra's ConfigStore and the run-folder resolvers with OmegaConf."""
    store = ConfigStore.instance()
    # The primary schema types the whole tree (configs/train.yaml lists it first), so a misspelt key in any group's
    # file or override fails at composition. No group-level schemas: Hydra would offer them as options
    # (attention=attention_schema would train).
    store.store(name="train_schema", node=TrainSchema)
    # use_cache: a folder is claimed once per composed config, however often Hydra (or Lightning's DDP launcher,
    # through HydraConfig) reads hydra.run.dir; Hydra copies the sweep config's cache into each job's config, so the
    # jobs of a sweep share its folder.
    OmegaConf.register_new_resolver("mhaplug.run_dir", run_dir_resolver, use_cache=True, replace=True)
    OmegaConf.register_new_resolver("mhaplug.job_subdir", job_subdir_resolver, use_cache=True, replace=True)


def invalid_combination(cfg: DictConfig) -> tuple[str, bool] | None:
    """Why this strategy / layout / padding / device cannot train correctly, and whether it can run at all
    (``causal_only`` with left padding runs, and shows how wrong it is; the others cannot run), or None.

    Decided from the strategy's row in :data:`mhaplug.attention.CAPABILITIES`, so a new strategy needs no
    change here."""
    strategy, data = cfg.attention.strategy, cfg.data
    caps = CAPABILITIES[strategy]
    packed, left = data.layout == "packed", data.padding_side == "left"
    if packed and left:
        return (
            (
                "data.padding_side=left has no effect with data.layout=packed (documents fill each row from the left, "
                "padding only ends a row); add data.layout=padded to pad rows, or drop the padding_side override"
            ),
            False,
        )
    if packed and not caps.document_masks:
        return (
            (
                f"attention={strategy} applies a plain causal mask, so with data.layout=packed the documents of a row "
                f"would attend each other. Use attention={' or attention='.join(_usable(cfg, document_masks=True))}, "
                f"or data.layout=padded"
            ),
            False,
        )
    if left and not caps.left_padding:
        return (
            (
                f"attention={strategy} ignores the padding mask, which is only correct with right padding; with "
                f"data.padding_side=left real tokens would attend the pads before them. Use attention="
                f"{' or attention='.join(_usable(cfg, left_padding=True, needs_is_causal=True))}"
                ", or data.padding_side=right"
            ),
            True,
        )
    if (left or packed) and not caps.empty_rows_zero:
        return (
            f"attention={strategy} with "
            + ("data.layout=packed" if packed else "data.padding_side=left")
            + ": some query rows have nothing to attend to (pads before the first real token, or a packed row's "
            "padding tail), and torch's MultiheadAttention returns NaN for them on its evaluation fast path (and "
            "with need_weights=True); in a model that computes every position the NaN spreads through the next "
            "layer into val/loss (mhaplug's decoder drops those rows, the mask audit still fails). Use an mhaplug "
            "strategy: attention=auto",
            True,
        )
    if not caps.trains_on_cpu and not _cuda_training(cfg):
        return (
            (
                f"attention={strategy} trains on CUDA only (no backward on CPU); this run has no CUDA accelerator. "
                f"Use attention=auto"
            ),
            False,
        )
    if not caps.dropout and cfg.model.attn_dropout > 0:
        return (
            f"attention={strategy} has no attention dropout; set model.attn_dropout=0 or use attention=auto",
            False,
        )
    return None


def _usable(cfg: DictConfig, **flags: bool) -> list[str]:
    """Strategies with ``flags`` that also train here and are correct and finite everywhere, best first."""
    cuda = _cuda_training(cfg)
    return [
        name
        for name in strategies_where(**flags, empty_rows_zero=True)
        if (cuda or CAPABILITIES[name].trains_on_cpu) and name != "reference" and CAPABILITIES[name].left_padding
    ]


def _cuda_training(cfg: DictConfig) -> bool:
    accelerator = str(cfg.trainer.get("accelerator", "auto"))
    return torch.cuda.is_available() and accelerator in ("auto", "gpu", "cuda")


def min_vocab_size() -> int:
    """The smallest ``data.vocab_size`` for the byte-level BPE that :func:`mhaplug.data.tokenizer.train_tokenizer`
    trains (258): the special tokens ``<|pad|>`` and ``<|endoftext|>``, then all 256 bytes, whatever the vocab size
    asked for. With a smaller one the last byte tokens get ids past the embedding: the collator refuses them, but only
    once a text holds one of those bytes (plain ASCII text trains with 257 and fails later on other text)."""
    from tokenizers import pre_tokenizers  # light (no datasets, no Lightning)

    return len(pre_tokenizers.ByteLevel.alphabet()) + len((PAD_TOKEN, EOS_TOKEN))


def _whole(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _check_values(cfg: DictConfig) -> None:
    """Settings that cannot train, each refused with one line: the setting, the value, what works."""
    data, model = cfg.data, cfg.model
    if data.max_length < 2:
        raise ConfigError(
            f"data.max_length={data.max_length} cannot train: a row of L tokens has L-1 next-token targets (1 trains "
            "on nothing and reports loss 0); use data.max_length >= 2, e.g. data.max_length=256"
        )
    if not data.tokenizer_path and data.vocab_size < min_vocab_size():
        raise ConfigError(
            f"data.vocab_size={data.vocab_size} is too small for the byte-level BPE trained on the data: it has "
            f"{min_vocab_size() - 2} byte tokens and 2 special tokens, whatever the vocab size; use data.vocab_size >= "
            f"{min_vocab_size()} (e.g. 4096), or data.tokenizer_path=<a tokenizer.json>"
        )
    if data.batch_size < 1:
        raise ConfigError(
            f"data.batch_size={data.batch_size} cannot train: use data.batch_size >= 1, e.g. data.batch_size=16"
        )
    if data.max_documents is not None and data.max_documents < 2:
        raise ConfigError(
            f"data.max_documents={data.max_documents} leaves too few documents to split into training and validation; "
            f"use data.max_documents >= 2, or data.max_documents=null for all of them"
        )
    if not (isinstance(model.lr, numbers.Real) and math.isfinite(model.lr) and model.lr > 0):
        raise ConfigError(f"model.lr={model.lr} cannot train: use a learning rate > 0, e.g. model.lr=3e-3")
    for name, seed in (("seed", cfg.seed), ("data.seed", data.seed)):
        if not 0 <= seed <= SEED_MAX:
            raise ConfigError(
                f"{name}={seed} is outside the seeds numpy takes (Lightning would silently use 0 instead): use "
                f"0 <= {name} <= {SEED_MAX}, e.g. {name}=0"
            )


def _check_trainer(trainer: DictConfig) -> None:
    """The Trainer's settings, each refused with one line before any data is read; Lightning would refuse them only
    once the data is read and the tokenizer trained (or never: ``max_steps=0`` trains nothing and exits 0)."""
    steps, epochs = trainer.max_steps, trainer.max_epochs
    if not (steps >= 1 or steps == -1):
        raise ConfigError(
            f"trainer.max_steps={steps} {'trains nothing' if steps == 0 else 'cannot train'}: use a number of "
            "optimizer steps >= 1, e.g. trainer.max_steps=300 (or -1, no step limit, with trainer.max_epochs >= 1)"
        )
    if not (epochs is None or epochs >= 1 or epochs == -1):
        raise ConfigError(
            f"trainer.max_epochs={epochs} {'trains nothing' if epochs == 0 else 'cannot train'}: use a number of "
            "epochs >= 1, or -1 (no epoch limit: trainer.max_steps ends the run)"
        )
    if steps == -1 and epochs == -1:
        raise ConfigError(
            "trainer.max_steps=-1 with trainer.max_epochs=-1 never stops (neither limits the run): use "
            "trainer.max_steps >= 1, e.g. trainer.max_steps=300, or trainer.max_epochs >= 1"
        )
    for name, least in (("limit_train_batches", 1), ("limit_val_batches", 0)):
        value = trainer[name]
        # a whole number counts batches, a float is a fraction of them; 0 (or 0.0) only where it is allowed
        if not (value is None or (value >= least if _whole(value) else 0 < value <= 1 or value == least)):
            raise ConfigError(
                f"trainer.{name}={value} is no number of batches: use a whole number >= {least} or a fraction in "
                f"{'(0' if least else '[0'}, 1]{' (0 turns validation off)' if not least else ''}, e.g. "
                f"trainer.{name}=1.0 (all of them)"
            )
    interval = trainer.val_check_interval
    per_epoch = trainer.check_val_every_n_epoch is not None  # a float (None: 1.0) is then a fraction of an epoch
    fraction = interval is None or (isinstance(interval, float) and 0 < interval <= 1)
    if not ((_whole(interval) and interval >= 1) or (per_epoch and fraction)):
        works = "a whole number of training batches >= 1" + (
            " or a fraction of an epoch in (0, 1]" if per_epoch else ""
        )
        raise ConfigError(
            f"trainer.val_check_interval={interval!r} cannot schedule validation: use {works}, e.g. "
            f"trainer.val_check_interval=100"
        )
    if per_epoch and trainer.check_val_every_n_epoch < 1:
        raise ConfigError(
            f"trainer.check_val_every_n_epoch={trainer.check_val_every_n_epoch} cannot schedule validation: use a "
            "number of epochs >= 1, or null (trainer.val_check_interval counts batches across epochs)"
        )
    if trainer.log_every_n_steps is not None and trainer.log_every_n_steps < 1:
        raise ConfigError(
            f"trainer.log_every_n_steps={trainer.log_every_n_steps} logs no training step (no train/loss in "
            "metrics.csv): use trainer.log_every_n_steps >= 1, e.g. trainer.log_every_n_steps=10"
        )
    if trainer.num_sanity_val_steps is not None and trainer.num_sanity_val_steps < -1:
        raise ConfigError(
            f"trainer.num_sanity_val_steps={trainer.num_sanity_val_steps} is no number of batches: use one >= 0, "
            "or -1 (all of them), e.g. trainer.num_sanity_val_steps=0"
        )
    if trainer.num_nodes < 1:
        raise ConfigError(
            f"trainer.num_nodes={trainer.num_nodes} cannot train: use a number of machines >= 1, e.g. "
            "trainer.num_nodes=1"
        )
    if not _devices(trainer.devices):
        raise ConfigError(
            f"trainer.devices={trainer.devices} names no devices: use a number of devices >= 1 (e.g. "
            "trainer.devices=2), -1 (all of them), auto, or device indices (trainer.devices=[0,1])"
        )
    if trainer.precision not in PRECISIONS + PRECISION_ALIASES:
        raise ConfigError(
            f"trainer.precision={trainer.precision} is not a precision Lightning takes; allowed: "
            f"{', '.join(PRECISIONS)} (or the short forms {', '.join(PRECISION_ALIASES)})"
        )
    if trainer.accumulate_grad_batches != 1:
        raise ConfigError(
            "trainer.accumulate_grad_batches must stay 1: the model accumulates itself to normalise the loss by the "
            f"real tokens of the whole step; set model.accumulate_grad_batches={trainer.accumulate_grad_batches}"
        )
    if trainer.gradient_clip_val:
        raise ConfigError(
            f"trainer.gradient_clip_val={trainer.gradient_clip_val} cannot be used: the model clips its own gradients "
            f"(it steps its optimizer itself, where Lightning refuses to clip); set "
            f"model.gradient_clip_val={trainer.gradient_clip_val} and leave trainer.gradient_clip_val unset"
        )


def _devices(devices: Any) -> bool:
    """Whether Lightning reads ``devices`` as some devices: a count >= 1, -1 (all), auto, or indices (``[0, 1]``,
    ``"0,1"``)."""
    if isinstance(devices, str):
        text = devices.strip()
        return text in ("auto", "-1") or (text != "0" and re.fullmatch(r"\d+(\s*,\s*\d+)*,?", text) is not None)
    if isinstance(devices, Sequence):
        return len(devices) > 0 and all(_whole(d) and d >= 0 for d in devices)
    return _whole(devices) and (devices >= 1 or devices == -1)


class SkipRun(Exception):
    """An invalid combination skipped on purpose; ``why`` says which rule skipped it: ``on_invalid=skip``, or
    ``on_invalid=run`` for a combination that cannot run at all (only a wrong-but-runnable one trains)."""

    def __init__(self, reason: str, *, why: str) -> None:
        super().__init__(reason)
        self.why = why


def validate(cfg: DictConfig) -> str | None:
    """Raise :class:`ConfigError` for a bad value or combination, or :class:`SkipRun` when ``on_invalid`` says to
    skip it; return the reason when ``on_invalid=run`` lets a wrong-but-runnable combination train on purpose."""
    _check_values(cfg)  # the choices (strategy, layout, ...) are typed: OmegaConf checked them at composition
    _check_trainer(cfg.trainer)
    if cfg.data.batching == "token_budget" and not cfg.data.max_tokens:
        raise ConfigError(
            f"data.batching=token_budget needs data.max_tokens (padded tokens per batch), e.g. "
            f"data.max_tokens={cfg.data.batch_size * cfg.data.max_length}"
        )
    row = round_up(cfg.data.max_length, cfg.data.pad_to_multiple_of)
    if cfg.data.batching == "token_budget" and cfg.data.max_tokens < row:
        raise ConfigError(
            f"data.max_tokens={cfg.data.max_tokens} cannot hold one row of data.max_length={cfg.data.max_length} "
            f"tokens{f' (rounded up to {row})' if row != cfg.data.max_length else ''}: use data.max_tokens >= {row}, "
            f"e.g. data.max_tokens={cfg.data.batch_size * row}"
        )
    found = invalid_combination(cfg)
    if found is None:
        return None
    reason, runnable = found
    if cfg.on_invalid == "error":
        raise ConfigError(reason)
    if cfg.on_invalid == "skip":
        raise SkipRun(reason, why="on_invalid=skip")
    if not runnable:
        raise SkipRun(
            reason, why="it cannot run at all: on_invalid=run trains only the combinations that run, wrong on purpose"
        )
    return reason
