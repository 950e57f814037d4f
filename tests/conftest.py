"""What every test shares: a seeded torch, mhaplug's known noise hidden, nothing written into the repository; and the
set-ups several test files build: a tiny synthetic :class:`~mhaplug.data.TextDataModule`, the tiny
:class:`~mhaplug.training.lit.LitDecoderLM` that trains on it, and ``python -m mhaplug.compare`` as a subprocess."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from mhaplug.training.quiet import silence_known_noise

ROOT = Path(__file__).resolve().parents[1]

# The tiny synthetic data and model the training tests share: documents of 1 to 64 words from a small grammar, a BPE of
# 300 tokens, rows of at most 32 tokens; a one-layer decoder of width 32.
TINY_DATA = {"source": "synthetic", "synthetic_documents": 200, "vocab_size": 300, "max_length": 32, "batch_size": 8}
TINY_MODEL = {"vocab_size": 300, "max_positions": 32, "d_model": 32, "num_heads": 2, "num_layers": 1, "d_ff": 64}


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _known_noise_silenced() -> None:
    """The tests' fits as quiet as train.py's: pytest resets the warning filters for each test, so
    mhaplug.training.quiet's exact filters are installed again inside it (tests/training/test_quiet.py removes them to
    see both sides). Every other warning stays visible."""
    silence_known_noise()


def pytest_configure(config: pytest.Config) -> None:
    # Deterministic and fast on a 2-core CI box: hypothesis without deadlines (the first SDPA call is slow).
    from hypothesis import settings

    settings.register_profile("mhaplug", deadline=None, print_blob=True)
    settings.load_profile("mhaplug")


@pytest.fixture(autouse=True)
def _nothing_written_into_the_repository() -> Iterator[None]:
    """Tests write under temporary folders only: a test that leaves a run folder in the repository's
    outputs/ (Hydra's default run dir) fails here."""
    outputs = ROOT / "outputs"
    before = set(outputs.rglob("*")) if outputs.exists() else set()
    yield
    after = set(outputs.rglob("*")) if outputs.exists() else set()
    new = sorted(str(p.relative_to(outputs.parent)) for p in after - before)
    assert not new, f"the test wrote into the repository: {new[:5]}; write under tmp_path (hydra.run.dir=...)"


@pytest.fixture
def tiny_data(tmp_path: Path) -> Callable[..., Any]:
    """``tiny_data(**settings)``: a :class:`~mhaplug.data.TextDataModule` of :data:`TINY_DATA` with its cache under
    this test's ``tmp_path`` (``cache_dir=`` elsewhere to share one), ``settings`` overriding; not yet set up."""
    from mhaplug.data import TextDataModule  # datasets and Lightning: imported by the tests that use it

    def make(**settings: Any) -> TextDataModule:
        return TextDataModule(**{**TINY_DATA, "cache_dir": str(tmp_path / "cache"), **settings})

    return make


@pytest.fixture
def tiny_model() -> Callable[..., Any]:
    """``tiny_model(**settings)``: a :class:`~mhaplug.training.lit.LitDecoderLM` of :data:`TINY_MODEL` (for
    :data:`TINY_DATA`), ``settings`` overriding (the optimiser's too)."""
    from mhaplug.training.lit import LitDecoderLM

    def make(**settings: Any) -> LitDecoderLM:
        return LitDecoderLM(**{**TINY_MODEL, **settings})

    return make


@pytest.fixture
def run_compare() -> Callable[..., subprocess.CompletedProcess[str]]:
    """``run_compare(runs_dir, *options)``: ``python -m mhaplug.compare RUNS_DIR [options]`` as a user runs it, in a
    subprocess from the repository's root; its exit code and output."""

    def run(runs_dir: str | Path, *options: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "mhaplug.compare", str(runs_dir), *options]
        return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)

    return run
