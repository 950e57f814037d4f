"""First-fit decreasing packing of whole documents into rows of at most ``max_length`` tokens.

:func:`first_fit_pack` returns the document indices per row; :class:`mhaplug.data.collate.PackCollator` packs each batch
with it, and :class:`mhaplug.data.TextDataModule` packs whole splits.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import numpy as np
from torch import Tensor

from mhaplug.common import check_int

__all__ = ["first_fit_pack", "first_fit_pack_reference"]


def first_fit_pack(lengths: Sequence[int] | np.ndarray | Tensor, max_length: int) -> list[list[int]]:
    """Indices of documents per row, first-fit decreasing: longest first, each into the first row with room.

    Whole documents only; every length must be in [1, ``max_length``]. Deterministic: ties keep input order.
    Rows come out in order of creation, so the fullest rows come first.

    O(n log n) for n documents (a few million pack in seconds), where scanning the rows for each document was
    O(n x rows): a max-tree over the rows' free room finds the lowest-index row with room in one descent. Its
    leaves for rows not yet opened have all of max_length free, so the same descent finds the next new row. Sorted,
    documents of equal length come in runs: the row found takes as many of the run as fit (first-fit would put
    them there one by one, since no row before it has room), and a run reaching the first unopened row fills
    the new rows it needs at once. Each descent places at least one document.
    """
    max_length = check_int("max_length", max_length)
    sizes = lengths.tolist() if isinstance(lengths, (np.ndarray, Tensor)) else list(lengths)
    if not all(type(size) is int for size in sizes):  # numpy ints, or not ints: checked one by one
        sizes = [_document_length(size, i) for i, size in enumerate(sizes)]
    if not sizes:
        return []
    if min(sizes) < 1:
        i = next(i for i, size in enumerate(sizes) if size < 1)
        raise ValueError(f"document {i} has {sizes[i]} tokens; every length must be >= 1 (drop empty documents)")
    if max(sizes) > max_length:
        i = sizes.index(max(sizes))  # the first of the longest: the first document the packing meets
        raise ValueError(f"document {i} has {sizes[i]} tokens, more than max_length={max_length}")
    count = len(sizes)
    order = sorted(range(count), key=sizes.__getitem__, reverse=True)  # longest first; reverse keeps ties in order
    # First-fit leaves at most one row at most half full (a document in a later row did not fit in an earlier
    # one), so rows <= 2 * tokens / max_length + 1: the tree's leaves.
    leaves = 1 << (min(count, 2 * sum(sizes) // max_length + 1) - 1).bit_length()
    room = [max_length] * (2 * leaves)  # room[node]: the most free room among the rows under node; row r: leaves + r
    rows: list[list[int]] = []
    stop = 0
    while stop < count:
        pos, size = stop, sizes[order[stop]]
        while stop < count and sizes[order[stop]] == size:  # the run of documents of this length: order[pos:stop]
            stop += 1
        assert room[1] >= size, "first-fit needs more rows than its bound"  # else the descent would never end
        while pos < stop:
            node = 1
            while node < leaves:  # descend to the lowest-index row with room >= size
                node = 2 * node if room[2 * node] >= size else 2 * node + 1
            row = node - leaves
            if row == len(rows):  # the first unopened row; every row after it is empty too
                per_row = max_length // size
                if stop - pos > per_row:  # the rest of the run fills several new rows: open them all at once
                    rows.extend(order[p : min(p + per_row, stop)] for p in range(pos, stop, per_row))
                    first, last = node, leaves + len(rows) - 1  # the new rows' leaves
                    room[first:last] = [max_length - per_row * size] * (last - first)
                    room[last] = max_length - (stop - pos - (last - first) * per_row) * size
                    first, last = first // 2, last // 2
                    while first:  # update their ancestors, level by level
                        for parent in range(first, last + 1):
                            room[parent] = max(room[2 * parent], room[2 * parent + 1])
                        first, last = first // 2, last // 2
                    break
                rows.append([])  # one new row: filled below as any open row
            take = min(room[node] // size, stop - pos)  # as many of the run as fit
            rows[row].extend(order[pos : pos + take])
            pos += take
            room[node] -= take * size
            while node > 1:  # update its ancestors, up to the first that does not change
                node //= 2
                most = max(room[2 * node], room[2 * node + 1])
                if room[node] == most:
                    break
                room[node] = most
    return rows


def _document_length(size: object, index: int) -> int:
    if isinstance(size, (bool, np.bool_)) or not isinstance(size, numbers.Integral):
        raise TypeError(f"lengths must be ints; document {index} has {type(size).__name__} {size!r}")
    return int(size)


def first_fit_pack_reference(lengths: Sequence[int], max_length: int) -> list[list[int]]:
    """:func:`first_fit_pack` written plainly, the reference: each document, longest first (ties in input order),
    goes into the lowest-index row with room, found by scanning the rows; O(documents x rows)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    rows: list[list[int]] = []
    room: list[int] = []
    for i in order:
        if lengths[i] > max_length:
            raise ValueError(f"document {i} has {lengths[i]} tokens, more than max_length={max_length}")
        for r, free in enumerate(room):
            if lengths[i] <= free:
                rows[r].append(i)
                room[r] -= lengths[i]
                break
        else:
            rows.append([i])
            room.append(max_length - lengths[i])
    return rows
