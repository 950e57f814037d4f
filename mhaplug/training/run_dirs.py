"""Every run in a folder of its own, named so that a person can tell runs apart.

Run folders (``configs/hydra/default.yaml``) come from two resolvers that
:func:`mhaplug.training.config.register_configs` registers: ``mhaplug.run_dir`` (a run, or a sweep's folder: when and
which process) and ``mhaplug.job_subdir`` (a job of a sweep: its overrides). Each *claims* its folder with ``os.mkdir``,
which fails when the folder exists (atomically, also on NFS), and tries the next name, so two runs never share a folder,
whenever and wherever they start.
"""

from __future__ import annotations

import hashlib
import itertools
import os
from collections.abc import Iterable
from datetime import datetime
from pathlib import Path
from typing import Any

__all__ = ["checkpoint_run_dir", "claim_job_subdir", "claim_run_dir", "job_subdir_resolver", "run_dir_resolver"]

_MAX_NAME = 120  # characters of overrides kept in a job's folder name (file systems allow 255 bytes)


def claim_run_dir(parent: str | os.PathLike[str], *, now: datetime | None = None, pid: int | None = None) -> str:
    """Create and return a new folder ``<parent>/<YYYY-MM-DD_HH-MM-SS.mmm>_<pid>`` (``-2``, ``-3``, ... after the pid
    should it exist: another host, the same pid and millisecond). The path keeps the form of ``parent`` (relative
    stays relative). Its name holds nothing that Hydra's override grammar would need quoted, so that
    ``ckpt_path=<folder>/checkpoints/last.ckpt`` can be typed as it is."""
    now = now or datetime.now()
    stamp = f"{now:%Y-%m-%d_%H-%M-%S}.{now.microsecond // 1000:03d}_{os.getpid() if pid is None else pid}"
    return _claim(parent, (stamp if n == 1 else f"{stamp}-{n}" for n in itertools.count(1)))


def claim_job_subdir(sweep_dir: str | os.PathLike[str], num: int, name: str) -> str:
    """Create ``<sweep_dir>/<name>`` for job ``num`` of a sweep and return ``<name>`` (what ``hydra.sweep.subdir``
    holds). ``name`` is the job's overrides (``hydra.job.override_dirname``:
    ``attention=merged_bool,data.layout=padded``), without path separators and at most ``_MAX_NAME`` characters;
    should two jobs have the same (the keys that differ are in ``hydra.job.config.override_dirname.exclude_keys``, or
    there are none), the later one is ``<name>_job<num>``."""
    base = _folder_name(name) if name else f"job{num}"
    candidates = itertools.chain([base], (f"{base}_job{num}" + (f"-{n}" if n > 1 else "") for n in itertools.count(1)))
    return Path(_claim(sweep_dir, candidates)).name


def checkpoint_run_dir(ckpt_path: str | os.PathLike[str] | None) -> str | None:
    """The run folder a checkpoint belongs to, ``<run>`` for ``<run>/checkpoints/<file>.ckpt`` (where
    ``configs/callbacks/default.yaml`` saves them), or None: a resumed run writes on in its own folder."""
    if not ckpt_path:
        return None
    path = Path(ckpt_path)
    return str(path.parent.parent) if path.parent.name == "checkpoints" and path.parent.parent.is_dir() else None


def run_dir_resolver(parent: str, ckpt_path: Any = None) -> str:
    """``${mhaplug.run_dir:<parent>[,<ckpt_path>]}``: the folder of the checkpoint's run when resuming from
    ``<run>/checkpoints/*.ckpt``, else a new folder (:func:`claim_run_dir`)."""
    return checkpoint_run_dir(ckpt_path) or claim_run_dir(parent)


def job_subdir_resolver(sweep_dir: str, num: Any, name: Any = "") -> str:
    """``${mhaplug.job_subdir:${hydra.sweep.dir},${hydra.job.num},${hydra.job.override_dirname}}``."""
    return claim_job_subdir(sweep_dir, int(num), "" if name is None else str(name))


def _folder_name(name: str) -> str:
    """Overrides as one folder name: no path separators, at most ``_MAX_NAME`` characters (a long name keeps its
    start and a hash of the whole, so names stay distinct)."""
    name = name.replace("/", "_").replace(os.sep, "_")
    if len(name) > _MAX_NAME:
        name = f"{name[: _MAX_NAME - 9]}~{hashlib.sha1(name.encode()).hexdigest()[:8]}"
    return name


def _claim(parent: str | os.PathLike[str], names: Iterable[str]) -> str:
    Path(parent).mkdir(parents=True, exist_ok=True)
    for name in names:
        path = os.path.join(parent, name)
        try:
            os.mkdir(path)  # fails if it exists: the folder is this run's alone
        except FileExistsError:
            continue
        return path
    raise AssertionError("unreachable: the candidate names never run out")
