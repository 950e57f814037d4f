"""Tokenising a range of a text store, in this process or in a worker process of its own.

This module imports only numpy, pyarrow and tokenizers (never torch or mhaplug), so a worker process started as
``python -c "..." encode.py spec.json`` (:func:`mhaplug.data.corpus.tokenise`) is ready in a fraction of a second.
It reads its record batches of the text store (an Arrow IPC file, :mod:`mhaplug.data.corpus`) one at a time with
plain reads (not a memory map, so the pages it reads do not stay in its memory), encodes each with
``Tokenizer.encode_batch``, appends EOS to every document (and to each part of the split's cut document), splits
documents longer than ``max_length`` into ``max_length`` chunks, and writes the train and validation rows to two
Arrow stream files (``input_ids`` list<int32>, ``length`` int32), the format ``datasets.Dataset.from_file`` maps.
"""

from __future__ import annotations

import itertools
import json
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
from tokenizers import Tokenizer

TOKENS_SCHEMA = pa.schema([("input_ids", pa.list_(pa.int32())), ("length", pa.int32())])


def chunk_rows(ids: list[list[int]], eos: int, max_length: int) -> pa.RecordBatch:
    """Documents' token ids -> rows: EOS appended to each, then cut into ``max_length`` chunks (in order)."""
    lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids)) + 1  # (D,) tokens with EOS
    flat = np.empty(int(lengths.sum()), dtype=np.int32)
    ends = np.cumsum(lengths)
    flat[ends - 1] = eos
    mask = np.ones(len(flat), dtype=bool)
    mask[ends - 1] = False
    flat[mask] = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int32, count=len(flat) - len(ids))
    chunks = -(-lengths // max_length)  # (D,) rows of each document
    first = np.repeat(np.cumsum(chunks) - chunks, chunks)  # (R,) index of each row's document's first row
    within = np.arange(int(chunks.sum())) - first  # (R,) the row's place in its document
    row_lengths = np.minimum(max_length, np.repeat(lengths, chunks) - within * max_length).astype(np.int32)
    offsets = np.zeros(len(row_lengths) + 1, dtype=np.int32)
    np.cumsum(row_lengths, out=offsets[1:])
    rows = pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat))
    return pa.RecordBatch.from_arrays([rows, pa.array(row_lengths)], schema=TOKENS_SCHEMA)


def split_texts(texts: list[str], is_val: np.ndarray, cut: tuple[int, int] | None) -> tuple[list[str], list[str]]:
    """``texts`` -> (training texts, validation texts), each in order; ``cut``: ``(index, character offset)`` of a
    text whose start trains and whose end validates."""
    train: list[str] = []
    val: list[str] = []
    for index, (text, v) in enumerate(zip(texts, is_val.tolist())):
        if cut is not None and index == cut[0]:
            train.append(text[: cut[1]])
            val.append(text[cut[1] :])
        else:
            (val if v else train).append(text)
    return train, val


def encode_range(spec: dict) -> dict[str, int]:
    """Encode record batches ``spec["batches"]`` (start, stop) of the text store ``spec["texts"]``. ``spec["is_val"]``:
    a ``.npy`` of one bool per document of the store (True: validation); ``spec["first_document"]``: the store's
    index of the range's first document; ``spec["cut"]``: ``[document, character offset]`` of a document whose start
    trains and whose end validates, or None. Writes ``spec["train"]`` and ``spec["val"]``; returns rows per split."""
    tokenizer = Tokenizer.from_str(Path(spec["tokenizer"]).read_text(encoding="utf-8"))
    is_val = np.load(spec["is_val"], mmap_mode="r")
    eos, max_length = int(spec["eos"]), int(spec["max_length"])
    rows = {"train": 0, "val": 0}
    start, stop = spec["batches"]
    document, cut = int(spec["first_document"]), spec.get("cut")
    with (
        pa.OSFile(spec["texts"], "rb") as source,
        pa.OSFile(spec["train"], "wb") as train_sink,
        pa.OSFile(spec["val"], "wb") as val_sink,
        pa.ipc.new_stream(train_sink, TOKENS_SCHEMA) as train_writer,
        pa.ipc.new_stream(val_sink, TOKENS_SCHEMA) as val_writer,
    ):
        reader = pa.ipc.open_file(source)
        writers = {"train": train_writer, "val": val_writer}
        for index in range(start, stop):
            texts = reader.get_batch(index).column(0).to_pylist()
            val = np.asarray(is_val[document : document + len(texts)])
            first, document = document, document + len(texts)
            local = None if cut is None or not 0 <= cut[0] - first < len(texts) else (cut[0] - first, cut[1])
            for name, chosen in zip(("train", "val"), split_texts(texts, val, local)):
                if chosen:
                    batch = chunk_rows([e.ids for e in tokenizer.encode_batch(chosen)], eos, max_length)
                    writers[name].write_batch(batch)
                    rows[name] += batch.num_rows
    return rows


if __name__ == "__main__":  # a worker process: python -c "..." encode.py spec.json
    encode_range(json.loads(Path(sys.argv[1]).read_text(encoding="utf-8")))
