from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from mhaplug.training.quiet import silence_known_noise


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _known_noise_silenced() -> None:
    """The tests' fits as quiet as train.py's: pytest resets the warning filters for each test, so
    mhaplug.training.quiet's exact filters are installed again inside it (tests/test_quiet.py removes them to see both
    sides). Every other warning stays visible."""
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
    outputs = Path(__file__).resolve().parents[1] / "outputs"
    before = set(outputs.rglob("*")) if outputs.exists() else set()
    yield
    after = set(outputs.rglob("*")) if outputs.exists() else set()
    new = sorted(str(p.relative_to(outputs.parent)) for p in after - before)
    assert not new, f"the test wrote into the repository: {new[:5]}; write under tmp_path (hydra.run.dir=...)"
