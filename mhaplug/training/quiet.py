"""Silence the messages of other libraries that every run prints and that no user of mhaplug can act on.

:class:`ModelSummary` is Lightning's model summary without the columns and lines that say nothing here (``Mode``,
``FLOPs`` and ``Total Flops``, always 0 without an ``example_input_array``, and the train/eval module counts).

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
from typing import Any

from pytorch_lightning.callbacks import ModelSummary as LightningModelSummary
from pytorch_lightning.utilities.model_summary.model_summary import get_formatted_model_size, get_human_readable_count

__all__ = ["ModelSummary", "silence_known_noise"]

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
#    (checkpoint and SIGTERM messages; 3. drops two more).
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

# 3. Lightning's device lines on a machine with neither (pytorch_lightning/trainer/setup.py, ``_log_device_info``),
#    and its "max_steps reached" line at the end of every fit (loops/fit_loop.py): INFO records of the same logger,
#    on every run and sweep job (mhaplug's summary says how many steps ran), and its note that :class:`ModelSummary`
#    replaces its own. Exactly these texts: a GPU or TPU that is there ("GPU available: True ...", and Lightning's
#    warning when one is not used) still shows.
DEVICE_LINES = (
    "GPU available: False, used: False",
    "TPU available: False, using: 0 TPU cores",
    (
        "Trainer already configured with model summary callbacks: [<class 'mhaplug.training.quiet.ModelSummary'>]. "
        "Skipping setting a default `ModelSummary` callback."
    ),
)
MAX_STEPS_LINE = re.compile(r"`Trainer\.fit` stopped: `max_steps=\d+` reached\.")


class _DropExact(logging.Filter):
    """Drop the INFO records whose whole message is one of ``texts`` or matches ``pattern``."""

    def __init__(self, texts: tuple[str, ...], pattern: re.Pattern[str]) -> None:
        super().__init__()
        self.texts, self.pattern = texts, pattern

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno != logging.INFO:
            return True
        message = record.getMessage()
        return not (message in self.texts or self.pattern.fullmatch(message))


_LIGHTNING_LINES_FILTER = _DropExact(DEVICE_LINES, MAX_STEPS_LINE)
_SHOWN_COLUMNS = (" ", "Name", "Type", "Params")


class ModelSummary(LightningModelSummary):
    """Lightning's model summary (the same layers, parameter counts and size), without the ``Mode`` and ``FLOPs``
    columns, the ``Total Flops`` line and the train/eval module counts."""

    @staticmethod
    def summarize(
        summary_data: list[tuple[str, list[str]]],
        total_parameters: int,
        trainable_parameters: int,
        model_size: float,
        total_training_modes: dict[str, int],
        total_flops: int,
        **summarize_kwargs: Any,
    ) -> None:
        logging.getLogger("pytorch_lightning.callbacks.model_summary").info(
            "\n" + format_summary(summary_data, total_parameters, trainable_parameters, model_size)
        )


def format_summary(
    summary_data: list[tuple[str, list[str]]], total_parameters: int, trainable_parameters: int, model_size: float
) -> str:
    """The table of :class:`ModelSummary`: the columns ``_SHOWN_COLUMNS`` of Lightning's, then the counts."""
    columns = [(name, [str(v) for v in values]) for name, values in summary_data if name in _SHOWN_COLUMNS]
    widths = [max([len(name), *(len(v) for v in values)]) for name, values in columns]
    rows = len(columns[0][1]) if columns else 0
    lines = [" | ".join(name.ljust(w) for (name, _), w in zip(columns, widths))]
    rule = "-" * (sum(widths) + 3 * len(widths))
    lines.append(rule)
    lines += [" | ".join(values[i].ljust(w) for (_, values), w in zip(columns, widths)) for i in range(rows)]
    lines.append(rule)
    counts = [
        (get_human_readable_count(trainable_parameters), "Trainable params"),
        (get_human_readable_count(total_parameters - trainable_parameters), "Non-trainable params"),
        (get_human_readable_count(total_parameters), "Total params"),
        (get_formatted_model_size(model_size), "Total estimated model params size (MB)"),
    ]
    lines += [f"{value:<10}{label}" for value, label in counts]
    return "\n".join(lines)


def silence_known_noise() -> None:
    """Hide the messages listed in this module (the LeafSpec FutureWarning from Lightning's ``_pytree`` module, the
    litlogger tip of Lightning's Trainer, its device lines on a CPU-only machine and its "max_steps reached" line),
    and nothing else. Idempotent: a second call installs nothing new."""
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
        logging.getLogger(name).addFilter(_LIGHTNING_LINES_FILTER)
