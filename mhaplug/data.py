"""An offline-first LightningDataModule: text -> byte-level BPE tokens -> padded or packed batches.

Sources (``source=``):

- ``stdlib_docs`` (default): the documentation strings of the Python standard library, real English text
  present on every Python install. Collected by parsing (never importing) every ``.py`` file under
  ``sysconfig.get_paths()["stdlib"]`` in sorted order and taking ``ast.get_docstring`` of each module, class
  and function, skipping ``site-packages`` and the test suites. On CPython 3.11: 562 files, 6,858 docstrings,
  1.5 M characters. Cached as JSON per Python version.
- ``synthetic``: seeded sentences from a small grammar, with lengths from 1 to ``synthetic_max_words`` words;
  tiny and fast, for tests.
- ``text_files``: local ``.txt`` (a document per line), ``.jsonl`` / ``.json`` or ``.parquet`` files, read by
  ``datasets`` (``path`` may be a file, a glob or a list).
- ``hf``: any ``datasets.load_dataset(path, name, split=split)``: a hub name, or a local path. Offline with no
  cache it fails with a message saying so.

Pipeline: empty documents are dropped (and counted in the log); a deterministic train/validation split (by
``seed``); a byte-level BPE tokenizer trained with ``tokenizers`` on the training split only, or loaded from
``tokenizer_path``, cached on disk by a key of the data and the settings; tokenisation with ``datasets.map``
(batched, cached on disk by the same key), an EOS after each document, documents longer than ``max_length``
split into ``max_length`` chunks (so no batch ever truncates). Batches come from :mod:`mhaplug.sampling` and
:mod:`mhaplug.collate`.
"""

from __future__ import annotations

import ast
import hashlib
import json
import logging
import os
import random
import sys
import sysconfig
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import datasets
import pytorch_lightning as pl
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from torch.utils.data import DataLoader, Dataset

from mhaplug import sampling
from mhaplug.collate import PackCollator, PadCollator, first_fit_pack

__all__ = ["BATCHINGS", "EOS_TOKEN", "LAYOUTS", "PAD_TOKEN", "SOURCES", "TextDataModule", "stdlib_docstrings", "synthetic_texts", "train_tokenizer"]

logger = logging.getLogger(__name__)

SOURCES = ("stdlib_docs", "synthetic", "text_files", "hf")
LAYOUTS = ("padded", "packed")
BATCHINGS = ("random", "length_grouped", "token_budget")
PAD_TOKEN, EOS_TOKEN = "<|pad|>", "<|endoftext|>"  # ids 0 and 1: pad is never EOS (HF transformers #23530)
_STDLIB_SKIP = {"site-packages", "test", "tests", "idlelib", "lib2to3", "tkinter", "turtledemo", "ensurepip", "__pycache__"}


def default_cache_dir() -> Path:
    return Path(os.environ.get("MHAPLUG_CACHE", Path.home() / ".cache" / "mhaplug"))


def _key(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------------------------------------
# Sources
# ----------------------------------------------------------------------------------------------------------


def stdlib_docstrings(*, cache_dir: Path | None = None) -> list[str]:
    """Docstrings of the standard library's modules, classes and functions, in a fixed order (see module doc)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    cache = (cache_dir or default_cache_dir()) / "sources" / f"stdlib_docs-{_key(sys.version, str(root))}.json"
    if cache.exists():
        return json.loads(cache.read_text())
    docs = []
    for path in sorted(root.rglob("*.py")):
        if _STDLIB_SKIP & set(path.relative_to(root).parts):
            continue
        try:
            tree = ast.parse(path.read_bytes())
        except (SyntaxError, ValueError):  # a few deliberately broken files (e.g. bad encodings in fixtures)
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc is not None:
                    docs.append(doc)
    _atomic_write(cache, json.dumps(docs))
    return docs


_SUBJECTS = ["the parser", "a thread", "this module", "the socket", "each worker", "the buffer", "a process", "the queue"]
_VERBS = ["returns", "reads", "writes", "closes", "opens", "sends", "waits for", "raises"]
_OBJECTS = ["a list of strings", "the next line", "an error", "the result", "all pending data", "a new file", "the lock"]


def synthetic_texts(num_documents: int = 512, *, max_words: int = 64, seed: int = 0) -> list[str]:
    """Seeded sentences from a tiny grammar: learnable structure, varied lengths (1..max_words words)."""
    rng = random.Random(seed)
    texts = []
    for _ in range(num_documents):
        words: list[str] = []
        target = max(1, min(max_words, int(rng.lognormvariate(2.5, 0.8))))
        while len(words) < target:
            sentence = f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)}."
            words += sentence.capitalize().split()
        texts.append(" ".join(words[:target]))
    return texts


def _load_text_files(path: str | Sequence[str]) -> datasets.Dataset:
    files = [path] if isinstance(path, str) else list(path)
    suffix = Path(files[0]).suffix.lower()
    builder = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}.get(suffix)
    if builder is None:
        raise ValueError(f"data path {files[0]!r}: unsupported extension {suffix!r}; use .txt, .jsonl, .json or .parquet")
    return datasets.load_dataset(builder, data_files=files, split="train")


def _load_hf(path: str, name: str | None, split: str) -> datasets.Dataset:
    try:
        return datasets.load_dataset(path, name, split=split)
    except Exception as error:  # datasets raises several types (ConnectionError, FileNotFoundError, ...)
        offline = os.environ.get("HF_DATASETS_OFFLINE") == "1" or os.environ.get("HF_HUB_OFFLINE") == "1"
        raise RuntimeError(
            f"could not load the Hugging Face dataset path={path!r}, name={name!r}, split={split!r}"
            f"{' (offline mode is on and it is not in the local cache)' if offline else ''}: {error}. "
            f"Download it once with network access, or point data.path at a local copy (data=text_files)."
        ) from error


# ----------------------------------------------------------------------------------------------------------
# Tokenizer
# ----------------------------------------------------------------------------------------------------------


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


def _atomic_write(path: Path, text: str) -> None:
    """Write via a temporary file and rename, so a killed process never leaves half a cache file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + f".tmp{os.getpid()}")
    tmp.write_text(text)
    tmp.replace(path)


