"""Streaming (mhaplug.data.streaming, TextDataModule(streaming=True)): best-fit decreasing against a plain reference,
every document once per epoch over ranks and workers, and loader states that resume exactly or are refused."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from mhaplug.data import TextDataModule
from mhaplug.data.streaming import StreamingLoader, best_fit_decreasing, packing_efficiency


def best_fit_reference(lengths: list[int], max_length: int) -> list[list[int]]:
    """Best-fit decreasing written plainly: each document, longest first (ties in input order), into the row with the
    least free room that fits it (the earliest such row on a tie), scanning all rows."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        fits = [r for r in range(len(rows)) if room[r] >= lengths[i]]
        if fits:
            best = min(fits, key=lambda r: (room[r], r))
            rows[best].append(i)
            room[best] -= lengths[i]
        else:
            rows.append([i])
            room.append(max_length - lengths[i])
    return rows


@pytest.mark.parametrize("seed", range(20))
def test_best_fit_decreasing_matches_the_plain_reference(seed: int) -> None:
    rng = np.random.default_rng(seed)
    max_length = int(rng.integers(8, 64))
    lengths = rng.integers(1, max_length + 1, int(rng.integers(1, 200))).tolist()
    rows = best_fit_decreasing(lengths, max_length)
    assert rows == best_fit_reference(lengths, max_length)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= max_length for row in rows)


def test_best_fit_decreasing_refuses_a_document_longer_than_a_row() -> None:
    with pytest.raises(ValueError, match="document 1 has 9 tokens, more than max_length=8"):
        best_fit_decreasing([3, 9], 8)
    assert packing_efficiency(np.array([8, 6]), 8) == 14 / 16


def stream_module(tmp_path: Path, **settings: object) -> TextDataModule:
    base = {"source": "synthetic", "synthetic_documents": 600, "vocab_size": 300, "max_length": 32, "batch_size": 4}
    base.update(streaming=True, stream_buffer=40, val_max_tokens=300, cache_dir=str(tmp_path / "cache"))
    module = TextDataModule(**{**base, **settings})  # type: ignore[arg-type]
    module.setup("fit")
    return module


def test_every_training_document_is_read_once_per_epoch_over_ranks_and_workers(tmp_path: Path) -> None:
    """Two ranks x two workers = four units: the windows of one pass, together, are the stream after the held-out
    documents, each document in exactly one unit."""
    module = stream_module(tmp_path)
    stream = module._stream_loader().dataset
    held_out = module.stats["val_documents"]
    texts = [t for t in module._documents(streaming=True)() if t and t.strip()]
    seen = [text for unit in range(4) for _, window in stream.windows(unit, 4) for text in window]
    assert sorted(seen) == sorted(texts[held_out:]) and len(seen) == len(texts) - held_out
    assert module.tokenizer is not None
    head = [len(module.tokenizer.encode(t).ids) + 1 for t in texts[:held_out]]  # tokens of each held-out document
    assert sum(head[:-1]) < 300 <= sum(head) == module.stats["val_tokens"]  # up to the cap, whole documents
    assert module.stats["val_rows"] == len(module.splits["val"]) and module.stats["streaming"] is True


