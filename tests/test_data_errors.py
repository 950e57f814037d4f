"""A data file or tokenizer that cannot be read: one :class:`~mhaplug.common.DataError` naming the file (and line) and
what to do, in the library and across a loader worker's process boundary; ``python train.py`` prints it as one line,
exits 2 and leaves no run folder (``HYDRA_FULL_ERROR=1``: the traceback above it)."""

from __future__ import annotations

import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mhaplug.common import ConfigError, DataError
from mhaplug.data import TextDataModule
from mhaplug.data.sources import read_text_files
from mhaplug.data.tokenizer import train_tokenizer

ROOT = Path(__file__).resolve().parents[1]

BAD_JSONL = b'{"text": "one"}\n{"text": "two"}\n{"text": "three"\n'


def expect_data_error(error: pytest.ExceptionInfo[DataError], message: str, path: Path, line: int | None) -> None:
    assert type(error.value) is DataError
    assert (error.value.args, error.value.path, error.value.line) == ((message,), str(path), line)


# ----------------------------------------------------------------------------------------------------------
# The library: each bad file is one DataError with its file and line
# ----------------------------------------------------------------------------------------------------------

# (file name, its bytes or None for no file, the message after "data file '<path>'", the line)
BAD_FILES = [
    ("missing.jsonl", None, " does not exist; check data.path", None),
    ("empty.txt", b"", " is empty: remove it from data.path, or give it text", None),
    ("blank.jsonl", b"\n  \n", " is empty: remove it from data.path, or give it text", None),
    (
        "latin1.txt",
        "good line\ncaf\u00e9\n".encode("latin-1"),
        ", line 2: not UTF-8 (byte 0xe9 at byte offset 13); convert the file to UTF-8, e.g. iconv -f latin1 -t utf-8",
        2,
    ),
    (
        "bad.jsonl",
        BAD_JSONL,
        ", line 3: not valid JSON (Expecting ',' delimiter at column 17); .jsonl files hold one JSON object per line",
        3,
    ),
    (
        "column.jsonl",
        b'{"text": "one"}\n{"body": "two", "id": 2}\n',
        ", line 2: text_column='text' is not in the row; its fields are ['body', 'id']; set data.text_column",
        2,
    ),
    (
        "number.jsonl",
        b'{"text": 2}\n',
        ", line 1: text_column='text' holds 2 (int), not a string; set data.text_column to a field of strings",
        1,
    ),
    (
        "surrogate.jsonl",
        b'{"text": "ok"}\n{"text": "a \\ud800 b"}\n',
        (
            ", line 2: text_column='text' holds a lone surrogate (\\ud800 at character 2), which is not Unicode text; "
            "fix the escape, or drop the row"
        ),
        2,
    ),
    (
        "broken.json",
        b'[{"text": "one"},\n {"text": }]',
        (
            ", line 2: not valid JSON (Expecting value at column 11); a .json file holds one JSON array of objects, or "
            "one object per line"
        ),
        2,
    ),
    (
        "corrupt.parquet",
        b"PAR1 not really parquet",
        (
            " is not a readable parquet file (Parquet magic bytes not found in footer. Either the file is corrupted or "
            "this is not a parquet file.); check that it was written whole, or remove it from data.path"
        ),
        None,
    ),
]


@pytest.mark.parametrize(("name", "content", "message", "line"), BAD_FILES, ids=[case[0] for case in BAD_FILES])
def test_a_bad_data_file_is_one_data_error_naming_the_file_and_line(
    tmp_path: Path, name: str, content: bytes | None, message: str, line: int | None
) -> None:
    good, bad = tmp_path / "good.txt", tmp_path / name
    good.write_text("a good line\n")
    if content is not None:
        bad.write_bytes(content)
    with pytest.raises(DataError) as error:
        read_text_files([str(good), str(bad)])
    expect_data_error(error, f"data file {str(bad)!r}{message}", bad, line)


def test_a_parquet_file_damaged_under_a_good_footer_or_without_the_column_is_named(tmp_path: Path) -> None:
    good = tmp_path / "good.parquet"
    pq.write_table(pa.table({"text": ["a document"] * 1000, "id": list(range(1000))}), good)
    damaged = tmp_path / "damaged.parquet"
    data = bytearray(good.read_bytes())
    data[10:60] = bytes(50)  # the first data page; the footer (schema, row counts) is whole
    damaged.write_bytes(bytes(data))
    with pytest.raises(DataError) as error:
        read_text_files(str(damaged))
    expect_data_error(
        error,
        f"data file {str(damaged)!r} is not a readable parquet file (Corrupt snappy compressed data.); check that it "
        f"was written whole, or remove it from data.path",
        damaged,
        None,
    )
    with pytest.raises(DataError) as error:
        read_text_files(str(good), text_column="body")
    expect_data_error(
        error,
        f"data file {str(good)!r}: text_column='body' is not in the file; its columns are ['text', 'id']; set "
        f"data.text_column",
        good,
        None,
    )
    with pytest.raises(DataError) as error:
        read_text_files(str(good), text_column="id")
    expect_data_error(
        error,
        f"data file {str(good)!r}: text_column='id' holds int64, not strings; set data.text_column to a column of "
        f"strings",
        good,
        None,
    )


