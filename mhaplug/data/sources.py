"""Where text comes from: every source yields the documents as strings, in a fixed order.

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
  written to the Hugging Face cache, and a bad file raises :class:`mhaplug.common.DataError` naming the file and
  line.
- ``hf``: any ``datasets.load_dataset(path, name, split=split)``: a hub name, or a local path (loaded offline). When
  the hub cannot be reached (or ``HF_HUB_OFFLINE=1``) a hub name loads from the local cache only, and fails at once
  with one line (:class:`mhaplug.common.ConfigError`) when it is not there.
"""

from __future__ import annotations

import ast
import codecs
import glob
import json
import os
import random
import reprlib
import sys
import sysconfig
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import pyarrow as pa

from mhaplug.common import ConfigError, DataError
from mhaplug.data.cache import cache_key, cached, default_cache_dir

__all__ = [
    "Documents",
    "data_files",
    "iter_text_files",
    "load_hf",
    "read_text_files",
    "stdlib_docstrings",
    "synthetic_texts",
]

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


def stdlib_docstrings(*, cache_dir: Path | None = None) -> list[str]:
    """Docstrings of the standard library's modules, classes and functions, in a fixed order (see module doc)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    cache = (cache_dir or default_cache_dir()) / "sources" / f"stdlib_docs-{cache_key(sys.version, str(root))}.json"

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

    return cached(cache, read=_read_docstrings, build=build)


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


@dataclass(frozen=True)
class Documents:
    """A source's documents in order (None for a null text), as a picklable callable: each call reads them again
    from the start, so a stream's loader workers can each call it. Fields: the TextDataModule's settings of the same
    names; ``streaming`` loads ``hf`` data as a ``datasets`` ``IterableDataset`` (nothing prepared first)."""

    source: str
    path: str | list[str] | None = None
    name: str | None = None
    split: str = "train"
    text_column: str = "text"
    cache_dir: str | None = None
    synthetic_documents: int = 512
    synthetic_max_words: int = 64
    seed: int = 0
    streaming: bool = False

    def __call__(self) -> Iterator[str | None]:
        if self.source == "stdlib_docs":
            return iter(stdlib_docstrings(cache_dir=Path(self.cache_dir) if self.cache_dir else None))
        if self.source == "synthetic":
            return iter(synthetic_texts(self.synthetic_documents, max_words=self.synthetic_max_words, seed=self.seed))
        if self.source == "text_files":
            assert self.path is not None
            return iter_text_files(self.path, text_column=self.text_column)
        return self._hf()

    def _hf(self) -> Iterator[str | None]:
        assert isinstance(self.path, str)
        data = load_hf(self.path, self.name, self.split, streaming=self.streaming)
        columns = data.column_names if data.column_names is not None else list(data.features or {})
        if columns and self.text_column not in columns:
            raise DataError(
                f"data.path={self.path!r}: text_column={self.text_column!r} is not in the data; its columns are "
                f"{columns}; set data.text_column",
                path=self.path,
            )
        if self.streaming:
            return (row[self.text_column] for row in data)
        column = data.data.column(self.text_column)
        if not pa.types.is_string(column.type) and not pa.types.is_large_string(column.type):
            raise DataError(
                f"data.path={self.path!r}: text_column={self.text_column!r} holds {column.type}, not strings; set "
                f"data.text_column to a column of strings",
                path=self.path,
            )
        return (text for chunk in column.chunks for text in chunk.to_pylist())  # a chunk of the table at a time


def read_text_files(path: str | Sequence[str], *, text_column: str = "text") -> list[str | None]:
    """The documents of local files, in order, as a list: :func:`iter_text_files` collected (for small corpora and
    tests; the DataModule streams them to disk instead)."""
    return list(iter_text_files(path, text_column=text_column))


def iter_text_files(path: str | Sequence[str], *, text_column: str = "text") -> Iterator[str | None]:
    """The documents of local files, in order, one at a time: ``path`` is a file, a glob or a list of them, and each
    file is read by its own extension:

    - ``.txt``: a document per line (``\\n``, ``\\r\\n`` or ``\\r``); ``text_column`` does not apply.
    - ``.jsonl``: an object per line, its ``text_column`` field the document; blank lines are skipped.
    - ``.json``: a JSON array of such objects (read whole: use ``.jsonl`` for large corpora), or (not starting with
      ``[``) an object per line as ``.jsonl``.
    - ``.parquet``: the ``text_column`` column, a record batch at a time.

    ``.txt``, ``.jsonl`` and ``.parquet`` are read a line (a batch) at a time, so memory does not grow with the file.
    Nothing is written anywhere (``datasets.load_dataset`` would keep a copy in the Hugging Face cache). A null text
    is an empty document (dropped and counted later). Every bad input raises :class:`mhaplug.common.DataError`, naming
    the file and, where it applies, the line: a missing file, an unknown extension, an empty file, a file that cannot
    be read, bytes that are not UTF-8, a line that is not JSON, a missing text field or one that is not a string, a
    parquet file that does not parse. The files are all checked to exist before the first document is read.
    """
    files = data_files(path)
    for file in files:
        try:
            yield from _READERS[file.suffix.lower()](file, text_column)
        except OSError as error:  # no permission, removed since data_files looked, an I/O error
            raise DataError(
                f"data file {str(file)!r} cannot be read ({error.strerror or error}); check that it is readable",
                path=file,
            ) from error


def data_files(path: str | Sequence[str]) -> list[Path]:
    files: list[Path] = []
    for pattern in [path] if isinstance(path, str) else list(path):
        pattern = os.path.expanduser(str(pattern))
        if any(char in pattern for char in "*?["):
            matches = sorted(Path(m) for m in glob.glob(pattern, recursive=True))
            if not matches:
                raise DataError(f"data path {pattern!r} matches no file; check data.path", path=pattern)
            files += [m for m in matches if not m.is_dir()]
        else:
            files.append(Path(pattern))
    for file in files:
        if file.is_dir():
            raise DataError(
                f"data path {str(file)!r} is a directory: give files or a glob, e.g. {str(file / '*.txt')!r}", path=file
            )
        if file.suffix.lower() not in _READERS:
            raise DataError(
                f"data path {str(file)!r}: unsupported extension {file.suffix.lower()!r}; use {', '.join(_READERS)}",
                path=file,
            )
    for file in files:
        if not file.exists():
            raise DataError(f"data file {str(file)!r} does not exist; check data.path", path=file)
    return files


def _lines(file: Path) -> Iterator[tuple[int, str]]:
    """``(line number, text)`` of each line of a UTF-8 file, read a line at a time, without its line ending (``\\n``,
    or ``\\r\\n``); a byte-order mark at the start is dropped. Bytes that are not UTF-8, or a file holding only
    white space, raise naming the file (and the line, and the byte offset in the file)."""
    offset, seen_text = 0, False
    with file.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            start = len(codecs.BOM_UTF8) if number == 1 and raw.startswith(codecs.BOM_UTF8) else 0
            try:
                line = raw[start:].decode("utf-8")
            except UnicodeDecodeError as error:
                at = offset + start + error.start
                raise DataError(
                    f"data file {str(file)!r}, line {number}: not UTF-8 (byte 0x{raw[start + error.start]:02x} at "
                    f"byte offset {at}); convert the file to UTF-8, e.g. iconv -f latin1 -t utf-8",
                    path=file,
                    line=number,
                ) from None
            offset += len(raw)
            seen_text = seen_text or bool(line.strip())
            yield number, line[:-2] if line.endswith("\r\n") else line.removesuffix("\n")
    if not seen_text:
        raise _empty(file)


def _empty(file: Path) -> DataError:
    return DataError(f"data file {str(file)!r} is empty: remove it from data.path, or give it text", path=file)


def _read_txt(file: Path, text_column: str) -> Iterator[str | None]:
    for _, line in _lines(file):
        yield from line.split("\r")  # a lone carriage return ends a line too


def _json_kind(value: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), "number"
    )


def _document(
    row: Any, text_column: str, file: Path, *, line: int | None = None, item: int | None = None
) -> str | None:
    """The text of a JSON row of ``file`` (at ``line``, or ``item`` of a JSON array), or a DataError naming where."""
    where = f"data file {str(file)!r}, " + (f"line {line}" if item is None else f"item [{item}]")
    if not isinstance(row, dict):
        raise DataError(
            f"{where}: a JSON {_json_kind(row)}, not an object with a {text_column!r} field", path=file, line=line
        )
    if text_column not in row:
        raise DataError(
            f"{where}: text_column={text_column!r} is not in the row; its fields are {list(row)}; set data.text_column",
            path=file,
            line=line,
        )
    text = row[text_column]
    if text is not None and not isinstance(text, str):
        raise DataError(
            f"{where}: text_column={text_column!r} holds {reprlib.repr(text)} ({type(text).__name__}), not a string; "
            f"set data.text_column to a field of strings",
            path=file,
            line=line,
        )
    if text is not None and not text.isascii():  # isascii is O(1); only JSON escapes make text that is not Unicode
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as error:
            raise DataError(
                f"{where}: text_column={text_column!r} holds a lone surrogate (\\u{ord(text[error.start]):04x} at "
                f"character {error.start}), which is not Unicode text; fix the escape, or drop the row",
                path=file,
                line=line,
            ) from None
    return text


def _read_jsonl(file: Path, text_column: str) -> Iterator[str | None]:
    yield from _jsonl_rows(file, _lines(file), text_column)


def _jsonl_rows(file: Path, lines: Iterable[tuple[int, str]], text_column: str) -> Iterator[str | None]:
    for number, line in lines:
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(
                f"data file {str(file)!r}, line {number}: not valid JSON ({error.msg} at column {error.colno}); "
                f"{file.suffix} files hold one JSON object per line"
                + (", or one JSON array" if file.suffix.lower() == ".json" else ""),
                path=file,
                line=number,
            ) from None
        yield _document(row, text_column, file, line=number)


def _read_json(file: Path, text_column: str) -> Iterator[str | None]:
    lines = list(_lines(file))  # a JSON array is parsed whole
    text = "\n".join(line for _, line in lines)
    if not text.lstrip().startswith("["):
        yield from _jsonl_rows(file, lines, text_column)  # JSON Lines in a .json file, as datasets' json reader accepts
        return
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as error:
        raise DataError(
            f"data file {str(file)!r}, line {error.lineno}: not valid JSON ({error.msg} at column {error.colno}); "
            f"a .json file holds one JSON array of objects, or one object per line",
            path=file,
            line=error.lineno,
        ) from None
    for i, row in enumerate(rows):
        yield _document(row, text_column, file, item=i)


def _read_parquet(file: Path, text_column: str) -> Iterator[str | None]:
    import pyarrow as pa  # datasets' own dependency
    import pyarrow.parquet as pq

    def unreadable(error: Exception) -> DataError:
        detail = " ".join(str(error).split())  # pyarrow's messages may span lines
        return DataError(
            f"data file {str(file)!r} is not a readable parquet file ({detail}); check that it was written whole, or "
            f"remove it from data.path",
            path=file,
        )

    if file.stat().st_size == 0:
        raise _empty(file)
    try:
        schema = pq.read_schema(file)
    except (pa.ArrowException, OSError) as error:
        raise unreadable(error) from None
    if text_column not in schema.names:
        raise DataError(
            f"data file {str(file)!r}: text_column={text_column!r} is not in the file; its columns are "
            f"{schema.names}; set data.text_column",
            path=file,
        )
    kind = schema.field(text_column).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_string_view(kind)):
        raise DataError(
            f"data file {str(file)!r}: text_column={text_column!r} holds {kind}, not strings; set data.text_column to "
            f"a column of strings",
            path=file,
        )
    reader = pq.ParquetFile(file)
    if reader.metadata.num_rows == 0:
        raise _empty(file)
    batches = reader.iter_batches(batch_size=4096, columns=[text_column])
    while True:
        try:  # a data page can be damaged under a good footer: found when the batch is read
            batch = next(batches, None)
        except (pa.ArrowException, OSError) as error:
            raise unreadable(error) from None
        if batch is None:
            return
        yield from batch.column(0).to_pylist()


_READERS: dict[str, Callable[[Path, str], Iterator[str | None]]] = {
    ".txt": _read_txt,
    ".jsonl": _read_jsonl,
    ".json": _read_json,
    ".parquet": _read_parquet,
}


def load_hf(path: str, name: str | None, split: str, *, streaming: bool = False) -> Any:
    """``datasets.load_dataset(path, name, split=split, streaming=streaming)`` (a ``Dataset``, or with ``streaming`` an
    ``IterableDataset``), failing at once with one line (:class:`ConfigError`).

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
            return datasets.load_dataset(path, name, split=split, streaming=streaming)
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
