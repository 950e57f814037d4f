"""TextDataModule end to end, offline: synthetic and local-file sources, tokenizer cache, split, batching."""

from __future__ import annotations

import itertools
import json
import logging
import re
import time
from collections.abc import Callable
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from mhaplug.common import ConfigError, DataError
from mhaplug.data import TextDataModule, cache, sources
from mhaplug.data.collate import PackCollator, PadCollator

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@pytest.fixture
def synthetic(tiny_data: Callable[..., TextDataModule], tmp_path: Path) -> Callable[..., TextDataModule]:
    """``synthetic(cache=tmp_path, **settings)``: the shared tiny data (``tiny_data``), its cache in ``cache``, prepared
    and set up."""

    def make(cache: Path = tmp_path, **settings: object) -> TextDataModule:
        module = tiny_data(cache_dir=str(cache), **settings)
        module.prepare_data()
        module.setup("fit")
        return module

    return make


def one_epoch(loader: torch.utils.data.DataLoader) -> list[dict]:
    return list(loader)


@pytest.mark.parametrize("layout", ["packed", "padded"])
def test_synthetic_end_to_end(synthetic: Callable[..., TextDataModule], tmp_path: Path, layout: str) -> None:
    module = synthetic(tmp_path, layout=layout)
    assert isinstance(module.collator(), PackCollator if layout == "packed" else PadCollator)
    assert module.stats["documents"] == 200 and module.stats["empty_documents_dropped"] == 0
    assert len(module.splits["train"]) + len(module.splits["val"]) >= 200  # long documents may become 2 chunks
    batches = one_epoch(module.train_dataloader())
    ids = [i for b in batches for row, real in zip(b["input_ids"], ~b["key_padding_mask"]) for i in row[real].tolist()]
    assert sum(b["lengths"].sum().item() for b in batches) == module.stats["train_tokens"] == len(ids)
    assert max(ids) < module.vocab_size and min(ids) >= 0
    assert all(b["input_ids"].shape[1] <= 32 for b in batches)
    # Every document ends with EOS (id 1) and the tokenizer round-trips the text.
    first = module.splits["train"][0]["input_ids"]
    assert module.tokenizer is not None and module.tokenizer.id_to_token(1) == "<|endoftext|>"
    assert module.tokenizer.id_to_token(0) == "<|pad|>"
    text = module.tokenizer.decode(first[:-1]) if first[-1] == 1 else None
    assert text is None or text in sources.synthetic_texts(200, seed=0)


def test_tokenizer_and_tokens_are_cached_and_the_split_is_deterministic(
    synthetic: Callable[..., TextDataModule], tmp_path: Path
) -> None:
    first = synthetic(tmp_path)
    tokenizers = list((tmp_path / "tokenizers").glob("*.json"))
    assert len(tokenizers) == 1
    stamp = tokenizers[0].stat().st_mtime_ns
    second = synthetic(tmp_path)
    assert tokenizers[0].stat().st_mtime_ns == stamp  # loaded, not retrained
    assert second.splits["val"]["input_ids"] == first.splits["val"]["input_ids"]
    assert len(list((tmp_path / "tokenised").glob("*.arrow"))) == 2  # train and val, reused
    other_seed = synthetic(tmp_path, seed=1)
    assert other_seed.splits["val"]["input_ids"] != first.splits["val"]["input_ids"]


@pytest.mark.parametrize(
    ("layout", "batching", "limit"),
    [("padded", "length_grouped", 0.10), ("padded", "token_budget", 0.10), ("packed", "random", 0.02)],
)
def test_batching_cuts_padding(
    synthetic: Callable[..., TextDataModule], tmp_path: Path, layout: str, batching: str, limit: float
) -> None:
    baseline = one_epoch(synthetic(tmp_path, layout="padded").train_dataloader())  # random batches of padded rows
    module = synthetic(tmp_path, layout=layout, batching=batching, max_tokens=8 * 32)
    batches = one_epoch(module.train_dataloader())

    def pad(bs: list[dict]) -> float:
        return 1 - sum(b["lengths"].sum().item() for b in bs) / sum(b["input_ids"].numel() for b in bs)

    assert pad(baseline) > 0.2
    assert pad(batches) < limit
    assert sum(b["lengths"].sum().item() for b in batches) == module.stats["train_tokens"]  # no token lost
    assert isinstance(module.collator(), PackCollator if layout == "packed" else PadCollator)
    if batching == "token_budget":
        assert all(b["input_ids"].numel() <= 8 * 32 for b in batches)
    if layout == "packed":
        assert all((b["document_ids"] >= 0).sum() == b["lengths"].sum() for b in batches)


