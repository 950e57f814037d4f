"""An offline-first LightningDataModule: text -> byte-level BPE tokens -> padded or packed batches.

Sources (``source=``):

- ``stdlib_docs`` (default): the documentation strings of the Python standard library, real English text
  present on every Python install. Collected by parsing (never importing) every ``.py`` file under
  ``sysconfig.get_paths()["stdlib"]`` in sorted order and taking ``ast.get_docstring`` of each module, class
  and function, skipping ``site-packages`` and the test suites (some thousands of docstrings, over a million
  characters). Cached as JSON per Python version.
- ``synthetic``: seeded sentences from a small grammar, with lengths from 1 to ``synthetic_max_words`` words;
  tiny and fast, for tests.
- ``text_files``: local ``.txt`` (a document per line), ``.jsonl`` / ``.json`` or ``.parquet`` files (``path`` may be a
  file, a glob or a list), each read by its own extension into memory (:func:`read_text_files`): nothing is
  written to the Hugging Face cache, and a bad file raises naming the file and line.
- ``hf``: any ``datasets.load_dataset(path, name, split=split)``: a hub name, or a local path (loaded offline). When
  the hub cannot be reached (or ``HF_HUB_OFFLINE=1``) a hub name loads from the local cache only, and fails at once
  with one line (:class:`mhaplug.util.ConfigError`) when it is not there.

Pipeline: empty documents are dropped (and counted in the log); a deterministic train/validation split (by
``seed``); a byte-level BPE tokenizer trained with ``tokenizers`` on the training split only, or loaded from
``tokenizer_path``, cached on disk by a key of the data and the settings; tokenisation with ``datasets.map``
(batched, cached on disk by the same key), an EOS after each document, documents longer than ``max_length``
split into ``max_length`` chunks (so no batch ever truncates). Batches come from :mod:`mhaplug.sampling` and
:mod:`mhaplug.collate`; the train loader resumes mid-epoch exactly, for any ``num_workers``.

The cache (``cache_dir``, default :func:`default_cache_dir`) holds ``sources/`` (the standard library's docstrings),
``tokenizers/`` and ``tokenised/``, each entry named by a key of what it was built from. Every entry is written to a
temporary file in its folder and renamed into place (a killed run or a full disk leaves no half entry), and is
validated when read: an entry that fails (truncated, corrupted) is logged as a WARNING with its path and rebuilt.
"""

from __future__ import annotations

import ast
import codecs
import glob
import hashlib
import json
import logging
import os
import random
import reprlib
import sys
import sysconfig
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import datasets
import numpy as np
import pytorch_lightning as pl
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from torch.utils.data import DataLoader, Dataset

from mhaplug import sampling, unpad
from mhaplug.collate import PackCollator, PadCollator
from mhaplug.packing import first_fit_pack
from mhaplug.util import (  # the choices live there, where config validation imports them without datasets
    BATCHINGS,
    EOS_TOKEN,
    LAYOUTS,
    PAD_TOKEN,
    PADDING_SIDES,
    SOURCES,
    ConfigError,
    atomic_path,
    check_choice,
)

__all__ = [
    "BATCHINGS",
    "EOS_TOKEN",
    "LAYOUTS",
    "PAD_TOKEN",
    "SOURCES",
    "TextDataModule",
    "default_cache_dir",
    "read_text_files",
    "stdlib_docstrings",
    "synthetic_texts",
    "train_tokenizer",
]

logger = logging.getLogger(__name__)

_STDLIB_SKIP = {
    "site-packages",
    "test",
    "tests",
    "idlelib",
    "lib2to3",
    "tkinter",
    "turtledemo",
    "ensurepip",
    "__pycache__",
}


def default_cache_dir() -> Path:
    """``$MHAPLUG_CACHE``, or ``~/.cache/mhaplug`` where it is unset or empty.

    Empty counts as unset, the rule the XDG base directory spec gives for ``$XDG_CACHE_HOME``: an empty value
    usually comes from ``MHAPLUG_CACHE=$SOME_UNSET_VARIABLE``, and taken as a path it would fill the current
    folder with cache files.
    """
    value = os.environ.get("MHAPLUG_CACHE", "").strip()
    return Path(value).expanduser() if value else Path.home() / ".cache" / "mhaplug"


