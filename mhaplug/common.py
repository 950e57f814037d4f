"""What every part of mhaplug shares, written once: constants, the settings with a fixed set of values, and the
checks and file writes that every wing uses. Standard library only (no torch, datasets or Lightning), so that any
module can import it, and config validation with it loads neither datasets nor Lightning.

- :data:`IGNORE_INDEX`, the label that takes no loss, the tokenizer's special tokens, and a run folder's files;
- :class:`ConfigError`, a setting that cannot train, and :class:`DataError`, a data file or tokenizer that cannot be
  read;
- the settings with a fixed set of values (:class:`Choice` and its subclasses), typed in the structured configs so
  that OmegaConf checks them when a config is composed, and checked by the library with :func:`check_choice`;
- :func:`check_int` (an int that fits int64, at least a minimum), :func:`round_up`, and :func:`atomic_path` /
  :func:`write_atomic` (a file is replaced whole or not at all).
"""

from __future__ import annotations

import numbers
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from enum import Enum
from pathlib import Path
from typing import Any

__all__ = [
    "EOS_TOKEN",
    "IGNORE_INDEX",
    "METRICS_FILE",
    "PAD_TOKEN",
    "SEED_MAX",
    "SKIPPED_FILE",
    "SUMMARY_FILE",
    "Batching",
    "Choice",
    "ConfigError",
    "DataError",
    "Layout",
    "OnInvalid",
    "PaddingSide",
    "Source",
    "atomic_path",
    "check_choice",
    "check_int",
    "plain_text",
    "round_up",
    "write_atomic",
]


# The label that takes no loss: where the collators write it (padding, and the first token of every sequence or
# document), what the loss and the token counts skip. torch's and Hugging Face's default.
IGNORE_INDEX = -100

PAD_TOKEN, EOS_TOKEN = "<|pad|>", "<|endoftext|>"  # ids 0 and 1: pad is never EOS (HF transformers #23530)

# A run folder's files, as train.py writes them and mhaplug.compare reads them: the run's summary, the CSV log of
# each attempt (Lightning's CSVLogger names it: <run>/csv/version_<n>/metrics.csv), and, instead of both, why a
# sweep skipped the combination.
SUMMARY_FILE, METRICS_FILE, SKIPPED_FILE = "summary.json", "metrics.csv", "skipped.txt"

_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
SEED_MAX = 2**32 - 1  # numpy's seed range; Lightning's seed_everything replaces a seed outside it with 0


class ConfigError(ValueError):
    """A setting, or a combination of settings, that cannot train correctly: train.py prints its message as one
    line and exits 2."""


class DataError(ConfigError):
    """A data file or tokenizer that cannot be read: missing, empty, not UTF-8, a line that is not JSON, a text column
    that is not there or holds no strings, a parquet file or tokenizer JSON that does not parse. The message is one
    line naming the file (and line) and what to do; ``path`` is the file (None when the data as a whole is at fault),
    ``line`` its line number where there is one. A :class:`ConfigError`, so train.py prints it as one line and
    exits 2. It pickles with its fields, so a DataLoader worker can hand it over whole."""

    def __init__(self, message: str, *, path: str | os.PathLike[str] | None = None, line: int | None = None) -> None:
        super().__init__(message)
        self.path = None if path is None else str(path)
        self.line = line

    def __reduce__(self) -> tuple[Any, ...]:
        # BaseException pickles as type(self)(*self.args) and then its __dict__: path, line and any notes, restored
        # after the call with the message alone
        return type(self), (str(self),), self.__dict__


class Choice(str, Enum):
    """A setting with a fixed set of values. As the type of a structured-config field, OmegaConf refuses any other
    value when the config is composed, listing the allowed ones. A member is a ``str`` equal to its value that
    prints as it (``Layout.packed == "packed"``, ``f"{Layout.packed}" == "packed"``); member names equal the values,
    since OmegaConf looks members up by name."""

    __str__ = str.__str__
    __format__ = str.__format__

    @classmethod
    def values(cls) -> tuple[str, ...]:
        return tuple(member.value for member in cls)