def test_text_files_txt_and_jsonl(tmp_path: Path) -> None:
    txt = tmp_path / "corpus.txt"
    txt.write_text("the first line of text\n\n   \nthe second line\n" * 10)
    module = TextDataModule(
        source="text_files",
        path=str(txt),
        cache_dir=str(tmp_path / "c"),
        vocab_size=300,
        max_length=16,
        val_fraction=0.1,
    )
    with pytest.warns(UserWarning, match=r"^tiny data split: .* training is less than one batch"):
        module.setup("fit")
    assert module.stats == {
        "documents": 20,
        "empty_documents_dropped": 20,
        "train_tokens": module.stats["train_tokens"],
        "val_tokens": module.stats["val_tokens"],
        "val_tokens_held_out": module.stats["val_tokens"],  # under val_max_tokens: all of it is validated
        "val_rows": 2,  # 10% of the bytes: 2 whole documents, one row each
        "documents_cut_by_split": 0,
        "split_warning": module.stats["split_warning"],  # 10 tiny lines: less than one batch
    }
    jsonl = tmp_path / "corpus.jsonl"
    jsonl.write_text("\n".join(json.dumps({"content": f"document number {i} says hello", "id": i}) for i in range(30)))
    module = TextDataModule(
        source="text_files", path=str(jsonl), text_column="content", cache_dir=str(tmp_path / "c"), vocab_size=300
    )
    module.setup("fit")
    assert module.stats["documents"] == 30
    with pytest.raises(
        ValueError,
        match=r"corpus.jsonl', line 1: text_column='body' is not in the row; its fields are \['content', 'id'\]",
    ):
        TextDataModule(source="text_files", path=str(jsonl), text_column="body", cache_dir=str(tmp_path / "c")).setup(
            "fit"
        )


# ----------------------------------------------------------------------------------------------------------
# The cache: written atomically, validated when read, a bad entry logged and rebuilt
# ----------------------------------------------------------------------------------------------------------

