"""The attention of one batch, planned once for every layer: which tokens are computed, in which layouts, under
which masks. A model calls :func:`plan_attention` once per batch and hands the :class:`AttentionPlan` to each layer
(:meth:`mhaplug.attention.MultiheadAttention.forward_tokens`); it never builds a mask itself.

What each strategy gets, on the batch's own device::

    rows     strategy                       attn_mask                           key_padding_mask  is_causal
    padded   causal_only                    None                                None (by design)  True
    padded   flex                           BlockMask: causal & not pad         None              False
    padded   any other                      None                                the batch's       True
    packed   auto (CPU, tokens not given)   None: each document a row of its    per layout        True
                                            own (mhaplug.attention.unpad)
    packed   flex                           BlockMask: causal & same document   None              False
    packed   reference, merged_*, auto      document-causal (B, 1, L, L),       None              False
                                            True = masked
    packed   causal_kpm, causal_only        refused: documents would attend each other

On the CPU, padded rows are also split into length buckets (:func:`mhaplug.attention.unpad.plan_tokens`), each a
kernel call padded only to its own longest row. The BlockMask is built from predicates on ``document_ids`` or
``key_padding_mask`` (:func:`mhaplug.attention.masks.document_causal_mask_mod`,
:func:`~mhaplug.attention.masks.padded_causal_mask_mod`): no dense mask, once per batch, shared by the layers.

Shapes: B batch, L length, N tokens computed.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor

from mhaplug.attention import masks
from mhaplug.attention.strategies import STRATEGIES, strategies_where
from mhaplug.attention.unpad import TokenLayout, plan_tokens
from mhaplug.common import check_choice

__all__ = ["PACKED_STRATEGIES", "AttentionPlan", "plan_attention"]

PACKED_STRATEGIES = strategies_where(document_masks=True)  # packed rows need a document mask


@dataclass(frozen=True)
class AttentionPlan:
    """How every layer's attention sees one batch.

    Attributes:
        token_index: (N,) the flat positions ``b * L + t`` of the tokens computed, in the order of ``layouts``;
            None: all B * L positions, in order.
        layouts: one :class:`~mhaplug.attention.unpad.TokenLayout` per kernel call, each with the
            ``key_padding_mask`` (True = pad) the strategy takes, or None where it takes none.
        attn_mask: every layer's ``attn_mask``: None, a document-causal (B, 1, L, L) bool mask (True = may NOT
            attend, broadcast over heads), or a FlexAttention ``BlockMask``.
        is_causal: whether every layer applies a causal mask on top.
    """

    token_index: Tensor | None
    layouts: tuple[TokenLayout, ...]
    attn_mask: object
    is_causal: bool


def plan_attention(
    strategy: str,
    batch_size: int,
    length: int,
    *,
    key_padding_mask: Tensor | None = None,
    document_ids: Tensor | None = None,
    token_index: Tensor | None = None,
) -> AttentionPlan:
    """The :class:`AttentionPlan` of a (B, L) batch for ``strategy``.

    Args:
        key_padding_mask: (B, L) bool, True = pad; None: every position is real.
        document_ids: (B, L) packed rows' documents, -1 on padding, a document a contiguous run of one id
            (:func:`mhaplug.attention.masks.document_runs`); None: padded rows.
        token_index: (N,) the flat positions to compute, decided by the caller: all B * L positions to compute
            every one in the batch's own layout (as :func:`mhaplug.audit` does), or the real tokens' positions
            found on the CPU before the batch moved to an accelerator (:func:`mhaplug.attention.unpad.add_token_index`),
            so that no layer reads the device; None: found here.
    """
    strategy = check_choice("strategy", strategy, STRATEGIES)
    is_pad = key_padding_mask
    if (
        strategy == "auto"
        and document_ids is not None
        and token_index is None
        and masks.host_read_is_free(document_ids)
    ):
        # each document a row of its own: the causal kernel with padding gives document-causal attention
        token_index, layouts = plan_tokens(is_pad, batch_size, length, document_ids=document_ids)
        return AttentionPlan(token_index, layouts, None, True)
    layer_padding_mask, attn_mask, is_causal = _layer_masks(strategy, is_pad, document_ids, batch_size, length)
    if token_index is not None:
        layouts = (TokenLayout(0, token_index.numel(), token_index, batch_size, length, layer_padding_mask),)
    else:  # length buckets for padded rows only: a document mask or a BlockMask spans the whole batch
        token_index, layouts = plan_tokens(is_pad, batch_size, length, buckets=attn_mask is None)
        if layer_padding_mask is None:  # the strategy takes no padding mask (causal_only, packed, flex)
            layouts = tuple(replace(layout, key_padding_mask=None) for layout in layouts)
    return AttentionPlan(token_index, layouts, attn_mask, is_causal)


def _layer_masks(
    strategy: str, key_padding_mask: Tensor | None, document_ids: Tensor | None, batch_size: int, length: int
) -> tuple[Tensor | None, object, bool]:
    """(key_padding_mask, attn_mask, is_causal) that every layer gets, built once per batch on its device."""
    if document_ids is not None:
        if strategy not in PACKED_STRATEGIES:
            raise ValueError(
                f"packed rows need a document mask; strategy={strategy!r} would let documents attend each "
                f"other. Use one of {', '.join(PACKED_STRATEGIES)}"
            )
        if strategy == "flex":  # predicates on document_ids: no (B, 1, L, L) tensor
            mask_mod = masks.document_causal_mask_mod(document_ids)
            return None, _block_mask(mask_mod, batch_size, length, document_ids.device), False
        keep = masks.document_causal_keep(document_ids)  # (B, 1, L, L), True = may attend
        return None, masks.is_masked_from_keep(keep), False  # MHA polarity, broadcast over heads
    if strategy == "causal_only":
        return None, None, True  # ignores padding by definition (valid with right padding only)
    if strategy == "flex" and key_padding_mask is not None:
        mask_mod = masks.padded_causal_mask_mod(key_padding_mask)
        return None, _block_mask(mask_mod, batch_size, length, key_padding_mask.device), False
    return key_padding_mask, None, True


def _block_mask(mask_mod: masks.MaskMod, batch_size: int, length: int, device: torch.device) -> object:
    """One FlexAttention ``BlockMask`` (B, 1, L, L) for every layer: the predicate evaluated per block."""
    from torch.nn.attention.flex_attention import create_block_mask

    return create_block_mask(mask_mod, batch_size, None, length, length, device=device)
