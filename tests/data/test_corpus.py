"""The corpus on disk (mhaplug.data.corpus): text store, split, tokenizer sample, tokenising in worker processes,
each compared with a plain Python reference."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from mhaplug.data import corpus
from mhaplug.data.datamodule import TextDataModule
from mhaplug.data.encode import chunk_rows
from mhaplug.data.sources import synthetic_texts
from mhaplug.data.tokenizer import check_tokenised, train_tokenizer


def store_of(tmp_path: Path, documents: list[str | None], **kwargs: object) -> corpus.TextStore:
    path = tmp_path / "texts.arrow"
    return corpus.TextStore(path, corpus.write_texts(documents, path, **kwargs))  # type: ignore[arg-type]


def all_texts(store: corpus.TextStore) -> list[str]:
    return [text for _, batch in store.batches() for text in batch.to_pylist()]


def test_the_text_store_keeps_the_non_empty_documents_in_order_a_bounded_batch_at_a_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(corpus, "TEXT_BATCH_DOCUMENTS", 3)
    monkeypatch.setattr(corpus, "TEXT_BATCH_BYTES", 10)
    documents = ["one", None, "  ", "two", "three", "a long document", "x", "\u00e9t\u00e9", "", "last"]
    store = store_of(tmp_path, documents)
    kept = [d for d in documents if d and d.strip()]
    assert all_texts(store) == kept
    # a batch ends after 3 documents, or after the document that reaches 10 bytes
    assert store.index == {
        "documents": 7,
        "empty_documents_dropped": 3,
        "text_bytes": sum(len(d.encode()) for d in kept),
        "batch_rows": [3, 1, 3],
    }
    assert store.byte_lengths().tolist() == [len(d.encode()) for d in kept]
    assert all_texts(store_of(tmp_path, documents, max_documents=4)) == kept[:4]


def test_a_text_store_whose_index_does_not_match_is_refused(tmp_path: Path) -> None:
    store = store_of(tmp_path, ["a", "b"])
    with pytest.raises(ValueError, match=r"holds 1 batches of .*, its index 2 batches"):
        corpus.TextStore(store.path, {**store.index, "batch_rows": [1, 1]})


@pytest.mark.parametrize(
    ("sizes", "fraction", "whole", "cut"),
    [
        # whole documents, as many as bring validation nearest val_fraction of the bytes (at most N - 1)
        ([100] * 20, 0.1, 2, None),
        ([100] * 21, 0.1, 2, None),  # 2.1 documents' worth: 2 (the document count rule drew ceil(2.1) = 3)
        ([100] * 10, 0.99, 9, None),
        ([100] * 19 + [10_000], 0.05, 6, None),  # 595 bytes asked: 6 small ones; the large one is too big to go whole
        # whole documents cannot make half the share: the end of the largest training document validates
        ([5_000_000, 6], 0.05, 1, (0, 249_994)),
        ([1_000_000], 0.05, 0, (0, 50_000)),
        ([1000, 1000], 0.05, 0, (0, 100)),
        ([16, 8, 56], 0.05, 1, None),  # 4 bytes asked: a whole 8-byte document (at most twice that), none cut
        ([1, 1], 0.05, 1, None),  # one-byte documents cannot be cut: one validates whole
    ],
)
def test_the_split_gives_validation_its_share_of_the_bytes_cutting_a_document_only_when_it_must(
    sizes: list[int], fraction: float, whole: int, cut: tuple[int, int] | None
) -> None:
    is_val, got_cut = corpus.split_mask(np.asarray(sizes), fraction, seed=0)
    assert is_val.dtype == bool and is_val.shape == (len(sizes),)
    assert (int(is_val.sum()), got_cut) == (whole, cut)
    again, _ = corpus.split_mask(np.asarray(sizes), fraction, seed=0)
    assert np.array_equal(is_val, again)  # seeded
    if cut is not None:
        assert not is_val[cut[0]]  # the cut document's start trains
    many = np.full(1000, 10)
    assert not np.array_equal(corpus.split_mask(many, 0.5, seed=0)[0], corpus.split_mask(many, 0.5, seed=1)[0])


def test_the_split_of_varied_documents_is_fair_by_bytes() -> None:
    sizes = (1.15 ** np.arange(60) * 100).astype(np.int64)  # 100 B to 380 KB: the largest holds 13% of the text
    is_val, cut = corpus.split_mask(sizes, 0.05, seed=0)
    assert cut is None and int(is_val.sum()) == 30
    assert round(sizes[is_val].sum() / sizes.sum(), 4) == 0.05  # 5% asked (drawing 3 documents by count gave 0.1-24%)


@pytest.mark.parametrize(
    ("text", "val_bytes", "offset"),
    [
        ("one two three four", 4, 13),  # the last 4 bytes begin at "four"; cut before its space
        ("one two three four", 6, 7),  # "ee four": back to the space before "three", no word cut
        ("abcdefgh", 3, 5),  # no white space: exactly there
        ("\u00e9\u00e9\u00e9\u00e9", 3, 3),  # 2-byte characters: byte 5 is inside the third, the cut after it
        ("ab", 5, 1),  # at least one character on each side
    ],
)
def test_a_cut_lands_on_a_character_boundary_before_white_space(text: str, val_bytes: int, offset: int) -> None:
    assert corpus.cut_offset(text, val_bytes) == offset
    assert text[:offset] + text[offset:] == text and text[:offset] and text[offset:]


def test_the_tokenizer_sample_and_the_rows_take_only_the_start_of_a_cut_document(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(corpus, "TEXT_BATCH_DOCUMENTS", 2)  # the cut document in the middle of a record batch
    monkeypatch.setattr(corpus, "BYTES_PER_PROCESS", 1)
    documents = ["alpha beta", "gamma delta epsilon zeta eta theta", "iota", "kappa lambda"]
    store = store_of(tmp_path, documents)
    is_val, cut = np.array([False, False, True, False]), (1, 18)  # "gamma delta epsilo" | "n zeta eta theta"
    texts, drawn = corpus.tokenizer_sample(store, is_val, max_bytes=10**6, seed=0, cut=cut)
    assert list(texts) == ["alpha beta", "gamma delta epsilo", "kappa lambda"]
    assert drawn == {"documents": 3, "bytes": 10 + 18 + 12}
    tokenizer = train_tokenizer(documents, vocab_size=300)
    expected = {
        "train": reference_rows(tokenizer, ["alpha beta", "gamma delta epsilo", "kappa lambda"], 4),
        "val": reference_rows(tokenizer, ["n zeta eta theta", "iota"], 4),
    }
    for processes in (1, 2):
        paths = {name: tmp_path / f"{name}-{processes}.arrow" for name in ("train", "val")}
        corpus.tokenise(
            store,
            is_val,
            tokenizer,
            max_length=4,
            eos=1,
            num_proc=processes,
            train_path=paths["train"],
            val_path=paths["val"],
            cut=cut,
        )
        for name, path in paths.items():
            with pa.OSFile(str(path), "rb") as source:
                assert pa.ipc.open_stream(source).read_all().column("input_ids").to_pylist() == expected[name]


def test_a_tiny_split_is_named_with_its_tokens_and_what_is_wrong() -> None:
    settings = {"val_fraction": 0.05, "batch_size": 16, "max_length": 64}
    assert corpus.split_warning(95_000, 5_000, **settings) is None
    assert corpus.split_warning(6, 4_917_788, **settings) == (
        "tiny data split: 6 training tokens (0.0%), 4,917,788 validation tokens (100.0%): training is less than one "
        "batch (data.batch_size * data.max_length = 1024); far from the 95%/5% that data.val_fraction=0.05 asks. "
        "Give it more text"
    )
    assert corpus.split_warning(99_990, 10, **settings) == (
        "tiny data split: 99,990 training tokens (100.0%), 10 validation tokens (0.0%): validation is less than one "
        "row (data.max_length = 64); far from the 95%/5% that data.val_fraction=0.05 asks. Give it more text"
    )


def test_the_tokenizer_sample_is_seeded_bounded_and_from_the_training_split_only(tmp_path: Path) -> None:
    documents = [f"document {i} " + "word " * (i % 7) for i in range(200)]
    store = store_of(tmp_path, documents)
    is_val, _ = corpus.split_mask(np.full(200, 10), 0.25, seed=0)
    texts, drawn = corpus.tokenizer_sample(store, is_val, max_bytes=1000, seed=0)
    sample = list(texts)
    training = {d for d, v in zip(documents, is_val) if not v}
    assert set(sample) <= training and len(sample) == drawn["documents"] == len(set(sample))
    assert drawn["bytes"] == sum(len(d.encode()) for d in sample) <= 1000
    assert drawn["bytes"] + max(len(d.encode()) for d in documents) > 1000  # nearly the whole budget
    assert sample == sorted(sample, key=documents.index)  # read in store order
    assert list(corpus.tokenizer_sample(store, is_val, max_bytes=1000, seed=0)[0]) == sample
    assert list(corpus.tokenizer_sample(store, is_val, max_bytes=1000, seed=1)[0]) != sample
    everything, _ = corpus.tokenizer_sample(store, is_val, max_bytes=10**9, seed=0)
    assert sorted(everything) == sorted(training)  # a budget over the split: all of it


def reference_rows(tokenizer: object, texts: list[str], max_length: int) -> list[list[int]]:
    """Each document's ids + EOS (1), cut into max_length chunks: the tokenising written plainly."""
    rows = []
    for text in texts:
        ids = tokenizer.encode(text).ids + [1]  # type: ignore[attr-defined]
        rows += [ids[i : i + max_length] for i in range(0, len(ids), max_length)]
    return rows


