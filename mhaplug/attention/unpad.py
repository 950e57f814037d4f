"""The real tokens of a (B, L) batch as one flat (N, E) tensor, and the layouts attention sees them in.

A model that computes only real tokens (:class:`mhaplug.decoder.DecoderLM`) takes them out of the padded layout once
per batch, runs every per-token operation on the N of them, and hands attention, the one operation that mixes
positions, a padded layout again: :class:`TokenLayout`. One layout is the batch's own (B, L). On the CPU a
padded batch is also split into **length buckets**: rows sorted by their real extent and grouped so that each
group is padded only to its own longest row (``torch.nn.functional.scaled_dot_product_attention`` is then called
once per bucket). A batch of random lengths then costs attention about what a length-grouped batch costs,
without changing what any row attends to: each bucket keeps its rows' ``key_padding_mask`` and the causal
alignment (the columns cut away are padding in every row of the bucket, and queries and keys are cut alike).

Tokens are ordered bucket by bucket (within a bucket, row by row, left to right), so each bucket's tokens are a
contiguous slice of the flat tensor and nothing is gathered per bucket. Right padding, a call costing 2 pairs::

    batch (B=3, L=6)        buckets (longest first)          flat tokens (N=9)   b b b b b b | a a | c
    row 0   a a . . . .     1: row 1           (1 x 6)       token_index         6 7 8 9 10 11 0 1 12
    row 1   b b b b b b     2: row 0, row 2    (2 x 2)       bucket 2's layout   a a
    row 2   c . . . . .                                      (index 0 1 2)       c .

Shapes: B batch, L length, N real tokens, E features.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from mhaplug.attention import masks

__all__ = ["BUCKET_COST", "TokenLayout", "add_token_index", "plan_tokens"]

# Attention-call overhead in units of (query, key) pairs: roughly what one more SDPA call per layer costs (forward
# and backward, scatter and gather) on a CPU, where buckets are used, so a bucket is split off only when it saves
# more than that (benchmarks/train_throughput.py measures the effect on a machine).
BUCKET_COST = 8192


@dataclass(frozen=True)
class TokenLayout:
    """Where a contiguous slice of the flat tokens sits in the padded layout one attention call sees.

    Attributes:
        start, stop: the slice ``x[start:stop]`` of the flat (N, E) tokens.
        index: (stop - start,) each token's flat position ``r * seq_len + t`` in this layout; None = every
            position, in order (no padding in the layout).
        batch_size, seq_len: the layout (rows, length).
        key_padding_mask: (batch_size, seq_len) bool True = pad, or None.
    """

    start: int
    stop: int
    index: Tensor | None
    batch_size: int
    seq_len: int
    key_padding_mask: Tensor | None


def plan_tokens(
    is_pad: Tensor | None,
    batch_size: int,
    seq_len: int,
    *,
    buckets: bool = True,
    document_ids: Tensor | None = None,
    bucket_cost: float | None = None,
) -> tuple[Tensor | None, tuple[TokenLayout, ...]]:
    """(token_index (N,), layouts) for a batch: the flat positions ``b * L + t`` of its real tokens, in the
    order the layouts take them, and one :class:`TokenLayout` per attention call.

    Args:
        is_pad: (B, L) bool True = pad (``key_padding_mask``), or None (every position real).
        buckets: split into length buckets where reading the mask on the host is free (the CPU, in eager
            mode); otherwise, and with ``buckets=False``, one layout, the batch's own (B, L).
        document_ids: (B, L) packed rows' documents (-1 on padding): with buckets, each document becomes a row
            of its own, left-aligned, so that a causal kernel with the layouts' padding masks gives exactly the
            document-causal attention, at the cost of the documents' lengths rather than the rows'.
        bucket_cost: what one more attention call costs, in (query, key) pairs; a bucket is split off where it
            saves more (0: one bucket per distinct length); default :data:`BUCKET_COST`.

    ``token_index`` is None when every position is real and the tokens keep their order.
    """
    bucket_cost = BUCKET_COST if bucket_cost is None else bucket_cost
    if is_pad is None and document_ids is None:
        return None, (TokenLayout(0, batch_size * seq_len, None, batch_size, seq_len, None),)
    on_host = masks.host_read_is_free(is_pad if is_pad is not None else document_ids)
    if not (buckets and on_host):
        token_index = None if is_pad is None else masks.token_index_from_is_pad(is_pad)  # a sync off the CPU
        total = batch_size * seq_len if token_index is None else token_index.numel()
        return token_index, (TokenLayout(0, total, token_index, batch_size, seq_len, is_pad),)
    if document_ids is not None:
        return _bucketed(*_document_rows(document_ids), batch_size * seq_len, bucket_cost)
    positions = torch.arange(batch_size * seq_len).view(batch_size, seq_len)  # (B, L)
    return _bucketed(is_pad, positions, batch_size * seq_len, bucket_cost)


def add_token_index(batch: dict, device: torch.device) -> dict:
    """Before a CPU batch moves to ``device``: off the CPU, add ``token_index`` (the real tokens' flat positions,
    all of them when there is no padding), found here, where reading the mask is free; on the accelerator their
    count would be read back from the device, a sync every step. On the CPU nothing is added: the model plans its
    own length buckets. Returns ``batch``."""
    is_pad = batch.get("key_padding_mask")
    if torch.device(device).type != "cpu" and is_pad is not None and "token_index" not in batch:
        token_index = masks.token_index_from_is_pad(is_pad)
        batch["token_index"] = torch.arange(is_pad.numel()) if token_index is None else token_index
    return batch


def _document_rows(document_ids: Tensor) -> tuple[Tensor, Tensor]:
    """Packed rows -> one row per document: (is_pad (D, W), positions (D, W)), W the longest document, each
    document's tokens left-aligned with their flat positions in the batch (-1 on padding)."""
    flat = masks.document_runs(document_ids).flatten()  # (B * L,) a document = a contiguous run of one id
    real = (flat >= 0).nonzero().squeeze(1)  # (N,) flat positions of the real tokens
    docs, rows = flat[real], real // document_ids.shape[1]
    starts_here = torch.ones_like(real, dtype=torch.bool)
    starts_here[1:] = (docs[1:] != docs[:-1]) | (rows[1:] != rows[:-1])
    segment = starts_here.cumsum(0) - 1  # (N,) document of each token, counted over the batch
    starts = starts_here.nonzero().squeeze(1)  # (D,)
    offset = torch.arange(real.numel()) - starts[segment]  # (N,) position within the document
    width = int(offset.max()) + 1 if real.numel() else 1
    positions = torch.full((starts.numel(), width), -1, dtype=torch.int64)  # (D, W)
    positions[segment, offset] = real
    return positions < 0, positions