class Source(Choice):
    """Where :class:`mhaplug.data.TextDataModule` reads text."""

    stdlib_docs = "stdlib_docs"
    synthetic = "synthetic"
    text_files = "text_files"
    hf = "hf"


class Layout(Choice):
    """A document per row (``padded``), or several whole documents per row (``packed``)."""

    padded = "padded"
    packed = "packed"


class PaddingSide(Choice):
    """Where a padded row's padding goes: after its real tokens (``right``) or before them (``left``)."""

    right = "right"
    left = "left"


class Batching(Choice):
    """Which samples share a batch (:mod:`mhaplug.data.sampling`)."""

    random = "random"
    length_grouped = "length_grouped"
    token_budget = "token_budget"


class OnInvalid(Choice):
    """What train.py does with a combination that cannot train correctly."""

    error = "error"
    skip = "skip"
    run = "run"  # train a wrong-but-runnable combination, for teaching


def check_choice(name: str, value: Any, choices: type[Choice] | tuple[str, ...]) -> str:
    """``value`` as a plain ``str`` if it is one of ``choices`` (a :class:`Choice` subclass, or names), else a
    ``ValueError`` naming ``name``, the value and the allowed ones. A plain ``str`` keeps checkpoints' hyper-parameters
    to plain types (``torch.load(weights_only=True)`` refuses Enum members)."""
    allowed = choices.values() if isinstance(choices, type) else tuple(choices)
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")
    return str.__str__(value)  # a Choice member as the plain str of its value


def check_int(name: str, value: Any, *, minimum: int | None = 1, optional: bool = False, meaning: str = "") -> Any:
    """``value`` as a Python ``int`` (numpy integers are ints too) if it fits int64 and is at least ``minimum``
    (``None``: any int; ``None`` passes when ``optional``). A ``TypeError`` for anything not an integer (a bool, a
    float, a string), a ``ValueError`` below ``minimum`` or outside int64, each naming ``name``, what it must be
    (``meaning`` says what the value is for) and what was given."""
    if value is None and optional:
        return None
    expected = "an int" + (f" >= {minimum}" if minimum is not None else "") + (f" ({meaning})" if meaning else "")
    expected += " or None" if optional else ""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):  # numpy's bool_ is no Integral
        raise TypeError(f"{name} must be {expected}, got {value!r} ({type(value).__name__})")
    if not _INT64_MIN <= value <= _INT64_MAX:
        raise ValueError(f"{name} must fit int64, got {value}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be {expected}, got {value}")
    return int(value)


def round_up(length: Any, multiple: int | None) -> Any:
    """``length`` rounded up to a multiple of ``multiple`` (unchanged when ``multiple`` is None or 0, and when it is
    one already); an int, or an integer array element-wise."""
    if not multiple:
        return length
    return -(-length // multiple) * multiple


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """A temporary path beside ``path`` to write to. When the block ends without an error it replaces ``path`` in
    one step (``os.replace``), so a reader sees the old file or the whole new one, never part of one; after an
    error it is removed and ``path`` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")  # same folder: os.replace never copies across disks
    tmp.unlink(missing_ok=True)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_atomic(path: str | os.PathLike[str], data: str | bytes) -> Path:
    """Write ``data`` (text as UTF-8) to ``path`` atomically (:func:`atomic_path`); return the path written."""
    with atomic_path(path) as tmp:
        if isinstance(data, bytes):
            tmp.write_bytes(data)
        else:
            tmp.write_text(data, encoding="utf-8")
    return Path(path)


def plain_text(text: str) -> str:
    """reStructuredText as a terminal shows it (for ``--help``): ````code```` -> ``code``, ``:class:`~a.b.C``` ->
    ``C``, ``:func:`a.b``` -> ``a.b``, and the lines joined into one paragraph."""
    text = re.sub(r":[a-z]+:`~[\w.]*?(\w+)`", r"\1", text)  # :role:`~module.Name` -> Name
    text = re.sub(r":[a-z]+:`([^`]+)`", r"\1", text)  # :role:`target` -> target
    text = re.sub(r"``([^`]+)``", r"\1", text)
    return " ".join(text.split())
