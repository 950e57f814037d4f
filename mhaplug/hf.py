"""mhaplug's attention inside Hugging Face transformers models: ``attn_implementation="mhaplug"``.

Importing this module registers mhaplug with transformers' attention interface (``AttentionInterface``) and its
mask interface (``AttentionMaskInterface``); ``import mhaplug`` alone never imports transformers. Then::

    import mhaplug.hf  # registers "mhaplug" and "mhaplug_<strategy>"
    model = AutoModelForCausalLM.from_config(config, attn_implementation="mhaplug")
    model.set_attn_implementation("mhaplug")  # or switch a model already built

Every model whose attention calls the interface takes it (Llama, Qwen2, Mistral, Gemma, GPT-2, ...).

What a model gets:
- **Packed rows attend over their documents only.** A document is a run of ``position_ids`` counting up by one
  (a new one wherever the count restarts, as ``transformers.masking_utils.find_packed_sequence_indices`` finds
  them), or a segment of ``cu_seq_lens_q`` (``DataCollatorWithFlattening``,
  ``mhaplug.PackCollator(return_flash_attn_kwargs=True)``), and never spans rows. Under ``"mhaplug"`` (the
  ``auto`` strategy) each document becomes a row of its own, documents of like length grouped into one kernel
  call (:func:`mhaplug.attention.unpad.plan_tokens`): attention costs the sum of the documents' squared
  lengths, not rows x L^2, and no (B, 1, L, L) mask is built. Documents are found in every call, with or without
  a KV cache and with or without a 2-D ``attention_mask``: ``model(**batch)`` on a packed batch gives the
  per-document loss, where ``sdpa`` and ``eager`` need ``use_cache=False`` and no ``attention_mask``.
- **Padded rows** (left or right, a 2-D ``attention_mask``) get the padding mask; pad queries get zeros, never
  NaN. The mask transformers hands each layer is the (B, L) padding mask itself: O(B x L) memory.
- Grouped-query attention (fewer key/value heads), the model's ``scaling``, attention dropout, bidirectional
  layers (``module.is_causal = False``) and a ``sliding_window`` (a banded (W, W) mask per kernel call where a
  document is longer than the window).
- Anything else, a KV cache with past tokens (generation), a 4-D mask, masks transformers composes from
  callbacks (``or_mask_function``/``and_mask_function``) or chunked attention, goes to transformers' own
  ``sdpa`` with transformers' own mask.

``"mhaplug_<strategy>"`` runs one of :data:`mhaplug.STRATEGIES` instead (``merged_bool``, ``causal_kpm``, ...),
as :class:`mhaplug.MultiheadAttention` would; on packed rows those build the dense document mask the strategy
is defined by.

On the CPU the lengths are read where they lie. On an accelerator the plan reads them back once per layer (a
host-device synchronisation each).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from mhaplug.attention import STRATEGIES, masks, strategies
from mhaplug.attention.plan import plan_attention

__all__ = ["IMPLEMENTATIONS", "attention_forward", "padding_mask", "register"]

IMPLEMENTATIONS: dict[str, str] = {
    "mhaplug": "auto",
    **{f"mhaplug_{name}": name for name in STRATEGIES if name not in ("auto", "torch_mha")},
}
"""Each ``attn_implementation`` name this module registers, and the strategy it runs."""


def register() -> tuple[str, ...]:
    """Register every name of :data:`IMPLEMENTATIONS` with transformers (done on import; calling again is
    harmless). Returns the names."""
    for name, strategy in IMPLEMENTATIONS.items():
        AttentionInterface.register(name, functools.partial(attention_forward, strategy=strategy))
        AttentionMaskInterface.register(name, padding_mask)
    return tuple(IMPLEMENTATIONS)


def padding_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int | Tensor = 0,
    kv_offset: int | Tensor = 0,
    mask_function: Callable[..., Any] | None = None,
    attention_mask: Tensor | None = None,
    *,
    use_vmap: bool = False,
    config: Any = None,
    **kwargs: Any,
) -> Tensor | None:
    """transformers' mask interface for mhaplug: what every layer's attention gets as ``attention_mask``.

    Self-attention over the call's own tokens gets the 2-D (B, L) padding mask (bool, True = real token, as
    transformers has it) or None: O(B x L), where ``sdpa`` builds (B, 1, L, L). The causal, document and window
    structure is applied by :func:`attention_forward`. Where transformers' mask says more than that (past tokens
    in a cache, masks composed from callbacks, chunked attention), transformers' own ``sdpa_mask`` is returned
    and :func:`attention_forward` hands the call to transformers' ``sdpa``.
    """
    own_tokens = (
        isinstance(q_offset, int)
        and isinstance(kv_offset, int)
        and q_offset == 0 == kv_offset
        and q_length == kv_length
    )
    if not own_tokens or use_vmap or getattr(config, "attention_chunk_size", None) is not None:
        return sdpa_mask(
            batch_size=batch_size,
            q_length=q_length,
            kv_length=kv_length,
            q_offset=q_offset,
            kv_offset=kv_offset,
            mask_function=mask_function,
            attention_mask=attention_mask,
            use_vmap=use_vmap,
            config=config,
            **kwargs,
        )
    if attention_mask is None:
        return None
    return attention_mask[:, -kv_length:].to(torch.bool)  # (B, L)


def attention_forward(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    *,
    strategy: str = "auto",
    **kwargs: Any,
) -> tuple[Tensor, None]:
    """transformers' attention interface for mhaplug: query (B, H, L, D), key and value (B, H_kv, S, D) ->
    ((B, L, H, D), None).

    ``attention_mask`` is what :func:`padding_mask` made: (B, L) bool True = real, or None; a 4-D mask, or keys
    other than the call's own tokens (a KV cache with past tokens), go to transformers' ``sdpa``. Documents come
    from ``cu_seq_lens_q`` or ``position_ids`` (in ``kwargs``, as the model passes them).
    """
    for name in ("softcap", "s_aux"):
        if kwargs.get(name) is not None:
            raise ValueError(
                f"attn_implementation='mhaplug' does not support {name} (this model passes {name}="
                f"{kwargs[name]!r}); use attn_implementation='eager' for this model"
            )
    batch_size, num_heads, length, head_dim = query.shape
    if (attention_mask is not None and attention_mask.dim() != 2) or key.shape[2] != length:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
        )
    causal = bool(getattr(module, "is_causal", True) if is_causal is None else is_causal)
    is_pad = None if attention_mask is None else attention_mask.logical_not()  # (B, L) True = pad
    segments = document_segments(batch_size, length, kwargs.get("position_ids"), kwargs.get("cu_seq_lens_q"))
    document_ids = None
    if segments is not None:
        document_ids = segments if is_pad is None else segments.masked_fill(is_pad, -1)  # (B, L), -1 on pads
    if scaling is not None and not math.isclose(scaling, head_dim**-0.5, rel_tol=1e-12):
        query = query * (scaling * head_dim**0.5)  # the kernels scale by 1/sqrt(D)
    qkv = _flat_qkv(query, key, value)  # (B * L, 3 * H * D)
    if strategy != "auto" and document_ids is not None and not causal:
        raise NotImplementedError(
            f"attn_implementation='mhaplug_{strategy}' has no bidirectional document mask for packed rows; "
            f"use attn_implementation='mhaplug'"
        )
    plan = plan_attention(strategy, batch_size, length, key_padding_mask=is_pad, document_ids=document_ids)
    window = kwargs.get("sliding_window")
    dropout_p = dropout if module.training else 0.0
    out = _attend(qkv, plan, num_heads, head_dim, causal=causal, window=window, dropout_p=dropout_p, strategy=strategy)
    out = _scatter(out, plan.token_index, batch_size * length)  # (B * L, H * D)
    return out.view(batch_size, length, num_heads, head_dim), None


def document_segments(
    batch_size: int, length: int, position_ids: Tensor | None, cu_seq_lens: Tensor | None
) -> Tensor | None:
    """(B, L) int64: each token's segment, counted per row from 0, or None where every row is one segment.

    A segment starts at every row's first token, at every boundary of ``cu_seq_lens`` (transformers' varlen
    boundaries over the B * L tokens taken row by row), or else wherever ``position_ids`` do not count up by one
    (``transformers.masking_utils.find_packed_sequence_indices``'s rule).
    """
    if cu_seq_lens is not None:
        total = batch_size * length
        bounds = cu_seq_lens.to(torch.int64)
        if bounds.dim() != 1 or int(bounds[-1]) != total or int(bounds[0]) != 0:
            raise ValueError(
                f"cu_seq_lens_q must be the (K + 1,) segment boundaries of all B * L = {total} tokens, from 0 to "
                f"{total}; got {tuple(bounds.shape)} from {int(bounds[0])} to {int(bounds[-1])}. Pass the keys "
                f"the collator made for this batch, or leave them out (position_ids give the documents)"
            )
        starts = torch.zeros(total, dtype=torch.bool, device=bounds.device)
        starts[bounds[:-1]] = True
        starts = starts.view(batch_size, length)
    elif position_ids is not None and length > 1:
        positions = position_ids.expand(batch_size, length)
        starts = torch.ones_like(positions, dtype=torch.bool)
        starts[:, 1:] = positions[:, 1:] != positions[:, :-1] + 1
    else:
        return None
    starts[:, 0] = True
    if masks.host_read_is_free(starts) and bool(starts.sum() == batch_size):
        return None  # one segment per row
    return starts.cumsum(1) - 1


def _flat_qkv(query: Tensor, key: Tensor, value: Tensor) -> Tensor:
    """(B, H, L, D), (B, H_kv, L, D) x 2 -> (B * L, 3 * H * D): per token its query, key and value heads, the key
    and value heads repeated to H (grouped-query attention)."""
    batch_size, num_heads, length, head_dim = query.shape
    groups = num_heads // key.shape[1]

    def tokens(x: Tensor, repeat: int) -> Tensor:  # (B, h, L, D) -> (B, L, H, D)
        x = x.transpose(1, 2)
        if repeat > 1:
            x = x[:, :, :, None].expand(batch_size, length, x.shape[2], repeat, head_dim).flatten(2, 3)
        return x

    qkv = torch.stack([tokens(query, 1), tokens(key, groups), tokens(value, groups)], dim=2)  # (B, L, 3, H, D)
    return qkv.view(batch_size * length, 3 * num_heads * head_dim)


def _attend(
    qkv: Tensor,
    plan: Any,
    num_heads: int,
    head_dim: int,
    *,
    causal: bool,
    window: int | None,
    dropout_p: float,
    strategy: str,
) -> Tensor:
    """The plan's kernel calls over the flat tokens: (B * L, 3 * H * D) -> (N, H * D), in the plan's token order."""
    tokens = qkv if plan.token_index is None else qkv.index_select(0, plan.token_index)  # (N, 3HD)
    outs = []
    for lay in plan.layouts:
        rows, length = lay.batch_size, lay.seq_len
        padded = _scatter(tokens[lay.start : lay.stop], lay.index, rows * length)  # (rows * length, 3HD)
        q, k, v = padded.view(rows, length, 3, num_heads, head_dim).permute(2, 0, 3, 1, 4)  # 3 x (rows, H, len, D)
        attn_mask, is_causal = plan.attn_mask, causal and plan.is_causal
        if window is not None and window < length:
            if attn_mask is not None:
                raise NotImplementedError(
                    f"attn_implementation='mhaplug_{strategy}' has no sliding window on packed rows; use "
                    f"attn_implementation='mhaplug'"
                )
            attn_mask, is_causal = masks.is_masked_from_keep(_window_keep(length, window, causal, q.device)), False
        call = strategies.AttentionCall(
            q=q, k=k, v=v, key_padding_mask=lay.key_padding_mask, attn_mask=attn_mask, is_causal=is_causal,
            dropout_p=dropout_p, src_len=length, extra_keys=0,
        )  # fmt: skip
        out, _served_by = strategies.dispatch(strategy, call)  # (rows, H, len, D)
        out = out.transpose(1, 2).reshape(rows * length, num_heads * head_dim)
        outs.append(out if lay.index is None else out.index_select(0, lay.index))
    return outs[0] if len(outs) == 1 else torch.cat(outs)


def _window_keep(length: int, window: int, causal: bool, device: torch.device) -> Tensor:
    """(length, length) bool True = may attend, transformers' sliding windows: causal, the ``window`` latest keys
    (``kv > q - window``); bidirectional, keys within ``window`` either side (``|q - kv| <= window``)."""
    offsets = torch.arange(length, device=device)
    distance = offsets[:, None] - offsets[None, :]  # q - kv
    return (distance >= 0) & (distance < window) if causal else distance.abs() <= window


def _scatter(rows: Tensor, index: Tensor | None, total: int) -> Tensor:
    """(N, F) -> (total, F), row i at ``index[i]``, zeros elsewhere (``index`` None: as they are)."""
    if index is None:
        return rows
    return rows.new_zeros(total, rows.shape[1]).index_copy(0, index, rows)


register()
