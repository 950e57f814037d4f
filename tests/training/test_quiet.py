"""mhaplug.training.quiet: each known message is emitted by its library as it is in a run (so a library that stops
emitting it fails here, and the filter can go), hidden once silence_known_noise() is installed, and every other message
of the same module, category or logger still shows."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import pytorch_lightning as pl
import torch
import torch.utils._pytree as torch_pytree
from pytorch_lightning.utilities import _pytree as lightning_pytree
from pytorch_lightning.utilities.model_summary import summarize

from mhaplug.training import quiet
from mhaplug.training.quiet import silence_known_noise

LEAFSPEC = (
    "`isinstance(treespec, LeafSpec)` is deprecated, use `isinstance(treespec, TreeSpec) and treespec.is_leaf()` "
    "instead."
)
TIP = (
    "💡 Tip: For seamless cloud logging and experiment tracking, try installing [litlogger]"
    "(https://pypi.org/project/litlogger/) to enable LitLogger, which logs metrics and artifacts automatically to the "
    "Lightning Experiments platform."
)


@contextmanager
def without_quiet_filters() -> Iterator[None]:
    """No warning filters and none of mhaplug.training.quiet's logging filters inside (train.py installs them when
    imported, so another test may have); every filter as it was afterwards."""
    loggers = [logging.getLogger(name) for name in quiet.LITLOGGER_TIP_LOGGERS]
    saved = [list(lg.filters) for lg in loggers]
    try:
        with warnings.catch_warnings():
            warnings.resetwarnings()
            for lg in loggers:
                lg.removeFilter(quiet._LITLOGGER_TIP_FILTER)
                lg.removeFilter(quiet._LIGHTNING_LINES_FILTER)
            yield
    finally:
        for lg, filters in zip(loggers, saved, strict=True):
            lg.filters[:] = filters


def warnings_shown(install: bool) -> list[tuple[str, str, str]]:
    """(category, module file, message) of each warning shown while Lightning flattens a leaf, the way its
    CombinedLoader does in every fit, then while the test itself constructs a LeafSpec and Lightning's module warns
    of something else."""
    with without_quiet_filters(), warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")  # not once per location: every call below shows unless filtered
        if install:
            silence_known_noise()
            silence_known_noise()  # idempotent
        lightning_pytree._tree_flatten(1)  # constructs torch's LeafSpec(): the warning every run printed
        torch_pytree.LeafSpec()  # the same message from another module (this test)
        warnings.warn_explicit(  # another FutureWarning from Lightning's _pytree module
            "another message", FutureWarning, lightning_pytree.__file__, 1, module="pytorch_lightning.utilities._pytree"
        )
        warnings.warn_explicit(  # the same message from Lightning's module, of another category
            LEAFSPEC, DeprecationWarning, lightning_pytree.__file__, 1, module="pytorch_lightning.utilities._pytree"
        )
    return [(w.category.__name__, w.filename.rsplit("/", 1)[-1], str(w.message)) for w in shown]


def test_the_leafspec_warning_from_lightning_is_hidden_and_every_other_warning_shows() -> None:
    lightning_leafspec = ("FutureWarning", "_pytree.py", LEAFSPEC)
    others = [
        ("FutureWarning", "test_quiet.py", LEAFSPEC),
        ("FutureWarning", "_pytree.py", "another message"),
        ("DeprecationWarning", "_pytree.py", LEAFSPEC),
    ]
    assert warnings_shown(install=False) == [lightning_leafspec, *others]  # what Lightning + torch print today
    assert warnings_shown(install=True) == others


def test_the_filters_are_installed_once() -> None:
    with without_quiet_filters():
        before = len(warnings.filters)
        silence_known_noise()
        silence_known_noise()
        assert len(warnings.filters) == before + 1
        for name in quiet.LITLOGGER_TIP_LOGGERS:
            assert logging.getLogger(name).filters.count(quiet._LITLOGGER_TIP_FILTER) == 1


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.messages: list[tuple[int, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append((record.levelno, record.getMessage()))


def lightning_info_when_a_trainer_is_built(install: bool) -> list[tuple[int, str]]:
    """What Lightning's rank-zero logger emits while a Trainer is built (the tip comes from its logger connector),
    then one more record with the tip's text at WARNING."""
    name = "pytorch_lightning.utilities.rank_zero"
    records = Records()
    logger = logging.getLogger(name)
    with without_quiet_filters():
        logger.addHandler(records)  # sees a record only once the logger's filters passed it
        try:
            if install:
                silence_known_noise()
                silence_known_noise()
            pl.Trainer(
                accelerator="cpu",
                devices=1,
                logger=False,
                enable_checkpointing=False,
                enable_progress_bar=False,
                enable_model_summary=False,
            )
            logger.warning(TIP)
        finally:
            logger.removeHandler(records)
    return records.messages


def test_the_litlogger_tip_is_hidden_and_lightnings_other_messages_show() -> None:
    shown = lightning_info_when_a_trainer_is_built(install=False)
    assert (logging.INFO, TIP) in shown  # what Lightning prints today, once per Trainer
    assert any(level == logging.INFO and m.startswith("GPU available: ") for level, m in shown)

    quiet_shown = lightning_info_when_a_trainer_is_built(install=True)
    dropped = {(logging.INFO, TIP), *((logging.INFO, line) for line in quiet.DEVICE_LINES)}
    assert quiet_shown == [m for m in shown if m not in dropped]
    assert (logging.WARNING, TIP) in quiet_shown  # the filter is for the INFO record only
    if torch.cuda.is_available():  # a GPU that is there is still reported
        assert any(m.startswith("GPU available: True") for _, m in quiet_shown)
    else:  # this CPU machine: Lightning says there is none, the filter hides it
        assert (logging.INFO, "GPU available: False, used: False") in shown
        assert not any(m.startswith("GPU available") for _, m in quiet_shown)


def test_lightnings_max_steps_line_is_hidden_and_its_other_stop_reasons_show() -> None:
    name = "pytorch_lightning.utilities.rank_zero"
    records = Records()
    logger = logging.getLogger(name)
    messages = [
        "`Trainer.fit` stopped: `max_steps=300` reached.",  # every run: the summary says the steps
        "`Trainer.fit` stopped: `max_epochs=3` reached.",
        "`Trainer.fit` stopped: `max_steps=300` reached. (and more)",
    ]
    with without_quiet_filters():
        logger.addHandler(records)
        try:
            silence_known_noise()
            for message in messages:
                logger.info(message)
            logger.warning(messages[0])
        finally:
            logger.removeHandler(records)
    assert records.messages == [
        (logging.INFO, messages[1]),
        (logging.INFO, messages[2]),
        (logging.WARNING, messages[0]),
    ]


class Tiny(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(10, 4)
        self.head = torch.nn.Linear(4, 10, bias=False)
        self.head.weight.requires_grad_(False)


def test_model_summary_drops_the_mode_and_flops_columns_and_lines() -> None:
    summary = summarize(Tiny(), max_depth=1)
    data = summary._get_summary_data()
    assert [name for name, _ in data] == [" ", "Name", "Type", "Params", "Mode", "FLOPs"]  # Lightning's columns
    table = quiet.format_summary(data, summary.total_parameters, summary.trainable_parameters, summary.model_size)
    assert table.splitlines() == [
        "  | Name  | Type      | Params",
        "---------------------------------",
        "0 | embed | Embedding | 40    ",
        "1 | head  | Linear    | 40    ",
        "---------------------------------",
        "40        Trainable params",
        "40        Non-trainable params",
        "80        Total params",
        "0.000     Total estimated model params size (MB)",
    ]
