"""mhaplug.training.quiet: each known message is emitted by its library as it is in a run (so a library that stops
emitting it fails here, and the filter can go), hidden once silence_known_noise() is installed, and every other message
of the same module, category or logger still shows."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import pytorch_lightning as pl
import torch.utils._pytree as torch_pytree
from pytorch_lightning.utilities import _pytree as lightning_pytree

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
    assert quiet_shown == [m for m in shown if m != (logging.INFO, TIP)]
    assert (logging.WARNING, TIP) in quiet_shown  # the filter is for the INFO record only
    assert any(m.startswith("GPU available: ") for _, m in quiet_shown)