def test_data_paths_that_name_no_file_are_data_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError) as error:
        read_text_files(str(tmp_path / "*.jsonl"))
    expect_data_error(
        error, f"data path {str(tmp_path / '*.jsonl')!r} matches no file; check data.path", tmp_path / "*.jsonl", None
    )
    (tmp_path / "corpus.csv").write_text("a,b\n")
    with pytest.raises(DataError) as error:
        read_text_files(str(tmp_path / "corpus.csv"))
    expect_data_error(
        error,
        f"data path {str(tmp_path / 'corpus.csv')!r}: unsupported extension '.csv'; use .txt, .jsonl, .json, .parquet",
        tmp_path / "corpus.csv",
        None,
    )


def text_files(tmp_path: Path, **settings: object) -> TextDataModule:
    """A TextDataModule of a good two-line file under ``tmp_path``, its cache there too, set up."""
    good = tmp_path / "good.txt"
    good.write_text("a good line\nanother good line\n")
    module = TextDataModule(source="text_files", path=str(good), cache_dir=str(tmp_path / "cache"), **settings)  # type: ignore[arg-type]
    module.setup("fit")
    return module


@pytest.mark.parametrize("kind", ["missing", "directory", "not JSON", "no special tokens"])
def test_a_bad_tokenizer_path_is_a_data_error_before_the_corpus_is_read(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "tokenizer.json"
    if kind == "directory":
        path.mkdir()
    elif kind == "not JSON":
        path.write_text('{"model": ')
    elif kind == "no special tokens":
        train_tokenizer(["some text to learn from"], vocab_size=300).save(str(path))
        path.write_text(path.read_text().replace("<|pad|>", "<pad>"))
    given = f"data.tokenizer_path={str(path)!r}"
    expected = {
        "missing": f"{given} does not exist; give the path of a tokenizer.json (tokenizers' Tokenizer.save writes "
        f"one), or leave data.tokenizer_path unset to train one",
        "directory": f"{given} is a directory; give the path of a tokenizer.json (tokenizers' Tokenizer.save writes "
        f"one), or leave data.tokenizer_path unset to train one",
        "not JSON": f"{given} is not a tokenizers JSON file (EOF while parsing a value at line 1 column 10); give a "
        f"tokenizer.json saved by tokenizers",
        "no special tokens": f"{given} must have <|pad|> with id 0, got None; give a tokenizer with both special "
        f"tokens at those ids (as mhaplug trains them)",
    }[kind]
    with pytest.raises(DataError) as error:
        text_files(tmp_path, tokenizer_path=str(path))
    expect_data_error(error, expected, path, None)
    assert not (tmp_path / "cache").exists()  # refused before the corpus was read into the cache


def test_a_corpus_too_small_to_split_is_a_data_error(tmp_path: Path) -> None:
    """One document is split by bytes (its start trains, its end validates); one of a single byte cannot be."""
    one = tmp_path / "one.txt"
    one.write_text("x\n\n")
    with pytest.raises(DataError) as error:
        TextDataModule(source="text_files", path=str(one), cache_dir=str(tmp_path / "cache")).setup("fit")
    assert str(error.value) == (
        f"source='text_files' (data.path={str(one)!r}) gave 1 document of 1 bytes, too little to split into a "
        f"training and a validation part; give it more text"
    )


# ----------------------------------------------------------------------------------------------------------
# Across processes: a DataError pickles whole; a loader worker's arrives as itself, not as a traceback
# ----------------------------------------------------------------------------------------------------------


def test_a_data_error_pickles_with_its_file_line_and_notes() -> None:
    error = DataError("data file 'x.jsonl', line 3: not valid JSON", path="x.jsonl", line=3)
    error.add_note("raised in DataLoader worker process 0")
    copy = pickle.loads(pickle.dumps(error))
    assert (type(copy), copy.args, copy.path, copy.line, copy.__notes__) == (
        DataError,
        ("data file 'x.jsonl', line 3: not valid JSON",),
        "x.jsonl",
        3,
        ["raised in DataLoader worker process 0"],
    )
    assert isinstance(copy, ConfigError)  # what train.py refuses with exit 2


def test_a_bad_line_read_in_a_streaming_loader_worker_arrives_as_the_same_data_error(tmp_path: Path) -> None:
    """Streamed, the validation head reads the first documents in this process; the bad line, past them, is read in
    the loader worker, and arrives here as the DataError it raised there (torch would re-raise it as a DataError
    holding the worker's whole traceback as its message)."""
    tokenizer = tmp_path / "tokenizer.json"
    train_tokenizer(["line number one of the corpus"], vocab_size=300).save(str(tokenizer))
    good, bad = tmp_path / "good.txt", tmp_path / "bad.jsonl"
    good.write_text("".join(f"line number {i} of the corpus\n" for i in range(200)))
    bad.write_bytes(BAD_JSONL)
    module = TextDataModule(
        source="text_files",
        path=[str(good), str(bad)],
        tokenizer_path=str(tokenizer),
        streaming=True,
        num_workers=1,
        val_max_tokens=32,
        max_length=32,
        cache_dir=str(tmp_path / "cache"),
    )
    module.setup("fit")  # reads the head of the stream: 64 documents of good.txt
    with pytest.raises(DataError) as error:
        next(iter(module.train_dataloader()))
    expect_data_error(
        error,
        f"data file {str(bad)!r}, line 3: not valid JSON (Expecting ',' delimiter at column 17); .jsonl files hold one "
        f"JSON object per line",
        bad,
        3,
    )
    (note,) = error.value.__notes__  # the worker's own traceback, for HYDRA_FULL_ERROR=1
    assert note.startswith("raised in DataLoader worker process 0:\nTraceback (most recent call last):\n")


# ----------------------------------------------------------------------------------------------------------
# python train.py: one line, exit 2, no run folder; HYDRA_FULL_ERROR=1 adds the traceback
# ----------------------------------------------------------------------------------------------------------


def run_train(tmp_path: Path, *overrides: str, sweep: bool = False, **env: str) -> subprocess.CompletedProcess[str]:
    """``python train.py [-m] data=text_files <overrides>`` in ``tmp_path`` (its default run folders under
    ``tmp_path/outputs``), mhaplug's cache there too."""
    return subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *(["-m"] if sweep else []), "data=text_files", *overrides],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=180,
        env={**os.environ, "MHAPLUG_CACHE": str(tmp_path / "cache"), **env},
        check=False,
    )


