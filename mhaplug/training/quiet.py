"""Silence the messages of other libraries that every run prints and that no user of mhaplug can act on.

:func:`silence_known_noise` installs one filter per message. Each names the exact message and where it comes from
(the warning's category and module, or the logger and level), so that every other warning and log line, of the same
library, module and category included, still shows: mhaplug's users need torch's and Lightning's real warnings (a
kernel fallback, a dataloader bottleneck, a deprecation in their own code). No filter here ignores a whole category,
module or logger.

Call it once per process before the first fit (it is idempotent): the filters act when a message is emitted, so the
order of imports does not matter. Processes that Lightning starts (DDP ranks) run the entry point's module again and
need the call at module level there, as ``train.py`` does.
"""

from __future__ import annotations

import logging
import re
import warnings

__all__ = ["silence_known_noise"]

# 1. torch deprecated constructing ``torch.utils._pytree.LeafSpec`` in favour of ``treespec_leaf()`` (pytorch
#    #138214); Lightning's copy of ``tree_flatten`` (pytorch_lightning/utilities/_pytree.py, used by
#    the CombinedLoader that wraps every fit's dataloaders) still constructs one, so every fit prints this
#    FutureWarning once per process. It is about Lightning's use of a private torch API, not about anything a user
#    wrote or configured: the object works as before, and the fix is Lightning's (Lightning-AI/pytorch-lightning
#    #21326). Only this message, only from that Lightning module: another library constructing a LeafSpec, or any
#    other FutureWarning of Lightning's, still shows.
LEAFSPEC_MESSAGE = (
    "`isinstance(treespec, LeafSpec)` is deprecated, use `isinstance(treespec, TreeSpec) and treespec.is_leaf()` "
    "instead."
)
LEAFSPEC_MODULE = "pytorch_lightning.utilities._pytree"

# 2. Lightning's Trainer logs an advertisement for its cloud logger (litlogger, a paid platform) each time a Trainer
#    is built without one (pytorch_lightning/trainer/connectors/logger_connector/logger_connector.py,
#    ``configure_logger``), as an INFO record of Lightning's rank-zero logger: once per run, 16+ times in a sweep.
#    It says nothing about the run. Lightning has no setting to turn it off; this drops exactly that record (INFO,
#    that logger, a message starting with the tip's text) and lets every other INFO line of Lightning through
#    ("GPU available", "`Trainer.fit` stopped", checkpoint and SIGTERM messages).
LITLOGGER_TIP = (
    "💡 Tip: For seamless cloud logging and experiment tracking, try installing [litlogger]"
    "(https://pypi.org/project/litlogger/)"
)
# lightning_utilities' rank_zero_info logs through ``rank_zero_module.log``, which pytorch_lightning sets to this
# logger on import (lightning_fabric to its own before that; either may hold it, depending on what was imported).
LITLOGGER_TIP_LOGGERS = ("pytorch_lightning.utilities.rank_zero", "lightning_fabric.utilities.rank_zero")


class _DropRecord(logging.Filter):
    """Drop the log records of ``level`` whose message starts with ``prefix``; pass every other record."""

    def __init__(self, *, level: int, prefix: str) -> None:
        super().__init__()
        self.level, self.prefix = level, prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno == self.level and record.getMessage().startswith(self.prefix))


_LITLOGGER_TIP_FILTER = _DropRecord(level=logging.INFO, prefix=LITLOGGER_TIP)


def silence_known_noise() -> None:
    """Hide the messages listed in this module (the LeafSpec FutureWarning from Lightning's ``_pytree`` module, the
    litlogger tip of Lightning's Trainer), and nothing else. Idempotent: a second call installs nothing new."""
    # filterwarnings matches ``message`` at the start of the text (case-insensitively) and ``module`` at the start
    # of the emitting module's name: \Z makes both exact. It inserts at the front and drops an equal filter first,
    # so calling it again keeps one copy.
    warnings.filterwarnings(
        "ignore",
        message=re.escape(LEAFSPEC_MESSAGE) + r"\Z",
        category=FutureWarning,
        module=re.escape(LEAFSPEC_MODULE) + r"\Z",
    )
    for name in LITLOGGER_TIP_LOGGERS:
        logging.getLogger(name).addFilter(_LITLOGGER_TIP_FILTER)  # addFilter adds a filter once
