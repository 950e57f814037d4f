"""A corpus on disk, prepared in bounded memory: text store, split, tokenizer sample, parallel tokenising.

Every step streams, so memory stays flat whatever the corpus size and time grows linearly with it:

- **Text store** (:func:`write_texts`, :class:`TextStore`): the non-empty documents of a source, in order, in an
  Arrow IPC file of one ``text`` column, written a record batch (at most :data:`TEXT_BATCH_DOCUMENTS` documents or
  about :data:`TEXT_BATCH_BYTES` of text) at a time, and read back a batch at a time with plain reads.
- **Split** (:func:`split_mask`): one bool per document (True: validation), ``ceil(val_fraction * N)`` of them, drawn
  by ``seed``; a numpy array, never a list of texts.
- **Tokenizer sample** (:func:`tokenizer_sample`): the training documents in a seeded random order, up to a byte
  budget, as an iterator for ``Tokenizer.train_from_iterator``.
- **Tokenising** (:func:`tokenise`): the store's record batches cut into contiguous ranges, one per worker process
  (:mod:`mhaplug.data.encode`), each writing its train and validation rows; the parts are then joined in order, so
  the result does not depend on the number of processes.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from tokenizers import Tokenizer

from mhaplug.common import atomic_path
from mhaplug.data import encode

__all__ = ["TextStore", "default_num_proc", "split_mask", "tokenise", "tokenizer_sample", "write_texts"]

logger = logging.getLogger(__name__)

#: A record batch of the text store holds at most this many documents ...
TEXT_BATCH_DOCUMENTS = 4096
#: ... or about this much text (a batch ends after the document that reaches it): what one read holds in memory.
TEXT_BATCH_BYTES = 16 << 20
#: Text per worker process below which tokenising stays in this process (a process costs ~0.3 s to start).
BYTES_PER_PROCESS = 32 << 20

TEXT_SCHEMA = pa.schema([("text", pa.string())])


def default_num_proc() -> int:
    """The cores this process may run on (``os.sched_getaffinity`` where there is one, else ``os.cpu_count()``)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def write_texts(documents: Iterable[str | None], path: Path, *, max_documents: int | None = None) -> dict:
    """Write the non-empty documents (not None, not only white space) to the text store ``path``, a record batch at
    a time; stop after ``max_documents`` of them. Returns the store's index: ``documents`` (kept),
    ``empty_documents_dropped``, ``text_bytes`` and ``batch_rows`` (documents per record batch)."""
    kept = dropped = text_bytes = pending_bytes = 0
    batch_rows: list[int] = []
    pending: list[str] = []
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, TEXT_SCHEMA) as writer:

        def flush() -> None:
            nonlocal pending, pending_bytes
            if pending:
                writer.write_batch(pa.record_batch([pa.array(pending, type=pa.string())], schema=TEXT_SCHEMA))
                batch_rows.append(len(pending))
                pending, pending_bytes = [], 0

        for text in documents:
            if max_documents is not None and kept >= max_documents:
                break
            if text is None or not text.strip():
                dropped += 1
                continue
            size = len(text.encode("utf-8", "surrogatepass"))
            pending.append(text)
            kept, text_bytes, pending_bytes = kept + 1, text_bytes + size, pending_bytes + size
            if len(pending) >= TEXT_BATCH_DOCUMENTS or pending_bytes >= TEXT_BATCH_BYTES:
                flush()
        flush()
    return {"documents": kept, "empty_documents_dropped": dropped, "text_bytes": text_bytes, "batch_rows": batch_rows}


class TextStore:
    """A text store written by :func:`write_texts`, with its index (the dict it returned)."""

    def __init__(self, path: Path, index: dict) -> None:
        self.path, self.index = Path(path), index
        self.batch_rows = np.asarray(index["batch_rows"], dtype=np.int64)  # (batches,)
        self.batch_starts = np.concatenate([[0], np.cumsum(self.batch_rows)])  # (batches + 1,) first document
        with pa.OSFile(str(self.path), "rb") as source:
            reader = pa.ipc.open_file(source)
            if reader.schema != TEXT_SCHEMA or reader.num_record_batches != len(self.batch_rows):
                raise ValueError(
                    f"text store {self.path} holds {reader.num_record_batches} batches of {reader.schema}, its index "
                    f"{len(self.batch_rows)} batches of {TEXT_SCHEMA}"
                )

    @property
    def num_documents(self) -> int:
        return int(self.batch_starts[-1])

    def batches(self) -> Iterator[tuple[int, pa.StringArray]]:
        """``(first document, texts)`` of each record batch in order, read one at a time."""
        with pa.OSFile(str(self.path), "rb") as source:
            reader = pa.ipc.open_file(source)
            for index in range(reader.num_record_batches):
                batch = reader.get_batch(index)
                if batch.num_rows != self.batch_rows[index]:
                    raise ValueError(f"text store {self.path}: batch {index} holds {batch.num_rows} documents")
                yield int(self.batch_starts[index]), batch.column(0)

    def byte_lengths(self) -> np.ndarray:
        """(N,) int64: UTF-8 bytes of each document."""
        parts = [pc.binary_length(texts).to_numpy(zero_copy_only=False) for _, texts in self.batches()]
        return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, dtype=np.int64)