def test_bad_data_files_are_one_line_each_exit_2_and_leave_no_folder(tmp_path: Path) -> None:
    """One sweep (one process start) over six bad files: each job refused in one line, none leaves a folder."""
    cases = [case for case in BAD_FILES if case[0] in ("missing.jsonl", "empty.txt", "latin1.txt", "bad.jsonl")]
    cases += [case for case in BAD_FILES if case[0] in ("corrupt.parquet", "column.jsonl")]
    for name, content, _, _ in cases:
        if content is not None:
            (tmp_path / name).write_bytes(content)
    paths = [str(tmp_path / name) for name, *_ in cases]
    result = run_train(tmp_path, f"data.path={','.join(paths)}", sweep=True)
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.splitlines() == [
        f"train.py: error: job {num} (data.path={path},data=text_files): data file {path!r}{message}"
        for num, (path, (_, _, message, _)) in enumerate(zip(paths, cases))
    ]
    assert list((tmp_path / "outputs" / "train" / "multiruns").iterdir()) == []  # neither the sweep's nor a job's


def test_a_bad_tokenizer_path_is_the_same_one_line_after_the_traceback_with_hydra_full_error(tmp_path: Path) -> None:
    """A single run (the sweep above shows the plain form); HYDRA_FULL_ERROR=1, Hydra's own switch, puts the traceback
    above the line, and the exit code and the folder stay those of a refusal."""
    (tmp_path / "good.txt").write_text("a good line\nanother good line\n")
    (tmp_path / "tokenizer.json").write_text('{"model": ')
    result = run_train(
        tmp_path,
        f"data.path={tmp_path}/good.txt",
        f"data.tokenizer_path={tmp_path}/tokenizer.json",
        HYDRA_FULL_ERROR="1",
    )
    assert (result.returncode, result.stdout) == (2, ""), result.stderr[-3000:]
    message = (
        f"data.tokenizer_path={str(tmp_path / 'tokenizer.json')!r} is not a tokenizers JSON file (EOF while parsing a "
        f"value at line 1 column 10); give a tokenizer.json saved by tokenizers"
    )
    lines = result.stderr.splitlines()
    assert lines[0] == "Traceback (most recent call last):"
    assert re.search(r'File ".*mhaplug/data/datamodule\.py", line \d+, in _given_tokenizer', result.stderr)
    assert lines[-2:] == [f"mhaplug.common.DataError: {message}", f"train.py: error: {message}"]
    assert list((tmp_path / "outputs" / "train" / "runs").iterdir()) == []  # no run folder
