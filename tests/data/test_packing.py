"""first_fit_pack: literal packings, errors, and equality with first_fit_pack_reference, the quadratic first-fit it
replaced (whose own packings are checked as literals too)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mhaplug.data.packing import first_fit_pack, first_fit_pack_reference


@pytest.mark.parametrize("pack", [first_fit_pack, first_fit_pack_reference])
def test_first_fit_pack_literal(pack) -> None:  # type: ignore[no-untyped-def]
    # Longest first: 5 -> row 0 (room 3); 4 -> row 1 (room 4); 3 -> row 0 (full); 2 -> row 1; 1 -> row 1.
    assert pack([2, 5, 3, 4, 1], 8) == [[1, 2], [3, 0, 4]]
    # Equal lengths fill a row in input order before the next opens; a row with room takes a later, shorter run.
    assert pack([3, 3, 3, 3, 3, 2, 2, 1], 7) == [[0, 1, 7], [2, 3], [4, 5, 6]]
    # A row that an earlier run left with room is found before the first empty row.
    assert pack([6, 6, 4, 2, 2, 2, 1, 1], 8) == [[0, 3], [1, 4], [2, 5, 6, 7]]
    assert pack([1, 1, 1], 1) == [[0], [1], [2]]  # capacity 1
    assert pack([4, 4, 4], 4) == [[0], [1], [2]]  # every document exactly the capacity
    assert pack([], 4) == []


def test_first_fit_pack_takes_arrays_and_tensors() -> None:
    assert first_fit_pack(np.array([2, 2], dtype=np.int32), 4) == first_fit_pack(torch.tensor([2, 2]), 4) == [[0, 1]]
    assert first_fit_pack([np.int64(3), 1], np.int64(4)) == [[0, 1]]
    assert type(first_fit_pack(np.array([2]), 4)[0][0]) is int


def test_first_fit_pack_errors() -> None:
    with pytest.raises(ValueError, match="^document 1 has 9 tokens, more than max_length=8$"):
        first_fit_pack_reference([3, 9], 8)
    with pytest.raises(ValueError, match="document 0 has 9 tokens, more than max_length=8"):
        first_fit_pack([9], 8)
    with pytest.raises(ValueError, match="document 1 has 9 tokens, more than max_length=8"):  # the first longest
        first_fit_pack([3, 9, 9], 8)
    for capacity in (0, -3):
        with pytest.raises(ValueError, match=f"max_length must be an int >= 1, got {capacity}"):
            first_fit_pack([1, 2], capacity)
    with pytest.raises(TypeError, match=r"max_length must be an int >= 1, got True \(bool\)"):
        first_fit_pack([1], True)  # type: ignore[arg-type]
    with pytest.raises(
        ValueError, match=r"document 2 has 0 tokens; every length must be >= 1 \(drop empty documents\)"
    ):
        first_fit_pack([1, 2, 0, -1], 8)
    with pytest.raises(TypeError, match=r"lengths must be ints; document 1 has float 1.5"):
        first_fit_pack([1, 1.5, 2.0], 8)
    with pytest.raises(TypeError, match=r"lengths must be ints; document 0 has list \[1, 2\]"):
        first_fit_pack(np.array([[1, 2]]), 8)
    with pytest.raises(TypeError, match=r"lengths must be ints; document 0 has bool True"):
        first_fit_pack([True], 8)


def random_lengths(rng: np.random.Generator, n: int, capacity: int, kind: str) -> list[int]:
    if kind == "uniform":
        return rng.integers(1, capacity + 1, n).tolist()
    if kind == "skewed":  # mostly short, as the standard library's docstring chunks: geometric, cut at capacity
        return np.minimum(rng.geometric(min(1.0, 4 / capacity), n), capacity).tolist()
    if kind == "capacity":  # many documents exactly the row capacity, among others
        return np.where(rng.random(n) < 0.5, capacity, rng.integers(1, capacity + 1, n)).tolist()
    if kind == "few":  # few distinct lengths: long runs of equal length
        return rng.choice(rng.integers(1, capacity + 1, 3), n).tolist()
    return rng.integers(
        max(1, capacity // 2), capacity + 1, n
    ).tolist()  # "large": more than half the capacity, one per row mostly


@pytest.mark.parametrize("kind", ["uniform", "skewed", "capacity", "few", "large"])
def test_first_fit_pack_equals_the_quadratic_reference(kind: str) -> None:
    rng = np.random.default_rng(["uniform", "skewed", "capacity", "few", "large"].index(kind))
    for trial in range(150):
        capacity = int(rng.choice([1, 2, 3, 7, 8, 64, 256, 1000]))
        n = int(rng.integers(0, 120 if trial < 140 else 2000))
        lengths = random_lengths(rng, n, capacity, kind)
        assert first_fit_pack(lengths, capacity) == first_fit_pack_reference(lengths, capacity), (
            kind,
            capacity,
            lengths,
        )
