"""A drop-in ``torch.nn.MultiheadAttention`` whose mask merge is explicit, correct and switchable.

``torch.nn.MultiheadAttention`` expands ``key_padding_mask`` (B, S) to (B*H, 1, S), adds it to ``attn_mask``
and runs one softmax; the (B*H, L, S) float mask it builds keeps the fast kernels out, and query rows with
nothing to attend to come out NaN. :class:`MultiheadAttention` takes the same arguments and weights, and merges
the masks on the tensors' own device by one of the strategies in :data:`CAPABILITIES` (one function each
below, one dispatch table). :func:`swap_attention` puts it into any model, ``nn.Transformer*`` included.

Every strategy but ``torch_mha`` outputs exactly 0, with zero and finite gradients, for a query row that may
attend no key. ``is_causal=True`` means "apply a causal mask" (top-left aligned when L != S, as SDPA's),
built on the device; with a 2-D ``attn_mask`` it is torch's hint that the mask is causal, which the causal
strategies verify and then replace by the causal kernel (:func:`mhaplug.masks.check_causal_hint`), and the
merged strategies intersect with the mask.

Shapes: B batch, L target (query) length, S source (key) length, E embed dim, H heads, D = E / H.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mhaplug import masks
from mhaplug.unpad import TokenLayout
from mhaplug.util import Choice, check_choice, check_int

__all__ = [
    "CAPABILITIES",
    "STRATEGIES",
    "Capabilities",
    "MultiheadAttention",
    "Strategy",
    "capability_table",
    "swap_attention",
]

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------------------
# What each strategy can serve: the one table the model, the config checks, the tests and the README read
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
        kernel="causal_kpm for causal calls, merged_bool for the others (`last_dispatch` says which)",
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
class _Call:
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

    def taking_causal_hint(self, strategy: str) -> _Call:
        """For the causal strategies: a causal 2-D ``attn_mask`` with ``is_causal=True`` (what
        ``nn.TransformerDecoderLayer`` passes) is checked to be causal and dropped, so the kernel gets
        ``is_causal=True`` and nothing of size L x S. Other calls are returned as they are."""
        attn_mask = self.attn_mask
        if not (self.is_causal and isinstance(attn_mask, Tensor) and attn_mask.dim() == 2):
            return self
        masks.check_causal_hint(attn_mask, strategy=strategy)
        return replace(self, attn_mask=None)


def _sdpa(call: _Call, mask: Tensor | None = None, *, is_causal: bool = False) -> Tensor:
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


def _sdpa_guarded(call: _Call, mask: Tensor | None, *, additive: bool) -> Tensor:
    """SDPA with one merged mask; rows that may attend nothing are opened for the kernel, then zeroed."""
    if mask is None:
        return _sdpa(call)
    safe, row_has_key = masks.guard_empty_rows(mask)
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
        safe, row_has_key = masks.guard_empty_rows(mask)
        if safe.requires_grad:
            scores = (scores.view(batch, heads, tgt_len, src_len) + safe).view(batch * heads, tgt_len, src_len)
        else:
            with torch.no_grad():  # bmm's backward does not read its output; see the docstring for why this is exact
                view = scores.view(batch, heads, tgt_len, src_len)  # (B, H, L, S)
                view.masked_fill_(safe.logical_not(), masks.NEG_INF) if safe.dtype == torch.bool else view.add_(safe)
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


def _reference(call: _Call) -> tuple[Tensor, str]:
    out, _, _ = explicit_attention(call.q, call.k, call.v, call.merged(), dropout_p=call.dropout_p)
    return out, "reference"


def _merged_bool(call: _Call) -> tuple[Tensor, str]:
    # A float attn_mask can carry values a bool cannot: then the merged mask is float (padding as -inf).
    return _sdpa_guarded(call, call.merged(), additive=False), "merged_bool"


def _merged_additive(call: _Call) -> tuple[Tensor, str]:
    return _sdpa_guarded(call, call.merged(), additive=True), "merged_additive"


def _fused_sdp_choice(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, dropout_p: float) -> int:
    return int(torch._fused_sdp_choice(q, k, v, mask, dropout_p, True))


@functools.cache
def _mark_compile_constants() -> None:
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


def _causal_kpm(call: _Call) -> tuple[Tensor, str]:
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
    row_has_key = masks.causal_row_has_key(mask, tgt_len, call.src_len, device=call.q.device)  # (B, 1, L, 1)
    return zero_rows(_sdpa(call, mask, is_causal=True), row_has_key), "causal_kpm"


def _fall_back(call: _Call, reason: str) -> tuple[Tensor, str]:
    if not torch.compiler.is_compiling():
        logger.debug("causal_kpm falls back to merged_bool: %s", reason)
    return _merged_bool(call)


def _causal_only(call: _Call) -> tuple[Tensor, str]:
    call = _check_causal_only(call)
    # key_padding_mask is ignored by design: with right padding no pad key precedes a real query.
    return _sdpa(call, is_causal=True), "causal_only"


def _check_causal_only(call: _Call) -> _Call:
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


def _flex(call: _Call) -> tuple[Tensor, str]:
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
                masks.causal_row_has_key(keep, tgt_len, call.src_len, device=call.q.device)
                if call.is_causal
                else masks.guard_empty_rows(keep)[1]
            )
    out = _flex_attention(call.q.device.type)(call.q, call.k, call.v, block_mask=block_mask)
    return (out if row_has_key is None else zero_rows(out, row_has_key)), "flex"


@functools.cache
def _flex_attention(device_type: str) -> Callable[..., Tensor]:
    from torch.nn.attention.flex_attention import flex_attention

    # The fused kernel only exists compiled (the first call compiles it, which takes a while). On CPU flex is
    # forward-only and for checking, so the uncompiled path (which materialises the scores) serves there.
    return flex_attention if device_type == "cpu" else torch.compile(flex_attention, dynamic=False)


def _auto(call: _Call) -> tuple[Tensor, str]:
    # The causal kernel path for causal calls (it falls back to merged_bool itself where it must).
    if call.is_causal:
        return _causal_kpm(call.taking_causal_hint("auto"))
    return _merged_bool(call)


def _require_causal(call: _Call, strategy: str) -> None:
    if not call.is_causal:
        raise ValueError(
            f"strategy={strategy!r} serves causal self-attention and needs is_causal=True; this call has "
            f"is_causal=False. Pass is_causal=True, or use strategy='auto' (which also serves the non-causal "
            f"calls of a model, with merged_bool) or 'merged_bool' for any mask"
        )


_DISPATCH: dict[str, Callable[[_Call], tuple[Tensor, str]]] = {
    "auto": _auto,
    "reference": _reference,
    "merged_bool": _merged_bool,
    "merged_additive": _merged_additive,
    "causal_kpm": _causal_kpm,
    "causal_only": _causal_only,
    "flex": _flex,
}
assert set(_DISPATCH) | {"torch_mha"} == set(CAPABILITIES), "every strategy has one row and one function"


# ----------------------------------------------------------------------------------------------------------
# The module
# ----------------------------------------------------------------------------------------------------------


def _stay_out_of_torch_fast_paths(module: nn.Module, args: tuple[object, ...]) -> None:
    """A forward pre-hook that does nothing. ``nn.TransformerEncoderLayer``'s inference fast path reads the
    attention's weights and never calls its ``forward``, unless a module in the layer has a hook (torch's
    ``why_not_sparsity_fast_path``): this hook keeps every call, in training and in eval, on mhaplug's path."""
    return


