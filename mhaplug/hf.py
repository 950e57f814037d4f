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
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor, nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from mhaplug.attention import STRATEGIES, masks, strategies
from mhaplug.attention.plan import AttentionPlan, plan_attention

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
    batch_size, _heads_count, length, head_dim = query.shape
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
    if strategy != "auto" and document_ids is not None and not causal:
        raise NotImplementedError(
            f"attn_implementation='mhaplug_{strategy}' has no bidirectional document mask for packed rows; "
            f"use attn_implementation='mhaplug'"
        )
    if strategy == "auto" and document_ids is not None and not masks.host_read_is_free(document_ids):
        plan = _plan_on_host(batch_size, length, is_pad, document_ids)  # a row per document, not (B, 1, L, L)
    else:
        plan = plan_attention(strategy, batch_size, length, key_padding_mask=is_pad, document_ids=document_ids)
    window = kwargs.get("sliding_window")
    dropout_p = dropout if module.training else 0.0
    return _attend(query, key, value, plan, causal=causal, window=window, dropout_p=dropout_p, strategy=strategy), None


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


def _plan_on_host(batch_size: int, length: int, is_pad: Tensor | None, document_ids: Tensor) -> AttentionPlan:
    """The CPU's plan (a row per document, in length buckets) for tensors on an accelerator: the ids read back
    once (a host-device synchronisation), the plan's indices and masks moved to the device."""
    device = document_ids.device
    plan = plan_attention(
        "auto", batch_size, length, key_padding_mask=None if is_pad is None else is_pad.cpu(),
        document_ids=document_ids.cpu(),
    )  # fmt: skip

    def moved(t: Tensor | None) -> Tensor | None:
        return None if t is None else t.to(device, non_blocking=True)

    layouts = tuple(
        replace(lay, index=moved(lay.index), key_padding_mask=moved(lay.key_padding_mask)) for lay in plan.layouts
    )
    return replace(plan, token_index=moved(plan.token_index), layouts=layouts)


def _attend(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    plan: AttentionPlan,
    *,
    causal: bool,
    window: int | None,
    dropout_p: float,
    strategy: str,
) -> Tensor:
    """The plan's kernel calls: query (B, H, L, D), key and value (B, H_kv, L, D) -> (B, L, H, D).

    The calls' layouts are laid end to end as one list of slots, each slot a token of the batch, so that every
    tensor is gathered once into the slots and the output once back (an index_select each way, whose backward is
    one index_add): a pad slot of a layout holds a copy of a real token, which its padding mask (or, for
    left-aligned documents under the causal mask, its place to the right of every real query) keeps unseen.
    """
    batch_size, num_heads, length, head_dim = query.shape
    total = batch_size * length
    whole = plan.token_index is None and len(plan.layouts) == 1 and plan.layouts[0].index is None
    routes = None if whole else _routes(plan, total, query.device)
    bounds = [(0, total)] if routes is None else routes.bounds
    gathered = [_tokens(x) if routes is None else routes.into_slots(_tokens(x)) for x in (query, key, value)]
    outs = []
    for lay, (start, stop) in zip(plan.layouts, bounds):
        rows, width = lay.batch_size, lay.seq_len
        if rows * width == 0:
            continue
        q, k, v = (_heads(x[start:stop], rows, width, num_heads, head_dim) for x in gathered)  # (rows, H, width, D)
        attn_mask, is_causal, kpm = plan.attn_mask, causal and plan.is_causal, lay.key_padding_mask
        if window is not None and window < width:
            if attn_mask is not None:
                raise NotImplementedError(
                    f"attn_implementation='mhaplug_{strategy}' has no sliding window on packed rows; use "
                    f"attn_implementation='mhaplug'"
                )
            attn_mask, is_causal = masks.is_masked_from_keep(_window_keep(width, window, causal, q.device)), False
        if strategy == "auto" and causal and _right_padded(kpm):
            kpm = None  # pads only right of every real query: causality alone keeps them unseen
        call = strategies.AttentionCall(
            q=q, k=k, v=v, key_padding_mask=kpm, attn_mask=attn_mask, is_causal=is_causal,
            dropout_p=dropout_p, src_len=width, extra_keys=0,
        )  # fmt: skip
        out, _served_by = strategies.dispatch(strategy, call)  # (rows, H, width, D)
        outs.append(out.transpose(1, 2).reshape(rows * width, num_heads * head_dim))
    if not outs:  # no real token at all
        return query.new_zeros(batch_size, length, num_heads, head_dim)
    out = outs[0] if len(outs) == 1 else torch.cat(outs)  # (slots, H * D)
    if routes is not None:
        out = routes.out_of_slots(out)  # (B * L, H * D)
    return out.view(batch_size, length, num_heads, head_dim)


def _right_padded(kpm: Tensor | None) -> bool:
    """Whether a layout's padding mask has pads, all of them after every real token of their row (read where
    that is free: on the CPU)."""
    return kpm is not None and masks.host_read_is_free(kpm) and not masks.has_pad_before_real_token(kpm)