CORRUPTIONS = {
    "truncated": lambda data: data[: len(data) // 2],
    "empty": lambda data: b"",
    "garbage": lambda data: bytes(range(256)) * (len(data) // 256 + 1),
}


@pytest.mark.parametrize("corruption", CORRUPTIONS)
@pytest.mark.parametrize("entry", ["tokenizers/*.json", "tokenised/*-train.arrow", "tokenised/*-val.arrow"])
def test_a_bad_cache_entry_is_logged_and_rebuilt(
    synthetic: Callable[..., TextDataModule],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    entry: str,
    corruption: str,
) -> None:
    module = synthetic(tmp_path)
    # copied out: the splits map the files, and a file truncated in place under them crashes this process (SIGBUS)
    first = {name: module.splits[name].to_dict()["input_ids"] for name in ("train", "val")}
    del module
    (path,) = (tmp_path / entry.split("/")[0]).glob(entry.split("/")[1])
    path.write_bytes(CORRUPTIONS[corruption](path.read_bytes()))
    with caplog.at_level(logging.WARNING, logger="mhaplug.data"):
        again = synthetic(tmp_path)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert (
        len(warnings) == 1
        and f"cache entry {path} is unreadable" in warnings[0]
        and warnings[0].endswith("rebuilding it")
    )
    assert {name: again.splits[name].to_dict()["input_ids"] for name in ("train", "val")} == first
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="mhaplug.data"):
        synthetic(tmp_path)  # rebuilt for good
    assert not caplog.records
    assert sorted(p.name for p in tmp_path.rglob("*tmp*")) == []  # no temporary file left behind


@pytest.fixture
def small_stdlib(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A standard library of two modules, so that collecting its docstrings takes milliseconds."""
    root = tmp_path / "stdlib"
    (root / "pkg").mkdir(parents=True)
    (root / "a.py").write_text('"""Module a."""\n\ndef f():\n    """Function f."""\n')
    (root / "pkg" / "b.py").write_text('class B:\n    """Class B."""\n')
    monkeypatch.setattr(sources.sysconfig, "get_paths", lambda: {"stdlib": str(root)})
    return root


@pytest.mark.parametrize(
    "content", [b'["Module a.", "Function', b"", b'{"not": "a list"}', b'["Module a.", 3]', b"\xff\xfe"]
)
def test_a_bad_stdlib_sources_entry_is_logged_and_rebuilt(
    tmp_path: Path, small_stdlib: Path, caplog: pytest.LogCaptureFixture, content: bytes
) -> None:
    cache = tmp_path / "cache"
    assert sources.stdlib_docstrings(cache_dir=cache) == ["Module a.", "Function f.", "Class B."]
    (path,) = (cache / "sources").glob("*.json")
    path.write_bytes(content)
    with caplog.at_level(logging.WARNING, logger="mhaplug.data"):
        assert sources.stdlib_docstrings(cache_dir=cache) == ["Module a.", "Function f.", "Class B."]
    assert [r.getMessage() for r in caplog.records if str(path) in r.getMessage() and r.levelno == logging.WARNING]
    assert json.loads(path.read_text()) == ["Module a.", "Function f.", "Class B."]


def test_a_cache_write_that_fails_half_way_leaves_no_entry(
    synthetic: Callable[..., TextDataModule], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full disk (or a killed process) in the middle of writing: no half entry under the final name, no
    temporary file; the next run builds the entry."""
    for method in ("write_bytes", "write_text"):

        def disk_full(
            self: Path, data: bytes | str, *args: object, _write: object = getattr(Path, method), **kwargs: object
        ) -> int:
            _write(self, data[: len(data) // 2], *args, **kwargs)  # type: ignore[operator]
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(Path, method, disk_full)
    with pytest.raises(OSError, match="No space left on device"):
        synthetic(tmp_path)
    assert [p.name for p in tmp_path.rglob("*") if p.is_file()] == []
    monkeypatch.undo()
    assert len(synthetic(tmp_path).splits["train"]) > 0
    assert len(list((tmp_path / "tokenizers").glob("*.json"))) == 1


def test_a_bad_tokenizer_path_is_named_not_rebuilt(synthetic: Callable[..., TextDataModule], tmp_path: Path) -> None:
    """A tokenizer the user gave is theirs: an error naming it, never a silent replacement."""
    synthetic(tmp_path)
    (cached,) = (tmp_path / "tokenizers").glob("*.json")
    given = tmp_path / "given.json"
    given.write_text(cached.read_text()[:100])
    with pytest.raises(
        ValueError, match=r"tokenizer_path='.*given.json' is not a tokenizers JSON file \(.*EOF while parsing.*\)"
    ):
        synthetic(tmp_path / "other", tokenizer_path=str(given))
    assert len(given.read_text()) == 100


def test_an_empty_mhaplug_cache_variable_means_the_default_not_the_current_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("MHAPLUG_CACHE", "")
    assert cache.default_cache_dir() == tmp_path / "home" / ".cache" / "mhaplug"
    assert TextDataModule(source="synthetic").cache_dir == tmp_path / "home" / ".cache" / "mhaplug"
    monkeypatch.setenv("MHAPLUG_CACHE", "~/elsewhere")
    assert cache.default_cache_dir() == tmp_path / "home" / "elsewhere"


# ----------------------------------------------------------------------------------------------------------
# data=text_files: each file read by its own extension; every bad input named by file (and line)
# ----------------------------------------------------------------------------------------------------------


def text_files(tmp_path: Path, path: str | list[str], **kwargs: object) -> TextDataModule:
    module = TextDataModule(source="text_files", path=path, cache_dir=str(tmp_path / "cache"), vocab_size=300, **kwargs)  # type: ignore[arg-type]
    module.setup("fit")
    return module


def documents(module: TextDataModule) -> list[str]:
    """Every document of both splits, decoded (each is one chunk followed by EOS here), sorted."""
    assert module.tokenizer is not None
    rows = list(module.splits["train"]["input_ids"]) + list(module.splits["val"]["input_ids"])
    assert all(row[-1] == 1 for row in rows)
    return sorted(module.tokenizer.decode(row[:-1]) for row in rows)


def test_text_files_of_mixed_extensions_are_each_read_by_their_own_extension(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("first line of a\r\nsecond line of a\n\n")
    (tmp_path / "b.jsonl").write_text(
        json.dumps({"body": "row of b", "id": 1}) + "\n\n" + json.dumps({"body": None}) + "\n"
    )
    (tmp_path / "c.json").write_text(json.dumps([{"body": "item of c"}, {"body": "other item of c"}]))
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    pq.write_table(pa.table({"body": ["row of d"], "n": [4]}), tmp_path / "d.parquet")
    module = text_files(
        tmp_path,
        [str(tmp_path / n) for n in ("a.txt", "b.jsonl", "c.json", "d.parquet")],
        text_column="body",
        val_fraction=0.2,  # a share whole lines make: no line is cut in two (5% of 71 bytes is half a line)
    )
    # .txt: a document per line, whatever text_column says; a null text is an empty document (dropped, counted)
    assert documents(module) == sorted(
        ["first line of a", "second line of a", "row of b", "item of c", "other item of c", "row of d"]
    )
    assert module.stats["documents"] == 6 and module.stats["empty_documents_dropped"] == 2
    (tmp_path / "more").mkdir()
    for name in ("y.txt", "x.txt"):
        (tmp_path / "more" / name).write_text(f"a line of {name}\nanother line of {name}\n")
    assert documents(text_files(tmp_path, str(tmp_path / "more" / "*.txt"), val_fraction=0.2)) == sorted(
        f"{line} of {name}" for name in ("x.txt", "y.txt") for line in ("a line", "another line")
    )


def test_text_files_do_not_write_into_the_hugging_face_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    hf_cache = tmp_path / "hf_datasets"
    monkeypatch.setenv("HF_DATASETS_CACHE", str(hf_cache))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", hf_cache)  # read when datasets is imported
    (tmp_path / "corpus.txt").write_text("\n".join(f"line number {i} of the corpus" for i in range(20)))
    (tmp_path / "corpus.jsonl").write_text("\n".join(json.dumps({"text": f"row {i}"}) for i in range(20)))
    text_files(tmp_path, [str(tmp_path / "corpus.txt"), str(tmp_path / "corpus.jsonl")])
    assert not hf_cache.exists() or not any(hf_cache.iterdir())
    assert {p.name for p in (tmp_path / "cache").iterdir()} == {"texts", "tokenizers", "tokenised"}  # all ours


@pytest.mark.parametrize(
    ("name", "content", "error"),
    [
        ("empty.txt", b"", r"data file '.*empty.txt' is empty: remove it from data.path, or give it text"),
        ("blank.jsonl", b"\n  \n", r"data file '.*blank.jsonl' is empty"),
        (
            "latin1.txt",
            "caf\u00e9 au lait\nun cr\u00e8me br\u00fbl\u00e9e\n".encode("latin-1"),
            r"data file '.*latin1.txt', line 1: not UTF-8 \(byte 0xe9 at byte offset 3\); convert the file to UTF-8",
        ),
        (
            "latin1.jsonl",
            b'{"text": "ok"}\n{"text": "caf\xe9"}\n',
            r"data file '.*latin1.jsonl', line 2: not UTF-8 \(byte 0xe9 at byte offset 28\)",
        ),
        (
            "bad.jsonl",
            b'{"text": "one"}\n{"text": "two"}\n{"text": "three"\n',
            r"data file '.*bad.jsonl', line 3: not valid JSON \(Expecting ',' delimiter at column 17\)",
        ),
        (
            "list.jsonl",
            b'{"text": "one"}\n["two"]\n',
            r"data file '.*list.jsonl', line 2: a JSON array, not an object with a 'text' field",
        ),
        (
            "number.jsonl",
            b'{"text": "one"}\n{"text": 2}\n',
            r"data file '.*number.jsonl', line 2: text_column='text' holds 2 \(int\), not a string",
        ),
        (
            "missing.jsonl",
            b'{"text": "one"}\n{"body": "two", "id": 2}\n',
            (
                r"data file '.*missing.jsonl', line 2: text_column='text' is not in the row; "
                r"its fields are \['body', 'id'\]; set data.text_column"
            ),
        ),
        (
            "number.json",
            b'[{"text": "one"},\n {"text": 2.5}]',
            r"data file '.*number.json', item \[1\]: text_column='text' holds 2.5 \(float\), not a string",
        ),
        (
            "broken.json",
            b'[{"text": "one"},\n {"text": }]',
            r"data file '.*broken.json', line 2: not valid JSON \(Expecting value at column 11\)",
        ),
    ],
)
def test_a_bad_data_file_is_named_with_its_line(tmp_path: Path, name: str, content: bytes, error: str) -> None:
    good = tmp_path / "good.txt"
    good.write_text("a good line\nanother good line\n")
    (tmp_path / name).write_bytes(content)
    with pytest.raises(ValueError, match=error):
        text_files(tmp_path, [str(good), str(tmp_path / name)])


def test_a_parquet_text_column_of_numbers_or_a_missing_one_is_named(tmp_path: Path) -> None:
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    pq.write_table(pa.table({"text": [1, 2], "body": ["x", "y"]}), tmp_path / "numbers.parquet")
    with pytest.raises(ValueError, match=r"data file '.*numbers.parquet': text_column='text' holds int64, not strings"):
        text_files(tmp_path, str(tmp_path / "numbers.parquet"))
    with pytest.raises(
        ValueError,
        match=(
            r"data file '.*numbers.parquet': text_column='content' is not in the file; "
            r"its columns are \['text', 'body'\]"
        ),
    ):
        text_files(tmp_path, str(tmp_path / "numbers.parquet"), text_column="content")
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 not really parquet")
    with pytest.raises(ValueError, match=r"data file '.*broken.parquet' is not a readable parquet file \(.*\)"):
        text_files(tmp_path, str(tmp_path / "broken.parquet"))


def test_a_missing_data_file_or_an_empty_glob_is_named(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"data file '.*nowhere.txt' does not exist"):
        text_files(tmp_path, str(tmp_path / "nowhere.txt"))
    with pytest.raises(DataError, match=r"data path '.*/\*.jsonl' matches no file"):
        text_files(tmp_path, str(tmp_path / "*.jsonl"))
    with pytest.raises(ValueError, match=r"data path '.*' is a directory: give files or a glob, e.g. '.*/\*.txt'"):
        text_files(tmp_path, str(tmp_path))


def test_hf_source_loads_a_local_directory_and_explains_a_missing_dataset(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    directory = tmp_path / "local_dataset"
    directory.mkdir()
    (directory / "train.jsonl").write_text(
        "\n".join(json.dumps({"text": f"row {i} of a local dataset"}) for i in range(20))
    )
    module = TextDataModule(source="hf", path=str(directory), cache_dir=str(tmp_path / "c"), vocab_size=300)
    module.setup("fit")
    assert module.stats["documents"] == 20
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(
        ConfigError,
        match=(
            r"^data.path='no-such-user/no-such-dataset': offline mode is on \(HF_HUB_OFFLINE\) and the dataset is not "
            r"in the local cache; "
        ),
    ):
        TextDataModule(source="hf", path="no-such-user/no-such-dataset", cache_dir=str(tmp_path / "c")).setup("fit")


def test_hf_source_fails_at_once_when_the_hub_cannot_be_reached(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A hub name with no hub to reach (offline: the endpoint refuses connections) fails in well under a second with
    one line naming the setting, instead of five retried HEAD requests (~23 s) and a chained traceback; a local
    dataset directory still loads."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # the discard port: nothing listens
    start = time.perf_counter()
    with pytest.raises(ConfigError) as failed:
        TextDataModule(source="hf", path="no-such-user/no-such-dataset", cache_dir=str(tmp_path / "c")).setup("fit")
    assert time.perf_counter() - start < 5
    message = str(failed.value)
    assert "\n" not in message and failed.value.__cause__ is None and failed.value.__suppress_context__
    assert message.startswith(
        "data.path='no-such-user/no-such-dataset': the Hugging Face hub (http://127.0.0.1:9) cannot be reached and "
        "the dataset is not in the local cache; "
    )
    assert not [r for r in caplog.records if "Retrying" in r.getMessage()]
    assert datasets.config.HF_HUB_OFFLINE is False and constants.HF_HUB_OFFLINE is False  # restored

    directory = tmp_path / "local_dataset"
    directory.mkdir()
    (directory / "train.jsonl").write_text("\n".join(json.dumps({"text": f"local row {i}"}) for i in range(20)))
    module = TextDataModule(source="hf", path=str(directory), cache_dir=str(tmp_path / "c"), vocab_size=300)
    module.setup("fit")
    assert module.stats["documents"] == 20


def test_bad_settings_name_the_argument(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="layout must be one of padded, packed; got 'ragged'"):
        TextDataModule(layout="ragged")
    with pytest.raises(ValueError, match="batching='token_budget' needs max_tokens"):
        TextDataModule(batching="token_budget")
    with pytest.raises(ValueError, match="source='text_files' needs path="):
        TextDataModule(source="text_files")


@pytest.mark.parametrize(
    ("settings", "error", "message"),
    [
        ({"seed": -1}, ValueError, r"^seed must be an int >= 0, got -1$"),
        ({"seed": 2**32}, ValueError, r"^seed must be in \[0, 4294967295\] \(the seeds numpy takes\), got 4294967296$"),
        ({"max_length": 0}, ValueError, r"^max_length must be an int >= 2 \(tokens per row; a row of L tokens has L-1"),
        ({"max_length": -1}, ValueError, r"^max_length must be an int >= 2 .*got -1$"),
        ({"max_length": 1}, ValueError, r"^max_length must be an int >= 2 .*got 1$"),
        ({"max_length": 2.5}, TypeError, r"^max_length must be an int >= 2 .*got 2.5 \(float\)$"),
        ({"batch_size": 0}, ValueError, r"^batch_size must be an int >= 1, got 0$"),
        ({"num_workers": -1}, ValueError, r"^num_workers must be an int >= 0 \(loader worker processes"),
        ({"max_documents": 1}, ValueError, r"^max_documents must be an int >= 2 \(documents kept; null = all\)"),
        ({"val_fraction": "0.1"}, ValueError, r"^val_fraction must be in \(0, 1\), got 0.1$"),
        (
            {"layout": "padded", "batching": "token_budget", "max_tokens": 10, "max_length": 64},
            ValueError,
            r"^max_tokens=10 cannot hold one row of max_length=64 tokens; use max_tokens >= 64, e.g. max_tokens=1024$",
        ),
        (
            {"batching": "token_budget", "max_tokens": 60, "max_length": 60, "pad_to_multiple_of": 8},
            ValueError,
            r"^max_tokens=60 cannot hold one row of max_length=60 tokens \(rounded up to 64\); use max_tokens >= 64",
        ),
    ],
)
def test_the_data_module_checks_its_own_arguments_before_reading_anything(
    settings: dict, error: type[Exception], message: str, tmp_path: Path
) -> None:
    """Each was a foreign error (range() arg 3 must not be zero, expected non-negative integer, ...), or for
    max_length=1 batches with no targets."""
    with pytest.raises(error, match=message):
        TextDataModule(source="synthetic", cache_dir=str(tmp_path / "cache"), **settings)
    assert not (tmp_path / "cache").exists()
    with pytest.raises(ValueError, match=r"data path '.*corpus.csv': unsupported extension '.csv'"):
        TextDataModule(source="text_files", path=str(tmp_path / "corpus.csv"), cache_dir=str(tmp_path)).setup("fit")


@pytest.mark.parametrize("num_workers", [0, 2])
def test_loader_state_survives_a_checkpoint_round_trip(
    synthetic: Callable[..., TextDataModule], tmp_path: Path, num_workers: int
) -> None:
    """Workers prefetch batches ahead of the loop: the state counts the batches taken, not those prefetched."""
    loader = synthetic(tmp_path, layout="padded", num_workers=num_workers).train_dataloader()
    iterator = iter(loader)
    seen = [next(iterator)["input_ids"] for _ in range(3)]
    state = loader.state_dict()
    assert state["batches_yielded"] == 3
    rest = [b["input_ids"] for b in iterator]
    assert len(seen) + len(rest) == len(loader) == 46
    resumed = synthetic(tmp_path, layout="padded", num_workers=num_workers).train_dataloader()
    resumed.load_state_dict(json.loads(json.dumps(state)))  # what Lightning does on resume
    again = [b["input_ids"] for b in resumed]
    assert len(again) == len(rest)
    assert all(torch.equal(a, b) for a, b in zip(again, rest))


def test_a_checkpoint_with_the_datamodules_old_sampler_state_still_resumes(
    synthetic: Callable[..., TextDataModule], tmp_path: Path
) -> None:
    """Checkpoints written before the train loader held the state carry it as the DataModule's ``train_sampler``."""
    whole = [b["input_ids"] for b in synthetic(tmp_path).train_dataloader()]
    sampler = synthetic(tmp_path).train_dataloader().batch_sampler
    old_state = {**sampler.state_dict(), "batches_yielded": 5}
    module = synthetic(tmp_path)
    module.load_state_dict({"train_sampler": old_state})
    assert module.state_dict() == {}  # nothing saved twice: the loader's state is in the checkpoint
    assert all(
        torch.equal(a, b) for a, b in zip([b["input_ids"] for b in module.train_dataloader()], whole[5:], strict=True)
    )


@pytest.mark.parametrize("name", ["stdlib_docs", "synthetic", "text_files", "hf"])
def test_data_configs_instantiate_the_datamodule(name: str) -> None:
    with initialize_config_dir(config_dir=str(CONFIGS / "data"), version_base="1.3"):
        cfg = compose(config_name=name, overrides=["+path=x.txt"] if name in ("text_files", "hf") else [])
    if name in ("text_files", "hf"):
        cfg.path = "x.txt"
    module = instantiate(cfg)
    assert isinstance(module, TextDataModule)
    assert (
        module.hparams.source == name
        and module.hparams.layout == "packed"
        and module.hparams.batch_size == (8 if name == "synthetic" else 16)  # synthetic.yaml's, or the default
    )


@pytest.mark.slow
def test_stdlib_docs_source(tmp_path: Path) -> None:
    docs = sources.stdlib_docstrings(cache_dir=tmp_path)
    assert len(docs) > 5000
    assert any(
        d.startswith("Remove any common leading whitespace from every line in `text`.") for d in docs
    )  # textwrap.dedent
    assert sources.stdlib_docstrings(cache_dir=tmp_path) == docs  # from the cache, same order


def test_public_names_are_importable_from_mhaplug() -> None:
    import mhaplug

    assert mhaplug.TextDataModule is TextDataModule
    from mhaplug.decoder import DecoderLM
    from mhaplug.training.lit import LitDecoderLM

    assert mhaplug.LitDecoderLM is LitDecoderLM and mhaplug.DecoderLM is DecoderLM
    assert mhaplug.PadCollator is PadCollator and mhaplug.PackCollator is PackCollator


def test_preparing_the_data_prints_no_progress_bar(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    """Nothing goes through datasets.map or filter any more, so no bar of theirs; the log says what took time."""
    settings = {"source": "synthetic", "vocab_size": 300, "max_length": 32, "synthetic_documents": 64}
    TextDataModule(**settings, cache_dir=str(tmp_path / "small")).setup("fit")
    assert "%|" not in capfd.readouterr().err


# -- the split: a fair share of the tokens on each side ---------------------------------------------------------


def long_line(size: int) -> str:
    """``size`` characters of seeded sentences on one line."""
    return " ".join(sources.synthetic_texts(4000, seed=1))[:size]


def text_files_module(tmp_path: Path, lines: list[str], **settings: object) -> TextDataModule:
    tmp_path.mkdir(exist_ok=True)
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    settings = {"cache_dir": str(tmp_path / "cache"), "vocab_size": 300, "max_length": 64, **settings}
    module = TextDataModule(source="text_files", path=str(path), **settings)
    module.setup("fit")
    return module


def val_share(module: TextDataModule) -> float:
    train, val = module.stats["train_tokens"], module.stats["val_tokens_held_out"]
    return val / (train + val)


def text_of(module: TextDataModule, name: str) -> str:
    assert module.tokenizer is not None
    ids = [i for row in module.splits[name]["input_ids"] for i in row if i != 1]  # EOS (1) dropped
    return module.tokenizer.decode(ids)


def test_one_huge_and_one_short_document_split_fairly_by_tokens_whatever_num_proc(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, recwarn: pytest.WarningsRecorder
) -> None:
    """The document split put the short one in train (6 tokens) and the huge one in validation."""
    from mhaplug.data import corpus

    lines = [long_line(200_000), "a short line"]
    module = text_files_module(tmp_path / "one", lines)
    assert module.stats["documents"] == 2 and module.stats["documents_cut_by_split"] == 1
    assert abs(val_share(module) - 0.05) < 0.002  # 5% asked, +- 0.2 points (bytes stand in for tokens)
    assert module.stats["train_tokens"] > 0.94 * (module.stats["train_tokens"] + module.stats["val_tokens_held_out"])
    assert "a short line" in text_of(module, "val") and "a short line" not in text_of(module, "train")
    assert not [w for w in recwarn if "tiny data split" in str(w.message)]
    monkeypatch.setattr(corpus, "TEXT_BATCH_DOCUMENTS", 1)  # a record batch per document, a process per batch
    monkeypatch.setattr(corpus, "BYTES_PER_PROCESS", 1)
    again = text_files_module(tmp_path / "two", lines, num_proc=2)
    for name in ("train", "val"):
        assert again.splits[name]["input_ids"] == module.splits[name]["input_ids"]


def test_one_long_document_alone_is_split_into_a_start_that_trains_and_an_end_that_validates(tmp_path: Path) -> None:
    """It was refused: gave 1 non-empty documents; need at least 2 to split."""
    line = long_line(200_000)
    module = text_files_module(tmp_path, [line])
    assert module.stats["documents"] == 1 and module.stats["documents_cut_by_split"] == 1
    assert abs(val_share(module) - 0.05) < 0.002
    train, val = text_of(module, "train"), text_of(module, "val")
    assert train + val == line and val.startswith(" ")  # no text lost or in both; cut at white space
    assert 9_000 < len(val) < 11_000


def test_many_documents_of_varied_sizes_split_whole_and_fairly_by_tokens(tmp_path: Path) -> None:
    """The document count drew 3 of 60 documents: 0.1% to 24% of the tokens, by seed."""
    text = long_line(200_000)
    lengths = (1.1 ** np.arange(60) * 20).astype(int)  # 20 to 5,500 characters
    starts = np.concatenate([[0], np.cumsum(lengths)])
    lines = [text[a:b].strip() or "x" for a, b in itertools.pairwise(starts)]
    module = text_files_module(tmp_path, lines)
    assert module.stats["documents"] == 60 and module.stats["documents_cut_by_split"] == 0
    assert abs(val_share(module) - 0.05) < 0.005  # whole documents: +- half a point
    val = module.splits["val"]["input_ids"]
    assert sum(row[-1] == 1 for row in val) == 14  # whole documents: each ends with EOS once


def test_a_tiny_split_warns_with_its_tokens(tmp_path: Path) -> None:
    """A run trained on 6 tokens and validated on 5 M without a word."""
    expected = (
        "tiny data split: 10 training tokens (76.9%), 3 validation tokens (23.1%): training is less than one batch "
        "(data.batch_size * data.max_length = 1024); validation is less than one row (data.max_length = 64); far "
        "from the 95%/5% that data.val_fraction=0.05 asks. Give it more text"
    )
    with pytest.warns(UserWarning, match=re.escape(expected) + "$"):
        module = text_files_module(tmp_path, ["hello world and good night", "see you tomorrow"])
    assert module.stats["split_warning"] == expected  # in the run's summary.json ("data")


def test_a_document_too_short_to_split_is_a_data_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"gave 1 document of 1 bytes, too little to split into a training and a"):
        text_files_module(tmp_path, ["x"])
