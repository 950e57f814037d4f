"""An offline-first LightningDataModule: text -> byte-level BPE tokens -> padded or packed batches, at any scale.

Pipeline (:mod:`mhaplug.data.corpus`; each step streams, so time is linear in the corpus and memory flat): text from
a source (:mod:`mhaplug.data.sources`: the standard library's docstrings, synthetic sentences, local files, the hub)
written once to an Arrow text store in mhaplug's cache, empty documents dropped (and counted in the log); a seeded
train/validation split, fair by bytes (whole documents; only where a few documents hold the text, the end of the
largest validates and its start trains: :func:`mhaplug.data.corpus.split_mask`), with a warning when a side is
tiny; a byte-level BPE tokenizer trained with ``tokenizers`` on a bounded, seeded
sample of the training split (``tokenizer_sample_mb``), or loaded from ``tokenizer_path``; tokenisation in
``num_proc`` worker processes, an EOS after each document, documents longer than ``max_length`` split into
``max_length`` chunks (so no batch ever truncates); all cached on disk (:mod:`mhaplug.data.cache`) by a key of the
data and the settings. Validation is capped at ``val_max_tokens``. Batches come from :mod:`mhaplug.data.sampling`
and :mod:`mhaplug.data.collate`; the train loader resumes mid-epoch exactly, for any ``num_workers``.

``streaming=True`` prepares nothing but the tokenizer: :mod:`mhaplug.data.streaming` packs the stream on the fly in
the loader workers, and resumes exactly for any ``num_workers`` and number of ranks.
"""

from __future__ import annotations

import itertools
import json
import logging
import sys
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pytorch_lightning as pl
from tokenizers import Tokenizer
from torch.utils.data import DataLoader, Dataset

from mhaplug.attention.unpad import add_token_index
from mhaplug.common import (
    EOS_TOKEN,
    PAD_TOKEN,
    SEED_MAX,
    Batching,
    DataError,
    Layout,
    PaddingSide,
    Source,
    atomic_path,
    check_choice,
    check_int,
    round_up,
)
from mhaplug.data import sampling
from mhaplug.data.cache import cache_key, cached, default_cache_dir, read_entry
from mhaplug.data.collate import PackCollator, PadCollator
from mhaplug.data.corpus import (
    SPLIT_VERSION,
    TextStore,
    default_num_proc,
    split_store,
    split_warning,
    tokenise,
    tokenizer_sample,
    write_texts,
)
from mhaplug.data.packing import first_fit_pack
from mhaplug.data.sources import Documents, data_files, load_hf
from mhaplug.data.streaming import STATE_KEY, StreamingLoader, TokenStream, tokenise_documents
from mhaplug.data.tokenizer import check_tokenised, train_tokenizer

__all__ = ["TextDataModule"]

logger = logging.getLogger(__name__)


class _PackedRows(Dataset):
    """Rows of whole documents packed offline; each item carries its ``document_lengths`` for PackCollator.

    ``documents[order[offsets[r]:offsets[r + 1]]]`` are row r's documents: two numpy arrays, never a list per row."""

    def __init__(self, documents: datasets.Dataset, order: np.ndarray, offsets: np.ndarray) -> None:
        self.documents, self.order, self.offsets = documents, order, offsets

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        docs = self.documents[self.order[self.offsets[index] : self.offsets[index + 1]].tolist()]["input_ids"]
        return {"input_ids": [t for d in docs for t in d], "document_lengths": [len(d) for d in docs]}