def _key(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------------------------------------
# Cache entries: written atomically, validated when read, rebuilt when bad
# ----------------------------------------------------------------------------------------------------------

_T = TypeVar("_T")


def _cached(path: Path, *, read: Callable[[Path], _T], build: Callable[[Path], None]) -> _T:
    """The cache entry at ``path``. ``read`` loads and validates an entry, raising if it is bad; ``build`` writes a
    new one to the path it is given (:func:`mhaplug.util.atomic_path`). A bad entry (truncated, corrupted, or not what
    this version writes) is logged as a WARNING with its path, and rebuilt."""
    if path.exists():
        try:
            return read(path)
        # Each format fails its own way (JSONDecodeError, ArrowInvalid, tokenizers' bare Exception); any of them
        # means the entry is bad, and it is rebuilt.
        except Exception as error:  # noqa: BLE001
            logger.warning("cache entry %s is unreadable (%s: %s); rebuilding it", path, type(error).__name__, error)
    with atomic_path(path) as tmp:
        build(tmp)
    return read(path)


# ----------------------------------------------------------------------------------------------------------
# Sources
# ----------------------------------------------------------------------------------------------------------


def stdlib_docstrings(*, cache_dir: Path | None = None) -> list[str]:
    """Docstrings of the standard library's modules, classes and functions, in a fixed order (see module doc)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    cache = (cache_dir or default_cache_dir()) / "sources" / f"stdlib_docs-{_key(sys.version, str(root))}.json"

    def build(tmp: Path) -> None:
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
        tmp.write_bytes(json.dumps(docs).encode())

    return _cached(cache, read=_read_docstrings, build=build)


def _read_docstrings(path: Path) -> list[str]:
    docs = json.loads(path.read_bytes())
    if not isinstance(docs, list) or not all(isinstance(doc, str) for doc in docs):
        raise ValueError(f"expected a JSON list of strings, got a {type(docs).__name__} holding {reprlib.repr(docs)}")
    return docs


_SUBJECTS = [
    "the parser",
    "a thread",
    "this module",
    "the socket",
    "each worker",
    "the buffer",
    "a process",
    "the queue",
]
_VERBS = ["returns", "reads", "writes", "closes", "opens", "sends", "waits for", "raises"]
_OBJECTS = [
    "a list of strings",
    "the next line",
    "an error",
    "the result",
    "all pending data",
    "a new file",
    "the lock",
]


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


def read_text_files(path: str | Sequence[str], *, text_column: str = "text") -> list[str | None]:
    """The documents of local files, in order: ``path`` is a file, a glob or a list of them, and each file is read
    by its own extension:

    - ``.txt``: a document per line (``\\n``, ``\\r\\n`` or ``\\r``); ``text_column`` does not apply.
    - ``.jsonl``: an object per line, its ``text_column`` field the document; blank lines are skipped.
    - ``.json``: a JSON array of such objects, or (not starting with ``[``) an object per line as ``.jsonl``.
    - ``.parquet``: the ``text_column`` column.

    Files are read into memory, so nothing is written anywhere (``datasets.load_dataset`` would keep a copy in the
    Hugging Face cache). A null text is an empty document (dropped and counted later). Every bad input raises,
    naming the file and, where it applies, the line: a missing file, an unknown extension, an empty file, bytes
    that are not UTF-8, a line that is not JSON, a missing text field or one that is not a string.
    """
    files = _data_files(path)
    return [text for file in files for text in _READERS[file.suffix.lower()](file, text_column)]


def _data_files(path: str | Sequence[str]) -> list[Path]:
    files: list[Path] = []
    for pattern in [path] if isinstance(path, str) else list(path):
        pattern = os.path.expanduser(str(pattern))
        if any(char in pattern for char in "*?["):
            matches = sorted(Path(m) for m in glob.glob(pattern, recursive=True))
            if not matches:
                raise FileNotFoundError(f"data path {pattern!r} matches no file; check data.path")
            files += [m for m in matches if not m.is_dir()]
        else:
            files.append(Path(pattern))
    for file in files:
        if file.is_dir():
            raise ValueError(
                f"data path {str(file)!r} is a directory: give files or a glob, e.g. {str(file / '*.txt')!r}"
            )
        if file.suffix.lower() not in _READERS:
            raise ValueError(
                f"data path {str(file)!r}: unsupported extension {file.suffix.lower()!r}; use {', '.join(_READERS)}"
            )
    for file in files:
        if not file.exists():
            raise FileNotFoundError(f"data file {str(file)!r} does not exist; check data.path")
    return files


def _read_text(file: Path) -> str:
    data = file.read_bytes()
    start = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0  # a byte-order mark is not text
    try:
        text = data[start:].decode("utf-8")
    except UnicodeDecodeError as error:
        offset = start + error.start
        line = data.count(b"\n", 0, offset) + 1
        raise ValueError(
            f"data file {str(file)!r}, line {line}: not UTF-8 (byte 0x{data[offset]:02x} at "
            f"byte offset {offset}); convert the file to UTF-8, e.g. iconv -f latin1 -t utf-8"
        ) from None
    if not text.strip():
        raise ValueError(f"data file {str(file)!r} is empty: remove it from data.path, or give it text")
    return text


def _read_txt(file: Path, text_column: str) -> list[str | None]:
    lines = _read_text(file).replace("\r\n", "\n").replace("\r", "\n").split("\n")
    return lines[:-1] if lines[-1] == "" else lines  # a final newline ends the last line; it starts no document


def _json_kind(value: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), "number"
    )


def _document(row: Any, text_column: str, where: str) -> str | None:
    # ValueError: a file's content is a bad value, not a programming error
    if not isinstance(row, dict):
        raise ValueError(f"{where}: a JSON {_json_kind(row)}, not an object with a {text_column!r} field")  # noqa: TRY004
    if text_column not in row:
        raise ValueError(
            f"{where}: text_column={text_column!r} is not in the row; its fields are {list(row)}; set data.text_column"
        )
    text = row[text_column]
    if text is not None and not isinstance(text, str):
        raise ValueError(
            f"{where}: text_column={text_column!r} holds {reprlib.repr(text)} ({type(text).__name__}), not a string"
        )
    return text


def _read_jsonl(file: Path, text_column: str) -> list[str | None]:
    texts = []
    for number, line in enumerate(_read_text(file).split("\n"), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(
                f"data file {str(file)!r}, line {number}: not valid JSON ({error.msg} at column {error.colno}); "
                f"{file.suffix} files hold one JSON object per line"
                + (", or one JSON array" if file.suffix.lower() == ".json" else "")
            ) from None
        texts.append(_document(row, text_column, f"data file {str(file)!r}, line {number}"))
    return texts


def _read_json(file: Path, text_column: str) -> list[str | None]:
    text = _read_text(file)
    if not text.lstrip().startswith("["):
        return _read_jsonl(file, text_column)  # JSON Lines in a .json file, as datasets' json reader accepts
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(
            f"data file {str(file)!r}, line {error.lineno}: not valid JSON ({error.msg} at column {error.colno})"
        ) from None
    return [_document(row, text_column, f"data file {str(file)!r}, item [{i}]") for i, row in enumerate(rows)]


def _read_parquet(file: Path, text_column: str) -> list[str | None]:
    import pyarrow as pa  # datasets' own dependency
    import pyarrow.parquet as pq

    if file.stat().st_size == 0:
        raise ValueError(f"data file {str(file)!r} is empty: remove it from data.path, or give it text")
    try:
        schema = pq.read_schema(file)
    except (pa.ArrowException, OSError) as error:
        raise ValueError(f"data file {str(file)!r} is not a readable parquet file ({error})") from None
    if text_column not in schema.names:
        raise ValueError(
            f"data file {str(file)!r}: text_column={text_column!r} is not in the file; its columns are "
            f"{schema.names}; set data.text_column"
        )
    kind = schema.field(text_column).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_string_view(kind)):
        raise ValueError(f"data file {str(file)!r}: text_column={text_column!r} holds {kind}, not strings")
    texts = pq.read_table(file, columns=[text_column]).column(text_column).to_pylist()
    if not texts:
        raise ValueError(f"data file {str(file)!r} is empty: remove it from data.path, or give it text")
    return texts


_READERS: dict[str, Callable[[Path, str], list[str | None]]] = {
    ".txt": _read_txt,
    ".jsonl": _read_jsonl,
    ".json": _read_json,
    ".parquet": _read_parquet,
}


def _load_hf(path: str, name: str | None, split: str) -> datasets.Dataset:
    """``datasets.load_dataset(path, name, split=split)``, failing at once with one line (:class:`ConfigError`).

    A local path loads offline. For a hub name, a hub that cannot be reached is found with one request of a few
    seconds (no retries), and the dataset is then loaded from the local cache only: ``huggingface_hub`` would retry
    each request five times, backing off 1 + 2 + 4 + 8 + 8 s, before ``datasets`` raises. ``HF_HUB_OFFLINE=1`` skips
    the probe."""
    from huggingface_hub import constants

    local, why = Path(path).expanduser().exists(), None  # why: the reason the hub is not asked
    if datasets.config.HF_HUB_OFFLINE or constants.HF_HUB_OFFLINE:
        why = "offline mode is on (HF_HUB_OFFLINE)"
    elif not local and not _hub_reachable(constants.ENDPOINT):
        why = f"the Hugging Face hub ({constants.ENDPOINT}) cannot be reached"
    try:
        with _hub_offline(local or why is not None):
            return datasets.load_dataset(path, name, split=split)
    except Exception as error:  # noqa: BLE001 (datasets raises several types: ConnectionError, FileNotFoundError, ...)
        where = f"data.path={path!r}" + (f", data.name={name!r}" if name else "") + f", data.split={split!r}"
        if why is not None and not local:
            raise ConfigError(
                f"data.path={path!r}: {why} and the dataset is not in the local cache; download it once with network "
                f"access (it is cached then), or point data.path at a local copy (a directory, or data=text_files)"
            ) from None
        detail = " ".join(str(error).split())  # one line
        raise ConfigError(
            f"could not load the Hugging Face dataset {where}: {type(error).__name__}: {detail}"
        ) from None


def _hub_reachable(endpoint: str, timeout: float = 3.0) -> bool:
    """Whether ``endpoint`` answers one HEAD request within ``timeout`` seconds (any HTTP status counts)."""
    import urllib.error
    import urllib.request

    try:
        urllib.request.urlopen(urllib.request.Request(endpoint, method="HEAD"), timeout=timeout).close()
    except urllib.error.HTTPError:
        return True  # it answered
    except (OSError, ValueError):  # URLError, a refused connection, an unknown host, a timeout, a malformed URL
        return False
    return True


@contextmanager
def _hub_offline(offline: bool) -> Iterator[None]:
    """``datasets`` and ``huggingface_hub`` in offline mode (read from the cache only) inside the block, if
    ``offline``; the flags are restored after it."""
    from huggingface_hub import constants

    if not offline:
        yield
        return
    saved = datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE = saved


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
        # plain strs (a structured config hands Enum members): save_hyperparameters below records these locals
        source = check_choice("source", source, SOURCES)
        layout = check_choice("layout", layout, LAYOUTS)
        padding_side = check_choice("padding_side", padding_side, PADDING_SIDES)
        batching = check_choice("batching", batching, BATCHINGS)
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
        table = _load_hf(hp.path, hp.name, hp.split)
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
        data_key = _key(
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
            _fingerprint_texts(split["train"]["text"]),
        )
        self.tokenizer = self._tokenizer(split["train"]["text"], data_key)
        token_key = _key(data_key, self.tokenizer.to_str(), hp.max_length)
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
        path = self.cache_dir / "tokenizers" / f"bpe-{_key(data_key, hp.vocab_size)}.json"

        def build(tmp: Path) -> None:
            tokenizer = train_tokenizer(train_texts, vocab_size=hp.vocab_size)
            tmp.write_text(tokenizer.to_str(), encoding="utf-8")
            logger.info("trained a byte-level BPE tokenizer (%d tokens) -> %s", tokenizer.get_vocab_size(), path)

        return _cached(
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
            _check_tokenised(
                rows, documents=len(texts), vocab_size=tokenizer.get_vocab_size(), max_length=max_length, eos=eos
            )
            return rows

        return _cached(self.cache_dir / "tokenised" / f"{key}.arrow", read=read, build=build)

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
        (:func:`mhaplug.unpad.add_token_index`)."""
        device = self.trainer.strategy.root_device if self.trainer is not None else "cpu"
        return unpad.add_token_index(batch, device)

    def train_dataloader(self) -> sampling.ResumableDataLoader:
        """Resumable mid-epoch for any ``num_workers``: Lightning saves the loader's state (the batches trained,
        :class:`mhaplug.sampling.ResumableDataLoader`) in checkpoints and restores it on resume."""
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


def _check_tokenised(rows: datasets.Dataset, *, documents: int, vocab_size: int, max_length: int, eos: int) -> None:
    """What every tokenised split holds, checked in one pass over its arrays: raises ValueError if it does not."""
    if rows.column_names != ["input_ids", "length"]:
        raise ValueError(f"columns are {rows.column_names}, expected ['input_ids', 'length']")
    rows.data.validate(full=True)  # offsets and buffers in bounds (ArrowInvalid if not), before anything reads them
    input_ids = rows.data.column("input_ids").combine_chunks()
    ids = input_ids.flatten().to_numpy(zero_copy_only=False)  # (total tokens,)
    lengths = np.diff(input_ids.offsets.to_numpy())  # (rows,) tokens of each row
    if not np.array_equal(lengths, rows.data.column("length").to_numpy()):
        raise ValueError("the length column does not match the rows' token counts")
    if len(lengths) and (lengths.min() < 1 or lengths.max() > max_length):
        raise ValueError(f"rows of {lengths.min()} to {lengths.max()} tokens, expected 1 to max_length={max_length}")
    if len(ids) and (ids.min() < 0 or ids.max() >= vocab_size):
        raise ValueError(f"token ids from {ids.min()} to {ids.max()}, expected 0 to {vocab_size - 1}")
    ends_with_eos = int((ids[np.cumsum(lengths) - 1] == eos).sum()) if len(lengths) else 0
    if ends_with_eos < documents:  # a document's last row ends with EOS: fewer means rows are missing (truncated)
        raise ValueError(f"{ends_with_eos} rows end a document, expected {documents} documents")


def _fingerprint_texts(texts: list[str]) -> str:
    digest = hashlib.sha256()
    for text in texts:
        digest.update(text.encode("utf-8", "surrogatepass"))
        digest.update(b"\0")
    return digest.hexdigest()[:16]