def test_chunk_rows_matches_the_plain_reference() -> None:
    ids = [[5, 6, 7], [], [8] * 9, [9] * 3]
    batch = chunk_rows(ids, eos=1, max_length=4)
    expected = [[5, 6, 7, 1], [1], [8, 8, 8, 8], [8, 8, 8, 8], [8, 1], [9, 9, 9, 1]]
    assert batch.column(0).to_pylist() == expected
    assert batch.column(1).to_pylist() == [len(r) for r in expected]


@pytest.mark.parametrize("processes", [1, 3])
def test_tokenising_in_worker_processes_gives_the_rows_of_the_plain_reference(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, processes: int
) -> None:
    monkeypatch.setattr(corpus, "TEXT_BATCH_DOCUMENTS", 25)  # 8 record batches
    monkeypatch.setattr(corpus, "BYTES_PER_PROCESS", 1)  # a process per range even for this small corpus
    documents = synthetic_texts(200, max_words=40, seed=3)
    store = store_of(tmp_path, documents)
    is_val, _ = corpus.split_mask(np.full(200, 10), 0.1, seed=0)
    tokenizer = train_tokenizer(documents, vocab_size=300)
    paths = {name: tmp_path / f"{name}.arrow" for name in ("train", "val")}
    with caplog.at_level(logging.INFO, logger="mhaplug.data.corpus"):
        corpus.tokenise(
            store,
            is_val,
            tokenizer,
            max_length=16,
            eos=1,
            num_proc=processes,
            train_path=paths["train"],
            val_path=paths["val"],
        )
    assert f"with {processes} process" in caplog.text
    for name, keep in (("train", ~is_val), ("val", is_val)):
        texts = [d for d, k in zip(documents, keep) if k]
        rows = check_tokenised(paths[name], documents=len(texts), vocab_size=300, max_length=16, eos=1)
        with pa.OSFile(str(paths[name]), "rb") as source:
            table = pa.ipc.open_stream(source).read_all()
        assert table.column("input_ids").to_pylist() == reference_rows(tokenizer, texts, 16)
        assert rows == table.num_rows
    assert sorted(p.name for p in tmp_path.iterdir()) == ["texts.arrow", "train.arrow", "val.arrow"]  # no work left


