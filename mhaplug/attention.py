"""A drop-in ``torch.nn.MultiheadAttention`` whose mask merge is explicit, correct and switchable.

``torch.nn.MultiheadAttention`` expands ``key_padding_mask`` (B, S) to (B*H, 1, S), adds it to ``attn_mask``
and runs one softmax; the (B*H, L, S) float mask it builds keeps the fast kernels out, and query rows with
nothing to attend to come out NaN. :class:`MultiheadAttention` takes the same arguments and weights, and merges
the masks on the tensors' own device by one of these strategies (one function each below)::

    strategy          what reaches the kernel                                    mask memory
    reference         explicit safe softmax(q k^T / sqrt(D) + mask) v            B*L*S (+ scores)
    torch_mha         torch's own MultiheadAttention.forward (NaN rows kept)     B*H*L*S float
    merged_bool       one (B, 1, L, S) bool keep-mask to SDPA                    B*L*S bytes
    merged_additive   one (B, 1, L, S) 0/-inf float mask to SDPA                 4*B*L*S bytes
    causal_kpm        SDPA is_causal=True + (B, 1, 1, S) keep-mask               B*S bytes
                      (merged_bool where the backend cannot take both)
    causal_only       SDPA is_causal=True, padding ignored (right padding only)  0
    flex              FlexAttention BlockMask from causal & not-pad predicates   O(blocks)

Every strategy but ``torch_mha`` outputs exactly 0, with zero and finite gradients, for a query row that may
attend no key. ``is_causal=True`` means "also apply a causal mask" (top-left aligned when L != S, as
SDPA's), built on the device, alone or with ``attn_mask``; torch's is only a hint.

Shapes: B batch, L target (query) length, S source (key) length, E embed dim, H heads, D = E / H.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mhaplug import masks

__all__ = ["STRATEGIES", "MultiheadAttention"]

logger = logging.getLogger(__name__)

STRATEGIES: tuple[str, ...] = (
    "reference",
    "torch_mha",
    "merged_bool",
    "merged_additive",
    "causal_kpm",
    "causal_only",
    "flex",
)


# ----------------------------------------------------------------------------------------------------------
# One call, as every strategy sees it
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Call:
    q: Tensor  # (B, H, L, D)
    k: Tensor  # (B, H, S + extra_keys, D)
    v: Tensor  # (B, H, S + extra_keys, D)
    key_padding_mask: Tensor | None  # (B, S), bool True = pad, or float
    attn_mask: object  # (L, S) | (B*H, L, S) bool True = masked, or float; a BlockMask for flex; or None
    is_causal: bool
    dropout_p: float
    src_len: int  # S, the caller's keys (without add_bias_kv / add_zero_attn columns)
    extra_keys: int  # columns appended by add_bias_kv / add_zero_attn, visible to every query

    @property
    def shape(self) -> tuple[int, int, int]:
        batch_size, num_heads, tgt_len, _ = self.q.shape
        return batch_size, num_heads, tgt_len

    def merged(self, *, is_causal: bool | None = None) -> Tensor | None:
        """The union of the call's masks, keep (bool) or additive (float), broadcast to (B, H, L, S')."""
        batch_size, num_heads, tgt_len = self.shape
        return masks.merge_masks(
            self.key_padding_mask,
            self.attn_mask,  # type: ignore[arg-type]
            batch_size=batch_size,
            num_heads=num_heads,
            tgt_len=tgt_len,
            src_len=self.src_len,
            is_causal=self.is_causal if is_causal is None else is_causal,
            dtype=self.q.dtype,
            device=self.q.device,
            extra_visible_keys=self.extra_keys,
        )


def _sdpa(call: _Call, mask: Tensor | None = None, *, is_causal: bool = False) -> Tensor:
    return F.scaled_dot_product_attention(call.q, call.k, call.v, attn_mask=mask, dropout_p=call.dropout_p, is_causal=is_causal)


def _sdpa_guarded(call: _Call, mask: Tensor | None, *, additive: bool) -> Tensor:
    """SDPA with one merged mask; rows that may attend nothing are opened for the kernel, then zeroed."""
    if mask is None:
        return _sdpa(call)
    safe, row_has_key = masks.guard_empty_rows(mask)
    if additive and safe.dtype == torch.bool:
        safe = masks.additive_from_keep(safe, call.q.dtype)
    return _sdpa(call, safe).masked_fill(~row_has_key, 0.0)  # (B, H, L, D)


def explicit_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, *, dropout_p: float = 0.0) -> tuple[Tensor, Tensor]:
    """softmax(q k^T / sqrt(D) + mask) v, written out, with fully masked rows giving 0.

    Args:
        q: (B, H, L, D). k, v: (B, H, S, D).
        mask: keep mask (bool, True = may attend) or additive float, broadcastable to (B, H, L, S).

    Returns:
        ``(out, weights)``: (B, H, L, D) and (B, H, L, S), weights after dropout as torch returns them.
    """
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)  # (B, H, L, S); q scaled first, as torch does
    row_has_key = None
    if mask is not None:
        safe, row_has_key = masks.guard_empty_rows(mask)
        scores = scores.masked_fill(~safe, masks.NEG_INF) if safe.dtype == torch.bool else scores + safe
    weights = scores.softmax(dim=-1)
    if row_has_key is not None:
        weights = weights.masked_fill(~row_has_key, 0.0)
    if dropout_p > 0.0:
        weights = F.dropout(weights, p=dropout_p)
    return weights @ v, weights  # (B, H, L, D), (B, H, L, S)


# ----------------------------------------------------------------------------------------------------------
# Strategies: one small function each, (call) -> (out (B, H, L, D), name of what served the call)
# ----------------------------------------------------------------------------------------------------------


def _reference(call: _Call) -> tuple[Tensor, str]:
    out, _ = explicit_attention(call.q, call.k, call.v, call.merged(), dropout_p=call.dropout_p)
    return out, "reference"


def _merged_bool(call: _Call) -> tuple[Tensor, str]:
    # A float attn_mask can carry values a bool cannot: then the merged mask is float (padding as -inf).
    return _sdpa_guarded(call, call.merged(), additive=False), "merged_bool"


def _merged_additive(call: _Call) -> tuple[Tensor, str]:
    return _sdpa_guarded(call, call.merged(), additive=True), "merged_additive"


def sdpa_takes_mask_with_causal(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, dropout_p: float) -> bool:
    """Whether the SDPA backend torch would pick accepts ``attn_mask`` together with ``is_causal=True``.

    The math backend refuses the pair ("Explicit attn_mask should not be set when is_causal=True"); on this
    CPU it is picked when attention dropout is on. Decided from shapes, dtypes and flags only: no sync.
    """
    choice = torch._fused_sdp_choice(q, k, v, mask, dropout_p, True)
    return choice > int(torch.nn.attention.SDPBackend.MATH.value)


def _causal_kpm(call: _Call) -> tuple[Tensor, str]:
    _require_causal(call, "causal_kpm")
    if call.extra_keys:
        return _fall_back(call, "add_bias_kv / add_zero_attn keys lie beyond SDPA's causal diagonal")
    mask = call.merged(is_causal=False)  # (B, 1, 1, S) for padding alone: B*S bytes
    if mask is None:
        return _sdpa(call, is_causal=True), "causal_kpm"
    if not sdpa_takes_mask_with_causal(call.q, call.k, call.v, mask, call.dropout_p):
        return _fall_back(call, "the SDPA backend for this call cannot take is_causal=True with attn_mask")
    batch_size, num_heads, tgt_len = call.shape
    row_has_key = masks.causal_row_has_key(mask, tgt_len, call.src_len, device=call.q.device)  # (B, 1, L, 1)
    return _sdpa(call, mask, is_causal=True).masked_fill(~row_has_key, 0.0), "causal_kpm"


def _fall_back(call: _Call, reason: str) -> tuple[Tensor, str]:
    logger.debug("causal_kpm falls back to merged_bool: %s", reason)
    out, _ = _merged_bool(call)
    return out, "merged_bool"


def _causal_only(call: _Call) -> tuple[Tensor, str]:
    _check_causal_only(call)
    # key_padding_mask is ignored by design: with right padding no pad key precedes a real query.
    return _sdpa(call, is_causal=True), "causal_only"


def _check_causal_only(call: _Call) -> None:
    _require_causal(call, "causal_only")
    if call.key_padding_mask is not None and masks.has_pad_before_real_token(call.key_padding_mask):
        raise ValueError(
            "strategy='causal_only' ignores key_padding_mask, which is only correct with right padding, but this "
            "key_padding_mask has a pad before a real token (left padding or a hole); use strategy='causal_kpm'"
        )
    if call.attn_mask is not None or call.extra_keys:
        raise ValueError(
            "strategy='causal_only' applies SDPA's causal mask and nothing else, but this call also has an "
            "attn_mask or add_bias_kv/add_zero_attn keys; use strategy='causal_kpm' or 'merged_bool'"
        )


def _flex(call: _Call) -> tuple[Tensor, str]:
    from torch.nn.attention.flex_attention import BlockMask, create_block_mask

    if call.dropout_p > 0.0:
        raise ValueError("strategy='flex' has no attention dropout; set dropout=0.0 or use strategy='merged_bool'")
    if call.q.device.type == "cpu" and torch.is_grad_enabled() and any(t.requires_grad for t in (call.q, call.k, call.v)):
        raise NotImplementedError(
            "strategy='flex' has no backward on CPU (FlexAttention is forward-only there); train on CPU with "
            "strategy='merged_bool' or 'causal_kpm', or run flex under torch.no_grad()"
        )
    if call.extra_keys:
        raise NotImplementedError("strategy='flex' does not support add_bias_kv / add_zero_attn; use strategy='merged_bool'")
    batch_size, num_heads, tgt_len = call.shape
    row_has_key = None
    if isinstance(call.attn_mask, BlockMask):
        block_mask = call.attn_mask  # built once per batch by the caller; it carries causality and padding
    else:
        keep = call.merged(is_causal=False)  # (B, 1, 1, S) for padding alone
        if keep is not None and keep.dtype != torch.bool:
            raise TypeError("strategy='flex' takes bool masks only; for float attn_mask use strategy='merged_additive'")
        mask_mod = masks.keep_mask_mod(keep, is_causal=call.is_causal)
        mask_b = keep.shape[0] if keep is not None and keep.shape[0] > 1 else None
        mask_h = keep.shape[1] if keep is not None and keep.shape[1] > 1 else None
        block_mask = create_block_mask(mask_mod, mask_b, mask_h, tgt_len, call.src_len, device=call.q.device)
        if keep is not None:
            row_has_key = (
                masks.causal_row_has_key(keep, tgt_len, call.src_len, device=call.q.device)
                if call.is_causal
                else masks.guard_empty_rows(keep)[1]
            )
    out = _flex_attention(call.q.device.type)(call.q, call.k, call.v, block_mask=block_mask)
    return (out if row_has_key is None else out.masked_fill(~row_has_key, 0.0)), "flex"


@functools.cache
def _flex_attention(device_type: str) -> Callable[..., Tensor]:
    from torch.nn.attention.flex_attention import flex_attention

    # The fused kernel only exists compiled (about 20 s on first use). On CPU flex is forward-only and for
    # checking, so the uncompiled path (which materialises the scores) serves there.
    return flex_attention if device_type == "cpu" else torch.compile(flex_attention, dynamic=False)


def _require_causal(call: _Call, strategy: str) -> None:
    if not call.is_causal:
        raise ValueError(
            f"strategy={strategy!r} serves causal self-attention and needs is_causal=True; this call has "
            f"is_causal=False. Pass is_causal=True, or use strategy='merged_bool' for any mask"
        )


_DISPATCH: dict[str, Callable[[_Call], tuple[Tensor, str]]] = {
    "reference": _reference,
    "merged_bool": _merged_bool,
    "merged_additive": _merged_additive,
    "causal_kpm": _causal_kpm,
    "causal_only": _causal_only,
    "flex": _flex,
}


# ----------------------------------------------------------------------------------------------------------
# The module
# ----------------------------------------------------------------------------------------------------------


class MultiheadAttention(nn.MultiheadAttention):
    """``torch.nn.MultiheadAttention`` with the same constructor, ``forward`` and ``state_dict``, plus ``strategy``.

    Weights load from a torch module with ``strict=True`` and back: this is a subclass, with torch's own
    parameters and initialisation. Outputs and weights equal torch's wherever torch's are finite.

    Args:
        strategy: how ``key_padding_mask``, ``attn_mask`` and ``is_causal`` reach the kernel; one of
            :data:`STRATEGIES` (see the module docstring). ``merged_bool``, the default, serves every call.

    ``need_weights=True`` (torch's default) needs the explicit softmax, as in torch; pass
    ``need_weights=False`` to reach the strategy's kernel. After each call, :attr:`last_dispatch` names what
    served it: a strategy name, ``"merged_bool"`` when ``causal_kpm`` fell back, or ``"explicit"`` for
    ``need_weights=True``.

    Note: ``torch.nn.TransformerEncoderLayer``'s own inference fast path reads ``in_proj_weight`` directly and
    never calls this ``forward``; use mhaplug's decoder, or call the layer in training mode.
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        dropout: float = 0.0,
        bias: bool = True,
        add_bias_kv: bool = False,
        add_zero_attn: bool = False,
        kdim: int | None = None,
        vdim: int | None = None,
        batch_first: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        strategy: str = "merged_bool",
    ) -> None:
        for name, value in (("embed_dim", embed_dim), ("num_heads", num_heads)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if embed_dim % num_heads:
            raise ValueError(
                f"num_heads must divide embed_dim, got embed_dim={embed_dim} and num_heads={num_heads}; "
                f"pick num_heads among {[h for h in range(1, embed_dim + 1) if embed_dim % h == 0][:12]}"
            )
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        super().__init__(
            embed_dim, num_heads, dropout, bias, add_bias_kv, add_zero_attn, kdim, vdim, batch_first, device, dtype
        )
        self.strategy = strategy
        self.last_dispatch: str | None = None

    @property
    def strategy(self) -> str:
        return self._strategy

    @strategy.setter
    def strategy(self, value: str) -> None:
        if value not in STRATEGIES:
            raise ValueError(f"strategy must be one of {', '.join(STRATEGIES)}; got {value!r}")
        self._strategy = value

    def extra_repr(self) -> str:
        return f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, batch_first={self.batch_first}, strategy={self.strategy!r}"

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        """Attention over ``key``/``value`` for each ``query``, masked by the union of the masks given.

        Args:
            query: (L, B, E), or (B, L, E) with ``batch_first=True``, or unbatched (L, E).
            key, value: (S, B, kdim / vdim), batch first (B, S, ...), or unbatched (S, ...).
            key_padding_mask: (B, S) or unbatched (S,), bool True = padding; or float, added to the scores.
            need_weights: also return attention weights (explicit softmax, as torch).
            attn_mask: (L, S) or (B*H, L, S) (unbatched (H, L, S)), bool True = may NOT attend, or float
                added to the scores. mhaplug also takes (B, 1, L, S) or (B, H, L, S), so a per-sequence mask
                (packed documents) need not be copied per head; with ``strategy="flex"`` also a ``BlockMask``.
            average_attn_weights: average the weights over heads.
            is_causal: also hide key j from query i for j > i, built on the device.

        Returns:
            ``(output, weights)``: output shaped like ``query`` with E features; weights (B, L, S') averaged
            or (B, H, L, S'), S' = S plus add_bias_kv / add_zero_attn columns, or None.
        """
        is_batched = _check_inputs(self, query, key, value, key_padding_mask, attn_mask)
        if self.strategy == "torch_mha":
            return self._forward_torch(query, key, value, key_padding_mask, need_weights, attn_mask, average_attn_weights, is_causal)

        same_qk, same_kv = query is key, key is value
        if not is_batched:
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)  # (1, L|S, E)
            key_padding_mask = None if key_padding_mask is None else key_padding_mask.unsqueeze(0)  # (1, S)
        elif not self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)  # (B, L|S, E)

        q, k, v = self._project(query, key, value, same_qk and same_kv, same_kv)  # (B, L, E), (B, S, E), (B, S, E)
        batch_size, tgt_len, _ = q.shape
        src_len, extra_keys = k.shape[1], 0
        if self.bias_k is not None and self.bias_v is not None:
            k = torch.cat([k, self.bias_k.expand(batch_size, 1, -1)], dim=1)  # (B, S + 1, E)
            v = torch.cat([v, self.bias_v.expand(batch_size, 1, -1)], dim=1)
            extra_keys += 1
        if self.add_zero_attn:
            k = torch.cat([k, k.new_zeros(batch_size, 1, k.shape[-1])], dim=1)  # (B, S' + 1, E)
            v = torch.cat([v, v.new_zeros(batch_size, 1, v.shape[-1])], dim=1)
            extra_keys += 1

        heads, head_dim = self.num_heads, self.head_dim
        call = _Call(
            q=q.view(batch_size, tgt_len, heads, head_dim).transpose(1, 2),  # (B, H, L, D)
            k=k.view(batch_size, -1, heads, head_dim).transpose(1, 2),  # (B, H, S', D)
            v=v.view(batch_size, -1, heads, head_dim).transpose(1, 2),  # (B, H, S', D)
            key_padding_mask=key_padding_mask,
            attn_mask=attn_mask,
            is_causal=is_causal,
            dropout_p=self.dropout if self.training else 0.0,
            src_len=src_len,
            extra_keys=extra_keys,
        )
        weights = None
        if need_weights:
            out, weights = explicit_attention(call.q, call.k, call.v, self._weights_mask(call), dropout_p=call.dropout_p)
            self.last_dispatch = "explicit"
        else:
            out, self.last_dispatch = _DISPATCH[self.strategy](call)

        out = out.transpose(1, 2).reshape(batch_size, tgt_len, self.embed_dim)  # (B, L, E)
        out = F.linear(out, self.out_proj.weight, self.out_proj.bias)
        if weights is not None and average_attn_weights:
            weights = weights.mean(dim=1)  # (B, L, S')
        if not is_batched:
            return out.squeeze(0), None if weights is None else weights.squeeze(0)
        if not self.batch_first:
            out = out.transpose(0, 1)  # (L, B, E)
        return out, weights

    def _project(self, query: Tensor, key: Tensor, value: Tensor, self_attention: bool, same_kv: bool) -> tuple[Tensor, Tensor, Tensor]:
        """Input projections, packed where torch packs them (one matmul for self-attention)."""
        embed_dim = self.embed_dim
        bias = self.in_proj_bias
        b_q, b_k, b_v = (None, None, None) if bias is None else bias.chunk(3)
        if not self._qkv_same_embed_dim:
            return (
                F.linear(query, self.q_proj_weight, b_q),
                F.linear(key, self.k_proj_weight, b_k),
                F.linear(value, self.v_proj_weight, b_v),
            )
        weight = self.in_proj_weight  # (3E, E)
        if self_attention:
            return F.linear(query, weight, bias).chunk(3, dim=-1)  # type: ignore[return-value]
        w_q, w_kv = weight.split([embed_dim, 2 * embed_dim])
        q = F.linear(query, w_q, b_q)
        if same_kv:
            b_kv = None if bias is None else bias[embed_dim:]
            k, v = F.linear(key, w_kv, b_kv).chunk(2, dim=-1)
            return q, k, v
        w_k, w_v = w_kv.chunk(2)
        return q, F.linear(key, w_k, b_k), F.linear(value, w_v, b_v)

    def _weights_mask(self, call: _Call) -> Tensor | None:
        """The mask the strategy applies, for the explicit path that returns weights."""
        if self.strategy == "causal_only":
            _check_causal_only(call)
            batch_size, num_heads, tgt_len = call.shape
            return masks.causal_keep(tgt_len, call.src_len, device=call.q.device)  # (L, S): padding ignored
        if self.strategy == "causal_kpm":
            _require_causal(call, "causal_kpm")
        if not isinstance(call.attn_mask, (Tensor, type(None))):
            raise ValueError("need_weights=True cannot be served from a BlockMask; pass need_weights=False")
        return call.merged()

    def _forward_torch(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None,
        need_weights: bool,
        attn_mask: Tensor | None,
        average_attn_weights: bool,
        is_causal: bool,
    ) -> tuple[Tensor, Tensor | None]:
        """torch's own path, unchanged but for ``is_causal``, which becomes a real mask (torch #131254), and a
        4-D ``attn_mask``, which torch does not take: it is copied per head to (B*H, L, S), as torch would."""
        if attn_mask is not None and attn_mask.dim() == 4:
            batch, _, tgt_len, src_len = attn_mask.shape
            attn_mask = attn_mask.expand(batch, self.num_heads, tgt_len, src_len).reshape(-1, tgt_len, src_len)
        if is_causal:
            seq_dim = 1 if (query.dim() == 3 and self.batch_first) else 0
            like = key_padding_mask if key_padding_mask is not None else attn_mask
            attn_mask = masks.add_causal_to_attn_mask(
                attn_mask,
                query.shape[seq_dim],
                key.shape[seq_dim],
                device=query.device,
                dtype=torch.bool if like is None else like.dtype,
            )
        self.last_dispatch = "torch_mha"
        return super().forward(
            query,
            key,
            value,
            key_padding_mask=key_padding_mask,
            need_weights=need_weights,
            attn_mask=attn_mask,
            average_attn_weights=average_attn_weights,
            is_causal=False,
        )