class MultiheadAttention(nn.MultiheadAttention):
    """``torch.nn.MultiheadAttention`` with the same constructor, ``forward`` and ``state_dict``, plus ``strategy``.

    Weights load from a torch module with ``strict=True`` and back: this is a subclass, with torch's own
    parameters and initialisation. Outputs and weights equal torch's wherever torch's are finite.

    Args:
        strategy: how ``key_padding_mask``, ``attn_mask`` and ``is_causal`` reach the kernel; one of
            :data:`STRATEGIES` (see :data:`CAPABILITIES`). ``"auto"``, the default, serves every call: the causal
            kernel path for causal calls, ``merged_bool`` for the others.

    ``need_weights=True`` (torch's default) is served by the explicit softmax, as in torch, at no more cost;
    pass ``need_weights=False`` to reach the strategy's kernel. After each call, :attr:`last_dispatch` names
    what served it: a strategy name (``"causal_kpm"`` or ``"merged_bool"`` under ``auto``, or when
    ``causal_kpm`` falls back), or ``"explicit"`` for ``need_weights=True`` (eager calls; compiled graphs do not
    update it).

    Inside ``nn.TransformerEncoderLayer`` the layer's inference fast path would skip this ``forward``; a no-op
    forward pre-hook keeps it out (see :func:`swap_attention`, which also turns off ``nn.TransformerEncoder``'s
    nested-tensor conversion). ``torch.compile`` and ``torch.export`` work; ``torch.jit.script`` does not.
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
        strategy: str = DEFAULT_STRATEGY,
    ) -> None:
        embed_dim, num_heads = check_int("embed_dim", embed_dim), check_int("num_heads", num_heads)
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
        self.register_forward_pre_hook(_stay_out_of_torch_fast_paths)
        _mark_compile_constants()

    def __setstate__(self, state: dict[str, object]) -> None:  # torch.load of a whole module skips __init__
        super().__setstate__(state)
        _mark_compile_constants()

    @classmethod
    def from_torch(cls, mha: nn.MultiheadAttention, *, strategy: str = DEFAULT_STRATEGY) -> MultiheadAttention:
        """An mhaplug layer that shares ``mha``'s parameters (the same ``nn.Parameter`` objects, so an optimizer
        built on ``mha`` keeps training it), configuration, device, dtype and training mode."""
        if not isinstance(mha, nn.MultiheadAttention):
            raise TypeError(f"mha must be a torch.nn.MultiheadAttention, got {type(mha).__name__}")
        new = cls(
            mha.embed_dim,
            mha.num_heads,
            dropout=mha.dropout,
            bias=mha.in_proj_bias is not None,
            add_bias_kv=mha.bias_k is not None,
            add_zero_attn=mha.add_zero_attn,
            kdim=mha.kdim,
            vdim=mha.vdim,
            batch_first=mha.batch_first,
            device=torch.device("meta"),  # no memory, no initialisation: every parameter is replaced below
            strategy=strategy,
        )
        for name in new._parameters:
            new._parameters[name] = mha._parameters[name]
        new.out_proj = mha.out_proj
        return new.train(mha.training)

    @property
    def strategy(self) -> str:
        return self._strategy

    @strategy.setter
    def strategy(self, value: str) -> None:
        self._strategy = check_choice("strategy", value, STRATEGIES)

    def extra_repr(self) -> str:
        return (
            f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, batch_first={self.batch_first}, "
            f"strategy={self.strategy!r}"
        )

    def __prepare_scriptable__(self) -> nn.Module:
        raise NotImplementedError(
            "mhaplug.MultiheadAttention does not support torch.jit.script (its strategies dispatch in Python); "
            "use torch.compile(model) or torch.export.export(model, args), which both work"
        )

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
            query: (L, B, E), or (B, L, E) with ``batch_first=True``, or unbatched (L, E). B may be 0: the
                output (and weights) are empty, shaped as torch's.
            key, value: (S, B, kdim / vdim), batch first (B, S, ...), or unbatched (S, ...).
            key_padding_mask: (B, S) or unbatched (S,), bool True = padding; or float, added to the scores.
            need_weights: also return attention weights (explicit softmax, as torch).
            attn_mask: (L, S) or (B*H, L, S) (unbatched (H, L, S)), bool True = may NOT attend, or float
                added to the scores. mhaplug also takes (B, 1, L, S) or (B, H, L, S), so a per-sequence mask
                (packed documents) need not be copied per head; with ``strategy="flex"`` also a ``BlockMask``.
            average_attn_weights: average the weights over heads.
            is_causal: apply a causal mask, built on the device; with a 2-D ``attn_mask``, torch's hint that the
                mask is causal (checked by the causal strategies, intersected by the others).

        Returns:
            ``(output, weights)``: output shaped like ``query`` with E features; weights (B, L, S') averaged
            or (B, H, L, S'), S' = S plus add_bias_kv / add_zero_attn columns, or None.
        """
        is_batched = _check_inputs(self, query, key, value, key_padding_mask, attn_mask)
        if self.strategy == "torch_mha":
            return self._forward_torch(
                query, key, value, key_padding_mask, need_weights, attn_mask, average_attn_weights, is_causal
            )

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
            k=k.view(batch_size, k.shape[1], heads, head_dim).transpose(1, 2),  # (B, H, S', D); no -1: B may be 0
            v=v.view(batch_size, v.shape[1], heads, head_dim).transpose(1, 2),  # (B, H, S', D)
            key_padding_mask=key_padding_mask,
            attn_mask=attn_mask,
            is_causal=is_causal,
            dropout_p=self.dropout if self.training else 0.0,
            src_len=src_len,
            extra_keys=extra_keys,
        )
        weights = None
        if need_weights:
            out, weights, row_has_key = explicit_attention(
                call.q, call.k, call.v, self._weights_mask(call), dropout_p=call.dropout_p
            )
            weights = _finish_weights(weights, row_has_key, average=average_attn_weights)
            self._record_dispatch("explicit")
        else:
            out, dispatch = _DISPATCH[self.strategy](call)
            self._record_dispatch(dispatch)

        out = out.transpose(1, 2).reshape(batch_size, tgt_len, self.embed_dim)  # (B, L, E)
        out = F.linear(out, self.out_proj.weight, self.out_proj.bias)
        if not is_batched:
            return out.squeeze(0), None if weights is None else weights.squeeze(0)
        if not self.batch_first:
            out = out.transpose(0, 1)  # (L, B, E)
        return out, weights

    def forward_tokens(
        self, x: Tensor, layouts: Sequence[TokenLayout], *, attn_mask: object = None, is_causal: bool = False
    ) -> Tensor:
        """Self-attention of the real tokens of a batch, given flat as (N, E): projections on the N tokens only.

        Each :class:`mhaplug.unpad.TokenLayout` places a slice of ``x`` in the padded layout one kernel call sees,
        with its ``key_padding_mask``; ``attn_mask`` and ``is_causal`` are as :meth:`forward`'s (batch first; an
        ``attn_mask`` needs a single layout, the batch's own). Pads enter the kernel as zero vectors, which the
        masks keep away from every real query. :func:`mhaplug.unpad.plan_tokens` makes ``x``'s order and the
        layouts; a model of variable-length rows then pays for padding in attention only.

        Returns:
            (N, E): each token's output, equal to :meth:`forward`'s at its position.
        """
        if x.dim() != 2 or x.shape[1] != self.embed_dim:
            raise ValueError(f"x must be (N, embed_dim={self.embed_dim}), got shape {tuple(x.shape)}")
        if attn_mask is not None and len(layouts) != 1:
            raise ValueError(f"an attn_mask describes one (B, L) layout; got {len(layouts)} layouts")
        if (
            self.strategy == "torch_mha"
            or not self._qkv_same_embed_dim
            or self.bias_k is not None
            or self.add_zero_attn
        ):
            outs = [self._forward_layout_padded(x[lay.start : lay.stop], lay, attn_mask, is_causal) for lay in layouts]
            return outs[0] if len(outs) == 1 else torch.cat(outs)
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)  # (N, 3E)
        outs = []
        heads, head_dim = self.num_heads, self.head_dim
        for lay in layouts:
            rows, length = lay.batch_size, lay.seq_len
            padded = _scatter_rows(qkv[lay.start : lay.stop], lay.index, rows * length)  # (rows * length, 3E)
            q, k, v = padded.view(rows, length, 3, heads, head_dim).permute(2, 0, 3, 1, 4)  # 3 x (rows, H, length, D)
            call = _Call(
                q=q, k=k, v=v, key_padding_mask=lay.key_padding_mask, attn_mask=attn_mask, is_causal=is_causal,
                dropout_p=self.dropout if self.training else 0.0, src_len=length, extra_keys=0,
            )  # fmt: skip
            out, dispatch = _DISPATCH[self.strategy](call)  # (rows, H, length, D)
            self._record_dispatch(dispatch)
            outs.append(_gather_rows(out.transpose(1, 2).reshape(rows * length, self.embed_dim), lay.index))
        out = outs[0] if len(outs) == 1 else torch.cat(outs)  # (N, E)
        return F.linear(out, self.out_proj.weight, self.out_proj.bias)

    def _forward_layout_padded(self, x: Tensor, lay: TokenLayout, attn_mask: object, is_causal: bool) -> Tensor:
        """forward_tokens through :meth:`forward` on the padded layout (torch_mha, and layers torch packs
        differently: separate q/k/v weights, add_bias_kv, add_zero_attn)."""
        padded = _scatter_rows(x, lay.index, lay.batch_size * lay.seq_len).view(lay.batch_size, lay.seq_len, x.shape[1])
        if not self.batch_first:
            padded = padded.transpose(0, 1)  # (L, B, E)
        out, _ = self(padded, padded, padded, key_padding_mask=lay.key_padding_mask, need_weights=False,
                      attn_mask=attn_mask, is_causal=is_causal)  # fmt: skip
        out = out if self.batch_first else out.transpose(0, 1)  # (B, L, E)
        return _gather_rows(out.reshape(lay.batch_size * lay.seq_len, out.shape[-1]), lay.index)

    def _record_dispatch(self, dispatch: str) -> None:
        # Eager calls only: a compiled or exported graph has no Python side effects to replay (and export warns).
        if not torch.compiler.is_compiling():
            self.last_dispatch = dispatch

    def _project(
        self, query: Tensor, key: Tensor, value: Tensor, self_attention: bool, same_kv: bool
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Input projections, packed where torch packs them (one matmul for self-attention)."""
        embed_dim = self.embed_dim
        bias = self.in_proj_bias
        if self_attention and self._qkv_same_embed_dim:
            return F.linear(query, self.in_proj_weight, bias).chunk(3, dim=-1)  # type: ignore[return-value]
        b_q, b_k, b_v = (None, None, None) if bias is None else bias.chunk(3)
        if not self._qkv_same_embed_dim:
            return (
                F.linear(query, self.q_proj_weight, b_q),
                F.linear(key, self.k_proj_weight, b_k),
                F.linear(value, self.v_proj_weight, b_v),
            )
        weight = self.in_proj_weight  # (3E, E)
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
        strategy = self.strategy
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
        self._record_dispatch("torch_mha")
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


def _scatter_rows(rows: Tensor, index: Tensor | None, total: int) -> Tensor:
    """(N, F) rows -> (total, F), each at its ``index``, zeros elsewhere (``index`` None: the rows as they are)."""
    if index is None:
        return rows
    return rows.new_zeros(total, rows.shape[1]).index_copy(0, index, rows)


def _gather_rows(rows: Tensor, index: Tensor | None) -> Tensor:
    """(total, F) -> (N, F) the rows at ``index`` (None: all)."""
    return rows if index is None else rows.index_select(0, index)


def _finish_weights(weights: Tensor, row_has_key: Tensor | None, *, average: bool) -> Tensor:
    """Weights (B, H, L, S) -> (B, L, S) averaged over heads or (B, H, L, S), 0 in rows that may attend nothing
    (not NaN). Zeroing after the average touches H times less memory, unless emptiness differs per head."""
    per_head_rows = row_has_key is not None and row_has_key.shape[1] > 1
    if row_has_key is not None and (per_head_rows or not average):
        weights = weights.masked_fill(~row_has_key, 0.0)
    if not average:
        return weights  # (B, H, L, S)
    weights = weights.mean(dim=1)  # (B, L, S), a fresh tensor: filled in place (autograd records it)
    if row_has_key is not None and not per_head_rows:
        weights.masked_fill_(~row_has_key[:, 0], 0.0)  # row_has_key[:, 0]: (B|1, L|1, 1)
    return weights


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
            raise NotImplementedError(
                f"{name} is a nested tensor; mhaplug takes padded tensors with key_padding_mask. "
                f"nn.TransformerEncoder makes nested tensors on its inference fast path: set "
                f"encoder.use_nested_tensor = False, or use mhaplug.swap_attention(model), which does"
            )
        if not tensor.is_floating_point():
            raise TypeError(f"{name} must be a floating point tensor, got dtype {tensor.dtype}")
    if query.dim() not in (2, 3):
        raise ValueError(f"query must be 3-D (batched) or 2-D (unbatched), got shape {tuple(query.shape)}")
    is_batched = query.dim() == 3
    for name, tensor in (("key", key), ("value", value)):
        if tensor.dim() != query.dim():
            raise ValueError(
                f"{name} must be {query.dim()}-D like query (shape {tuple(query.shape)}), "
                f"got shape {tuple(tensor.shape)}"
            )
    seq_dim = 1 if (is_batched and mha.batch_first) else 0
    layout = "(B, L, E)" if seq_dim == 1 else "(L, B, E)" if is_batched else "(L, E)"
    for name, tensor, features in (("query", query, mha.embed_dim), ("key", key, mha.kdim), ("value", value, mha.vdim)):
        if tensor.shape[-1] != features:
            raise ValueError(
                f"{name} must have {features} features in its last dim {layout}, got shape {tuple(tensor.shape)}"
            )
    if key.shape[:-1] != value.shape[:-1]:
        raise ValueError(
            f"key and value must agree in batch and length, got shapes {tuple(key.shape)} and {tuple(value.shape)}"
        )
    tgt_len, src_len = query.shape[seq_dim], key.shape[seq_dim]
    batch_size = query.shape[1 - seq_dim] if is_batched else 1
    if is_batched and key.shape[1 - seq_dim] != batch_size:
        raise ValueError(f"key has batch size {key.shape[1 - seq_dim]} but query has {batch_size}")

    masks.check_mask(key_padding_mask, name="key_padding_mask")
    if key_padding_mask is not None:
        expected = (batch_size, src_len) if is_batched else (src_len,)
        if tuple(key_padding_mask.shape) != expected:
            raise ValueError(
                f"key_padding_mask must have shape {expected} "
                f"({'batch, source length' if is_batched else 'source length,'}), True = padding; "
                f"got {tuple(key_padding_mask.shape)}"
            )
    if attn_mask is None:
        return is_batched
    if not isinstance(attn_mask, Tensor):
        from torch.nn.attention.flex_attention import BlockMask

        if isinstance(attn_mask, BlockMask) and mha.strategy == "flex":
            if key_padding_mask is not None:
                raise ValueError(
                    "with a BlockMask attn_mask, fold the padding into the BlockMask and pass key_padding_mask=None"
                )
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


# ----------------------------------------------------------------------------------------------------------
# Into any model
# ----------------------------------------------------------------------------------------------------------


def swap_attention(model: nn.Module, strategy: str = DEFAULT_STRATEGY) -> dict[str, str]:
    """Serve every ``torch.nn.MultiheadAttention`` in ``model`` with mhaplug's, in place; return what changed.

    Each torch layer is replaced by :meth:`MultiheadAttention.from_torch`: the same parameters (the same
    objects: an optimizer built before the swap keeps training them), device, dtype and training mode. mhaplug
    layers already in the model get ``strategy``. ``nn.TransformerEncoder``'s inference fast path, which would
    turn padded input into nested tensors and bypass the attention's ``forward``, is switched off
    (``use_nested_tensor = False``), so that training and evaluation run the same strategy (no NaN rows in eval).

    Returns:
        ``{qualified module name: what was there before}``, e.g.
        ``{"encoder.layers.0.self_attn": "torch.nn.MultiheadAttention", "encoder": "nested-tensor fast path off"}``.
    """
    strategy = check_choice("strategy", strategy, STRATEGIES)
    if isinstance(model, nn.MultiheadAttention):
        raise TypeError(
            "swap_attention replaces the attention layers inside a model; for a bare nn.MultiheadAttention use "
            "mhaplug.MultiheadAttention.from_torch(mha, strategy=...)"
        )
    changed: dict[str, str] = {}
    for parent_name, parent in list(model.named_modules()):
        prefix = f"{parent_name}." if parent_name else ""
        for name, child in list(parent.named_children()):
            if isinstance(child, MultiheadAttention):
                if child.strategy != strategy:
                    changed[prefix + name] = f"mhaplug.MultiheadAttention(strategy={child.strategy!r})"
                    child.strategy = strategy
            elif isinstance(child, nn.MultiheadAttention):
                setattr(parent, name, MultiheadAttention.from_torch(child, strategy=strategy))
                changed[prefix + name] = (
                    f"{type(child).__module__.replace('.modules.activation', '')}.{type(child).__name__}"
                )
        if isinstance(parent, nn.TransformerEncoder) and parent.use_nested_tensor:
            parent.use_nested_tensor = False
            changed[parent_name or "(model)"] = "nested-tensor fast path off"
    logger.info("swap_attention(strategy=%r): %d change(s): %s", strategy, len(changed), changed)
    return changed
