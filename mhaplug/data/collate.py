"""Drop-in collators: token sequences -> padded (or packed) batches with every mask a model needs.

Both collators are dataclasses called on a list of rows, as ``DataLoader(dataset, collate_fn=collator)`` or as a
Hugging Face ``data_collator``. A row is a dict with ``input_ids`` (list, numpy array or tensor of ints), as a
``datasets.Dataset`` yields with or without ``set_format("torch")``, or a bare sequence of ints. Other keys of a
row are ignored; name them in ``passthrough_keys`` (:class:`PadCollator`) to have them stacked with
``default_collate``: not one of :data:`COMPUTED_KEYS`, and of one type and shape in every row.

Every bad input raises a ``TypeError`` / ``ValueError`` that names the setting, or the row and key, what was given and
what to do: empty, nested, ragged, string or non-integer ``input_ids``, token ids outside int64 or the vocabulary, a
``pad_token_id`` that is not an int, ``passthrough_keys`` that name a key the collator computes or values that cannot
be stacked.

Batch keys (B rows, L = padded length)::

    input_ids          int64 (B, L)   pad_token_id on padding
    labels             int64 (B, L)   the token, or IGNORE_INDEX (-100) where no loss: padding (from lengths, never from
                                      ``== pad_token_id``, so a pad id equal to EOS still learns to stop) and the
                                      first token of every sequence (packed: of every document), which nothing
                                      before it in the same sequence predicts (with left padding it would be
                                      predicted from a pad)
    key_padding_mask   bool  (B, L)   True = padding (torch MHA convention)
    position_ids       int64 (B, L)   0 on the first real token (also with left padding), 0 on padding;
                                      packed: restart at 0 on every document
    lengths            int64 (B,)     real tokens per row
    num_targets        int            labels that take a loss after the next-token shift
                                      (``labels[:, 1:] != ignore_index``), the loss's normaliser
    num_real_tokens    int            real tokens in the batch (``lengths.sum()``)
    num_padded_tokens  int            B * L, the tokens the model computes on (pads included)

    padded only:
    attention_mask     int64 (B, L)   1 = real token (Hugging Face convention)

    packed only:
    document_ids       int64 (B, L)   0, 1, ... per document within a row; -1 on padding
    cu_seqlens         int32 (D + 1,) document boundaries in the real tokens taken row by row
                                      (``input_ids[~key_padding_mask]``), as varlen attention kernels want
    max_seqlen         int            longest document (a Python int: reading it needs no device sync)

    packed, with ``return_flash_attn_kwargs=True`` (transformers' flash-attention varlen keys):
    cu_seq_lens_q/k    int32 (N + 1,) segment boundaries in all B * L tokens taken row by row (pads included):
                                      the documents, and every pad token as a segment of its own
    max_length_q/k     int            longest segment (= max_seqlen)

Labels are not shifted: position t holds token t, and the loss compares logits at t - 1 with it.

The three counts are Python ints, counted on the CPU where the collator runs (a DataLoader worker or the main
process), so a training loop reads them after the batch has moved to an accelerator without a host-device
synchronisation. A batch from another collator gets them from :func:`add_token_counts` (a synchronisation if it is
already on the device).

Packed batches carry no 2-D ``attention_mask``. Hugging Face models read one as padding only (1 = attend), so
with it every token would attend to the earlier documents of its row. Without it, a transformers model finds the
documents where ``position_ids`` restart (``transformers.masking_utils.find_packed_sequence_indices``, as for
its own ``DataCollatorWithFlattening``), so ``model(**batch)`` gives the per-document loss; mhaplug's own model
uses ``document_ids``. transformers looks at ``position_ids`` only when the model runs without a KV cache:
pass ``use_cache=False`` (or set ``model.config.use_cache = False``; ``transformers.Trainer`` does so, from
``TrainingArguments.use_cache``), otherwise the model attends across documents. Flash-attention models infer
documents from ``position_ids`` only for a single row (B = 1); for B > 1 they need ``return_flash_attn_kwargs``.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import default_collate

from mhaplug.attention import masks
from mhaplug.common import IGNORE_INDEX, PaddingSide, check_choice, check_int, round_up
from mhaplug.data.packing import first_fit_pack
from mhaplug.data.rows import INT64, Row, token_ids, unstackable

__all__ = ["COMPUTED_KEYS", "PackCollator", "PadCollator", "add_token_counts"]

# What a tokenizer without a pad token gives as its pad_token_id, and what to do about it.
_NO_PAD_TOKEN = (
    "tokenizer.pad_token_id is None when the tokenizer has no pad token: add one, or pass the EOS id "
    "(labels come from lengths, so a pad id equal to EOS still learns to stop)"
)

logger = logging.getLogger(__name__)


# Every key a collator computes (the flash-attention keys on request): a pass-through key may not replace one.
COMPUTED_KEYS: tuple[str, ...] = (
    "input_ids", "labels", "key_padding_mask", "attention_mask", "position_ids", "lengths",
    "num_targets", "num_real_tokens", "num_padded_tokens",
    "document_ids", "cu_seqlens", "max_seqlen", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k",
)  # fmt: skip


def add_token_counts(batch: dict[str, Any], *, ignore_index: int = IGNORE_INDEX) -> dict[str, Any]:
    """Add the token counts of a collated batch, as Python ints, to ``batch`` (in place) and return it.

    ``num_targets``: labels that take a loss after the next-token shift (``labels[:, 1:] != ignore_index``: nothing
    predicts position 0); ``num_real_tokens``: real tokens (``lengths`` summed, or the non-pad positions of
    ``key_padding_mask`` when the batch has no ``lengths``); ``num_padded_tokens``: B * L.

    :class:`PadCollator` and :class:`PackCollator` call it on every batch they emit. Reading a count copies it to the
    host, so call it on the CPU, before the batch moves to an accelerator (there it would synchronise).
    """
    labels = batch.get("labels")
    if not isinstance(labels, Tensor) or labels.dim() != 2:
        got = f"shape {tuple(labels.shape)}" if isinstance(labels, Tensor) else type(labels).__name__
        raise ValueError(f"batch['labels'] must be a (B, L) tensor to count the targets, got {got}")
    if "lengths" in batch:
        real = int(batch["lengths"].sum())
    elif "key_padding_mask" in batch:
        real = int(batch["key_padding_mask"].logical_not().sum())
    else:
        raise KeyError(
            f"batch has neither 'lengths' nor 'key_padding_mask' to count real tokens; its keys are {sorted(batch)}"
        )
    batch["num_targets"] = int((labels[:, 1:] != ignore_index).sum())
    batch["num_real_tokens"] = real
    batch["num_padded_tokens"] = labels.numel()
    return batch


@dataclass(kw_only=True)
class _Collator:
    pad_token_id: int = 0
    pad_to_multiple_of: int | None = None
    ignore_index: int = IGNORE_INDEX
    vocab_size: int | None = None
    passthrough_keys: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        try:
            self.pad_token_id = check_int(
                "pad_token_id", self.pad_token_id, minimum=None, meaning="the id written on padding"
            )
        except TypeError as error:
            if self.pad_token_id is not None:
                raise
            raise TypeError(f"{error}; {_NO_PAD_TOKEN}") from None
        self.ignore_index = check_int(
            "ignore_index", self.ignore_index, minimum=None, meaning="the label where no loss is taken"
        )
        self.pad_to_multiple_of = check_int("pad_to_multiple_of", self.pad_to_multiple_of, optional=True)
        self.vocab_size = check_int("vocab_size", self.vocab_size, optional=True)
        keys = self.passthrough_keys
        if isinstance(keys, (str, bytes)) or not isinstance(keys, Iterable):
            hint = f"; write ({keys!r},)" if isinstance(keys, str) else ""
            raise TypeError(f"passthrough_keys must be a tuple of row keys, got {type(keys).__name__} {keys!r}{hint}")
        self.passthrough_keys = tuple(keys)  # a list (or Hydra's ListConfig) too
        for key in self.passthrough_keys:
            if key in COMPUTED_KEYS:
                raise ValueError(
                    f"passthrough_keys names {key!r}, a key the collator computes; rename that row key (e.g. "
                    f"'row_{key}') and pass it through under its new name"
                )
        if self.vocab_size is not None and not 0 <= self.pad_token_id < self.vocab_size:
            raise ValueError(f"pad_token_id must be in [0, vocab_size={self.vocab_size}), got {self.pad_token_id}")

    def _sequences(self, rows: Sequence[Row]) -> list[Tensor]:
        if len(rows) == 0:
            raise ValueError("cannot collate an empty batch (rows == []); check the sampler and drop_last settings")
        return [token_ids(row, i, self.vocab_size) for i, row in enumerate(rows)]

    def _batch(
        self, input_ids: Tensor, is_pad: Tensor, position_ids: Tensor, lengths: Tensor, *, attention_mask: bool
    ) -> dict[str, Any]:
        """The keys both collators emit, from the padded ids, padding mask and positions (all (B, L)), and the
        token counts (:func:`add_token_counts`).

        ``attention_mask`` adds the Hugging Face padding mask: padded batches only, since a transformers model reads
        it as "attend to every real token of the row", across a packed row's documents.
        """
        batch = {
            "input_ids": input_ids,
            "labels": input_ids.masked_fill(position_ids == 0, self.ignore_index),  # padding and first tokens
            "key_padding_mask": is_pad,
        }
        if attention_mask:
            batch["attention_mask"] = masks.attention_mask_from_is_pad(is_pad)
        batch = {**batch, "position_ids": position_ids, "lengths": lengths}
        return add_token_counts(batch, ignore_index=self.ignore_index)

    def _passthrough(self, rows: Sequence[Row]) -> dict[str, Any]:
        extra = {}
        for key in self.passthrough_keys:
            missing = [i for i, row in enumerate(rows) if not isinstance(row, Mapping) or key not in row]
            if missing:
                raise KeyError(f"passthrough key {key!r} is missing from rows {missing[:5]}")
            values = [row[key] for row in rows]  # type: ignore[index]
            try:
                extra[key] = default_collate(values)
            except (TypeError, ValueError, RuntimeError, KeyError) as error:  # ragged or mixed: name the rows
                raise unstackable(key, values, error) from error
        return extra


@dataclass(kw_only=True)
class PadCollator(_Collator):
    """Pads rows to the longest (or ``max_length``), rounded up to ``pad_to_multiple_of``.

    Args:
        pad_token_id: id written on padding (labels there are ``ignore_index`` whatever this is).
        padding_side: ``"right"`` (real tokens first) or ``"left"`` (real tokens last, for generation).
        pad_to_multiple_of: round L up to a multiple (8 or 64 keep kernels and ``torch.compile`` shapes stable).
        max_length: the longest row allowed; longer rows follow ``overflow``.
        overflow: ``"error"`` (default) raises naming the row; ``"truncate"`` keeps the first ``max_length`` tokens.
        ignore_index: the label where no loss is taken (:data:`IGNORE_INDEX`, what ``torch.nn.functional.cross_entropy``
            and Hugging Face skip by default).
        vocab_size: if given, ids outside [0, vocab_size) raise naming the row.
        passthrough_keys: extra row keys to stack into the batch with ``default_collate`` (none of
            :data:`COMPUTED_KEYS`; a value of another type or shape in some rows raises naming those rows).

    Example, ``padding_side="left"``, ``pad_to_multiple_of=4``, rows [5, 6, 7] and [8]::

        input_ids     [[0 5 6 7]    key_padding_mask [[T F F F]
                       [0 0 0 8]]                     [T T T F]]

        position_ids  [[0 0 1 2]    labels           [[-100 -100 6 7]
                       [0 0 0 0]]                     [-100 -100 -100 -100]]
    """

    padding_side: Literal["right", "left"] = "right"
    max_length: int | None = None
    overflow: Literal["error", "truncate"] = "error"

    def __post_init__(self) -> None:
        super().__post_init__()
        self.padding_side = check_choice("padding_side", self.padding_side, PaddingSide)  # type: ignore[assignment]
        self.overflow = check_choice("overflow", self.overflow, ("error", "truncate"))  # type: ignore[assignment]
        self.max_length = check_int("max_length", self.max_length, optional=True)

    def __call__(self, rows: Sequence[Row]) -> dict[str, Any]:
        flat, lengths = self._flat_ids(rows)  # (T,) int64 numpy, (B,) int64 numpy
        if self.max_length is not None and lengths.max() > self.max_length:
            flat, lengths = self._fit(flat, lengths)
        length = round_up(int(lengths.max()), self.pad_to_multiple_of)
        lengths_t = torch.from_numpy(lengths)  # (B,)
        is_pad = masks.is_pad_from_lengths(lengths_t, length, padding_side=self.padding_side)  # (B, L)
        input_ids = torch.full((len(lengths), length), self.pad_token_id, dtype=torch.int64)  # (B, L)
        input_ids[~is_pad] = torch.from_numpy(flat)  # row-major scatter: each row's tokens in order
        batch = self._batch(input_ids, is_pad, _positions(is_pad), lengths_t, attention_mask=True)
        return {**batch, **self._passthrough(rows)}

    def _flat_ids(self, rows: Sequence[Row]) -> tuple[np.ndarray, np.ndarray]:
        """All rows' ids concatenated, and the row lengths, converted once for the whole batch.

        The fast path converts every row in one numpy call; anything unusual (an empty, nested, ragged, string,
        non-integer, past-int64 or out-of-vocabulary row) goes through the per-row checks, which name the row.
        """
        if len(rows) == 0:
            raise ValueError("cannot collate an empty batch (rows == []); check the sampler and drop_last settings")
        ids = [row["input_ids"] if isinstance(row, Mapping) and "input_ids" in row else row for row in rows]
        try:
            lengths = np.fromiter((len(r) for r in ids), dtype=np.int64, count=len(ids))
            if any(isinstance(r, (str, bytes)) for r in ids):  # bytes iterate as ints: not token ids
                flat = None
            elif isinstance(ids[0], (Tensor, np.ndarray)):
                arrays = [np.asarray(r) for r in ids]
                # integers in every row: concatenating would take a bool (or float) row's values as ids
                flat = np.concatenate(arrays) if lengths.all() and all(a.dtype.kind in "iu" for a in arrays) else None
            else:
                tokens = list(itertools.chain.from_iterable(ids))
                # Python ints only: numpy would silently truncate 2.5 to 2, or take True as 1.
                flat = np.array(tokens, dtype=np.int64) if all(type(t) is int for t in tokens) else None
        except (TypeError, ValueError, OverflowError):  # OverflowError: an int past int64
            flat = None
        if (
            flat is None
            or flat.dtype.kind not in "iu"
            or flat.ndim != 1
            or not lengths.all()
            or (
                flat.dtype == np.uint64 and flat.max() > INT64.max  # would wrap to a negative id
            )
            or (self.vocab_size is not None and (flat.min() < 0 or flat.max() >= self.vocab_size))
        ):
            sequences = self._sequences(rows)  # raises, naming the row
            return torch.cat(sequences).numpy(), np.array([len(t) for t in sequences], dtype=np.int64)
        return flat.astype(np.int64, copy=False), lengths

    def _fit(self, flat: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        assert self.max_length is not None
        index = int(np.argmax(lengths > self.max_length))
        if self.overflow == "error":
            raise ValueError(
                f"row {index} has {lengths[index]} tokens, more than max_length={self.max_length}; raise max_length, "
                f"split long documents when tokenising, or pass overflow='truncate' to keep the first {self.max_length}"
            )
        logger.debug(
            "%d rows truncated to max_length=%d tokens", int((lengths > self.max_length).sum()), self.max_length
        )
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        kept = np.minimum(lengths, self.max_length)
        flat = np.concatenate([flat[start : start + n] for start, n in zip(starts, kept)])
        return flat, kept


def _positions(is_pad: Tensor) -> Tensor:
    """0, 1, ... over the real tokens of each row, 0 on padding. (B, L) -> (B, L)."""
    real = (~is_pad).long()
    return (real.cumsum(-1) - 1).clamp_(min=0).masked_fill_(is_pad, 0)


def _flat_segment_bounds(position_ids: Tensor) -> Tensor:
    """Segment starts in the flattened (B * L,) tokens, and B * L: (B, L) int64 -> (N + 1,) int32.

    A segment starts wherever the position is 0: at every document, and at every pad token (positions are 0 on
    padding), so each pad is a segment of its own. A row always starts with a document, so no segment crosses rows.
    """
    flat = position_ids.reshape(-1)  # (B * L,)
    starts = (flat == 0).nonzero().reshape(-1)  # (N,)
    return torch.cat([starts, starts.new_tensor([flat.numel()])]).to(torch.int32)


@dataclass(kw_only=True)
class PackCollator(_Collator):
    """Packs whole documents into rows of at most ``max_length`` tokens, with a document-causal layout.

    Rows that carry ``document_lengths`` (pre-packed, e.g. by :class:`mhaplug.data.TextDataModule`) stay one
    output row each. Otherwise the batch's documents are packed first-fit decreasing
    (:func:`~mhaplug.data.packing.first_fit_pack`), so B out may differ from B in.

    A packed batch has no ``attention_mask``: a transformers model would read it as padding only and attend
    across documents. Fed as ``model(**batch, use_cache=False)``, a transformers causal LM finds the documents
    from ``position_ids`` and gives the per-document loss (see the module docstring; with a KV cache, which
    ``use_cache=True`` creates, it ignores ``position_ids`` and attends across documents).

    Args:
        max_length: the longest row in tokens (positions restart per document, so it bounds the position table
            too).
        overflow: a document longer than ``max_length``: ``"split"`` (default) into ``max_length``
            chunks, each a document of its own; ``"error"`` raises naming the row; ``"truncate"`` keeps the first
            ``max_length`` tokens.
        return_flash_attn_kwargs: also emit transformers' flash-attention varlen keys ``cu_seq_lens_q``,
            ``cu_seq_lens_k`` (int32) and ``max_length_q``, ``max_length_k`` (Python ints), as
            ``transformers.DataCollatorWithFlattening`` does. transformers' flash path flattens the (B, L) batch
            to B * L tokens and runs one varlen call over them, so the segments cover every token, row by row:
            each document, and each pad token as a segment of length 1 (pads see only themselves, and carry
            label -100). These are the segments transformers itself reads from these ``position_ids``
            (``prepare_fa_kwargs_from_position_ids``), so flash, sdpa and eager models see the same documents.
            Without them a flash-attention model separates documents only when B = 1.

    Example, ``max_length=6, pad_to_multiple_of=2`` (L = the fullest row, rounded up), documents [5, 6, 7], [8, 9]::

        input_ids     [5 6 7 8 9 0]      document_ids [0 0 0 1 1 -1]     position_ids [0 1 2 0 1 0]
        labels        [-100 6 7 -100 9 -100]                             cu_seqlens   [0 3 5]
        with return_flash_attn_kwargs:   cu_seq_lens_q [0 3 5 6]         max_length_q 3
    """

    max_length: int  # required: the row length (and position table) packing fills
    overflow: Literal["split", "error", "truncate"] = "split"
    return_flash_attn_kwargs: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        self.max_length = check_int("max_length", self.max_length)
        overflow = check_choice("overflow", self.overflow, ("split", "error", "truncate"))
        self.overflow = overflow  # type: ignore[assignment]
        if not isinstance(self.return_flash_attn_kwargs, bool):
            raise TypeError(f"return_flash_attn_kwargs must be a bool, got {self.return_flash_attn_kwargs!r}")
        if self.passthrough_keys:
            raise ValueError(
                f"PackCollator cannot pass keys through (rows are regrouped), got passthrough_keys="
                f"{self.passthrough_keys!r}; use passthrough_keys=()"
            )

    def __call__(self, rows: Sequence[Row]) -> dict[str, Any]:
        packed = self._packed_rows(rows)  # list of rows, each a list of documents (1-D tensors)
        length = round_up(max(sum(len(d) for d in docs) for docs in packed), self.pad_to_multiple_of)
        batch = len(packed)
        input_ids = torch.full((batch, length), self.pad_token_id, dtype=torch.int64)  # (B, L)
        document_ids = torch.full((batch, length), -1, dtype=torch.int64)  # (B, L)
        position_ids = torch.zeros((batch, length), dtype=torch.int64)  # (B, L)
        doc_lengths: list[int] = []
        for r, docs in enumerate(packed):
            start = 0
            for d, ids in enumerate(docs):
                stop = start + len(ids)
                input_ids[r, start:stop] = ids
                document_ids[r, start:stop] = d
                position_ids[r, start:stop] = torch.arange(len(ids))
                doc_lengths.append(len(ids))
                start = stop
        is_pad = document_ids < 0
        cu_seqlens = torch.zeros(len(doc_lengths) + 1, dtype=torch.int32)
        cu_seqlens[1:] = torch.tensor(doc_lengths).cumsum(0)
        out = {
            # labels: the ignore index at document starts; no attention_mask (see the class docstring)
            **self._batch(input_ids, is_pad, position_ids, (~is_pad).sum(-1), attention_mask=False),
            "document_ids": document_ids,
            "cu_seqlens": cu_seqlens,
            "max_seqlen": max(doc_lengths),
        }
        if self.return_flash_attn_kwargs:
            cu_seq_lens = _flat_segment_bounds(position_ids)  # (N + 1,) int32; documents are the longest segments
            out.update(cu_seq_lens_q=cu_seq_lens, cu_seq_lens_k=cu_seq_lens)
            out.update(max_length_q=out["max_seqlen"], max_length_k=out["max_seqlen"])
        return out

    def _packed_rows(self, rows: Sequence[Row]) -> list[list[Tensor]]:
        sequences = self._sequences(rows)
        prepacked = [isinstance(row, Mapping) and "document_lengths" in row for row in rows]
        if all(prepacked):
            return [
                self._split_prepacked(ids, row["document_lengths"], i)
                for i, (ids, row) in enumerate(zip(sequences, rows))
            ]  # type: ignore[index]
        if any(prepacked):
            raise ValueError(
                "rows mix pre-packed rows (with 'document_lengths') and plain documents; use one kind per batch"
            )
        documents = [chunk for i, ids in enumerate(sequences) for chunk in self._fit(ids, i)]
        return [[documents[i] for i in row] for row in first_fit_pack([len(d) for d in documents], self.max_length)]

    def _split_prepacked(self, ids: Tensor, document_lengths: Sequence[int], index: int) -> list[Tensor]:
        sizes = [int(n) for n in document_lengths]
        if sum(sizes) != len(ids) or len(ids) > self.max_length or min(sizes) < 1:
            raise ValueError(
                f"row {index}: document_lengths {sizes[:8]} must be positive and sum to its {len(ids)} tokens, "
                f"at most max_length={self.max_length}"
            )
        return list(ids.split(sizes))

    def _fit(self, ids: Tensor, index: int) -> list[Tensor]:
        if len(ids) <= self.max_length:
            return [ids]
        if self.overflow == "error":
            raise ValueError(
                f"row {index} has {len(ids)} tokens, more than max_length={self.max_length}; raise max_length or "
                f"pass overflow='split' (chunks of max_length) or 'truncate'"
            )
        if self.overflow == "truncate":
            return [ids[: self.max_length]]
        return list(ids.split(self.max_length))