def split_mask(num_documents: int, val_fraction: float, seed: int) -> np.ndarray:
    """(N,) bool, True for the ``ceil(val_fraction * N)`` validation documents, drawn by ``seed`` (at least one
    document on each side)."""
    count = min(max(1, int(np.ceil(val_fraction * num_documents))), num_documents - 1)
    is_val = np.zeros(num_documents, dtype=bool)
    is_val[np.random.default_rng(seed).permutation(num_documents)[:count]] = True
    return is_val


def tokenizer_sample(store: TextStore, is_val: np.ndarray, *, max_bytes: int, seed: int) -> tuple[Iterator[str], dict]:
    """The training documents a tokenizer learns from: in an order drawn by ``seed``, as many as fit in
    ``max_bytes`` of UTF-8 (at least one). Returns an iterator over them (in store order, read a batch at a time)
    and ``{"documents": ..., "bytes": ...}`` of the sample."""
    sizes = store.byte_lengths()
    candidates = np.flatnonzero(~is_val)
    order = np.random.default_rng([seed, 1]).permutation(candidates)
    take = max(1, int(np.searchsorted(np.cumsum(sizes[order]), max_bytes, side="right")))
    chosen = np.zeros(store.num_documents, dtype=bool)
    chosen[order[:take]] = True

    def texts() -> Iterator[str]:
        for first, batch in store.batches():
            keep = np.flatnonzero(chosen[first : first + len(batch)])
            if len(keep):
                yield from batch.take(pa.array(keep)).to_pylist()

    return texts(), {"documents": take, "bytes": int(sizes[order[:take]].sum())}


def tokenise(
    store: TextStore,
    is_val: np.ndarray,
    tokenizer: Tokenizer,
    *,
    max_length: int,
    eos: int,
    num_proc: int,
    train_path: Path,
    val_path: Path,
) -> None:
    """Tokenise the store into ``train_path`` and ``val_path`` (Arrow stream files, :mod:`mhaplug.data.encode`), each
    written atomically. Up to ``num_proc`` worker processes take contiguous ranges of record batches (fewer for a
    small corpus: at least :data:`BYTES_PER_PROCESS` of text each); with one, it runs in this process, where
    ``tokenizers`` still encodes each batch on all cores. The rows are those of one process, in store order."""
    batches = len(store.batch_rows)
    processes = max(1, min(num_proc, batches, store.index["text_bytes"] // BYTES_PER_PROCESS))
    bounds = np.linspace(0, batches, processes + 1).round().astype(int)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="mhaplug-tokenise-", dir=train_path.parent) as work:
        work_dir = Path(work)
        (work_dir / "tokenizer.json").write_text(tokenizer.to_str(), encoding="utf-8")
        np.save(work_dir / "is_val.npy", is_val)
        specs = [
            {
                "tokenizer": str(work_dir / "tokenizer.json"),
                "texts": str(store.path),
                "is_val": str(work_dir / "is_val.npy"),
                "batches": [int(bounds[p]), int(bounds[p + 1])],
                "first_document": int(store.batch_starts[bounds[p]]),
                "max_length": max_length,
                "eos": eos,
                "train": str(work_dir / f"train-{p:05d}.arrow"),
                "val": str(work_dir / f"val-{p:05d}.arrow"),
            }
            for p in range(processes)
        ]
        if processes == 1:
            encode.encode_range(specs[0])
        else:
            _run_workers(specs, work_dir)
        for name, path in (("train", train_path), ("val", val_path)):
            with (
                atomic_path(path) as tmp,
                pa.OSFile(str(tmp), "wb") as sink,
                pa.ipc.new_stream(sink, encode.TOKENS_SCHEMA) as writer,
            ):
                for spec in specs:
                    with pa.OSFile(spec[name], "rb") as part:
                        for batch in pa.ipc.open_stream(part):
                            writer.write_batch(batch)
    logger.info(
        "tokenised %d documents (%.1f MB of text) in %.1f s with %d process%s",
        store.num_documents,
        store.index["text_bytes"] / 1e6,
        time.perf_counter() - start,
        processes,
        "" if processes == 1 else "es",
    )


def _run_workers(specs: list[dict], work_dir: Path) -> None:
    """One worker process per spec, each on one core (``TOKENIZERS_PARALLELISM=false``); a failure raises with the
    worker's own error message."""
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    # run_path: the worker module runs as a script without its folder on sys.path and without importing mhaplug
    code = "import runpy, sys; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')"
    workers = []
    for p, spec in enumerate(specs):
        spec_path = work_dir / f"spec-{p:05d}.json"
        spec_path.write_text(json.dumps(spec), encoding="utf-8")
        command = [sys.executable, "-c", code, encode.__file__, str(spec_path)]
        workers.append(subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True))
    errors = [(worker, worker.communicate()[1]) for worker in workers]
    failed = [(w, err) for w, err in errors if w.returncode != 0]
    if failed:
        worker, stderr = failed[0]
        last = (stderr.strip().splitlines() or [f"exit status {worker.returncode}"])[-1]
        raise RuntimeError(f"a tokenising worker process failed ({len(failed)} of {len(specs)}): {last}")
