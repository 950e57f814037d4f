"""A row as the collators take it (a dict with ``input_ids``, or a bare sequence of ints; a list, numpy array or
tensor), made a 1-D int64 tensor, or refused with an error that names the row and says what to do; and the error
for a pass-through key whose values cannot be stacked."""

from __future__ import annotations

import numbers
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = ["INT64", "Row", "token_ids", "unstackable"]

Row = Mapping[str, Any] | Sequence[int] | np.ndarray | Tensor


INT64 = np.iinfo(np.int64)


def token_ids(row: Row, index: int, vocab_size: int | None) -> Tensor:
    """One row's ``input_ids`` as a 1-D int64 tensor, with errors that name the row."""
    if isinstance(row, Mapping) and "input_ids" not in row:
        raise KeyError(f"row {index} has no 'input_ids' key; its keys are {sorted(row)}")
    ids = row["input_ids"] if isinstance(row, Mapping) else row
    if isinstance(ids, (str, bytes)):
        hint = "for byte-level ids pass list(data)" if isinstance(ids, bytes) else "tokenise the text first"
        got = f"{type(ids).__name__} {ids[:60]!r}"
        raise TypeError(f"row {index}: input_ids must be token ids (ints), got {got}; {hint}")
    if isinstance(ids, Tensor) and ids.dtype != torch.uint64:  # torch has no max() for uint64: checked as numpy
        tensor = ids
    else:
        array = _id_array(ids, index)
        tensor = torch.from_numpy(array) if array.size else torch.zeros(0, dtype=torch.int64)
    if tensor.dtype == torch.bool or tensor.is_floating_point() or tensor.is_complex():
        raise TypeError(
            f"row {index}: input_ids must be integers, got dtype {tensor.dtype}: {tensor.flatten()[:8].tolist()}"
        )
    if tensor.dim() != 1:
        raise ValueError(f"row {index}: input_ids must be 1-D, got shape {tuple(tensor.shape)}")
    if tensor.numel() == 0:
        raise ValueError(f"row {index}: input_ids is empty; drop empty documents before collating")
    tensor = tensor.to(torch.int64)
    if vocab_size is not None and (tensor.min() < 0 or tensor.max() >= vocab_size):
        bad = tensor[(tensor < 0) | (tensor >= vocab_size)][:4].tolist()
        raise ValueError(f"row {index}: token ids {bad} are outside the vocabulary [0, {vocab_size})")
    return tensor


def _id_array(ids: object, index: int) -> np.ndarray:
    """``ids`` as a numpy array, or an error naming the row for what numpy would reject, or turn into something
    other than token ids (strings, floats from ints past int64, or a silent wrap of uint64 to negative ids)."""
    try:
        array = np.asarray(ids.cpu() if isinstance(ids, Tensor) else ids)
    except ValueError as error:  # numpy refuses a ragged nested sequence
        raise ValueError(
            f"row {index}: input_ids must be a flat sequence of ints, got a nested {type(ids).__name__} {str(ids)[:60]}"
        ) from error
    kind = array.dtype.kind
    if kind == "i" or (kind == "u" and array.dtype.itemsize < 8):
        return array  # the common case, checked cheaply: the collators convert every row here
    if kind in "US":
        raise TypeError(
            f"row {index}: input_ids must be token ids (ints), got strings {array.ravel()[:8].tolist()}; "
            "tokenise the text first"
        )
    outside = _outside_int64(ids, array)
    if outside:
        raise ValueError(f"row {index}: input_ids has token ids {outside} that do not fit int64")
    if kind == "O":
        got = f"{type(ids).__name__} {str(ids)[:60]}"
        raise TypeError(f"row {index}: input_ids must be a flat sequence of ints, got {got}")
    return array  # bool, float or complex: the caller names the dtype


def _outside_int64(ids: object, array: np.ndarray) -> list[int]:
    """Up to 4 ids of ``ids`` outside int64. numpy makes Python ints past int64 a uint64, float64 or object array."""
    if array.dtype == np.uint64:
        return array[array > INT64.max][:4].tolist()
    ints = (
        array.dtype.kind in "fO"
        and array.ndim == 1
        and isinstance(ids, Sequence)
        and all(isinstance(t, numbers.Integral) and not isinstance(t, (bool, np.bool_)) for t in ids)
    )
    return [int(t) for t in ids if not INT64.min <= t <= INT64.max][:4] if ints else []  # type: ignore[union-attr]


def _show(value: object) -> str:
    """A short description of one value, for errors: ``Tensor of shape (3,)``, ``list [1, 2]``, ``int 3``."""
    if isinstance(value, (Tensor, np.ndarray)):
        return f"{type(value).__name__} of shape {tuple(value.shape)}"
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 60 else text[:57] + '...'}"


def _structure(value: object) -> object:
    """What ``default_collate`` needs equal in every row to stack a value: its type and shape, nested."""
    if isinstance(value, (Tensor, np.ndarray)):
        return type(value).__name__, tuple(value.shape)
    if isinstance(value, Mapping):
        return "mapping", tuple(sorted((str(k), _structure(v)) for k, v in value.items()))
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        return "sequence", tuple(_structure(v) for v in value)
    if isinstance(value, numbers.Number) and not isinstance(value, (bool, np.bool_)):
        return "number"  # ints and floats stack together (as floats)
    return type(value).__name__


def unstackable(key: str, values: list[Any], error: Exception) -> Exception:
    """The error for a pass-through key whose values ``default_collate`` cannot stack: the rows that differ."""
    first = _structure(values[0])
    differ = [i for i, value in enumerate(values) if _structure(value) != first]
    if not differ:
        detail = f"default_collate raised {type(error).__name__}: {error}"
        cls: type[Exception] = ValueError
    else:
        i = differ[0]
        detail = f"rows {differ[:8]} differ from row 0 (row 0: {_show(values[0])}; row {i}: {_show(values[i])})"
        cls = TypeError if type(values[i]) is not type(values[0]) else ValueError
    return cls(
        f"passthrough key {key!r} cannot be stacked: {detail}; give {key!r} one type and shape in every row, "
        "or leave it out of passthrough_keys"
    )