def test_streamed_rows_hold_every_token_of_their_window_once(tmp_path: Path) -> None:
    module = stream_module(tmp_path)
    stream = module._stream_loader().dataset
    assert module.tokenizer is not None
    window, texts = next(stream.windows(0, 1))
    rows = stream.rows(module.tokenizer, texts, 0, window)
    expected = sorted(
        tuple(ids[i : i + 32])
        for ids in (module.tokenizer.encode(t).ids + [1] for t in texts)
        for i in range(0, len(ids), 32)
    )
    chunks = []
    for row in rows:
        starts = np.cumsum([0, *row["document_lengths"]])
        chunks += [tuple(row["input_ids"][a:b].tolist()) for a, b in itertools.pairwise(starts)]
        assert len(row["input_ids"]) <= 32
    assert sorted(chunks) == expected
    assert stream.rows(module.tokenizer, texts, 0, window)[0]["input_ids"].tolist() == rows[0]["input_ids"].tolist()
    other_epoch = stream.rows(module.tokenizer, texts, 1, window)
    assert [r["input_ids"].tolist() for r in other_epoch] != [r["input_ids"].tolist() for r in rows]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_loader_state_resumes_the_exact_batches(tmp_path: Path, num_workers: int) -> None:
    """Take 13 batches, save the state (as JSON, as a checkpoint would hold it), take 8 more; a new loader from the
    state gives those 8, for any number of workers (13 is odd: the resumed loader starts with the second worker)."""
    loader = stream_module(tmp_path, num_workers=num_workers).train_dataloader()
    batches = iter(loader)
    for _ in range(13):
        next(batches)
    state = json.loads(json.dumps(loader.state_dict()))
    expected = [next(batches)["input_ids"] for _ in range(8)]
    del batches
    resumed = stream_module(tmp_path, num_workers=num_workers).train_dataloader()
    resumed.load_state_dict(state)
    got = [b["input_ids"] for b in itertools.islice(resumed, 8)]
    assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))
    assert state["num_workers"] == max(1, num_workers) and state["world_size"] == 1
    assert state["ranks"][0]["turn"] == (13 % max(1, num_workers))


def test_a_state_of_other_settings_is_refused_naming_them(tmp_path: Path) -> None:
    loader = stream_module(tmp_path).train_dataloader()
    next(iter(loader))
    state = loader.state_dict()
    other = stream_module(tmp_path, num_workers=2, batch_size=8).train_dataloader()
    with pytest.raises(
        ValueError,
        match=(
            r"the stream's state was saved with other data or settings: batch_size=4 in the state, 8 here; "
            r"num_workers=1 in the state, 2 here\. Resume with the same data, data.num_workers"
        ),
    ):
        other.load_state_dict(state)


def test_a_stream_too_short_for_its_units_or_its_validation_is_named(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"the stream holds only \d+ documents \(\d+ tokens\), all held out"):
        stream_module(tmp_path, synthetic_documents=5, val_max_tokens=10_000)
    loader = stream_module(tmp_path, stream_buffer=10_000, num_workers=2).train_dataloader()  # one window, two units
    with pytest.raises(ValueError, match=r"the stream has no training window for unit 1 of 2 \(rank 0, worker 1\)"):
        list(itertools.islice(loader, 2))  # the second batch is worker 1's: worker 0 has the only window


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (
            {"batching": "token_budget", "max_tokens": 4096},
            r"streaming=True makes batches of batch_size rows .* use batching=random",
        ),
        ({"val_max_tokens": None}, r"streaming=True validates on the first val_max_tokens tokens"),
    ],
)
def test_streaming_refuses_settings_it_cannot_honour(settings: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TextDataModule(source="synthetic", streaming=True, **settings)


def test_streamed_text_files_train_without_a_text_store(tmp_path: Path) -> None:
    """data=text_files streamed: nothing but the tokenizer is written to the cache."""
    path = tmp_path / "corpus.jsonl"
    path.write_text("\n".join(json.dumps({"text": f"document {i} " + "word " * (i % 50)}) for i in range(400)))
    module = TextDataModule(
        source="text_files",
        path=str(path),
        streaming=True,
        stream_buffer=50,
        val_max_tokens=200,
        vocab_size=300,
        max_length=32,
        cache_dir=str(tmp_path / "cache"),
    )
    module.setup("fit")
    batch = next(iter(module.train_dataloader()))
    assert batch["input_ids"].shape[0] == 16 and int(batch["lengths"].sum()) > 0.9 * batch["input_ids"].numel()
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["tokenizers"]
    assert isinstance(module._train_loader, StreamingLoader)
