from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def pytest_configure(config: pytest.Config) -> None:
    # Deterministic and fast on a 2-core CI box: hypothesis without deadlines (the first SDPA call is slow).
    from hypothesis import settings

    settings.register_profile("mhaplug", deadline=None, print_blob=True)
    settings.load_profile("mhaplug")
