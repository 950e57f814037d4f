"""Batch samplers for variable-length data: which samples share a batch decides how much of it is padding.

Three strategies, one class each, used as ``DataLoader(dataset, batch_sampler=..., collate_fn=...)``::

    name            class                      a batch is                          use it when
    random          RandomBatchSampler         batch_size random samples           baseline; packed rows (no padding)
    length_grouped  LengthGroupedBatchSampler  batch_size samples of similar       a fixed batch size matters (recipes,
                                               length                              schedules tuned per batch)
    token_budget    TokenBudgetBatchSampler    as many similar-length samples as   lengths vary a lot: many short rows
                                               fit max_tokens, padding included    or few long ones, steady memory/step

Length grouping (as in Hugging Face's ``LengthGroupedSampler`` and fairseq's token batching): shuffle all
indices, cut them into mega-batches, sort each mega-batch by length (longest first) and cut it into batches,
then shuffle the batch order. Randomness survives at the mega-batch level; padding shrinks to the length
spread inside one batch. A larger ``mega_batch_mult`` pads less but makes batch contents less random.

Every sampler is deterministic (epoch ``e`` depends only on seed, e, lengths and settings; call
``set_epoch``), splits each epoch's batches over DDP ranks with the same count on every rank, and can resume
mid-epoch from ``state_dict()``; :class:`ResumableDataLoader` keeps that exact with DataLoader workers (and is
what Lightning checkpoints). :func:`padded_tokens` and :func:`pad_fraction` measure the padding.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Sampler

from mhaplug.common import check_int, round_up

__all__ = [
    "BaseBatchSampler",
    "LengthGroupedBatchSampler",
    "Lengths",
    "RandomBatchSampler",
    "ResumableDataLoader",
    "TokenBudgetBatchSampler",
    "pad_fraction",
    "padded_tokens",
]

Lengths = Sequence[int] | np.ndarray | Tensor  # token count of each sample (N,): list, numpy array or 1-D tensor


def padded_tokens(batch_lengths: Sequence[int], pad_to_multiple_of: int | None = None) -> int:
    """Token slots a padded batch occupies: ``len(batch) * round_up(max(batch_lengths), pad_to_multiple_of)``."""
    multiple = check_int("pad_to_multiple_of", pad_to_multiple_of, optional=True)
    return len(batch_lengths) * round_up(int(np.max(batch_lengths)), multiple) if len(batch_lengths) else 0


def pad_fraction(lengths: Lengths, batches: Iterable[Sequence[int]], pad_to_multiple_of: int | None = None) -> float:
    """Fraction of padded token slots over all ``batches`` (lists of indices into ``lengths``): 1 - real/padded."""
    lengths = _as_lengths(lengths)
    real = padded = 0
    for batch in batches:
        batch_lengths = lengths[np.asarray(batch, dtype=np.int64)]
        real += int(batch_lengths.sum())
        padded += padded_tokens(batch_lengths, pad_to_multiple_of)
    return 1.0 - real / padded if padded else 0.0


def _as_lengths(lengths: Lengths) -> np.ndarray:
    """Token counts (N,) -> read-only int64 array, or an error naming the first bad entry."""
    if isinstance(lengths, (str, bytes)):
        raise TypeError(f"lengths must be a sequence of ints (token count per sample), got {type(lengths).__name__}")
    array = np.asarray(lengths.tolist() if isinstance(lengths, Tensor) else lengths)
    if array.ndim != 1:
        raise ValueError(f"lengths must be 1-D (one token count per sample), got shape {array.shape}")
    if array.size == 0:
        raise ValueError("lengths is empty: a sampler needs at least one sample; check the dataset split")
    if array.dtype.kind not in "iu":
        values = array.tolist() if isinstance(lengths, (np.ndarray, Tensor)) else list(lengths)
        bad = next((i for i, v in enumerate(values) if isinstance(v, bool) or not isinstance(v, (int, np.integer))), 0)
        raise TypeError(f"lengths must hold ints (token counts), got lengths[{bad}] = {values[bad]!r} ({array.dtype})")
    if (array < 1).any():
        bad = int(np.flatnonzero(array < 1)[0])
        raise ValueError(
            f"lengths[{bad}] is {array[bad]}: an empty sequence cannot be batched; drop empty rows first, "
            f"e.g. dataset.filter(lambda row: len(row['input_ids']) > 0)"
        )
    array = array.astype(np.int64)
    array.flags.writeable = False
    return array


def _sorted_chunks(indices: np.ndarray, lengths: np.ndarray, bounds: np.ndarray) -> list[np.ndarray]:
    """Split ``indices`` at ``bounds`` into mega-batches, each sorted by length, longest first (stable)."""
    return [chunk[np.argsort(-lengths[chunk], kind="stable")] for chunk in np.split(indices, bounds) if len(chunk)]


class BaseBatchSampler(Sampler[list[int]]):
    """Per-epoch batches of sample indices, split over DDP ranks, resumable mid-epoch.

    Subclasses only build the global list of batches for one epoch (:meth:`_global_batches`); this class
    handles seeding, ranks and resuming. The rules:

    - Determinism: epoch ``e`` draws from ``numpy.random.default_rng([seed, e])``. ``set_epoch`` as for
      ``DistributedSampler``; ``shuffle=False`` uses no randomness at all.
    - Ranks: every rank builds the same global list, then takes batches ``rank::num_replicas``. If the
      global count is not a multiple of ``num_replicas``, ``drop_last=True`` drops the last few batches,
      otherwise the first batches of the (shuffled) global list are repeated at its end until it is; those
      repeats are the only samples seen twice in an epoch. ``num_replicas``/``rank`` default to
      ``torch.distributed``'s world size and rank when it is initialised, else 1 and 0.
    - ``len(sampler)``: batches of the whole current epoch on this rank, also after a resume (token_budget:
      the count can change from epoch to epoch).
    - Resume: ``state_dict()`` holds the epoch, the seed and ``batches_yielded``, the batches of this epoch
      handed out by ``__iter__`` so far. After ``load_state_dict`` the next ``__iter__`` yields exactly the
      remaining batches; without one, each ``__iter__`` starts the epoch at batch 0. With DataLoader workers
      the count runs ahead of training by the batches the workers prefetch (up to ``num_workers *
      prefetch_factor``): iterate through :class:`ResumableDataLoader`, whose state counts the batches the loop
      took. A loop that stops after
      ``len()`` batches without exhausting the iterator (Lightning does) leaves ``batches_yielded == len()``:
      loading that state yields nothing until ``set_epoch`` moves on. Every rank yields the same count, so
      one rank's state can be loaded on all ranks.
    - Lightning (>= 2.0) calls ``set_epoch`` on ``dataloader.batch_sampler.sampler`` (lightning #16841),
      never on a batch sampler itself: :attr:`sampler` is this object so that call reaches it. Under DDP,
      set ``Trainer(use_distributed_sampler=False)``: the split over ranks happens here.
    """

    _settings: tuple[str, ...] = ()  # attributes of a subclass that shape its batches (part of the fingerprint)
    #: Same batch count on every rank (the rule above). Set False for evaluation, where a repeated batch would
    #: count twice in a metric and a rank with one batch fewer costs nothing (no per-step collectives).
    even_batches: bool = True

    def __init__(
        self, lengths: Lengths, shuffle: bool, seed: int, drop_last: bool, num_replicas: int | None, rank: int | None
    ) -> None:
        super().__init__()
        self.lengths = _as_lengths(lengths)
        self.shuffle, self.drop_last = bool(shuffle), bool(drop_last)
        self.seed = check_int("seed", seed, minimum=0)
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        if num_replicas is None:
            num_replicas = torch.distributed.get_world_size() if distributed else 1
        if rank is None:
            rank = torch.distributed.get_rank() if distributed else 0
        self.num_replicas = check_int("num_replicas", num_replicas)
        self.rank = check_int("rank", rank, minimum=0)
        if self.rank >= self.num_replicas:
            raise ValueError(f"rank must be in [0, num_replicas={self.num_replicas}), got rank={self.rank}")
        self.epoch = 0
        self._batches_yielded = 0  # batches of self.epoch handed out by the latest __iter__
        self._resume_from = 0  # set by load_state_dict, used by the next __iter__ only
        self._cache: tuple[int, list[list[int]]] | None = None
        # What a state must match to be loaded here: cheap to compute, and names what differs.
        self._fingerprint = {
            "sampler": type(self).__name__,
            "num_samples": len(self.lengths),
            "total_length": int(self.lengths.sum()),
            # the lengths themselves, in order: a state of permuted lengths (same count and sum) is other data
            "lengths_digest": hashlib.blake2b(self.lengths.astype(np.int64).tobytes(), digest_size=8).hexdigest(),
            "num_replicas": self.num_replicas,
            "shuffle": self.shuffle,
            "drop_last": self.drop_last,
            **{name: getattr(self, name) for name in self._settings},
        }

    @property
    def start_batch(self) -> int:
        """The batch of the current epoch that the next ``__iter__`` starts at: 0, or where ``load_state_dict``
        left it."""
        return self._resume_from

    @property
    def sampler(self) -> BaseBatchSampler:
        """This object: where Lightning looks for ``set_epoch`` (see the class docstring)."""
        return self

    def _global_batches(self, rng: np.random.Generator | None) -> list[list[int]]:
        """All batches of one epoch before the split over ranks; ``rng`` is None when ``shuffle=False``."""
        raise NotImplementedError

    def _shuffle_batches(self, batches: list[list[int]], rng: np.random.Generator | None) -> list[list[int]]:
        """Shuffle the batch order, then move the batch holding the longest sample to the front.

        Longest first (as Hugging Face's LengthGroupedSampler does) makes an out-of-memory batch fail at
        step 0, not hours in. With ``shuffle=False`` the order is left as built.
        """
        if rng is None or not batches:
            return batches
        batches = [batches[i] for i in rng.permutation(len(batches))]
        longest = max(range(len(batches)), key=lambda i: int(self.lengths[batches[i]].max()))
        batches[0], batches[longest] = batches[longest], batches[0]
        return batches

    def _rank_batches(self, epoch: int) -> list[list[int]]:
        if self._cache is None or self._cache[0] != epoch:
            rng = np.random.default_rng([self.seed, epoch]) if self.shuffle else None
            batches = self._global_batches(rng)
            total, extra = len(batches), len(batches) % self.num_replicas
            if extra and not self.even_batches:
                pass  # evaluation: every batch exactly once, ranks may differ by one batch
            elif extra and self.drop_last:
                batches = batches[: total - extra]
            elif extra:
                need = self.num_replicas - extra
                batches = batches + (batches * math.ceil(need / total))[:need]
            self._cache = (epoch, batches[self.rank :: self.num_replicas])
        return self._cache[1]

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch to iterate; a new epoch starts at batch 0, the current one keeps its position."""
        epoch = check_int("epoch", epoch, minimum=0)
        if epoch != self.epoch:
            self.epoch, self._batches_yielded, self._resume_from = epoch, 0, 0

    def __len__(self) -> int:
        return len(self._rank_batches(self.epoch))

    def __iter__(self) -> Iterator[list[int]]:
        batches = self._rank_batches(self.epoch)
        start, self._resume_from = self._resume_from, 0
        self._batches_yielded = start
        for position in range(start, len(batches)):
            self._batches_yielded = position + 1
            yield list(batches[position])
        self._batches_yielded = 0  # epoch complete: the next __iter__ starts it again unless set_epoch moves on

    def state_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable dict: epoch, seed, batches_yielded (this epoch, this rank), fingerprint."""
        return {
            "epoch": self.epoch,
            "seed": self.seed,
            "batches_yielded": self._batches_yielded,
            "fingerprint": dict(self._fingerprint),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`; the next ``__iter__`` yields the rest of that epoch."""
        missing = [key for key in ("epoch", "seed", "batches_yielded", "fingerprint") if key not in state]
        if missing:
            raise ValueError(f"state is missing {missing}; pass a dict returned by {type(self).__name__}.state_dict()")
        ours = {"seed": self.seed, **self._fingerprint}
        theirs = {"seed": state["seed"], **state["fingerprint"]}
        differ = [
            f"{k}={theirs.get(k)!r} in the state, {ours.get(k)!r} here"
            for k in ours.keys() | theirs.keys()
            if ours.get(k) != theirs.get(k)
        ]
        if differ:
            raise ValueError(
                f"state was saved by a sampler with other data or settings: {'; '.join(sorted(differ))}. "
                f"Build the sampler from the same lengths and settings to resume, or start without the state."
            )
        epoch = check_int("state['epoch']", state["epoch"], minimum=0)
        count = len(self._rank_batches(epoch))
        done = check_int("state['batches_yielded']", state["batches_yielded"], minimum=0)
        if done > count:
            raise ValueError(f"state['batches_yielded'] is {done} but epoch {epoch} has {count} batches on this rank")
        self.epoch, self._batches_yielded, self._resume_from = epoch, done, done


class RandomBatchSampler(BaseBatchSampler):
    """``batch_size`` samples in random order: the baseline that pads every row to its batch's longest."""

    _settings = ("batch_size",)

    def __init__(
        self,
        lengths: Lengths,
        batch_size: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        num_replicas: int | None = None,
        rank: int | None = None,
    ) -> None:
        self.batch_size = check_int("batch_size", batch_size)
        super().__init__(lengths, shuffle, seed, drop_last, num_replicas, rank)

    def _global_batches(self, rng: np.random.Generator | None) -> list[list[int]]:
        order = rng.permutation(len(self.lengths)) if rng is not None else np.arange(len(self.lengths))
        batches = [order[i : i + self.batch_size].tolist() for i in range(0, len(order), self.batch_size)]
        return batches[:-1] if self.drop_last and len(batches[-1]) < self.batch_size else batches


class LengthGroupedBatchSampler(BaseBatchSampler):
    """``batch_size`` samples of similar length, from mega-batches of ``mega_batch_mult * batch_size``.

    shuffle indices -> mega-batches -> sort each by length, longest first -> cut into batches -> drop the
    final partial batch if ``drop_last`` -> shuffle the batch order, longest batch first. With
    ``shuffle=False``: indices in order, each mega-batch still sorted, batches in that order.
    """

    _settings = ("batch_size", "mega_batch_mult")

    def __init__(
        self,
        lengths: Lengths,
        batch_size: int,
        *,
        mega_batch_mult: int = 50,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        num_replicas: int | None = None,
        rank: int | None = None,
    ) -> None:
        self.batch_size = check_int("batch_size", batch_size)
        self.mega_batch_mult = check_int("mega_batch_mult", mega_batch_mult)
        super().__init__(lengths, shuffle, seed, drop_last, num_replicas, rank)

    def _global_batches(self, rng: np.random.Generator | None) -> list[list[int]]:
        n, size = len(self.lengths), self.batch_size
        order = rng.permutation(n) if rng is not None else np.arange(n)
        bounds = np.arange(size * self.mega_batch_mult, n, size * self.mega_batch_mult)
        batches = [
            mega[i : i + size].tolist()
            for mega in _sorted_chunks(order, self.lengths, bounds)
            for i in range(0, len(mega), size)
        ]
        if self.drop_last and len(batches[-1]) < size:  # only the last mega-batch can end in a partial batch
            batches = batches[:-1]
        return self._shuffle_batches(batches, rng)


class TokenBudgetBatchSampler(BaseBatchSampler):
    """Batches whose padded size ``len(batch) * round_up(max length, pad_to_multiple_of)`` is <= ``max_tokens``.

    shuffle indices -> mega-batches of about ``mega_batch_mult * max_tokens`` real tokens -> sort each by
    length, longest first -> fill batches greedily (each batch as many samples as fit, at most
    ``max_batch_size``) -> shuffle the batch order, longest batch first. No batch is dropped, so the
    batch count per epoch depends on the shuffle: ``len()`` can differ between epochs.
    """

    _settings = ("max_tokens", "pad_to_multiple_of", "max_batch_size", "mega_batch_mult")

    def __init__(
        self,
        lengths: Lengths,
        max_tokens: int,
        *,
        pad_to_multiple_of: int | None = None,
        max_batch_size: int | None = None,
        mega_batch_mult: int = 50,
        shuffle: bool = True,
        seed: int = 0,
        num_replicas: int | None = None,
        rank: int | None = None,
    ) -> None:
        self.max_tokens = check_int("max_tokens", max_tokens)
        self.pad_to_multiple_of = check_int("pad_to_multiple_of", pad_to_multiple_of, optional=True)
        self.max_batch_size = check_int("max_batch_size", max_batch_size, optional=True)
        self.mega_batch_mult = check_int("mega_batch_mult", mega_batch_mult)
        super().__init__(lengths, shuffle, seed, False, num_replicas, rank)
        multiple = self.pad_to_multiple_of or 1
        self._widths = round_up(self.lengths, multiple)  # (N,) padded length of each sample alone
        too_long = np.flatnonzero(self._widths > self.max_tokens)
        if len(too_long):
            i = int(too_long[0])
            rounded = f" ({self._widths[i]} after pad_to_multiple_of={self.pad_to_multiple_of})" if multiple > 1 else ""
            raise ValueError(
                f"lengths[{i}] is {self.lengths[i]} tokens{rounded}, more than max_tokens={self.max_tokens} "
                f"({len(too_long)} of {len(self.lengths)} samples do not fit): raise max_tokens to at least "
                f"{int(self._widths.max())} or set max_length (truncation) in the collator and compute lengths "
                f"after truncation"
            )

    def _global_batches(self, rng: np.random.Generator | None) -> list[list[int]]:
        n = len(self.lengths)
        order = rng.permutation(n) if rng is not None else np.arange(n)
        # Mega-batch k holds the samples whose running token total falls in [k, k+1) * mega_batch_mult * max_tokens.
        mega_id = (np.cumsum(self.lengths[order]) - 1) // (self.mega_batch_mult * self.max_tokens)
        batches = []
        for mega in _sorted_chunks(order, self.lengths, np.flatnonzero(np.diff(mega_id)) + 1):
            start = 0
            while start < len(mega):  # sorted longest first: the first sample sets the batch's padded width
                fits = self.max_tokens // int(self._widths[mega[start]])
                fits = min(fits, self.max_batch_size) if self.max_batch_size else fits
                batches.append(mega[start : start + fits].tolist())
                start += fits
        return self._shuffle_batches(batches, rng)


class ResumableDataLoader(DataLoader):
    """A ``DataLoader`` over a :class:`BaseBatchSampler` whose ``state_dict()`` counts the batches the loop took.

    The sampler runs in the main process and hands each batch's indices to a worker as soon as the worker can
    take it, so with ``num_workers > 0`` its own count is ahead of training by the prefetched batches (up to
    ``num_workers * prefetch_factor``) and a resume from it would skip them. This loader counts a batch when its
    iterator returns it, in the loop's process: the state is the sampler's, with that count as
    ``batches_yielded``, so a resumed loader yields exactly the batches the loop had not taken, for any
    ``num_workers``.

    Lightning (2.x) saves the ``state_dict()`` of a train dataloader that has one in its checkpoints and loads it
    into the new dataloader before the first batch of a resumed fit (and, finding one, does not warn that the
    dataloader is not resumable). Lightning takes each batch when it is trained: it fetches ahead only from a
    loader without ``len()``, and this one has one.
    """

    def __init__(self, dataset: Any, *args: Any, batch_sampler: BaseBatchSampler, **kwargs: Any) -> None:
        if not isinstance(batch_sampler, BaseBatchSampler):
            raise TypeError(
                f"batch_sampler must be a mhaplug.data.sampling.BaseBatchSampler (its state is what resumes), got "
                f"{type(batch_sampler).__name__}; use a plain DataLoader for other samplers"
            )
        super().__init__(dataset, *args, batch_sampler=batch_sampler, **kwargs)
        self._taken: tuple[int, int] | None = None  # (epoch, batches of it taken) by the latest __iter__

    def __iter__(self) -> Iterator[Any]:
        self._taken = None  # until the first batch, the sampler's own state holds
        return self._batches()

    def _batches(self) -> Iterator[Any]:
        # A generator: nothing runs until the first batch is asked for, so a set_epoch or load_state_dict
        # between iter() and next() (Lightning makes both) is seen, as by the sampler itself.
        sampler: BaseBatchSampler = self.batch_sampler  # type: ignore[assignment]
        epoch, taken = sampler.epoch, sampler.start_batch
        self._taken = (epoch, taken)
        for batch in super().__iter__():
            taken += 1
            self._taken = (epoch, taken)
            yield batch
        self._taken = None  # epoch complete: as the sampler, the next __iter__ starts it again at batch 0

    def state_dict(self) -> dict[str, Any]:
        """:meth:`BaseBatchSampler.state_dict` with ``batches_yielded`` = the batches of the epoch the loop took."""
        state = self.batch_sampler.state_dict()  # type: ignore[union-attr]
        if self._taken is not None and self._taken[0] == state["epoch"]:  # else set_epoch moved on: 0 taken
            state["batches_yielded"] = self._taken[1]
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`: the next ``__iter__`` yields the batches of that epoch not yet taken."""
        self.batch_sampler.load_state_dict(state)  # type: ignore[union-attr]
        self._taken = None
