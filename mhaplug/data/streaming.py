"""Streaming: train on a corpus of any size without preparing it first, packed on the fly, resumable exactly.

The stream is the source's non-empty documents in order. Its first documents, up to ``val_max_tokens`` tokens, are
held out for validation (:class:`mhaplug.data.TextDataModule` reads them once); training reads the rest.

- **Windows.** The training documents are cut into windows of ``buffer`` documents (window 0, 1, ...). Window ``j``
  belongs to one *unit*, ``j % units``: a unit is a (rank, loader worker) pair, ``units = world_size * workers``,
  so every document is trained once per epoch of its unit, and no two units read the same one.
- **Packing.** A unit tokenises each of its windows (EOS after each document, documents longer than ``max_length``
  cut into chunks), shuffles the chunks with a generator seeded by (seed, epoch, window), packs them best-fit
  decreasing (:func:`best_fit_decreasing`; ``layout="padded"``: a chunk per row) and shuffles the rows. Consecutive
  rows make batches of ``batch_size`` rows, across window ends. Each unit runs through its windows epoch after
  epoch, without end: a run is as long as ``trainer.max_steps``, and every rank trains the same number of steps.
- **Position and resume.** Every batch carries ``stream_state``: its unit and the position after it (epoch, window,
  row). A window is a pure function of the stream, the tokenizer and the seed, so the position is the whole state:
  a resumed unit skips to its window, packs it again and starts at the row. :class:`StreamingLoader` keeps the
  position of every unit of this rank as of the last batch the loop *trained* (the DataModule records it when the
  batch goes to the device, so a batch Lightning fetched ahead is not counted), gathers the ranks' positions into
  its ``state_dict`` (Lightning saves it in checkpoints), and restarts each unit there. The DataLoader takes
  batches from its workers in turn, so the resumed loader also turns its workers' roles so that the first batch
  comes from the unit whose turn it was.
- **Errors in the workers.** A loader worker reads the stream, so it is where a bad line past the head of the stream
  is found. torch re-raises a worker's exception in the main process as its type made from the worker's formatted
  traceback, which would bury the one-line message of a :class:`mhaplug.common.ConfigError` (a
  :class:`~mhaplug.common.DataError`: the file and line) in it. The worker hands such an error over as its next item
  instead (it pickles whole, with the worker's traceback as a note) and :class:`StreamingLoader` raises it.
"""

from __future__ import annotations

import bisect
import itertools
import traceback
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
import torch
from tokenizers import Tokenizer
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from mhaplug.common import ConfigError
from mhaplug.data.encode import chunk_rows

__all__ = ["StreamingLoader", "TokenStream", "best_fit_decreasing", "packing_efficiency", "tokenise_documents"]

STATE_KEY = "stream_state"  # the batch key that carries the stream position (removed before the model sees it)


def best_fit_decreasing(lengths: np.ndarray | list[int], max_length: int) -> list[list[int]]:
    """Indices per row, best-fit decreasing: longest first (ties in input order), each into the row with the least
    room that still fits it, a new row when none does. Rows come out in order of creation."""
    order = sorted(range(len(lengths)), key=lambda i: -int(lengths[i]))
    rooms: list[tuple[int, int]] = []  # (free room, row), sorted; full rows leave it
    rows: list[list[int]] = []
    for i in order:
        size = int(lengths[i])
        if size > max_length:
            raise ValueError(f"document {i} has {size} tokens, more than max_length={max_length}")
        k = bisect.bisect_left(rooms, (size, -1))  # the smallest room >= size
        if k == len(rooms):
            rows.append([i])
            room, row = max_length - size, len(rows) - 1
        else:
            room, row = rooms.pop(k)
            rows[row].append(i)
            room -= size
        if room:
            bisect.insort(rooms, (room, row))
    return rows


def packing_efficiency(row_lengths: np.ndarray, max_length: int) -> float:
    """Real tokens over row capacity: ``sum(row_lengths) / (rows * max_length)``."""
    return float(np.sum(row_lengths)) / (len(row_lengths) * max_length) if len(row_lengths) else 0.0


