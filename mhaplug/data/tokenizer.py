"""The byte-level BPE tokenizer (``<|pad|>`` = 0, ``<|endoftext|>`` = 1) and the check a tokenised split passes
before it is used."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pyarrow as pa
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from mhaplug.common import EOS_TOKEN, PAD_TOKEN

__all__ = ["check_tokenised", "train_tokenizer"]


def train_tokenizer(texts: Iterable[str], *, vocab_size: int) -> Tokenizer:
    """A byte-level BPE (any text encodes, no unknown token) with ``<|pad|>`` = 0 and ``<|endoftext|>`` = 1."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD_TOKEN, EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def check_tokenised(path: Path, *, documents: int, vocab_size: int, max_length: int, eos: int) -> int:
    """What every tokenised split file holds, checked a record batch at a time (plain reads: memory stays flat
    whatever the file's size); raises ValueError if it does not hold it, and returns its rows."""
    rows = ends_with_eos = 0
    with pa.OSFile(str(path), "rb") as source:
        reader = pa.ipc.open_stream(source)
        if reader.schema.names != ["input_ids", "length"]:
            raise ValueError(f"columns are {reader.schema.names}, expected ['input_ids', 'length']")
        for batch in reader:
            batch.validate(full=True)  # offsets and buffers in bounds (ArrowInvalid if not), before anything reads them
            input_ids = batch.column(0)
            ids = input_ids.flatten().to_numpy(zero_copy_only=False)  # (tokens,)
            lengths = np.diff(input_ids.offsets.to_numpy())  # (rows,) tokens of each row
            if not np.array_equal(lengths, batch.column(1).to_numpy(zero_copy_only=False)):
                raise ValueError("the length column does not match the rows' token counts")
            if len(lengths) and (lengths.min() < 1 or lengths.max() > max_length):
                raise ValueError(
                    f"rows of {lengths.min()} to {lengths.max()} tokens, expected 1 to max_length={max_length}"
                )
            if len(ids) and (ids.min() < 0 or ids.max() >= vocab_size):
                raise ValueError(f"token ids from {ids.min()} to {ids.max()}, expected 0 to {vocab_size - 1}")
            ends_with_eos += int((ids[np.cumsum(lengths) - 1] == eos).sum()) if len(lengths) else 0
            rows += len(lengths)
    if ends_with_eos < documents:  # a document's last row ends with EOS: fewer means rows are missing (truncated)
        raise ValueError(f"{ends_with_eos} rows end a document, expected {documents} documents")
    return rows