def _check_inputs(
    mha: MultiheadAttention,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    key_padding_mask: Tensor | None,
    attn_mask: object,
) -> bool:
    """Validate shapes and dtypes with errors that name the argument; return whether the input is batched."""
    for name, tensor in (("query", query), ("key", key), ("value", value)):
        if not isinstance(tensor, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
        if tensor.is_nested:
            raise NotImplementedError(f"{name} is a nested tensor; mhaplug takes padded tensors with key_padding_mask")
        if not tensor.is_floating_point():
            raise TypeError(f"{name} must be a floating point tensor, got dtype {tensor.dtype}")
    if query.dim() not in (2, 3):
        raise ValueError(f"query must be 3-D (batched) or 2-D (unbatched), got shape {tuple(query.shape)}")
    is_batched = query.dim() == 3
    for name, tensor in (("key", key), ("value", value)):
        if tensor.dim() != query.dim():
            raise ValueError(f"{name} must be {query.dim()}-D like query (shape {tuple(query.shape)}), got shape {tuple(tensor.shape)}")
    seq_dim = 1 if (is_batched and mha.batch_first) else 0
    layout = "(B, L, E)" if seq_dim == 1 else "(L, B, E)" if is_batched else "(L, E)"
    for name, tensor, features in (("query", query, mha.embed_dim), ("key", key, mha.kdim), ("value", value, mha.vdim)):
        if tensor.shape[-1] != features:
            raise ValueError(f"{name} must have {features} features in its last dim {layout}, got shape {tuple(tensor.shape)}")
    if key.shape[:-1] != value.shape[:-1]:
        raise ValueError(f"key and value must agree in batch and length, got shapes {tuple(key.shape)} and {tuple(value.shape)}")
    tgt_len, src_len = query.shape[seq_dim], key.shape[seq_dim]
    batch_size = query.shape[1 - seq_dim] if is_batched else 1
    if is_batched and key.shape[1 - seq_dim] != batch_size:
        raise ValueError(f"key has batch size {key.shape[1 - seq_dim]} but query has {batch_size}")

    masks.check_mask(key_padding_mask, name="key_padding_mask")
    if key_padding_mask is not None:
        expected = (batch_size, src_len) if is_batched else (src_len,)
        if tuple(key_padding_mask.shape) != expected:
            raise ValueError(
                f"key_padding_mask must have shape {expected} (batch, source length), True = padding; "
                f"got {tuple(key_padding_mask.shape)}"
            )
    if attn_mask is None:
        return is_batched
    if not isinstance(attn_mask, Tensor):
        from torch.nn.attention.flex_attention import BlockMask

        if isinstance(attn_mask, BlockMask) and mha.strategy == "flex":
            if key_padding_mask is not None:
                raise ValueError("with a BlockMask attn_mask, fold the padding into the BlockMask and pass key_padding_mask=None")
            return is_batched
        raise TypeError(
            f"attn_mask must be a torch.Tensor (or a BlockMask with strategy='flex'), got {type(attn_mask).__name__}"
        )
    masks.check_mask(attn_mask, name="attn_mask")
    per_head = (batch_size * mha.num_heads if is_batched else mha.num_heads, tgt_len, src_len)
    four_d = [(batch_size, 1, tgt_len, src_len), (batch_size, mha.num_heads, tgt_len, src_len)] if is_batched else []
    if tuple(attn_mask.shape) not in [(tgt_len, src_len), per_head, *four_d]:
        raise ValueError(
            f"attn_mask must have shape {(tgt_len, src_len)} (L, S) or {per_head} "
            f"({'B*H' if is_batched else 'H'}, L, S)"
            + (f", or (mhaplug only) {four_d[0]} / {four_d[1]} (B, 1|H, L, S)" if is_batched else "")
            + f"; got {tuple(attn_mask.shape)}"
        )
    return is_batched