def test_a_failing_worker_process_is_reported_with_its_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(corpus, "TEXT_BATCH_DOCUMENTS", 10)
    monkeypatch.setattr(corpus, "BYTES_PER_PROCESS", 1)
    store = store_of(tmp_path, [f"text {i}" for i in range(40)])
    store.path.write_bytes(store.path.read_bytes()[:100])  # the workers find a broken store
    with pytest.raises(RuntimeError, match=r"a tokenising worker process failed \(2 of 2\): .*Arrow"):
        corpus.tokenise(
            store,
            np.zeros(40, dtype=bool),
            train_tokenizer(["text"], vocab_size=300),
            max_length=8,
            eos=1,
            num_proc=2,
            train_path=tmp_path / "train.arrow",
            val_path=tmp_path / "val.arrow",
        )
    assert not (tmp_path / "train.arrow").exists() and not (tmp_path / "val.arrow").exists()


def test_the_datamodule_gives_the_same_splits_whatever_num_proc(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(corpus, "TEXT_BATCH_DOCUMENTS", 40)
    monkeypatch.setattr(corpus, "BYTES_PER_PROCESS", 1)
    settings = {"source": "synthetic", "vocab_size": 300, "max_length": 32, "synthetic_documents": 300}
    splits = []
    for num_proc in (1, 2):
        module = TextDataModule(**settings, num_proc=num_proc, cache_dir=str(tmp_path / f"cache{num_proc}"))
        module.setup("fit")
        splits.append({name: module.splits[name]["input_ids"] for name in ("train", "val")})
    assert splits[0] == splits[1]


def test_validation_is_capped_at_val_max_tokens_by_a_seeded_draw(tmp_path: Path) -> None:
    settings = {"source": "synthetic", "vocab_size": 300, "max_length": 32, "synthetic_documents": 400}
    settings["val_fraction"] = 0.25
    full = TextDataModule(**settings, val_max_tokens=None, cache_dir=str(tmp_path))
    full.setup("fit")
    capped = TextDataModule(**settings, val_max_tokens=300, cache_dir=str(tmp_path))
    capped.setup("fit")
    held_out = full.splits["val"]["input_ids"]
    kept = capped.splits["val"]["input_ids"]
    assert capped.stats["val_tokens_held_out"] == full.stats["val_tokens"] == sum(map(len, held_out)) > 300
    assert capped.stats["val_tokens"] == sum(map(len, kept)) <= 300 < capped.stats["val_tokens"] + 32
    assert capped.stats["val_rows"] == len(kept)
    positions = [held_out.index(row) for row in kept]
    assert positions == sorted(positions) and positions != list(range(len(kept)))  # a draw, in order, not the head
    batches = list(capped.val_dataloader())
    assert sum(int(b["lengths"].sum()) for b in batches) == capped.stats["val_tokens"]
    with pytest.raises(ValueError, match=r"val_max_tokens must be an int >= 1"):
        TextDataModule(**settings, val_max_tokens=0)


def test_a_text_files_store_is_named_by_each_files_path_size_and_time(tmp_path: Path) -> None:
    path = tmp_path / "corpus.jsonl"
    path.write_text("\n".join(json.dumps({"text": f"row {i} here"}) for i in range(20)))
    settings = {"source": "text_files", "path": str(path), "vocab_size": 300, "cache_dir": str(tmp_path / "c")}
    TextDataModule(**settings).setup("fit")
    path.write_text("\n".join(json.dumps({"text": f"changed row {i}"}) for i in range(30)))
    module = TextDataModule(**settings)
    module.setup("fit")
    assert module.stats["documents"] == 30
    assert len(list((tmp_path / "c" / "texts").glob("*.arrow"))) == 2
