"""The merge of ``key_padding_mask`` and ``attn_mask``: one mask, kept broadcast, and fully masked rows made safe.

``torch.nn.MultiheadAttention`` merges ``key_padding_mask`` into ``attn_mask`` (a union: OR for bool,
addition for float) after expanding it to (B*H, L, S). :func:`merge_masks` computes the same union but keeps
it broadcast: (B, 1, 1, S) for padding alone, (B, 1, L, S) with a 2-D or causal mask, and (B, H, L, S) only
when the caller's ``attn_mask`` is per head. For B=2, S=L=4, the second row left-padded by one::

    key_padding_mask      causal keep         merged keep, batch 1 (query row 0 has no key)
    [[F F F F],           1 . . .             . . . .   <- fully masked row
     [T F F F]]           1 1 . .             . 1 . .
                          1 1 1 .             . 1 1 .
                          1 1 1 1             . 1 1 1

Fully masked query rows are made safe with :func:`guard_empty_rows`: the kernel sees them unmasked (so no
backend can produce NaN for them) and the caller zeroes their output afterwards. :func:`causal_row_has_key` finds
those rows under a causal kernel without building the (L, S) union. Nothing here reads tensor values on the host.

Shapes: B batch, H heads, L target (query) length, S source (key) length.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from mhaplug.attention.masks import (
    NEG_INF,
    additive_from_keep,
    causal_keep,
    is_masked_from_keep,
    keep_from_additive,
    keep_from_is_masked,
)

__all__ = ["add_causal_to_attn_mask", "causal_row_has_key", "guard_empty_rows", "merge_masks"]


def add_causal_to_attn_mask(
    attn_mask: Tensor | None, tgt_len: int, src_len: int, *, device: torch.device, dtype: torch.dtype = torch.bool
) -> Tensor:
    """Fold a causal mask into an MHA ``attn_mask`` (True / -inf = may NOT attend), keeping its dtype.

    Without an ``attn_mask`` the result has ``dtype``: bool, or additive float (pass the float
    ``key_padding_mask``'s dtype, since torch deprecates mixing a bool and a float mask).
    """
    keep = causal_keep(tgt_len, src_len, device=device)  # (L, S)
    is_masked = is_masked_from_keep(keep)
    if attn_mask is None:
        return is_masked if dtype == torch.bool else additive_from_keep(keep, dtype)
    if attn_mask.dtype == torch.bool:
        return attn_mask | is_masked
    return attn_mask.masked_fill(is_masked, NEG_INF)


def merge_masks(
    key_padding_mask: Tensor | None,
    attn_mask: Tensor | None,
    *,
    batch_size: int,
    num_heads: int,
    tgt_len: int,
    src_len: int,
    is_causal: bool = False,
    dtype: torch.dtype = torch.float32,
    device: torch.device | None = None,
    extra_visible_keys: int = 0,
) -> Tensor | None:
    """Union of the MHA masks, as one mask broadcastable to (B, H, L, S + extra_visible_keys).

    Args:
        key_padding_mask: (B, S) bool, True = pad; or float, added to every query's scores.
        attn_mask: (L, S) or (B*H, L, S), bool True = may not attend; or float, added to the scores. Also
            (B, 1, L, S) or (B, H, L, S) (an mhaplug extension: a per-batch mask without copying it per head).
        is_causal: also hide key j from query i when j > i (top-left aligned, see :func:`causal_keep`).
        dtype: floating dtype of the result when a float mask is involved (the query's dtype).
        device: where the causal mask is built (the query's device); defaults to the masks' device.
        extra_visible_keys: columns appended after the S keys that every query may attend
            (``add_bias_kv`` / ``add_zero_attn``), as torch pads them.

    Returns:
        ``None`` when there is nothing to mask. Otherwise a **keep** mask (bool, True = may attend) when every
        input is bool, or an **additive** float mask (0 / values / -inf) when any input is float: a float mask
        can carry values a bool cannot. Shape (B, 1, 1, S) for padding alone, (1, 1, L, S) for a 2-D or causal
        mask alone, (B, 1, L, S) for both, (B, H, L, S) only with a per-head 3-D ``attn_mask``.
    """
    keeps: list[Tensor] = []
    additives: list[Tensor] = []

    def collect(mask: Tensor) -> None:
        if mask.dtype == torch.bool:
            keeps.append(keep_from_is_masked(mask))
        else:
            additives.append(mask.to(dtype))

    if key_padding_mask is not None:
        collect(key_padding_mask.view(batch_size, 1, 1, src_len))  # (B, 1, 1, S)
    if attn_mask is not None:
        if attn_mask.dim() == 2:
            collect(attn_mask.view(1, 1, tgt_len, src_len))  # (1, 1, L, S)
        elif attn_mask.dim() == 4:
            collect(attn_mask)  # (B, 1|H, L, S) already
        else:
            collect(attn_mask.view(batch_size, num_heads, tgt_len, src_len))  # (B, H, L, S)
    if is_causal:
        device = device if device is not None else _device_of(key_padding_mask, attn_mask)
        keeps.append(causal_keep(tgt_len, src_len, device=device))  # (L, S)

    if not keeps and not additives:
        return None
    keep = functools.reduce(torch.logical_and, keeps) if keeps else None
    if keep is not None and keep.dim() < 4:
        keep = keep.view(1, 1, tgt_len, src_len)  # (1, 1, L, S): causal alone
    if additives:
        merged = functools.reduce(torch.add, additives)
        if keep is not None:
            merged = merged.masked_fill(is_masked_from_keep(keep), NEG_INF)
    else:
        merged = keep
    if extra_visible_keys:
        merged = _append_visible_columns(merged, extra_visible_keys)
    return merged


def _device_of(*masks: Tensor | None) -> torch.device | None:
    for mask in masks:
        if mask is not None:
            return mask.device
    return None


def _append_visible_columns(mask: Tensor, count: int) -> Tensor:
    """Append ``count`` key columns every query may attend (keep True / additive 0)."""
    fill = True if mask.dtype == torch.bool else 0.0
    extra = torch.full((*mask.shape[:-1], count), fill, dtype=mask.dtype, device=mask.device)
    return torch.cat([mask, extra], dim=-1)


def guard_empty_rows(mask: Tensor) -> tuple[Tensor, Tensor]:
    """Unmask query rows that may attend nothing, and say which rows have a key.

    Softmax over a row of -inf is 0/0: NaN in the output and in every gradient it touches, or uniform
    attention, depending on the backend. The kernel is given such rows unmasked (any finite answer), and the
    caller zeroes them with ``out.masked_fill(~row_has_key, 0)``, which also gives them zero gradient.

    Args:
        mask: keep mask (bool, True = may attend) or additive float mask, broadcastable to (B, H, L, S).

    Returns:
        ``(safe_mask, row_has_key)``: the mask with empty rows opened, same dtype and shape; and a bool
        (..., L, 1) tensor, True where the row may attend at least one key.
    """
    if mask.dtype == torch.bool:
        row_has_key = mask.any(dim=-1, keepdim=True)  # (B, H|1, L|1, 1)
        return mask | ~row_has_key, row_has_key
    row_has_key = (~torch.isneginf(mask)).any(dim=-1, keepdim=True)  # (B, H|1, L|1, 1)
    return mask.masked_fill(~row_has_key, 0.0), row_has_key


def causal_row_has_key(mask: Tensor | None, tgt_len: int, src_len: int, *, device: torch.device) -> Tensor | None:
    """Which query rows keep a key under ``mask`` AND a causal mask, without building the (L, S) union.

    For a padding-only mask (..., 1, S) this is a cumulative "any" over the keys, O(B*S): query i has a key
    iff one of keys 0..min(i, S-1) is kept. Returns None when every row has a key (no mask: key 0 is always
    visible under a top-left causal mask).
    """
    if mask is None:
        return None
    keep = mask if mask.dtype == torch.bool else keep_from_additive(mask)
    if keep.shape[-2] == 1:
        seen_key = keep.cumsum(dim=-1) > 0  # (B, H|1, 1, S)
        if tgt_len <= src_len:  # query i's last visible key is i
            return seen_key[..., 0, :tgt_len].unsqueeze(-1)  # (B, H|1, L, 1)
        last_visible = torch.arange(tgt_len, device=device).clamp_(max=src_len - 1)  # (L,)
        return seen_key[..., 0, last_visible].unsqueeze(-1)  # (B, H|1, L, 1)
    return (keep & causal_keep(tgt_len, src_len, device=device)).any(dim=-1, keepdim=True)  # (B, H|1, L, 1)