def _bucketed(
    is_pad: Tensor, positions: Tensor, total: int, bucket_cost: float
) -> tuple[Tensor | None, tuple[TokenLayout, ...]]:
    """Rows (is_pad (R, W), their flat positions (R, W)) grouped into length buckets, longest first."""
    width = is_pad.shape[1]
    real = is_pad.logical_not()  # (R, W)
    has_real = real.any(dim=1)  # (R,)
    first = real.to(torch.uint8).argmax(dim=1)  # (R,) first real column
    stop = width - real.flip(1).to(torch.uint8).argmax(dim=1)  # (R,) one past the last real column
    extent = torch.where(has_real, stop - first, 0)
    order = [r for r in torch.argsort(extent, descending=True, stable=True).tolist() if has_real[r]]
    pieces, layouts, start = [], [], 0
    for lo, hi in _groups([int(extent[r]) for r in order], bucket_cost):
        rows = torch.tensor(order[lo:hi])  # (n,)
        c0, c1 = int(first[rows].min()), int(stop[rows].max())
        sub_pad = is_pad[rows, c0:c1]  # (n, c1 - c0)
        local = masks.token_index_from_is_pad(sub_pad)  # (N_g,), or None: no padding in this bucket
        sub_positions = positions[rows, c0:c1].flatten()  # (n * (c1 - c0),)
        pieces.append(sub_positions if local is None else sub_positions[local])
        count = pieces[-1].numel()
        layouts.append(TokenLayout(start, start + count, local, len(rows), c1 - c0, None if local is None else sub_pad))
        start += count
    if not pieces:  # no real token at all
        return torch.zeros(0, dtype=torch.int64), (TokenLayout(0, 0, None, 0, width, None),)
    token_index = torch.cat(pieces)  # (N,)
    if token_index.numel() == total and bool((token_index == torch.arange(total)).all()):
        token_index = None  # nothing to take out: every position real, in order
    return token_index, tuple(layouts)


def _groups(extents: list[int], bucket_cost: float) -> list[tuple[int, int]]:
    """Split extents sorted longest first into contiguous groups [lo, hi) minimising the attention cost
    sum(rows * extent[lo]^2 / 2 + bucket_cost) over groups (dynamic programming, O(B^2) on B ints)."""
    n = len(extents)
    best, cut = [0.0] * (n + 1), [0] * (n + 1)
    for hi in range(1, n + 1):
        best[hi], cut[hi] = min((best[lo] + (hi - lo) * extents[lo] ** 2 / 2 + bucket_cost, lo) for lo in range(hi))
    groups, hi = [], n
    while hi > 0:
        groups.append((cut[hi], hi))
        hi = cut[hi]
    return groups[::-1]
