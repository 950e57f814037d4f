"""The mask strategies: what each can serve (:data:`CAPABILITIES`, the one table the model, the config checks, the
tests and the README read), one small function each, and the one dispatch table that picks it.

A strategy gets one :class:`AttentionCall` (the heads' q, k, v and the caller's masks, as
:class:`mhaplug.attention.MultiheadAttention` hands them over) and returns the output (B, H, L, D) with the name of
what served it. Every strategy but ``torch_mha`` outputs exactly 0, with zero and finite gradients, for a query row
that may attend no key (:func:`zero_rows`). ``torch_mha`` is torch's own path, which the layer itself runs
(:mod:`mhaplug.attention.mha`).

Shapes: B batch, L target (query) length, S source (key) length, H heads, D head dim.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass, fields, replace

import torch
import torch.nn.functional as F
from torch import Tensor

from mhaplug.attention import masks, merge
from mhaplug.common import Choice

__all__ = [
    "CAPABILITIES",
    "DEFAULT_STRATEGY",
    "STRATEGIES",
    "AttentionCall",
    "Capabilities",
    "Strategy",
    "capability_table",
    "dispatch",
    "explicit_attention",
    "mark_compile_constants",
    "strategies_where",
    "weights_mask",
    "zero_rows",
]

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------------------
# What each strategy can serve
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Capabilities:
    """What one strategy can serve, and what it hands the kernel.

    Attributes:
        kernel: what reaches the attention kernel.
        mask_memory: bytes of mask per call (B batch, H heads, L queries, S keys).
        needs_is_causal: serves causal calls only (``is_causal=True``); raises for any other call.
        document_masks: takes a packed row's document-causal ``attn_mask`` (B, 1, L, L), so it can train
            ``data.layout=packed``.
        left_padding: correct with a ``key_padding_mask`` that has pads before real tokens (left padding).
        trains_on_cpu: has a backward on the CPU.
        dropout: supports attention dropout.
        returns_weights: ``need_weights=True`` returns attention weights (from the explicit softmax).
        empty_rows_zero: a query row that may attend nothing outputs 0 with finite gradients (not NaN).
    """

    kernel: str
    mask_memory: str
    needs_is_causal: bool = False
    document_masks: bool = True
    left_padding: bool = True
    trains_on_cpu: bool = True
    dropout: bool = True
    returns_weights: bool = True
    empty_rows_zero: bool = True


CAPABILITIES: dict[str, Capabilities] = {
    "auto": Capabilities(
        kernel=(
            "causal_kpm for causal calls, merged_bool for the others (`last_dispatch` says which); "
            "refuses is_causal=True with a 2-D attn_mask that is not causal"
        ),
        mask_memory="as the one chosen",
    ),
    "reference": Capabilities(kernel="explicit safe softmax(q k^T / sqrt(D) + mask) v", mask_memory="B*L*S (+ scores)"),
    "torch_mha": Capabilities(
        kernel="torch's own MultiheadAttention.forward (NaN rows kept)",
        mask_memory="B*H*L*S float",
        empty_rows_zero=False,
    ),
    "merged_bool": Capabilities(kernel="one (B, 1, L, S) bool keep-mask to SDPA", mask_memory="B*L*S bytes"),
    "merged_additive": Capabilities(kernel="one (B, 1, L, S) 0/-inf float mask to SDPA", mask_memory="4*B*L*S bytes"),
    "causal_kpm": Capabilities(
        kernel="SDPA is_causal=True + (B, 1, 1, S) keep-mask (merged_bool where the backend cannot take both)",
        mask_memory="B*S bytes",
        needs_is_causal=True,
        document_masks=False,
    ),
    "causal_only": Capabilities(
        kernel="SDPA is_causal=True, padding ignored",
        mask_memory="0",
        needs_is_causal=True,
        document_masks=False,
        left_padding=False,
    ),
    "flex": Capabilities(
        kernel="FlexAttention BlockMask from causal & not-pad (or document) predicates",
        mask_memory="O(blocks)",
        trains_on_cpu=False,
        dropout=False,
    ),
}


STRATEGIES: tuple[str, ...] = tuple(CAPABILITIES)


DEFAULT_STRATEGY = "auto"


# The strategies as a Choice, the type of ``attention.strategy`` in the structured configs (checked at composition)
Strategy = Choice("Strategy", [(name, name) for name in STRATEGIES])  # type: ignore[misc]


def strategies_where(**flags: bool) -> tuple[str, ...]:
    """Strategies whose capabilities have the given values, e.g. ``strategies_where(document_masks=True)``."""
    return tuple(name for name, caps in CAPABILITIES.items() if all(getattr(caps, k) == v for k, v in flags.items()))


def capability_table() -> str:
    """:data:`CAPABILITIES` as a Markdown table (the README shows it; a test keeps the two equal)."""
    flags = [f.name for f in fields(Capabilities) if f.type in ("bool", bool)]
    header = ["strategy", "what reaches the kernel", "mask memory", *flags]
    rows = [
        [f"`{name}`", caps.kernel, caps.mask_memory, *("yes" if getattr(caps, flag) else "no" for flag in flags)]
        for name, caps in CAPABILITIES.items()
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


# ----------------------------------------------------------------------------------------------------------
# One call, as every strategy sees it
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AttentionCall:
    """One attention call: the heads' q, k, v and the masks as the caller gave them."""

    q: Tensor  # (B, H, L, D)
    k: Tensor  # (B, H, S + extra_keys, D)
    v: Tensor  # (B, H, S + extra_keys, D)
    key_padding_mask: Tensor | None  # (B, S), bool True = pad, or float
    attn_mask: object  # (L, S) | (B*H, L, S) | (B, 1|H, L, S) bool True = masked, or float; a BlockMask; or None
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
        return merge.merge_masks(
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

    def taking_causal_hint(self, strategy: str) -> AttentionCall:
        """For the causal strategies: a causal 2-D ``attn_mask`` with ``is_causal=True`` (what
        ``nn.TransformerDecoderLayer`` passes) is checked to be causal and dropped, so the kernel gets
        ``is_causal=True`` and nothing of size L x S. Other calls are returned as they are."""
        attn_mask = self.attn_mask
        if not (self.is_causal and isinstance(attn_mask, Tensor) and attn_mask.dim() == 2):
            return self
        masks.check_causal_hint(attn_mask, strategy=strategy)
        return replace(self, attn_mask=None)


def _sdpa(call: AttentionCall, mask: Tensor | None = None, *, is_causal: bool = False) -> Tensor:
    return F.scaled_dot_product_attention(
        call.q, call.k, call.v, attn_mask=mask, dropout_p=call.dropout_p, is_causal=is_causal
    )


def zero_rows(out: Tensor, row_has_key: Tensor) -> Tensor:
    """``out`` (B, H, L, D) with the rows that may attend nothing set to 0 (row_has_key (B, H|1, L|1, 1)).

    Filled in the (B, L, H, D) order that SDPA's output has in memory and the output projection reads: filling
    (B, H, L, D) directly makes a (B, H, L, D)-contiguous copy, which costs a transposing copy after it and one
    more in the backward.
    """
    if masks.host_read_is_free(row_has_key) and bool(row_has_key.all()):
        return out  # every row sees a key (right padding, the common case): nothing to fill, checked for free
    return out.transpose(1, 2).masked_fill(~row_has_key.transpose(1, 2), 0.0).transpose(1, 2)


def _sdpa_guarded(call: AttentionCall, mask: Tensor | None, *, additive: bool) -> Tensor:
    """SDPA with one merged mask; rows that may attend nothing are opened for the kernel, then zeroed."""
    if mask is None:
        return _sdpa(call)
    safe, row_has_key = merge.guard_empty_rows(mask)
    if additive and safe.dtype == torch.bool:
        safe = masks.additive_from_keep(safe, call.q.dtype)
    return zero_rows(_sdpa(call, safe), row_has_key)  # (B, H, L, D)


def explicit_attention(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, *, dropout_p: float = 0.0
) -> tuple[Tensor, Tensor, Tensor | None]:
    """softmax(q k^T / sqrt(D) + mask) v, written out, for the attention weights (and as the ground truth).

    Laid out as torch's own path is (batched matmuls over B*H), with two differences that make returning
    weights cheaper than ``nn.MultiheadAttention``'s: the mask stays broadcast (B, 1, L, S) instead of torch's
    (B*H, L, S) float copy, and it is applied to the scores in place, outside autograd. That is exact: adding a
    constant does not change a gradient, and where the mask is -inf the softmax is 0, so the gradient there is 0
    with or without the fill. (A float mask that itself requires grad, a learned bias, is added out of place.)

    Args:
        q: (B, H, L, D). k, v: (B, H, S, D).
        mask: keep mask (bool, True = may attend) or additive float, broadcastable to (B, H, L, S).

    Returns:
        ``(out, weights, row_has_key)``: out (B, H, L, D), exactly 0 in rows that may attend nothing; weights
        (B, H, L, S) after dropout, as torch returns them, *not yet zeroed* in those rows (zero them with
        ``weights.masked_fill(~row_has_key, 0)`` after any averaging, which is cheaper); row_has_key
        (B, H|1, L|1, 1) bool, or None when nothing is masked.
    """
    batch, heads, tgt_len, head_dim = q.shape
    src_len = k.shape[-2]
    q3 = (q * head_dim**-0.5).reshape(batch * heads, tgt_len, head_dim)  # (B*H, L, D); scaled first, as torch
    k3 = k.reshape(batch * heads, src_len, head_dim)  # (B*H, S, D)
    v3 = v.reshape(batch * heads, src_len, v.shape[-1])  # (B*H, S, D)
    scores = torch.bmm(q3, k3.transpose(1, 2))  # (B*H, L, S)
    row_has_key = None
    if mask is not None:
        safe, row_has_key = merge.guard_empty_rows(mask)
        if safe.requires_grad:
            scores = (scores.view(batch, heads, tgt_len, src_len) + safe).view(batch * heads, tgt_len, src_len)
        else:
            with torch.no_grad():  # bmm's backward does not read its output; see the docstring for why this is exact
                view = scores.view(batch, heads, tgt_len, src_len)  # (B, H, L, S)
                view.masked_fill_(
                    masks.is_masked_from_keep(safe), masks.NEG_INF
                ) if safe.dtype == torch.bool else view.add_(safe)
    weights = scores.softmax(dim=-1)
    if dropout_p > 0.0:
        weights = F.dropout(weights, p=dropout_p)
    out = torch.bmm(weights, v3).view(batch, heads, tgt_len, v3.shape[-1])  # (B, H, L, D); no -1: B may be 0
    if row_has_key is not None:
        out = zero_rows(out, row_has_key)  # also stops every gradient into the opened rows
    return out, weights.view(batch, heads, tgt_len, src_len), row_has_key


# ----------------------------------------------------------------------------------------------------------
# Strategies: one small function each, (call) -> (out (B, H, L, D), name of what served the call)
# ----------------------------------------------------------------------------------------------------------


def _reference(call: AttentionCall) -> tuple[Tensor, str]:
    out, _, _ = explicit_attention(call.q, call.k, call.v, call.merged(), dropout_p=call.dropout_p)
    return out, "reference"


def _merged_bool(call: AttentionCall) -> tuple[Tensor, str]:
    # A float attn_mask can carry values a bool cannot: then the merged mask is float (padding as -inf).
    return _sdpa_guarded(call, call.merged(), additive=False), "merged_bool"


def _merged_additive(call: AttentionCall) -> tuple[Tensor, str]:
    return _sdpa_guarded(call, call.merged(), additive=True), "merged_additive"


def _fused_sdp_choice(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, dropout_p: float) -> int:
    return int(torch._fused_sdp_choice(q, k, v, mask, dropout_p, True))


@functools.cache
def mark_compile_constants() -> None:
    """Tell torch.compile / torch.export that the SDPA backend choice is a constant of the traced graph: it
    depends on shapes, dtypes, devices and flags only, which they guard on (a Python int from a torch op would
    otherwise break the graph). Done when the first layer is built, not at import: it imports torch._dynamo
    (about a second), which users of the collators alone need not pay."""
    torch.compiler.assume_constant_result(_fused_sdp_choice)


def sdpa_takes_mask_with_causal(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, dropout_p: float) -> bool:
    """Whether the SDPA backend torch would pick accepts ``attn_mask`` together with ``is_causal=True``.

    The math backend refuses the pair ("Explicit attn_mask should not be set when is_causal=True"); on the CPU
    it is picked when attention dropout is on. Decided from shapes, dtypes and flags only: no sync.
    """
    return _fused_sdp_choice(q, k, v, mask, dropout_p) > int(torch.nn.attention.SDPBackend.MATH.value)


def _causal_kpm(call: AttentionCall) -> tuple[Tensor, str]:
    _require_causal(call, "causal_kpm")
    call = call.taking_causal_hint("causal_kpm")
    if call.extra_keys:
        return _fall_back(call, "add_bias_kv / add_zero_attn keys lie beyond SDPA's causal diagonal")
    mask = call.merged(is_causal=False)  # (B, 1, 1, S) for padding alone: B*S bytes
    if mask is None:
        return _sdpa(call, is_causal=True), "causal_kpm"
    if not sdpa_takes_mask_with_causal(call.q, call.k, call.v, mask, call.dropout_p):
        return _fall_back(call, "the SDPA backend for this call cannot take is_causal=True with attn_mask")
    _batch_size, _num_heads, tgt_len = call.shape
    row_has_key = merge.causal_row_has_key(mask, tgt_len, call.src_len, device=call.q.device)  # (B, 1, L, 1)
    return zero_rows(_sdpa(call, mask, is_causal=True), row_has_key), "causal_kpm"


def _fall_back(call: AttentionCall, reason: str) -> tuple[Tensor, str]:
    if not torch.compiler.is_compiling():
        logger.debug("causal_kpm falls back to merged_bool: %s", reason)
    return _merged_bool(call)


def _causal_only(call: AttentionCall) -> tuple[Tensor, str]:
    call = _check_causal_only(call)
    # key_padding_mask is ignored by design: with right padding no pad key precedes a real query.
    return _sdpa(call, is_causal=True), "causal_only"


def _check_causal_only(call: AttentionCall) -> AttentionCall:
    _require_causal(call, "causal_only")
    call = call.taking_causal_hint("causal_only")
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
    return call


def _flex(call: AttentionCall) -> tuple[Tensor, str]:
    from torch.nn.attention.flex_attention import BlockMask, create_block_mask

    if call.dropout_p > 0.0:
        raise ValueError("strategy='flex' has no attention dropout; set dropout=0.0 or use strategy='merged_bool'")
    if (
        call.q.device.type == "cpu"
        and torch.is_grad_enabled()
        and any(t.requires_grad for t in (call.q, call.k, call.v))
    ):
        raise NotImplementedError(
            "strategy='flex' has no backward on CPU (FlexAttention is forward-only there); train on CPU with "
            "strategy='auto' or 'merged_bool', or run flex under torch.no_grad()"
        )
    if call.extra_keys:
        raise NotImplementedError(
            "strategy='flex' does not support add_bias_kv / add_zero_attn; use strategy='merged_bool'"
        )
    batch_size, _num_heads, tgt_len = call.shape
    row_has_key = None
    if isinstance(call.attn_mask, BlockMask):
        block_mask = call.attn_mask  # built once per batch by the caller; it carries causality and padding
    else:
        keep = call.merged(is_causal=False)  # (B, 1, 1, S) for padding alone
        if keep is not None and keep.dtype != torch.bool:
            raise TypeError("strategy='flex' takes bool masks only; for float attn_mask use strategy='merged_additive'")
        if batch_size == 0:
            keep = None  # no row to mask, and create_block_mask cannot vmap a mask over an empty batch
        mask_mod = masks.keep_mask_mod(keep, is_causal=call.is_causal)
        mask_b = keep.shape[0] if keep is not None and keep.shape[0] > 1 else None
        mask_h = keep.shape[1] if keep is not None and keep.shape[1] > 1 else None
        block_mask = create_block_mask(mask_mod, mask_b, mask_h, tgt_len, call.src_len, device=call.q.device)
        if keep is not None:
            row_has_key = (
                merge.causal_row_has_key(keep, tgt_len, call.src_len, device=call.q.device)
                if call.is_causal
                else merge.guard_empty_rows(keep)[1]
            )
    out = _flex_attention(call.q.device.type)(call.q, call.k, call.v, block_mask=block_mask)
    return (out if row_has_key is None else zero_rows(out, row_has_key)), "flex"


@functools.cache
def _flex_attention(device_type: str) -> Callable[..., Tensor]:
    from torch.nn.attention.flex_attention import flex_attention

    # The fused kernel only exists compiled (the first call compiles it, which takes a while). On CPU flex is
    # forward-only and for checking, so the uncompiled path (which materialises the scores) serves there.
    return flex_attention if device_type == "cpu" else torch.compile(flex_attention, dynamic=False)


def _auto(call: AttentionCall) -> tuple[Tensor, str]:
    """Serve every call but one: a causal call (``is_causal=True``) by the causal kernel path (``causal_kpm``,
    which falls back to ``merged_bool`` itself where it must), any other call by ``merged_bool``. Refused:
    ``is_causal=True`` with a 2-D ``attn_mask`` that is not the causal mask (torch's hint says it is), a
    ``ValueError`` on the CPU and an asynchronous device assert on an accelerator or under a compiler
    (:func:`mhaplug.attention.masks.check_causal_hint`); pass ``is_causal=False`` to apply such a mask as given."""
    if call.is_causal:
        return _causal_kpm(call.taking_causal_hint("auto"))
    return _merged_bool(call)


def _require_causal(call: AttentionCall, strategy: str) -> None:
    if not call.is_causal:
        raise ValueError(
            f"strategy={strategy!r} serves causal self-attention and needs is_causal=True; this call has "
            f"is_causal=False. Pass is_causal=True, or use strategy='auto' (which also serves the non-causal "
            f"calls of a model, with merged_bool) or 'merged_bool' for any mask"
        )


_DISPATCH: dict[str, Callable[[AttentionCall], tuple[Tensor, str]]] = {
    "auto": _auto,
    "reference": _reference,
    "merged_bool": _merged_bool,
    "merged_additive": _merged_additive,
    "causal_kpm": _causal_kpm,
    "causal_only": _causal_only,
    "flex": _flex,
}
assert set(_DISPATCH) | {"torch_mha"} == set(CAPABILITIES), "every strategy has one row and one function"


def dispatch(strategy: str, call: AttentionCall) -> tuple[Tensor, str]:
    """Serve ``call`` with ``strategy`` (any but ``torch_mha``): the output (B, H, L, D) and what served it."""
    return _DISPATCH[strategy](call)


def weights_mask(strategy: str, call: AttentionCall) -> Tensor | None:
    """The mask ``strategy`` applies to ``call``, for the explicit softmax that returns attention weights
    (``need_weights=True``): keep (bool) or additive (float), broadcastable to (B, H, L, S'), or None."""
    if strategy == "causal_only":
        call = _check_causal_only(call)
        keep = masks.causal_keep(call.shape[2], call.src_len, device=call.q.device)  # padding ignored
        return keep.view(1, 1, *keep.shape)  # (1, 1, L, S)
    if strategy == "causal_kpm" or (strategy == "auto" and call.is_causal):
        _require_causal(call, strategy)
        call = call.taking_causal_hint(strategy)
    # ValueError: a combination of arguments is a bad value, not a programming error
    if not isinstance(call.attn_mask, (Tensor, type(None))):
        raise ValueError("need_weights=True cannot be served from a BlockMask; pass need_weights=False")  # noqa: TRY004
    return call.merged()