def _tokens(x: Tensor) -> Tensor:
    """(B, h, L, D) -> (B * L, h * D): a view where x lies as (B, L, h, D) in memory, as projections leave it."""
    batch_size, heads, length, head_dim = x.shape
    return x.transpose(1, 2).reshape(batch_size * length, heads * head_dim)


def _heads(x: Tensor, rows: int, width: int, num_heads: int, head_dim: int) -> Tensor:
    """(rows * width, h * D) -> (rows, H, width, D), key/value heads repeated to H (grouped-query attention)."""
    heads = x.shape[1] // head_dim
    x = x.view(rows, width, heads, head_dim)
    if heads != num_heads:
        x = (
            x[:, :, :, None]
            .expand(rows, width, heads, num_heads // heads, head_dim)
            .reshape(rows, width, num_heads, head_dim)
        )
    return x.transpose(1, 2)


@dataclass(frozen=True)
class _Routes:
    """Where the batch's B * L tokens go in the slots of the plan's layouts (laid end to end) and back.

    Attributes:
        source: (slots,) the token each slot holds; a pad slot holds a real token of its layout.
        is_pad_slot: (slots,) True where the slot is a layout's padding.
        destination: (B * L,) the slot holding each real token (0 for the batch's pads).
        is_pad_token: (B * L,) True where the token is in no slot (the batch's padding).
        bounds: each layout's [start, stop) in the slots.
    """

    source: Tensor
    is_pad_slot: Tensor
    destination: Tensor
    is_pad_token: Tensor
    bounds: list[tuple[int, int]]

    def into_slots(self, tokens: Tensor) -> Tensor:
        """(B * L, F) -> (slots, F). The backward is a gather too, not an index_add: the real slots and the real
        tokens are one to one, and a pad slot's gradient is exactly 0 (its output is never read, and its key and
        value are masked from every real query, or unseen to the right of them under the causal mask)."""
        return _Gather.apply(tokens, self.source, None, self.destination, self.is_pad_token)

    def out_of_slots(self, slots: Tensor) -> Tensor:
        """(slots, F) -> (B * L, F), zeros at the batch's pads (whose outputs nothing should read)."""
        return _Gather.apply(slots, self.destination, self.is_pad_token, self.source, self.is_pad_slot)


class _Gather(torch.autograd.Function):
    """``y = x[index]``, rows where ``zero`` is True set to 0; the backward ``g[inverse]``, rows where
    ``inverse_zero`` is True set to 0. Exact where each row of ``x`` either is read by exactly one row of ``y``
    that ``inverse`` points back to, or gets no gradient (``inverse_zero``), and every other row of ``y`` has a
    zero gradient: :class:`_Routes` guarantees both."""

    @staticmethod
    def forward(
        ctx: Any, x: Tensor, index: Tensor, zero: Tensor | None, inverse: Tensor, inverse_zero: Tensor | None
    ) -> Tensor:
        ctx.save_for_backward(inverse, inverse_zero)
        y = x.index_select(0, index)
        return y if zero is None else y.masked_fill_(zero[:, None], 0.0)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, None, None, None, None]:
        inverse, inverse_zero = ctx.saved_tensors
        grad_x = grad.index_select(0, inverse)
        if inverse_zero is not None:
            grad_x.masked_fill_(inverse_zero[:, None], 0.0)
        return grad_x, None, None, None, None


def _routes(plan: AttentionPlan, total: int, device: torch.device) -> _Routes:
    """The :class:`_Routes` of a plan over B * L = ``total`` tokens."""
    tokens = plan.token_index if plan.token_index is not None else torch.arange(total, device=device)
    sources, pad_slots, bounds, offset = [], [], [], 0
    destination = torch.zeros(total, dtype=torch.int64, device=device)
    is_pad_token = torch.ones(total, dtype=torch.bool, device=device)
    for lay in plan.layouts:
        size = lay.batch_size * lay.seq_len
        own = tokens[lay.start : lay.stop]  # (n,) this layout's tokens
        if lay.index is None:
            source, slots = own, torch.arange(size, device=device)
            pad_slot = torch.zeros(size, dtype=torch.bool, device=device)
        else:
            fill = own[:1] if own.numel() else torch.zeros(1, dtype=torch.int64, device=device)
            source = fill.expand(size).clone()
            source[lay.index] = own
            slots = lay.index
            pad_slot = torch.ones(size, dtype=torch.bool, device=device)
            pad_slot[lay.index] = False
        destination[own] = offset + slots
        is_pad_token[own] = False
        sources.append(source)
        pad_slots.append(pad_slot)
        bounds.append((offset, offset + size))
        offset += size
    return _Routes(torch.cat(sources), torch.cat(pad_slots), destination, is_pad_token, bounds)


def _window_keep(length: int, window: int, causal: bool, device: torch.device) -> Tensor:
    """(length, length) bool True = may attend, transformers' sliding windows: causal, the ``window`` latest keys
    (``kv > q - window``); bidirectional, keys within ``window`` either side (``|q - kv| <= window``)."""
    offsets = torch.arange(length, device=device)
    distance = offsets[:, None] - offsets[None, :]  # q - kv
    return (distance >= 0) & (distance < window) if causal else distance.abs() <= window


register()