class TextDataModule(pl.LightningDataModule):
    """Text to batches, offline first. Every argument is a plain value, so Hydra configs map onto it 1:1.

    Args:
        source: one of :class:`mhaplug.common.Source`. path / name / split / text_column: where the text is
            (``text_files`` and ``hf``). tokenizer_path: a ``tokenizer.json`` to load instead of training one.
        vocab_size: BPE vocabulary when training a tokenizer. max_length: longest row in tokens.
        layout: ``packed`` (several whole documents per row: the fastest, and no padding to speak of) or ``padded``
            (a document per row).
        padding_side, batching, batch_size, max_tokens, pad_to_multiple_of: see :mod:`mhaplug.data.collate` and
            :mod:`mhaplug.data.sampling` (``max_tokens`` is the padded-token budget of ``token_budget`` batching).
        val_fraction, seed: deterministic split, and the seed of shuffling and packing.
        cache_dir: tokenizers and tokenised data (default ``$MHAPLUG_CACHE`` or ``~/.cache/mhaplug``).
        max_documents: keep only the first N documents (after dropping empty ones).
        num_proc: processes that tokenise (default: every core this process may use; a small corpus stays in this
            process). tokenizer_sample_mb: MB of training text the tokenizer learns from, a seeded sample.
        val_max_tokens: tokens each validation reads, a seeded draw from the held-out split (None: all of it);
            streamed, the first documents of the stream up to it are held out.
        streaming: train on the stream without preparing it (:mod:`mhaplug.data.streaming`); ``batching`` must be
            ``random``. stream_buffer: documents packed together (per window) when streaming.
    """

    def __init__(
        self,
        *,
        source: str = "stdlib_docs",
        path: str | list[str] | None = None,
        name: str | None = None,
        split: str = "train",
        text_column: str = "text",
        tokenizer_path: str | None = None,
        vocab_size: int = 4096,
        max_length: int = 256,
        layout: str = "packed",
        padding_side: str = "right",
        batching: str = "random",
        batch_size: int = 16,
        max_tokens: int | None = None,
        pad_to_multiple_of: int | None = None,
        val_fraction: float = 0.05,
        seed: int = 0,
        num_workers: int = 0,
        cache_dir: str | None = None,
        max_documents: int | None = None,
        synthetic_documents: int = 512,
        synthetic_max_words: int = 64,
        num_proc: int | None = None,
        tokenizer_sample_mb: int = 32,
        val_max_tokens: int | None = 262_144,
        streaming: bool = False,
        stream_buffer: int = 4096,
    ) -> None:
        super().__init__()
        # plain strs (a structured config hands Enum members): save_hyperparameters below records these locals
        source = check_choice("source", source, Source)
        layout = check_choice("layout", layout, Layout)
        padding_side = check_choice("padding_side", padding_side, PaddingSide)
        batching = check_choice("batching", batching, Batching)
        if source in ("text_files", "hf") and not path:
            raise ValueError(
                f"source={source!r} needs path= (a file, glob or list for text_files; "
                "a dataset name or directory for hf)"
            )
        check_int("max_length", max_length, minimum=2, meaning="tokens per row; a row of L tokens has L-1 targets")
        check_int("vocab_size", vocab_size)
        check_int("batch_size", batch_size)
        check_int("seed", seed, minimum=0)
        if seed > SEED_MAX:
            raise ValueError(f"seed must be in [0, {SEED_MAX}] (the seeds numpy takes), got {seed}")
        check_int("num_workers", num_workers, minimum=0, meaning="loader worker processes; 0 = this process")
        check_int("max_tokens", max_tokens, optional=True, meaning="padded tokens per batch, for token_budget")
        check_int("pad_to_multiple_of", pad_to_multiple_of, optional=True)
        check_int("max_documents", max_documents, minimum=2, optional=True, meaning="documents kept; null = all")
        check_int("synthetic_documents", synthetic_documents, minimum=2)
        check_int("synthetic_max_words", synthetic_max_words)
        if batching == "token_budget" and not max_tokens:
            raise ValueError(
                "batching='token_budget' needs max_tokens (padded tokens per batch), e.g. batch_size * max_length"
            )
        if batching == "token_budget" and max_tokens < (row := round_up(max_length, pad_to_multiple_of)):
            raise ValueError(
                f"max_tokens={max_tokens} cannot hold one row of max_length={max_length} tokens"
                + (f" (rounded up to {row})" if row != max_length else "")
                + f"; use max_tokens >= {row}, e.g. max_tokens={batch_size * row}"
            )
        if not isinstance(val_fraction, (int, float)) or not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
        check_int("num_proc", num_proc, optional=True, meaning="processes that tokenise; null = all cores")
        check_int("tokenizer_sample_mb", tokenizer_sample_mb, meaning="MB of text the tokenizer learns from")
        check_int("val_max_tokens", val_max_tokens, optional=True, meaning="tokens of each validation; null = all")
        check_int("stream_buffer", stream_buffer, meaning="documents packed together in a stream")
        if streaming and batching != "random":
            raise ValueError(
                f"streaming=True makes batches of batch_size rows from a shuffled buffer, got batching={batching!r}; "
                f"use batching=random (with layout=packed the rows are nearly full anyway), or streaming=false"
            )
        if streaming and val_max_tokens is None:
            raise ValueError(
                "streaming=True validates on the first val_max_tokens tokens of the stream, got val_max_tokens=None; "
                "give it a number (default 262144)"
            )
        self.save_hyperparameters()
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
        self.tokenizer: Tokenizer | None = None
        self.splits: dict[str, datasets.Dataset] = {}
        self.stats: dict[str, Any] = {}
        self._datasets: dict[str, tuple[Dataset | datasets.Dataset, np.ndarray]] = {}
        self._lengths: dict[str, np.ndarray] = {}  # per split: tokens of each row  # per split, built once
        self._legacy_sampler_state: dict[str, Any] | None = None
        self._train_loader: StreamingLoader | None = None  # streamed: told which batches were trained
        self._stream: dict[str, Any] = {}

    # -- data ---------------------------------------------------------------------------------------------

    def _documents(self, *, streaming: bool = False) -> Documents:
        hp = self.hparams
        settings = ("path", "name", "split", "text_column", "synthetic_documents", "synthetic_max_words", "seed")
        return Documents(hp.source, cache_dir=str(self.cache_dir), streaming=streaming, **{k: hp[k] for k in settings})

    def _source(self) -> tuple[list[Any], Documents]:
        """What names the source's text store (its cache key's parts) and its documents, in order."""
        hp = self.hparams
        documents = self._documents()
        if hp.source == "stdlib_docs":
            return [sys.version], documents
        if hp.source == "synthetic":
            return [hp.synthetic_documents, hp.synthetic_max_words, hp.seed], documents
        if hp.source == "text_files":
            files = data_files(hp.path)
            # a file is known by its path, size and modification time, as make and datasets know theirs
            parts = [[str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns] for f in files] + [hp.text_column]
            return parts, documents
        table = load_hf(hp.path, hp.name, hp.split)
        return [hp.path, hp.name, hp.split, hp.text_column, table._fingerprint], documents

    def _text_store(self) -> TextStore:
        """The source's non-empty documents (the first ``max_documents``) in mhaplug's cache, written once, a record
        batch at a time (:mod:`mhaplug.data.corpus`)."""
        hp = self.hparams
        parts, documents = self._source()
        path = self.cache_dir / "texts" / f"{hp.source}-{cache_key(hp.source, parts, hp.max_documents)}.arrow"

        def build(tmp_index: Path) -> None:
            with atomic_path(path) as tmp:
                index = write_texts(documents(), tmp, max_documents=hp.max_documents)
                tmp_index.write_text(json.dumps(index), encoding="utf-8")

        return cached(
            path.with_suffix(".json"),
            read=lambda p: TextStore(path, json.loads(p.read_text(encoding="utf-8"))),
            build=build,
        )

    def prepare_data(self) -> None:
        """Collect text, train or load the tokenizer, tokenise: all cached on disk, so a later call (another process,
        another run) reads the cache. Lightning calls it on one process per node; train.py calls it in every process,
        before the Trainer. With Lightning's own DDP launcher the first process builds the cache before it starts
        the others (from ``trainer.fit``); processes started together (torchrun, SLURM) may build an entry at the
        same time, which is safe: each writes a temporary file and renames it into place, so none reads part of one."""
        if not self.splits:
            self._build()

    def setup(self, stage: str | None = None) -> None:
        if not self.splits:
            self._build()

    def _build(self) -> None:
        # A tokenizer the user gave is read first: a bad data.tokenizer_path fails before the corpus is read.
        given = self._given_tokenizer() if self.hparams.tokenizer_path else None
        if self.hparams.streaming:
            self._build_stream(given)
            return
        hp = self.hparams
        store = self._text_store()
        count, dropped = store.num_documents, store.index["empty_documents_dropped"]
        self.stats = {"documents": count, "empty_documents_dropped": dropped}
        if dropped:
            logger.info("dropped %d empty documents of %d", dropped, count + dropped)
        if count < 1:
            raise DataError(
                f"source={hp.source!r}" + (f" (data.path={hp.path!r})" if hp.path else "") + " gave no non-empty "
                "documents; give it some text (one long document is enough: it is split in two)"
            )
        is_val, cut = self._split(store)
        data_key = cache_key(store.path.stem, hp.seed, hp.val_fraction, SPLIT_VERSION)
        self.tokenizer = given
        if self.tokenizer is None:
            self.tokenizer = self._tokenizer(
                lambda: tokenizer_sample(store, is_val, cut=cut, **self._sample_settings()), data_key
            )
        token_key = cache_key(data_key, self.tokenizer.to_str(), hp.max_length)
        self.splits = self._tokenise(store, is_val, cut, token_key)
        self._datasets = {}
        self.stats["train_tokens"] = int(self._lengths["train"].sum())
        self._cap_validation()
        self._check_split()

    def _split(self, store: TextStore) -> tuple[np.ndarray, tuple[int, int] | None]:
        """:func:`mhaplug.data.corpus.split_store`; a DataError when the text is too short to make two sides."""
        hp = self.hparams
        is_val, cut = split_store(store, hp.val_fraction, hp.seed)
        self.stats["documents_cut_by_split"] = int(cut is not None)
        if cut is None and not is_val.any():
            raise DataError(
                f"source={hp.source!r}" + (f" (data.path={hp.path!r})" if hp.path else "") + f" gave "
                f"{store.num_documents} document of {store.index['text_bytes']} bytes, too little to split into a "
                f"training and a validation part; give it more text"
            )
        return is_val, cut

    def _check_split(self) -> None:
        """Warn when a split is tiny (:func:`mhaplug.data.corpus.split_warning`); ``stats["split_warning"]`` (which
        the run summary carries) says so too."""
        hp = self.hparams
        train, val = self.stats["train_tokens"], self.stats["val_tokens_held_out"]
        message = split_warning(
            train, val, val_fraction=hp.val_fraction, batch_size=hp.batch_size, max_length=hp.max_length
        )
        if message is not None:
            self.stats["split_warning"] = message
            warnings.warn(message, UserWarning, stacklevel=3)

    def _build_stream(self, given: Tokenizer | None) -> None:
        """Streaming: the tokenizer from the head of the stream (the first ``tokenizer_sample_mb``), and the
        validation rows from its first documents, up to ``val_max_tokens`` tokens (held out of training)."""
        hp = self.hparams
        parts, _ = self._source() if hp.source in ("stdlib_docs", "synthetic", "text_files") else ([], None)
        documents = self._documents(streaming=True)
        key = cache_key("stream", hp.source, parts, hp.path, hp.name, hp.split, hp.text_column)

        def head() -> tuple[Iterator[str], dict[str, int]]:
            budget, drawn = self._sample_settings()["max_bytes"], {"documents": 0, "bytes": 0}

            def texts() -> Iterator[str]:
                for text in _non_empty(documents()):
                    drawn["documents"] += 1
                    drawn["bytes"] += len(text.encode("utf-8", "surrogatepass"))
                    yield text
                    if drawn["bytes"] >= budget:
                        return

            return texts(), drawn

        self.tokenizer = given if given is not None else self._tokenizer(head, key)
        rows, held_out, tokens = [], 0, 0
        stream = _non_empty(documents())
        while tokens < hp.val_max_tokens:
            texts = list(itertools.islice(stream, 64))
            if not texts:
                raise DataError(
                    f"the stream holds only {held_out} documents ({tokens} tokens), all held out for validation by "
                    f"val_max_tokens={hp.val_max_tokens}; lower val_max_tokens, or stream a larger corpus"
                )
            for text in texts:
                if tokens >= hp.val_max_tokens:
                    break
                chunks = tokenise_documents(self.tokenizer, [text], max_length=hp.max_length, eos=1)
                rows += [chunk.tolist() for chunk in chunks]
                held_out, tokens = held_out + 1, tokens + sum(len(c) for c in chunks)
        self._lengths = {"val": np.asarray([len(r) for r in rows], dtype=np.int64)}
        self.splits = {"val": datasets.Dataset.from_dict({"input_ids": rows, "length": self._lengths["val"].tolist()})}
        self._datasets = {}
        self._stream = {"documents": documents, "skip": held_out, "key": key}
        self.stats = {"streaming": True, "val_documents": held_out, "val_tokens": tokens, "val_rows": len(rows)}

    def _stream_loader(self) -> StreamingLoader:
        hp = self.hparams
        assert self.tokenizer is not None
        trainer = self.trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        stream = TokenStream(
            self._stream["documents"],
            self.tokenizer.to_str(),
            self.collator(),
            max_length=hp.max_length,
            batch_size=hp.batch_size,
            buffer=hp.stream_buffer,
            packed=hp.layout == "packed",
            seed=hp.seed,
            skip=self._stream["skip"],
            rank=rank,
            world_size=world,
        )
        fingerprint = {
            "data": self._stream["key"],
            "tokenizer": cache_key(self.tokenizer.to_str()),
            "held_out": self._stream["skip"],
            **{k: hp[k] for k in ("seed", "max_length", "batch_size", "stream_buffer", "layout")},
        }
        return StreamingLoader(
            stream, num_workers=hp.num_workers, fingerprint=fingerprint, record_on_yield=trainer is None
        )

    def _sample_settings(self) -> dict[str, int]:
        return {"max_bytes": self.hparams.tokenizer_sample_mb * 1_000_000, "seed": self.hparams.seed}

    def _cap_validation(self) -> None:
        """At most ``val_max_tokens`` of the validation rows, drawn by ``seed`` (all of them below the cap), so that a
        validation costs seconds whatever the corpus size; ``stats`` says how much is validated and held out."""
        cap, lengths = self.hparams.val_max_tokens, self._lengths["val"]
        self.stats["val_tokens_held_out"] = int(lengths.sum())
        if cap is not None and lengths.sum() > cap:
            order = np.random.default_rng([self.hparams.seed, 2]).permutation(len(lengths))
            keep = np.sort(order[: max(1, int(np.searchsorted(np.cumsum(lengths[order]), cap, side="right")))])
            self.splits["val"] = self.splits["val"].select(keep)
            self._lengths["val"] = lengths[keep]
        self.stats["val_tokens"] = int(self._lengths["val"].sum())
        self.stats["val_rows"] = len(self._lengths["val"])

    def _given_tokenizer(self) -> Tokenizer:
        """The tokenizer at ``tokenizer_path``, checked; a DataError naming the file if it cannot be used (never
        replaced by another: it is the user's)."""
        hp = self.hparams
        path = Path(hp.tokenizer_path).expanduser()
        name = f"data.tokenizer_path={hp.tokenizer_path!r}"
        if not path.is_file():
            raise DataError(
                f"{name} {'is a directory' if path.is_dir() else 'does not exist'}; give the path of a tokenizer.json "
                f"(tokenizers' Tokenizer.save writes one), or leave data.tokenizer_path unset to train one",
                path=path,
            )
        try:
            tokenizer = Tokenizer.from_file(str(path))
        except Exception as error:  # noqa: BLE001 (tokenizers raises a bare Exception that names no file)
            detail = " ".join(str(error).split())
            raise DataError(
                f"{name} is not a tokenizers JSON file ({detail}); give a tokenizer.json saved by tokenizers",
                path=path,
            ) from None
        return self._check_tokenizer(tokenizer, name, path=path)

    def _tokenizer(self, sample: Callable[[], tuple[Iterator[str], dict[str, int]]], data_key: str) -> Tokenizer:
        """A byte-level BPE trained on ``sample()``, cached by ``data_key`` and the tokenizer's settings."""
        hp = self.hparams
        key = cache_key(data_key, hp.vocab_size, self._sample_settings())
        path = self.cache_dir / "tokenizers" / f"bpe-{key}.json"

        def build(tmp: Path) -> None:
            texts, drawn = sample()
            tokenizer = train_tokenizer(texts, vocab_size=hp.vocab_size)
            tmp.write_text(tokenizer.to_str(), encoding="utf-8")
            logger.info(
                "trained a byte-level BPE tokenizer (%d tokens) on %d documents (%.1f MB, data.tokenizer_sample_mb=%d)"
                " -> %s",
                tokenizer.get_vocab_size(),
                drawn["documents"],
                drawn["bytes"] / 1e6,
                hp.tokenizer_sample_mb,
                path,
            )

        return cached(
            path, read=lambda p: self._check_tokenizer(Tokenizer.from_file(str(p)), f"tokenizer {p}"), build=build
        )

    def _check_tokenizer(self, tokenizer: Tokenizer, name: str, *, path: Path | None = None) -> Tokenizer:
        """``tokenizer`` if it has the special tokens at their ids and fits ``vocab_size``, else a DataError naming
        it (``name``; ``path``: the user's file, None for a cache entry, which is then rebuilt)."""
        for token, expected in ((PAD_TOKEN, 0), (EOS_TOKEN, 1)):
            if tokenizer.token_to_id(token) != expected:
                raise DataError(
                    f"{name} must have {token} with id {expected}, got {tokenizer.token_to_id(token)}; give a "
                    f"tokenizer with both special tokens at those ids (as mhaplug trains them)",
                    path=path,
                )
        if tokenizer.get_vocab_size() > self.hparams.vocab_size:
            raise DataError(
                f"{name} has {tokenizer.get_vocab_size()} tokens, more than vocab_size={self.hparams.vocab_size}; "
                f"set vocab_size >= {tokenizer.get_vocab_size()} (it sizes the model's embedding)",
                path=path,
            )
        return tokenizer

    def _tokenise(
        self, store: TextStore, is_val: np.ndarray, cut: tuple[int, int] | None, key: str
    ) -> dict[str, datasets.Dataset]:
        """Both splits tokenised (:func:`mhaplug.data.corpus.tokenise`, in ``num_proc`` processes; ``cut``: a document
        whose start trains and whose end validates), cached as one entry per split; a missing or bad entry rebuilds
        both, in one pass over the text."""
        tokenizer, hp = self.tokenizer, self.hparams
        assert tokenizer is not None
        paths = {name: self.cache_dir / "tokenised" / f"{key}-{name}.arrow" for name in ("train", "val")}
        counts = {"train": int((~is_val).sum()), "val": int(is_val.sum()) + (cut is not None)}

        def read(name: str) -> Callable[[Path], datasets.Dataset]:
            def load(path: Path) -> datasets.Dataset:
                check_tokenised(
                    path, documents=counts[name], vocab_size=tokenizer.get_vocab_size(), max_length=hp.max_length, eos=1
                )
                return datasets.Dataset.from_file(str(path))

            return load

        splits = {name: read_entry(path, read(name)) for name, path in paths.items()}
        if any(split is None for split in splits.values()):
            paths["train"].parent.mkdir(parents=True, exist_ok=True)
            tokenise(
                store,
                is_val,
                tokenizer,
                max_length=hp.max_length,
                eos=1,
                num_proc=hp.num_proc or default_num_proc(),
                train_path=paths["train"],
                val_path=paths["val"],
                cut=cut,
            )
            splits = {name: read(name)(path) for name, path in paths.items()}
        self._lengths = {
            name: split.data.column("length").to_numpy().astype(np.int64) for name, split in splits.items()
        }
        return splits  # type: ignore[return-value]

    # -- loaders ------------------------------------------------------------------------------------------

    @property
    def pad_token_id(self) -> int:
        """``<|pad|>`` is id 0 in every tokenizer this module trains or accepts."""
        return 0

    @property
    def vocab_size(self) -> int:
        """The embedding size a model needs: ``vocab_size`` (a trained BPE may stop short of it; ids stay below)."""
        return self.hparams.vocab_size

    def collator(self) -> PadCollator | PackCollator:
        hp = self.hparams
        if hp.layout == "packed":
            return PackCollator(
                max_length=hp.max_length,
                pad_token_id=self.pad_token_id,
                pad_to_multiple_of=hp.pad_to_multiple_of,
                vocab_size=self.vocab_size,
            )
        return PadCollator(
            pad_token_id=self.pad_token_id,
            padding_side=hp.padding_side,
            pad_to_multiple_of=hp.pad_to_multiple_of,
            max_length=hp.max_length,
            vocab_size=self.vocab_size,
        )

    def _dataset_and_lengths(self, name: str) -> tuple[Dataset | datasets.Dataset, np.ndarray]:
        if name not in self._datasets:
            documents, lengths = self.splits[name], self._lengths[name]
            if self.hparams.layout == "padded":
                self._datasets[name] = (documents, lengths)
            else:
                # Whole documents packed once, first-fit decreasing after a seeded shuffle: rows nearly full.
                order = np.random.default_rng(self.hparams.seed).permutation(len(lengths))
                rows = first_fit_pack(lengths[order], self.hparams.max_length)
                sizes = np.fromiter(map(len, rows), dtype=np.int64, count=len(rows))  # (rows,) documents per row
                flat = order[np.fromiter(itertools.chain.from_iterable(rows), dtype=np.int64, count=int(sizes.sum()))]
                del rows
                offsets = np.concatenate([[0], np.cumsum(sizes)])
                row_lengths = np.add.reduceat(lengths[flat], offsets[:-1])
                self._datasets[name] = (_PackedRows(documents, flat, offsets), row_lengths)
        return self._datasets[name]

    def batch_sampler(self, name: str, lengths: Sequence[int], *, shuffle: bool) -> sampling.BaseBatchSampler:
        hp = self.hparams
        if hp.batching == "token_budget":
            return sampling.TokenBudgetBatchSampler(
                lengths, hp.max_tokens, pad_to_multiple_of=hp.pad_to_multiple_of, shuffle=shuffle, seed=hp.seed
            )
        cls = sampling.LengthGroupedBatchSampler if hp.batching == "length_grouped" else sampling.RandomBatchSampler
        return cls(lengths, hp.batch_size, shuffle=shuffle, seed=hp.seed, drop_last=False)

    def on_before_batch_transfer(self, batch: dict[str, Any], dataloader_idx: int) -> dict[str, Any]:
        """Off the CPU, the real tokens' positions are found here, before the transfer
        (:func:`mhaplug.attention.add_token_index`)."""
        state = batch.pop(STATE_KEY, None)
        if state is not None and self._train_loader is not None:
            self._train_loader.record(state)  # this batch is trained now (Lightning fetched it one batch ahead)
        device = self.trainer.strategy.root_device if self.trainer is not None else "cpu"
        return add_token_index(batch, device)

    def train_dataloader(self) -> sampling.ResumableDataLoader | StreamingLoader:
        """Resumable mid-epoch for any ``num_workers``: Lightning saves the loader's state (the batches trained,
        :class:`mhaplug.data.sampling.ResumableDataLoader`; streamed, every unit's position,
        :class:`mhaplug.data.streaming.StreamingLoader`) in checkpoints and restores it on resume."""
        if self.hparams.streaming:
            self._train_loader = self._stream_loader()
            return self._train_loader
        dataset, lengths = self._dataset_and_lengths("train")
        batch_sampler = self.batch_sampler("train", lengths, shuffle=True)
        loader = sampling.ResumableDataLoader(
            dataset, batch_sampler=batch_sampler, collate_fn=self.collator(), num_workers=self.hparams.num_workers
        )
        if self._legacy_sampler_state is not None:
            loader.load_state_dict(self._legacy_sampler_state)
            self._legacy_sampler_state = None
        return loader

    def val_dataloader(self) -> DataLoader:
        dataset, lengths = self._dataset_and_lengths("val")
        batch_sampler = self.batch_sampler("val", lengths, shuffle=False)
        batch_sampler.even_batches = False  # validation sees every batch exactly once across ranks
        return DataLoader(
            dataset, batch_sampler=batch_sampler, collate_fn=self.collator(), num_workers=self.hparams.num_workers
        )

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Checkpoints written before the train loader held the state keep it here (``train_sampler``, counted by the
        sampler: exact with ``num_workers=0``); the next train loader starts from it. This module saves no state."""
        self._legacy_sampler_state = state_dict.get("train_sampler")


def _non_empty(texts: Iterable[str | None]) -> Iterator[str]:
    return (text for text in texts if text is not None and text.strip())
