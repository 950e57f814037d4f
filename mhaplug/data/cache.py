"""mhaplug's cache on disk: where it lives, how an entry is named, and entries written atomically, validated when
read and rebuilt when bad.

The cache (``cache_dir``, default :func:`default_cache_dir`) holds ``sources/`` (the standard library's docstrings),
``texts/`` (each source's documents as an Arrow file, :mod:`mhaplug.data.corpus`), ``tokenizers/`` and
``tokenised/``, each entry named by a key of what it was built from. Every entry is written to a temporary file in
its folder and renamed into place (a killed run or a full disk leaves no half entry), and is validated when read: an
entry that fails (truncated, corrupted) is logged as a WARNING with its path and rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from mhaplug.common import atomic_path

__all__ = ["cache_key", "cached", "default_cache_dir", "read_entry"]

logger = logging.getLogger(__name__)


def default_cache_dir() -> Path:
    """``$MHAPLUG_CACHE``, or ``~/.cache/mhaplug`` where it is unset or empty.

    Empty counts as unset, the rule the XDG base directory spec gives for ``$XDG_CACHE_HOME``: an empty value
    usually comes from ``MHAPLUG_CACHE=$SOME_UNSET_VARIABLE``, and taken as a path it would fill the current
    folder with cache files.
    """
    value = os.environ.get("MHAPLUG_CACHE", "").strip()
    return Path(value).expanduser() if value else Path.home() / ".cache" / "mhaplug"


def cache_key(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


T_ = TypeVar("T_")


def cached(path: Path, *, read: Callable[[Path], T_], build: Callable[[Path], None]) -> T_:
    """The cache entry at ``path``. ``read`` loads and validates an entry, raising if it is bad; ``build`` writes a
    new one to the path it is given (:func:`mhaplug.common.atomic_path`). A bad entry (truncated, corrupted, or not what
    this version writes) is logged as a WARNING with its path, and rebuilt."""
    entry = read_entry(path, read)
    if entry is not None:
        return entry
    with atomic_path(path) as tmp:
        build(tmp)
    return read(path)


def read_entry(path: Path, read: Callable[[Path], T_]) -> T_ | None:
    """``read(path)``, or None when there is no entry; an entry that ``read`` refuses is logged as a WARNING with
    its path ("rebuilding it": the caller builds it again)."""
    if not path.exists():
        return None
    try:
        return read(path)
    # Each format fails its own way (JSONDecodeError, ArrowInvalid, tokenizers' bare Exception); any of them
    # means the entry is bad, and it is rebuilt.
    except Exception as error:  # noqa: BLE001
        logger.warning("cache entry %s is unreadable (%s: %s); rebuilding it", path, type(error).__name__, error)
        return None