def tokenise_documents(tokenizer: Tokenizer, texts: list[str], *, max_length: int, eos: int) -> list[np.ndarray]:
    """Each document's ids + EOS, cut into ``max_length`` chunks: the rows, as the offline tokenising makes them."""
    batch = chunk_rows([e.ids for e in tokenizer.encode_batch(texts)], eos, max_length)
    ids = batch.column(0)
    flat, offsets = ids.flatten().to_numpy(), ids.offsets.to_numpy()
    return [flat[offsets[r] : offsets[r + 1]] for r in range(len(offsets) - 1)]


class TokenStream(IterableDataset):
    """Batches of packed (or padded) rows from a stream of documents, for one rank (see the module docstring).

    Args:
        documents: a picklable callable returning the stream's documents in order (every loader worker calls it).
        tokenizer: the tokenizer's JSON (``Tokenizer.to_str()``). collate: a picklable collator, called on each
            batch's rows in the worker (``PackCollator`` for packed rows, ``PadCollator`` for padded ones).
        skip: documents at the head of the stream held out for validation.
        rank, world_size: this rank and the number of ranks.
    """

    def __init__(
        self,
        documents: Callable[[], Iterable[str | None]],
        tokenizer: str,
        collate: Callable[[list[dict[str, Any]]], dict[str, Any]],
        *,
        max_length: int,
        batch_size: int,
        buffer: int,
        packed: bool,
        seed: int,
        skip: int,
        rank: int,
        world_size: int,
        eos: int = 1,
    ) -> None:
        super().__init__()
        self.documents, self.tokenizer, self.collate = documents, tokenizer, collate
        self.max_length, self.batch_size, self.buffer, self.packed = max_length, batch_size, buffer, packed
        self.seed, self.skip, self.rank, self.world_size, self.eos = seed, skip, rank, world_size, eos
        self.start: dict[int, tuple[int, int, int]] = {}  # worker (logical) -> (epoch, window, row) to start from
        self.rotation = 0  # DataLoader worker i serves logical worker (i + rotation) % workers

    def windows(self, unit: int, units: int) -> Iterator[tuple[int, list[str]]]:
        """``(window, texts)`` of the unit's windows over one pass of the stream."""
        texts = (t for t in self.documents() if t is not None and t.strip())
        texts = itertools.islice(texts, self.skip, None)
        for window in itertools.count():
            chunk = list(itertools.islice(texts, self.buffer))
            if not chunk:
                return
            if window % units == unit:
                yield window, chunk

    def rows(self, tokenizer: Tokenizer, texts: list[str], epoch: int, window: int) -> list[dict[str, Any]]:
        """The window's rows, packed and shuffled by (seed, epoch, window)."""
        chunks = tokenise_documents(tokenizer, texts, max_length=self.max_length, eos=self.eos)
        rng = np.random.default_rng([self.seed, epoch, window])
        chunks = [chunks[i] for i in rng.permutation(len(chunks))]
        if not self.packed:
            return [{"input_ids": chunk} for chunk in chunks]
        rows = best_fit_decreasing([len(c) for c in chunks], self.max_length)
        rows = [rows[i] for i in rng.permutation(len(rows))]
        return [
            {"input_ids": np.concatenate([chunks[i] for i in row]), "document_lengths": [len(chunks[i]) for i in row]}
            for row in rows
        ]

    def __iter__(self) -> Iterator[dict[str, Any] | ConfigError]:
        """The unit's batches; in a loader worker, a :class:`~mhaplug.common.ConfigError` (bad data) as the last item
        (the module docstring says why), to be raised by :class:`StreamingLoader`."""
        if get_worker_info() is None:
            return self._batches()
        return self._batches_or_error()

    def _batches_or_error(self) -> Iterator[dict[str, Any] | ConfigError]:
        try:
            yield from self._batches()
        except ConfigError as error:
            info = get_worker_info()
            error.add_note(f"raised in DataLoader worker process {info.id}:\n" + traceback.format_exc())
            yield error

    def _batches(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        logical = (worker + self.rotation) % workers
        unit, units = self.rank * workers + logical, self.world_size * workers
        tokenizer = Tokenizer.from_str(self.tokenizer)
        epoch, start_window, start_row = self.start.get(logical, (0, 0, 0))
        pending: list[dict[str, Any]] = []
        while True:
            found = False
            for window, texts in self.windows(unit, units):
                found = True
                if window < start_window:  # before the resumed position
                    continue
                rows = self.rows(tokenizer, texts, epoch, window)
                first = start_row if window == start_window else 0
                for row in range(first, len(rows)):
                    pending.append(rows[row])
                    if len(pending) == self.batch_size:
                        batch = self.collate(pending)
                        batch[STATE_KEY] = {"worker": logical, "epoch": epoch, "window": window, "row": row + 1}
                        pending = []
                        yield batch
            if not found:
                raise ConfigError(
                    f"the stream has no training window for unit {unit} of {units} (rank {self.rank}, worker "
                    f"{logical}): it holds fewer than {units} windows of data.stream_buffer={self.buffer} documents "
                    f"after the {self.skip} held out; lower data.stream_buffer, data.num_workers or the number of "
                    f"ranks, or stream a larger corpus"
                )
            epoch, start_window, start_row = epoch + 1, 0, 0


class StreamingLoader(DataLoader):
    """A ``DataLoader`` over a :class:`TokenStream` (batches are made in the workers) whose state is every unit's
    position as of the last batch :meth:`record` was given (see the module docstring).

    ``record_on_yield=True`` records each batch as this loader hands it out (a plain loop); Lightning fetches one
    batch ahead, so :class:`mhaplug.data.TextDataModule` records in ``on_before_batch_transfer`` instead.
    ``fingerprint``: what a state must match to be loaded (the data and settings that shape the stream)."""

    def __init__(
        self, dataset: TokenStream, *, num_workers: int, fingerprint: dict[str, Any], record_on_yield: bool = True
    ) -> None:
        super().__init__(dataset, batch_size=None, num_workers=num_workers)
        self.fingerprint, self.record_on_yield = fingerprint, record_on_yield
        self.workers = max(1, num_workers)
        self.positions: dict[int, list[int]] = {}  # logical worker -> [epoch, window, row] after its last batch
        self.turn = 0  # the logical worker whose batch comes next

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return self._batches()

    def _batches(self) -> Iterator[dict[str, Any]]:
        # A generator: the workers start (and copy the dataset's start positions) at the first next(), after any
        # load_state_dict made between iter() and next().
        for batch in super().__iter__():
            if isinstance(batch, ConfigError):  # from a worker: TokenStream hands it over whole
                raise batch
            if self.record_on_yield:
                self.record(batch.pop(STATE_KEY))
            yield batch

    def record(self, state: dict[str, int]) -> None:
        """Count a batch as trained: its worker's position is the one after it, and the turn passes on."""
        self.positions[state["worker"]] = [state["epoch"], state["window"], state["row"]]
        self.turn = (state["worker"] + 1) % self.workers

    def state_dict(self) -> dict[str, Any]:
        """Every rank's positions (gathered: a collective when ``torch.distributed`` runs, as Lightning's
        checkpointing calls it on every rank), the workers and ranks they belong to, and the fingerprint."""
        mine = {"positions": {str(k): v for k, v in self.positions.items()}, "turn": self.turn}
        ranks: list[Any] = [mine]
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            ranks = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(ranks, mine)
        return {
            "fingerprint": dict(self.fingerprint),
            "num_workers": self.workers,
            "world_size": self.dataset.world_size,  # type: ignore[attr-defined]
            "ranks": ranks,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restart every unit of this rank where ``state`` left it; refuse a state of other data or another shape."""
        dataset: TokenStream = self.dataset  # type: ignore[assignment]
        theirs = {**state.get("fingerprint", {}), "num_workers": state.get("num_workers")}
        theirs["world_size"] = state.get("world_size")
        ours = {**self.fingerprint, "num_workers": self.workers, "world_size": dataset.world_size}
        differ = [
            f"{k}={theirs.get(k)!r} in the state, {ours.get(k)!r} here"
            for k in sorted(ours)
            if ours[k] != theirs.get(k)
        ]
        if differ:
            raise ValueError(
                f"the stream's state was saved with other data or settings: {'; '.join(differ)}. Resume with the "
                f"same data, data.num_workers and number of ranks (the stream position belongs to them), or start "
                f"without the checkpoint"
            )
        mine = state["ranks"][dataset.rank]
        self.positions = {int(k): list(v) for k, v in mine["positions"].items()}
        self.turn = int(mine["turn"])
        dataset.start = {k: (v[0], v[1], v[2]) for k, v in self.positions.items()}
        dataset.rotation = self.turn
