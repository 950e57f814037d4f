"""An offline-first LightningDataModule: text -> byte-level BPE tokens -> padded or packed batches.

Pipeline: text from a source (:mod:`mhaplug.data.sources`: the standard library's docstrings, synthetic sentences,
local files, the hub); empty documents are dropped (and counted in the log); a deterministic train/validation split
(by ``seed``); a byte-level BPE tokenizer trained with ``tokenizers`` on the training split only, or loaded from
``tokenizer_path``, cached on disk by a key of the data and the settings (:mod:`mhaplug.data.cache`); tokenisation
with ``datasets.map`` (batched, cached on disk by the same key), an EOS after each document, documents longer than
``max_length`` split into ``max_length`` chunks (so no batch ever truncates). Batches come from
:mod:`mhaplug.data.sampling` and :mod:`mhaplug.data.collate`; the train loader resumes mid-epoch exactly, for any
``num_workers``.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import datasets
import pytorch_lightning as pl
from tokenizers import Tokenizer
from torch.utils.data import DataLoader, Dataset

from mhaplug.attention.unpad import add_token_index
from mhaplug.common import EOS_TOKEN, PAD_TOKEN, Batching, Layout, PaddingSide, Source, check_choice
from mhaplug.data import sampling
from mhaplug.data.cache import cache_key, cached, default_cache_dir
from mhaplug.data.collate import PackCollator, PadCollator
from mhaplug.data.packing import first_fit_pack
from mhaplug.data.sources import load_hf, read_text_files, stdlib_docstrings, synthetic_texts
from mhaplug.data.tokenizer import check_tokenised, fingerprint_texts, train_tokenizer

__all__ = ["TextDataModule"]

logger = logging.getLogger(__name__)


class _PackedRows(Dataset):
    """Rows of whole documents packed offline; each item carries its ``document_lengths`` for PackCollator."""

    def __init__(self, documents: datasets.Dataset, rows: list[list[int]]) -> None:
        self.documents, self.rows = documents, rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        docs = self.documents[self.rows[index]]["input_ids"]
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
        if batching == "token_budget" and not max_tokens:
            raise ValueError(
                "batching='token_budget' needs max_tokens (padded tokens per batch), e.g. batch_size * max_length"
            )
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
        self.save_hyperparameters()
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
        self.tokenizer: Tokenizer | None = None
        self.splits: dict[str, datasets.Dataset] = {}
        self.stats: dict[str, int] = {}
        self._datasets: dict[str, tuple[Dataset | datasets.Dataset, list[int]]] = {}  # per split, built once
        self._legacy_sampler_state: dict[str, Any] | None = None

    # -- data ---------------------------------------------------------------------------------------------

    def _texts(self) -> datasets.Dataset:
        hp = self.hparams
        if hp.source == "stdlib_docs":
            return datasets.Dataset.from_dict({"text": stdlib_docstrings(cache_dir=self.cache_dir)})
        if hp.source == "synthetic":
            return datasets.Dataset.from_dict(
                {"text": synthetic_texts(hp.synthetic_documents, max_words=hp.synthetic_max_words, seed=hp.seed)}
            )
        if hp.source == "text_files":
            return datasets.Dataset.from_dict({"text": read_text_files(hp.path, text_column=hp.text_column)})
        table = load_hf(hp.path, hp.name, hp.split)
        if hp.text_column not in table.column_names:
            raise ValueError(f"text_column={hp.text_column!r} is not in the data; its columns are {table.column_names}")
        return (
            table.select_columns([hp.text_column]).rename_column(hp.text_column, "text")
            if hp.text_column != "text"
            else table.select_columns(["text"])
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
        hp = self.hparams
        texts = self._texts()
        total = len(texts)
        with _quiet_progress(len(texts)):
            texts = texts.filter(lambda batch: [bool(t and t.strip()) for t in batch["text"]], batched=True)
        if hp.max_documents:
            texts = texts.select(range(min(hp.max_documents, len(texts))))
        self.stats = {"documents": len(texts), "empty_documents_dropped": total - len(texts)}
        if self.stats["empty_documents_dropped"]:
            logger.info("dropped %d empty documents of %d", self.stats["empty_documents_dropped"], total)
        if len(texts) < 2:
            raise ValueError(f"source={hp.source!r} gave {len(texts)} non-empty documents; need at least 2 to split")
        split = texts.train_test_split(test_size=hp.val_fraction, seed=hp.seed, shuffle=True)
        data_key = cache_key(
            hp.source,
            hp.path,
            hp.name,
            hp.split,
            hp.text_column,
            hp.seed,
            hp.val_fraction,
            hp.max_documents,
            hp.synthetic_documents,
            hp.synthetic_max_words,
            fingerprint_texts(split["train"]["text"]),
        )
        self.tokenizer = self._tokenizer(split["train"]["text"], data_key)
        token_key = cache_key(data_key, self.tokenizer.to_str(), hp.max_length)
        self.splits = {
            name: self._tokenise(split[part], f"{token_key}-{name}")
            for name, part in (("train", "train"), ("val", "test"))
        }
        self._datasets = {}
        self.stats["train_tokens"] = sum(self.splits["train"]["length"])
        self.stats["val_tokens"] = sum(self.splits["val"]["length"])

    def _tokenizer(self, train_texts: list[str], data_key: str) -> Tokenizer:
        hp = self.hparams
        if hp.tokenizer_path:
            name = f"tokenizer_path={hp.tokenizer_path!r}"
            try:
                tokenizer = Tokenizer.from_file(str(hp.tokenizer_path))
            except Exception as error:  # noqa: BLE001 (tokenizers raises a bare Exception that names no file)
                raise ValueError(
                    f"{name} is not a tokenizers JSON file ({error}); give a tokenizer.json saved by tokenizers"
                ) from None
            return self._check_tokenizer(tokenizer, name)
        path = self.cache_dir / "tokenizers" / f"bpe-{cache_key(data_key, hp.vocab_size)}.json"

        def build(tmp: Path) -> None:
            tokenizer = train_tokenizer(train_texts, vocab_size=hp.vocab_size)
            tmp.write_text(tokenizer.to_str(), encoding="utf-8")
            logger.info("trained a byte-level BPE tokenizer (%d tokens) -> %s", tokenizer.get_vocab_size(), path)

        return cached(
            path, read=lambda p: self._check_tokenizer(Tokenizer.from_file(str(p)), f"tokenizer {p}"), build=build
        )

    def _check_tokenizer(self, tokenizer: Tokenizer, name: str) -> Tokenizer:
        for token, expected in ((PAD_TOKEN, 0), (EOS_TOKEN, 1)):
            if tokenizer.token_to_id(token) != expected:
                raise ValueError(f"{name} must have {token} with id {expected}, got {tokenizer.token_to_id(token)}")
        if tokenizer.get_vocab_size() > self.hparams.vocab_size:
            raise ValueError(
                f"{name} has {tokenizer.get_vocab_size()} tokens, more than vocab_size={self.hparams.vocab_size}; "
                f"set vocab_size >= {tokenizer.get_vocab_size()} (it sizes the model's embedding)"
            )
        return tokenizer

    def _tokenise(self, texts: datasets.Dataset, key: str) -> datasets.Dataset:
        tokenizer, max_length, eos = self.tokenizer, self.hparams.max_length, 1
        assert tokenizer is not None

        def encode(batch: dict[str, list[str]]) -> dict[str, list[Any]]:
            ids, lengths = [], []
            for encoding in tokenizer.encode_batch(batch["text"]):
                tokens = encoding.ids + [eos]
                for start in range(0, len(tokens), max_length):  # long documents become max_length chunks
                    chunk = tokens[start : start + max_length]
                    ids.append(chunk)
                    lengths.append(len(chunk))
            return {"input_ids": ids, "length": lengths}

        def build(tmp: Path) -> None:
            with _quiet_progress(len(texts)):
                texts.map(
                    encode,
                    batched=True,
                    remove_columns=texts.column_names,
                    cache_file_name=str(tmp),
                    load_from_cache_file=False,
                    desc="tokenising",
                )

        def read(path: Path) -> datasets.Dataset:
            rows = datasets.Dataset.from_file(str(path))
            check_tokenised(
                rows, documents=len(texts), vocab_size=tokenizer.get_vocab_size(), max_length=max_length, eos=eos
            )
            return rows

        return cached(self.cache_dir / "tokenised" / f"{key}.arrow", read=read, build=build)

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

    def _dataset_and_lengths(self, name: str) -> tuple[Dataset | datasets.Dataset, list[int]]:
        if name not in self._datasets:
            documents = self.splits[name]
            lengths = documents["length"]
            if self.hparams.layout == "padded":
                self._datasets[name] = (documents, lengths)
            else:
                # Whole documents packed once, first-fit decreasing after a seeded shuffle: rows nearly full.
                order = list(range(len(lengths)))
                random.Random(self.hparams.seed).shuffle(order)
                rows = first_fit_pack([lengths[i] for i in order], self.hparams.max_length)
                rows = [[order[i] for i in row] for row in rows]
                self._datasets[name] = (_PackedRows(documents, rows), [sum(lengths[i] for i in row) for row in rows])
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
        device = self.trainer.strategy.root_device if self.trainer is not None else "cpu"
        return add_token_index(batch, device)

    def train_dataloader(self) -> sampling.ResumableDataLoader:
        """Resumable mid-epoch for any ``num_workers``: Lightning saves the loader's state (the batches trained,
        :class:`mhaplug.data.sampling.ResumableDataLoader`) in checkpoints and restores it on resume."""
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


# Rows below which a datasets step (filtering out empty documents, tokenising) runs without its progress bar.
# Over a corpus this size a step takes about a second or less, so its bar would flash by and only clutter the
# run's log; a larger corpus keeps its bars, which then say how far a long step is.
QUIET_PROGRESS_ROWS = 100_000


@contextmanager
def _quiet_progress(rows: int) -> Iterator[None]:
    """datasets' progress bars off inside the block when ``rows`` is small (:data:`QUIET_PROGRESS_ROWS`).

    Safe, though the switch is global: the block runs in the process that builds the data, where nothing else
    shows a datasets bar meanwhile; the previous state is restored after it; and a user's explicit
    ``HF_DATASETS_DISABLE_PROGRESS_BARS`` (0 or 1) is left to decide, as datasets itself lets it."""
    if rows >= QUIET_PROGRESS_ROWS or datasets.config.HF_DATASETS_DISABLE_PROGRESS_BARS is not None:
        yield
        return
    was_enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was_enabled:
            datasets.enable_progress_bars()