# ----------------------------------------------------------------------------------------------------------
# The DataModule
# ----------------------------------------------------------------------------------------------------------


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
        source: one of :data:`SOURCES`. path / name / split / text_column: where the text is (``text_files``
            and ``hf``). tokenizer_path: a ``tokenizer.json`` to load instead of training one.
        vocab_size: BPE vocabulary when training a tokenizer. max_length: longest row in tokens.
        layout: ``padded`` (a document per row) or ``packed`` (several whole documents per row).
        padding_side, batching, batch_size, max_tokens, pad_to_multiple_of: see :mod:`mhaplug.collate` and
            :mod:`mhaplug.sampling` (``max_tokens`` is the padded-token budget of ``token_budget`` batching).
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
        layout: str = "padded",
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
        for arg, value, allowed in (("source", source, SOURCES), ("layout", layout, LAYOUTS), ("batching", batching, BATCHINGS), ("padding_side", padding_side, ("right", "left"))):
            if value not in allowed:
                raise ValueError(f"{arg} must be one of {', '.join(allowed)}; got {value!r}")
        if source in ("text_files", "hf") and not path:
            raise ValueError(f"source={source!r} needs path= (a file, glob or list for text_files; a dataset name or directory for hf)")
        if batching == "token_budget" and not max_tokens:
            raise ValueError("batching='token_budget' needs max_tokens (padded tokens per batch), e.g. batch_size * max_length")
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
        self.save_hyperparameters()
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
        self.tokenizer: Tokenizer | None = None
        self.splits: dict[str, datasets.Dataset] = {}
        self.stats: dict[str, int] = {}
        self._datasets: dict[str, tuple[Dataset | datasets.Dataset, list[int]]] = {}  # per split, built once
        self._train_sampler: sampling.BaseBatchSampler | None = None
        self._pending_sampler_state: dict[str, Any] | None = None

    # -- data ---------------------------------------------------------------------------------------------

    def _texts(self) -> datasets.Dataset:
        hp = self.hparams
        if hp.source == "stdlib_docs":
            return datasets.Dataset.from_dict({"text": stdlib_docstrings(cache_dir=self.cache_dir)})
        if hp.source == "synthetic":
            return datasets.Dataset.from_dict({"text": synthetic_texts(hp.synthetic_documents, max_words=hp.synthetic_max_words, seed=hp.seed)})
        table = _load_text_files(hp.path) if hp.source == "text_files" else _load_hf(hp.path, hp.name, hp.split)
        if hp.text_column not in table.column_names:
            raise ValueError(f"text_column={hp.text_column!r} is not in the data; its columns are {table.column_names}")
        return table.select_columns([hp.text_column]).rename_column(hp.text_column, "text") if hp.text_column != "text" else table.select_columns(["text"])

    def prepare_data(self) -> None:
        """Collect text, train or load the tokenizer, tokenise: all cached on disk (rank 0 only under DDP)."""
        if not self.splits:
            self._build()

    def setup(self, stage: str | None = None) -> None:
        if not self.splits:
            self._build()

    def _build(self) -> None:
        hp = self.hparams
        texts = self._texts()
        total = len(texts)
        texts = texts.filter(lambda batch: [bool(t and t.strip()) for t in batch["text"]], batched=True)
        if hp.max_documents:
            texts = texts.select(range(min(hp.max_documents, len(texts))))
        self.stats = {"documents": len(texts), "empty_documents_dropped": total - len(texts)}
        if self.stats["empty_documents_dropped"]:
            logger.info("dropped %d empty documents of %d", self.stats["empty_documents_dropped"], total)
        if len(texts) < 2:
            raise ValueError(f"source={hp.source!r} gave {len(texts)} non-empty documents; need at least 2 to split")
        split = texts.train_test_split(test_size=hp.val_fraction, seed=hp.seed, shuffle=True)
        data_key = _key(hp.source, hp.path, hp.name, hp.split, hp.text_column, hp.seed, hp.val_fraction, hp.max_documents,
                        hp.synthetic_documents, hp.synthetic_max_words, _fingerprint_texts(split["train"]["text"]))
        self.tokenizer = self._tokenizer(split["train"]["text"], data_key)
        token_key = _key(data_key, self.tokenizer.to_str(), hp.max_length)
        self.splits = {name: self._tokenise(split[part], f"{token_key}-{name}") for name, part in (("train", "train"), ("val", "test"))}
        self._datasets = {}
        self.stats["train_tokens"] = sum(self.splits["train"]["length"])
        self.stats["val_tokens"] = sum(self.splits["val"]["length"])

    def _tokenizer(self, train_texts: list[str], data_key: str) -> Tokenizer:
        hp = self.hparams
        if hp.tokenizer_path:
            tokenizer = Tokenizer.from_file(str(hp.tokenizer_path))
            for token, expected in ((PAD_TOKEN, 0), (EOS_TOKEN, 1)):
                if tokenizer.token_to_id(token) != expected:
                    raise ValueError(f"tokenizer_path={hp.tokenizer_path!r} must have {token} with id {expected}, got {tokenizer.token_to_id(token)}")
            if tokenizer.get_vocab_size() > hp.vocab_size:
                raise ValueError(
                    f"tokenizer_path={hp.tokenizer_path!r} has {tokenizer.get_vocab_size()} tokens, more than "
                    f"vocab_size={hp.vocab_size}; set vocab_size >= {tokenizer.get_vocab_size()} (it sizes the model's embedding)"
                )
            return tokenizer
        path = self.cache_dir / "tokenizers" / f"bpe-{_key(data_key, hp.vocab_size)}.json"
        if path.exists():
            return Tokenizer.from_file(str(path))
        tokenizer = train_tokenizer(train_texts, vocab_size=hp.vocab_size)
        _atomic_write(path, tokenizer.to_str())
        logger.info("trained a byte-level BPE tokenizer (%d tokens) -> %s", tokenizer.get_vocab_size(), path)
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

        cache_file = self.cache_dir / "tokenised" / f"{key}.arrow"
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        return texts.map(encode, batched=True, remove_columns=texts.column_names, cache_file_name=str(cache_file), desc="tokenising")

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
            return PackCollator(max_length=hp.max_length, pad_token_id=self.pad_token_id, pad_to_multiple_of=hp.pad_to_multiple_of, vocab_size=self.vocab_size)
        return PadCollator(pad_token_id=self.pad_token_id, padding_side=hp.padding_side, pad_to_multiple_of=hp.pad_to_multiple_of, max_length=hp.max_length, vocab_size=self.vocab_size)

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
            return sampling.TokenBudgetBatchSampler(lengths, hp.max_tokens, pad_to_multiple_of=hp.pad_to_multiple_of, shuffle=shuffle, seed=hp.seed)
        cls = sampling.LengthGroupedBatchSampler if hp.batching == "length_grouped" else sampling.RandomBatchSampler
        return cls(lengths, hp.batch_size, shuffle=shuffle, seed=hp.seed, drop_last=False)

    def _loader(self, name: str, *, shuffle: bool) -> DataLoader:
        dataset, lengths = self._dataset_and_lengths(name)
        batch_sampler = self.batch_sampler(name, lengths, shuffle=shuffle)
        batch_sampler.even_batches = name == "train"  # validation sees every batch exactly once across ranks
        if name == "train":
            if self._pending_sampler_state is not None:
                batch_sampler.load_state_dict(self._pending_sampler_state)
                self._pending_sampler_state = None
            self._train_sampler = batch_sampler
        return DataLoader(dataset, batch_sampler=batch_sampler, collate_fn=self.collator(), num_workers=self.hparams.num_workers)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    # -- resumable mid-epoch: Lightning saves and restores a DataModule's state in its checkpoints ----------

    def state_dict(self) -> dict[str, Any]:
        return {"train_sampler": self._train_sampler.state_dict()} if self._train_sampler is not None else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending_sampler_state = state_dict.get("train_sampler")


def _fingerprint_texts(texts: list[str]) -> str:
    digest = hashlib.sha256()
    for text in texts:
        digest.update(text.encode("utf-8", "surrogatepass"))
        digest.update(b"\0")
    return digest.hexdigest()[:16]
