"""A corpus on disk, prepared in bounded memory: text store, split, tokenizer sample, parallel tokenising.

Every step streams, so memory stays flat whatever the corpus size and time grows linearly with it:

- **Text store** (:func:`write_texts`, :class:`TextStore`): the non-empty documents of a source, in order, in an
  Arrow IPC file of one ``text`` column, written a record batch (at most :data:`TEXT_BATCH_DOCUMENTS` documents or
  about :data:`TEXT_BATCH_BYTES` of text) at a time, and read back a batch at a time with plain reads.
- **Split** (:func:`split_mask`): a fair share of the text on each side, by bytes (the tokenizer is not trained yet;
  tokens per byte are about even within a corpus): whole documents drawn by ``seed`` up to ``val_fraction`` of the
  bytes, and where whole documents cannot make half of that share (a few documents larger than it), the end of the
  largest training document validates (:func:`cut_offset`). One bool per document and at most one cut: numpy, never
  a list of texts.
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

__all__ = [
    "SPLIT_VERSION",
    "TextStore",
    "cut_offset",
    "default_num_proc",
    "split_mask",
    "split_store",
    "split_warning",
    "tokenise",
    "tokenizer_sample",
    "write_texts",
]

logger = logging.getLogger(__name__)

#: A record batch of the text store holds at most this many documents ...
TEXT_BATCH_DOCUMENTS = 4096
#: ... or about this much text (a batch ends after the document that reaches it): what one read holds in memory.
TEXT_BATCH_BYTES = 16 << 20
#: Text per worker process below which tokenising stays in this process (a process costs ~0.3 s to start).
BYTES_PER_PROCESS = 32 << 20

TEXT_SCHEMA = pa.schema([("text", pa.string())])

#: Names the rule of :func:`split_mask` in the cache keys of what depends on the split (tokenizer, tokenised rows):
#: a new rule must not reuse the entries of an old one (v1 drew ``ceil(val_fraction * N)`` documents).
SPLIT_VERSION = "bytes-v2"
#: Passes of :func:`split_mask` over the documents that still fit in validation (each leaves less room, so few are
#: ever needed: a pass ends at the first document that does not fit, the next drops all that do not).
SPLIT_PASSES = 8
#: How far :func:`cut_offset` moves a cut back to the white space before it, so no word is cut in two.
CUT_SEARCH_CHARS = 256


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
        self._byte_lengths: np.ndarray | None = None
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
        """(N,) int64: UTF-8 bytes of each document (read once, then kept: 8 bytes a document)."""
        if self._byte_lengths is None:
            parts = [pc.binary_length(texts).to_numpy(zero_copy_only=False) for _, texts in self.batches()]
            self._byte_lengths = np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, dtype=np.int64)
        return self._byte_lengths

    def document(self, index: int) -> str:
        """The text of document ``index`` (its record batch read, that one document converted)."""
        batch = int(np.searchsorted(self.batch_starts, index, side="right")) - 1
        with pa.OSFile(str(self.path), "rb") as source:
            texts = pa.ipc.open_file(source).get_batch(batch).column(0)
            return texts[index - int(self.batch_starts[batch])].as_py()


def split_mask(sizes: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, tuple[int, int] | None]:
    """The train/validation split of documents of ``sizes`` (N,) bytes: ``(is_val, cut)``.

    ``is_val`` (N,) bool, True for a whole validation document. In an order drawn by ``seed``, whole documents go to
    validation while they fit in what is left of the target (``val_fraction`` of all the bytes; a few vectorised
    passes, each over the documents that still fit), then the smallest other document if it brings validation nearer
    the target (or, when none validates yet, if it is at most twice the target); at most N - 1 of them. If they make
    less than half the target (the text is in a few documents larger than it, e.g. one long line), ``cut`` is
    ``(document, bytes)``: the last ``bytes`` of the largest training document validate and the rest of it trains;
    else None. The cut document is the only one on both sides of the split (its two parts share no text, but the
    model trains on the start of the document it validates on)::

        sizes 5_000_000, 6    val_fraction 0.05    ->  is_val [F, T], cut (0, 249_994)
        sizes 1_000_000       val_fraction 0.05    ->  is_val [F],    cut (0, 50_000)
        sizes 100 x 1_000     val_fraction 0.05    ->  5 whole documents validate, cut None

    Documents of one byte cannot be cut: there the smallest validates whole (as long as there are two)."""
    sizes = np.asarray(sizes, dtype=np.int64)  # (N,)
    count, target = len(sizes), val_fraction * float(sizes.sum())
    is_val = np.zeros(count, dtype=bool)
    candidates, short = np.random.default_rng(seed).permutation(count), target
    for _ in range(SPLIT_PASSES):
        candidates = candidates[sizes[candidates] <= short]  # the left-out stay out: short only shrinks
        reached = np.cumsum(sizes[candidates])  # (C,) bytes after each candidate
        take = int(np.searchsorted(reached, short, side="right"))
        if take == 0:
            break
        is_val[candidates[:take]], short, candidates = True, short - float(reached[take - 1]), candidates[take:]
    training = np.flatnonzero(~is_val)
    if len(training) > 1 and short > 0:
        smallest = int(training[np.argmin(sizes[training])])
        # the next size up when overshooting by it misses the target by less, or when no whole document validates
        # yet and it at most doubles the target: a whole document rather than a cut one
        if sizes[smallest] - short < short or (not is_val.any() and sizes[smallest] <= 2 * target):
            is_val[smallest], short = True, short - float(sizes[smallest])
            training = training[training != smallest]
    if not len(training):  # everything validates (val_fraction near 1): the largest trains
        is_val[int(np.argmax(sizes))] = False
        return is_val, None
    if short <= target / 2:
        return is_val, None
    document = int(training[np.argmax(sizes[training])])  # the first of the largest
    piece = min(max(1, round(short)), int(sizes[document]) - 1)
    if piece >= 1:
        return is_val, (document, piece)
    if not is_val.any() and count >= 2:
        is_val[int(np.argmin(sizes))] = True
    return is_val, None


def cut_offset(text: str, val_bytes: int) -> int:
    """Where in ``text`` (a character offset, in ``[1, len(text) - 1]``) its last ``val_bytes`` UTF-8 bytes begin,
    moved back to the white space before them when there is some within :data:`CUT_SEARCH_CHARS` characters (and
    within as many characters as they hold): the
    split of :func:`split_mask`'s cut document, ``text[:offset]`` trains and ``text[offset:]`` validates."""
    if len(text) < 2:
        raise ValueError(f"a document of {len(text)} character cannot be cut in two")
    data = np.frombuffer(text.encode("utf-8", "surrogatepass"), dtype=np.uint8)  # (bytes,)
    start = max(0, len(data) - val_bytes)
    offset = int(np.count_nonzero((data[:start] & 0xC0) != 0x80))  # characters starting before it: lead bytes
    offset = min(max(1, offset), len(text) - 1)
    reach = min(CUT_SEARCH_CHARS, len(text) - offset)  # at most doubles the validation part
    space = max(text.rfind(c, max(1, offset - reach), offset + 1) for c in " \n\t")
    return space if space >= 1 else offset


