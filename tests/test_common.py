"""mhaplug.common: the choices, the input checks, rounding up and atomic writes, each written once and used by every
module; and the light imports that let config validation use them."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mhaplug.common import (
    METRICS_FILE,
    SKIPPED_FILE,
    SUMMARY_FILE,
    Batching,
    Layout,
    OnInvalid,
    PaddingSide,
    Source,
    atomic_path,
    check_choice,
    check_int,
    plain_text,
    round_up,
    write_atomic,
)

ROOT = Path(__file__).resolve().parents[1]


def test_a_choice_is_the_str_of_its_value() -> None:
    assert Layout.packed == "packed" and f"{Layout.packed}" == "packed" and str(Layout.packed) == "packed"
    assert json.dumps({"layout": Layout.packed}) == '{"layout": "packed"}'
    assert {"packed": 1}[Layout.packed] == 1  # dict lookups by the plain name
    assert Batching.values() == ("random", "length_grouped", "token_budget")
    assert (Source.values(), Layout.values(), PaddingSide.values(), OnInvalid.values()) == (
        ("stdlib_docs", "synthetic", "text_files", "hf"),
        ("padded", "packed"),
        ("right", "left"),
        ("error", "skip", "run"),
    )


def test_check_choice_returns_a_plain_str_or_names_the_allowed_values() -> None:
    value = check_choice("layout", Layout.packed, Layout)
    assert value == "packed" and type(value) is str  # a checkpoint's hyper-parameters stay plain types
    assert type(check_choice("layout", "padded", ("padded", "packed"))) is str
    for bad in ("ragged", None, 1):
        with pytest.raises(ValueError, match=f"^layout must be one of padded, packed; got {bad!r}$"):
            check_choice("layout", bad, Layout)


def test_check_int() -> None:
    assert check_int("n", 3) == 3 and type(check_int("n", np.int32(3))) is int
    assert check_int("n", 0, minimum=0) == 0 and check_int("n", None, optional=True) is None
    with pytest.raises(ValueError, match=r"^n must be an int >= 1, got 0$"):
        check_int("n", 0)
    with pytest.raises(ValueError, match=r"^seed must be an int >= 0, got -1$"):
        check_int("seed", -1, minimum=0)
    for bad, kind in ((True, "bool"), (np.bool_(True), "bool"), (2.0, "float"), ("8", "str"), (None, "NoneType")):
        with pytest.raises(TypeError, match=rf"^n must be an int >= 1, got {bad!r} \({kind}\)$"):
            check_int("n", bad)
    with pytest.raises(TypeError, match=r"^n must be an int >= 1 or None, got 1.5 \(float\)$"):
        check_int("n", 1.5, optional=True)
    # any int (minimum=None), with what it is for in the message; and always within int64
    assert check_int("ignore_index", -100, minimum=None) == -100
    with pytest.raises(
        TypeError, match=r"^pad_token_id must be an int \(the id written on padding\), got '0' \(str\)$"
    ):
        check_int("pad_token_id", "0", minimum=None, meaning="the id written on padding")
    for big in (2**63, -(2**63) - 1):
        with pytest.raises(ValueError, match=rf"^n must fit int64, got {big}$"):
            check_int("n", big, minimum=None)
    with pytest.raises(ValueError, match=rf"^max_length must fit int64, got {2**70}$"):
        check_int("max_length", 2**70)


def test_a_run_folder_s_file_names_are_lightning_s_where_lightning_writes_them() -> None:
    from pytorch_lightning.loggers.csv_logs import ExperimentWriter

    assert (SUMMARY_FILE, METRICS_FILE, SKIPPED_FILE) == ("summary.json", "metrics.csv", "skipped.txt")
    assert METRICS_FILE == ExperimentWriter.NAME_METRICS_FILE  # what the CSV logger writes, and compare reads


def test_round_up() -> None:
    assert [round_up(n, 8) for n in (1, 7, 8, 9, 16)] == [8, 8, 8, 16, 16]
    assert round_up(13, None) == 13 and round_up(13, 1) == 13
    assert round_up(np.array([1, 8, 9]), 8).tolist() == [8, 8, 16]


def test_atomic_path_replaces_the_whole_file_or_nothing(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "summary.json"
    write_atomic(target, "old")
    with pytest.raises(RuntimeError, match="disk full"), atomic_path(target) as tmp:
        tmp.write_text("half of the new")
        raise RuntimeError("disk full")
    assert target.read_text() == "old" and sorted(p.name for p in target.parent.iterdir()) == ["summary.json"]
    write_atomic(target, b"new")
    assert target.read_bytes() == b"new" and sorted(p.name for p in target.parent.iterdir()) == ["summary.json"]


def test_common_imports_the_standard_library_only_and_config_neither_datasets_nor_lightning() -> None:
    tree = ast.parse((ROOT / "mhaplug" / "common.py").read_text())
    imported = {
        alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names
    } | {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
    assert imported <= set(sys.stdlib_module_names) | {"__future__"}, imported
    heavy = ("datasets", "pytorch_lightning", "lightning_fabric", "mhaplug.data.datamodule", "mhaplug.training.lit")
    code = f"import sys, mhaplug.training.config; print([m for m in {heavy!r} if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"


def test_plain_text_is_restructuredtext_as_a_terminal_shows_it() -> None:
    text = "Masks of a real batch: ``key_padding_mask``,\n:class:`~mhaplug.data.PadCollator` and :func:`mhaplug.audit`."
    assert plain_text(text) == "Masks of a real batch: key_padding_mask, PadCollator and mhaplug.audit."


@pytest.mark.parametrize("module", ["mhaplug.show", "mhaplug.compare"])
def test_help_prints_no_restructuredtext(module: str) -> None:
    out = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, check=True).stdout
    assert "``" not in out and ":class:" not in out and ":mod:" not in out
    description = " ".join(out.split("\n\n")[1].split())
    if module == "mhaplug.show":
        assert description == (
            "A picture of the masks of a real batch: key_padding_mask, attn_mask, torch's merge, and what each "
            "strategy hands its kernel, for left padding, right padding and packed rows."
        )