def split_store(store: TextStore, val_fraction: float, seed: int) -> tuple[np.ndarray, tuple[int, int] | None]:
    """The store's split (:func:`split_mask` of its documents' bytes), its cut as ``(document, character offset)``
    (:func:`cut_offset`), logged."""
    sizes = store.byte_lengths()
    is_val, cut = split_mask(sizes, val_fraction, seed)
    if cut is None:
        return is_val, None
    document, val_bytes = cut
    logger.info(
        "split: document %d (%.2f MB) is larger than the validation share (val_fraction=%g), so its last %.2f MB "
        "validate and its start trains: the one document on both sides",
        document,
        sizes[document] / 1e6,
        val_fraction,
        val_bytes / 1e6,
    )
    return is_val, (document, cut_offset(store.document(document), val_bytes))


def split_warning(train: int, val: int, *, val_fraction: float, batch_size: int, max_length: int) -> str | None:
    """What is wrong with a split of ``train`` and ``val`` tokens, or None: training on less than one batch
    (``batch_size * max_length`` tokens), validating on less than one row (``max_length``), or a side under a third
    of the share ``val_fraction`` asks for (validation: or over three times it)."""
    total = max(1, train + val)
    reasons = []
    if train < batch_size * max_length:
        reasons.append(
            f"training is less than one batch (data.batch_size * data.max_length = {batch_size * max_length})"
        )
    if val < max_length:
        reasons.append(f"validation is less than one row (data.max_length = {max_length})")
    if not val_fraction / 3 <= val / total <= 3 * val_fraction or train / total < (1 - val_fraction) / 3:
        reasons.append(
            f"far from the {1 - val_fraction:.0%}/{val_fraction:.0%} that data.val_fraction={val_fraction} asks"
        )
    if not reasons:
        return None
    return (
        f"tiny data split: {train:,} training tokens ({train / total:.1%}), {val:,} validation tokens "
        f"({val / total:.1%}): {'; '.join(reasons)}. Give it more text"
    )


def tokenizer_sample(
    store: TextStore, is_val: np.ndarray, *, max_bytes: int, seed: int, cut: tuple[int, int] | None = None
) -> tuple[Iterator[str], dict]:
    """The training documents a tokenizer learns from: in an order drawn by ``seed``, as many as fit in
    ``max_bytes`` of UTF-8 (at least one). ``cut``: ``(document, character offset)`` of the split's cut document,
    whose start only is training text. Returns an iterator over them (in store order, read a batch at a time)
    and ``{"documents": ..., "bytes": ...}`` of the sample."""
    sizes = store.byte_lengths().copy()
    if cut is not None:
        sizes[cut[0]] = len(store.document(cut[0])[: cut[1]].encode("utf-8", "surrogatepass"))
    candidates = np.flatnonzero(~is_val)
    order = np.random.default_rng([seed, 1]).permutation(candidates)
    take = max(1, int(np.searchsorted(np.cumsum(sizes[order]), max_bytes, side="right")))
    chosen = np.zeros(store.num_documents, dtype=bool)
    chosen[order[:take]] = True

    def texts() -> Iterator[str]:
        for first, batch in store.batches():
            keep = np.flatnonzero(chosen[first : first + len(batch)])
            for index, text in zip(keep.tolist(), batch.take(pa.array(keep)).to_pylist()):
                yield text[: cut[1]] if cut is not None and first + index == cut[0] else text

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
    cut: tuple[int, int] | None = None,
) -> None:
    """Tokenise the store into ``train_path`` and ``val_path`` (Arrow stream files, :mod:`mhaplug.data.encode`), each
    written atomically; ``cut``: ``(document, character offset)``, a document whose start trains and whose end
    validates (:func:`split_store`). Up to ``num_proc`` worker processes take contiguous ranges of record batches
    (fewer for a small corpus: at least :data:`BYTES_PER_PROCESS` of text each); with one, it runs in this process,
    where ``tokenizers`` still encodes each batch on all cores. The rows are those of one process, in store order."""
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
                "cut": None if cut is None else [int(cut[0]), int(cut[1])],
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
