"""Every attention-mask convention in one place, and every conversion between them.

Four conventions meet in a variable-length transformer, and they disagree on what ``True`` means::

    object                                  dtype, shape                True / value means
    key_padding_mask (MHA arg, batch key)   bool (B, S)                 True  = padding, ignore this key
    attention_mask   (batch key, HF)        int64 (B, S)                1     = real token
    attn_mask        (MHA arg)              bool (L, S) | (B*H, L, S)   True  = may NOT attend
    attn_mask        (MHA arg, float)       float, same shapes          added to the scores; -inf = may not
    keep mask        (SDPA, FlexAttention)  bool, broadcast (B,H,L,S)   True  = MAY attend

Names here carry the polarity: ``is_pad`` and ``is_masked`` are True where something is hidden, ``keep`` is
True where attention is allowed, ``additive`` is a float mask of 0 / -inf. Nothing outside this module
flips a mask's polarity: the merge (:mod:`mhaplug.attention.merge`) and the strategies convert with the functions
here.

The union of ``key_padding_mask`` and ``attn_mask`` that ``torch.nn.MultiheadAttention`` computes is
:mod:`mhaplug.attention.merge`'s, built from the masks made here.

No function here or on the merge path reads tensor values on the host: no ``.item()``, no data-dependent Python
branch, so the merge never forces a host-device synchronisation and compiles without graph breaks. Input checks
that need values (NaN in a float mask, left padding for ``causal_only``) run where :func:`host_read_is_free`;
:func:`check_causal_hint` checks on the device (``torch._assert_async``) everywhere else.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from mhaplug.common import PaddingSide, check_choice

__all__ = [
    "NEG_INF",
    "additive_from_keep",
    "attention_mask_from_is_pad",
    "causal_keep",
    "causal_mask_mod",
    "check_causal_hint",
    "check_mask",
    "document_causal_keep",
    "document_causal_mask_mod",
    "document_runs",
    "has_pad_before_real_token",
    "host_read_is_free",
    "is_causal_attn_mask",
    "is_masked_from_keep",
    "is_pad_from_attention_mask",
    "is_pad_from_lengths",
    "keep_from_additive",
    "keep_from_is_masked",
    "keep_mask_mod",
    "lengths_from_is_pad",
    "not_pad_mask_mod",
    "padded_causal_mask_mod",
    "same_document_mask_mod",
    "token_index_from_is_pad",
]

NEG_INF = float("-inf")


# ----------------------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------------------


def host_read_is_free(tensor: Tensor) -> bool:
    """Whether reading ``tensor``'s values on the host costs nothing worth avoiding: a CPU tensor in eager mode.

    On an accelerator a read waits for the device (a host-device synchronisation); under ``torch.compile`` or
    ``torch.export`` a Python branch on a value breaks the graph. Under ``torch.autograd.set_detect_anomaly``
    the checks run anyway: that mode is for finding bugs, not for speed.
    """
    if torch.compiler.is_compiling():
        return False
    return tensor.device.type == "cpu" or torch.is_anomaly_enabled()


def check_mask(mask: Tensor | None, *, name: str) -> None:
    """Reject masks torch would reject with a bare assertion, or silently misread.

    A mask must be ``torch.bool`` (True = masked, for the MHA arguments) or floating point (added to the
    scores). Integer and uint8 masks are ambiguous (is 1 "real token", as in Hugging Face, or "masked"?), so
    they are refused with the conversion to use. A float mask holding NaN or +inf would turn whole rows of the
    softmax into NaN; it is refused on CPU and, on accelerators, under anomaly detection (checking there
    would need a host-device synchronisation on every call).
    """
    if mask is None:
        return
    if not isinstance(mask, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(mask).__name__}")
    if mask.dtype == torch.bool:
        return
    if not mask.is_floating_point():
        raise TypeError(
            f"{name} must be a bool tensor (True = masked) or a float tensor of additive scores "
            f"(0 = attend, -inf = masked); got dtype {mask.dtype}. For a 0/1 mask where 1 marks padding "
            f"use {name}.bool(); for a Hugging Face attention_mask (1 = real token) use "
            f"mhaplug.attention.masks.is_pad_from_attention_mask(attention_mask)."
        )
    if host_read_is_free(mask) and (bad := torch.isnan(mask) | torch.isposinf(mask)).any():
        what = "NaN" if torch.isnan(mask).any() else "+inf"
        raise ValueError(
            f"{name} contains {what} at {bad.nonzero()[:4].tolist()} (first positions): a softmax row with it is NaN; "
            f"use -inf for positions that may not be attended and finite values elsewhere"
        )


# ----------------------------------------------------------------------------------------------------------
# Polarity conversions
# ----------------------------------------------------------------------------------------------------------


def keep_from_is_masked(is_masked: Tensor) -> Tensor:
    """MHA bool mask (True = may NOT attend) -> keep mask (True = MAY attend), as SDPA and Flex want."""
    return ~is_masked


def is_masked_from_keep(keep: Tensor) -> Tensor:
    """Keep mask (True = MAY attend) -> MHA bool mask (True = may NOT attend)."""
    return ~keep


def additive_from_keep(keep: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """Keep mask -> additive float mask: 0 where attention is allowed, -inf where it is not.

    ``-inf``, not ``torch.finfo(dtype).min``: two ``finfo.min`` summed overflow to -inf in half precision,
    and a row of ``finfo.min`` softmaxes to uniform weights (the mean of V) instead of nothing.
    """
    if keep.dtype != torch.bool:
        raise TypeError(f"keep must be a bool tensor (True = may attend), got dtype {keep.dtype}")
    return torch.zeros(keep.shape, dtype=dtype, device=keep.device).masked_fill_(~keep, NEG_INF)


def keep_from_additive(additive: Tensor) -> Tensor:
    """Additive float mask -> keep mask: a position may be attended unless its value is -inf."""
    return ~torch.isneginf(additive)


def is_pad_from_attention_mask(attention_mask: Tensor) -> Tensor:
    """Hugging Face ``attention_mask`` (1 = real token, 0 = pad) -> ``key_padding_mask`` (True = pad)."""
    if attention_mask.dtype == torch.bool or attention_mask.is_floating_point():
        raise TypeError(
            f"attention_mask must be an integer 0/1 tensor (1 = real token), got dtype {attention_mask.dtype}; "
            f"a bool key_padding_mask (True = pad) needs no conversion"
        )
    return attention_mask == 0


def attention_mask_from_is_pad(is_pad: Tensor) -> Tensor:
    """``key_padding_mask`` (True = pad) -> Hugging Face ``attention_mask`` int64 (1 = real token)."""
    return (~is_pad).long()


def is_pad_from_lengths(lengths: Tensor, max_length: int, *, padding_side: str = "right") -> Tensor:
    """``key_padding_mask`` (B, max_length), True = pad, from per-row lengths (B,).

    ``padding_side="right"`` puts the real tokens first, ``"left"`` last::

        lengths = [3, 1], max_length = 4
        right: [[F F F T],      left: [[T F F F],
                [F T T T]]             [T T T F]]
    """
    padding_side = check_choice("padding_side", padding_side, PaddingSide)
    if lengths.dim() != 1 or lengths.dtype.is_floating_point or lengths.dtype == torch.bool:
        raise TypeError(f"lengths must be a 1-D integer tensor (B,), got {lengths.dtype} {tuple(lengths.shape)}")
    if (
        host_read_is_free(lengths)
        and lengths.numel()
        and not (0 <= int(lengths.min()) <= int(lengths.max()) <= max_length)
    ):
        raise ValueError(
            f"lengths must be in [0, max_length={max_length}], got {lengths.min().item()}..{lengths.max().item()}; "
            f"a row longer than max_length would be cut without a word"
        )
    positions = torch.arange(max_length, device=lengths.device)  # (L,)
    if padding_side == "right":
        return positions[None, :] >= lengths[:, None]  # (B, L)
    return positions[None, :] < (max_length - lengths)[:, None]  # (B, L)


def has_pad_before_real_token(is_pad: Tensor) -> bool:
    """Whether any row of a bool ``key_padding_mask`` (B, S) has a pad before a real token (left padding or a
    hole), where a causal mask alone would let real queries attend pads.

    Checked only where :func:`host_read_is_free` (reading the answer on the host would force a synchronisation
    on an accelerator, and a graph break under a compiler); returns False otherwise.
    """
    if is_pad.dtype != torch.bool or not host_read_is_free(is_pad):
        return False
    return bool((is_pad[..., :-1] & ~is_pad[..., 1:]).any())


def token_index_from_is_pad(is_pad: Tensor) -> Tensor | None:
    """(B, L) bool True = pad -> (N,) int64 flat positions ``b * L + t`` of the real tokens, row by row; None
    when every position is real. Its size is the number of real tokens, so on an accelerator this reads the
    device (a sync), unless it is built on the CPU and handed over (``DecoderLM``'s ``token_index``)."""
    index = is_pad.logical_not().flatten().nonzero().squeeze(1)  # (N,)
    return None if index.numel() == is_pad.numel() else index


def lengths_from_is_pad(is_pad: Tensor) -> Tensor:
    """Number of real tokens per row (B,) of a ``key_padding_mask`` (B, S)."""
    return (~is_pad).sum(-1)


# ----------------------------------------------------------------------------------------------------------
# Causal and document masks
# ----------------------------------------------------------------------------------------------------------


def causal_keep(tgt_len: int, src_len: int, *, device: torch.device | str | None = None) -> Tensor:
    """Causal keep mask (L, S), True = may attend, built on ``device`` and cached per (L, S, device).

    Top-left aligned, as ``scaled_dot_product_attention(is_causal=True)``: query i sees keys 0..i. With
    L != S this differs from flash-attn's bottom-right alignment::

        L=3, S=4          L=4, S=2
        1 . . .           1 .
        1 1 . .           1 1
        1 1 1 .           1 1
                          1 1

    The tensor is shared by every caller: do not modify it in place. Under ``torch.compile`` it is built in
    the graph instead (a compiler folds it; a Python cache there would be traced through, with a warning).
    """
    device = torch.device(device) if device is not None else torch.device("cpu")
    if torch.compiler.is_compiling():
        return _build_causal_keep(tgt_len, src_len, device)
    return _cached_causal_keep(tgt_len, src_len, device)


def _build_causal_keep(tgt_len: int, src_len: int, device: torch.device) -> Tensor:
    return torch.ones(tgt_len, src_len, dtype=torch.bool, device=device).tril_()


_cached_causal_keep = functools.lru_cache(maxsize=64)(_build_causal_keep)
causal_keep.cache_clear = _cached_causal_keep.cache_clear  # type: ignore[attr-defined]  # as before, for tests


def document_runs(document_ids: Tensor) -> Tensor:
    """The one meaning of ``document_ids`` (B, L): a document is a contiguous run of one id within a row, and a
    negative id is padding. Returns each token's run, numbered 0, 1, ... per row (-1 on padding).

    Ids need not start at 0, be consecutive or increase; an id that comes back after another starts a new
    document, and so does a real token after padding, as the document-per-row path (:mod:`mhaplug.attention.unpad`)
    and transformers' ``position_ids`` restarts read them::

        document_ids = [5 5 9 9 5 -1]   ->   [0 0 1 1 2 -1]

    Every strategy, the audit and the collators read documents through this function (or agree with it).
    """
    real = document_ids >= 0
    starts = real.clone()
    starts[:, 1:] &= (document_ids[:, 1:] != document_ids[:, :-1]) | ~real[:, :-1]
    return (starts.cumsum(-1) - 1).masked_fill_(~real, -1)


def document_causal_keep(document_ids: Tensor) -> Tensor:
    """Keep mask (B, 1, L, L) for packed rows: causal, within one document, never onto padding.

    ``document_ids`` (B, L) marks the documents of each row, -1 on padding; a document is a contiguous run of one
    id (:func:`document_runs`), so an id that comes back is another document::

        document_ids = [0 0 1 1 0 -1]
        1 . . . . .
        1 1 . . . .
        . . 1 . . .
        . . 1 1 . .
        . . . . 1 .   <- the second run of id 0: a document of its own
        . . . . . .   <- the pad query sees nothing (its output is zeroed)
    """
    length = document_ids.shape[-1]
    document_ids = document_runs(document_ids)
    same_doc = document_ids[:, :, None] == document_ids[:, None, :]  # (B, L, L)
    real_key = (document_ids >= 0)[:, None, :]  # (B, 1, L)
    causal = causal_keep(length, length, device=document_ids.device)
    return (same_doc & real_key & causal)[:, None]  # (B, 1, L, L)


def is_causal_attn_mask(attn_mask: Tensor) -> Tensor:
    """Whether an MHA ``attn_mask`` (L, S) is exactly the causal mask, as a 0-d bool tensor (no host read).

    Causal means masked strictly above the diagonal (bool True, or float ``-inf``; ``finfo.min`` counts as masked,
    as some libraries write it) and open on and below it (bool False, or float 0.0), top-left aligned as
    :func:`causal_keep`. ``nn.Transformer.generate_square_subsequent_mask`` is causal::

        causal (float)       not causal (a window)     not causal (a bias)
        0 -inf -inf          0 -inf -inf              0   -inf -inf
        0  0   -inf          0  0   -inf              0.5  0   -inf
        0  0    0           -inf 0   0                0    0    0
    """
    tgt_len, src_len = attn_mask.shape
    keep = causal_keep(tgt_len, src_len, device=attn_mask.device)  # (L, S)
    if attn_mask.dtype == torch.bool:
        return (attn_mask != keep).all()  # masked exactly where causal does not keep
    masked = attn_mask <= torch.finfo(attn_mask.dtype).min  # -inf or finfo.min
    return torch.where(keep, attn_mask == 0, masked).all()


def check_causal_hint(attn_mask: Tensor, *, strategy: str) -> None:
    """Raise unless ``attn_mask`` (L, S) is the causal mask, for a call with ``is_causal=True``.

    torch documents ``is_causal`` as a hint that ``attn_mask`` *is* the causal mask, and
    ``nn.TransformerDecoderLayer`` passes both (``tgt_is_causal=True``). The causal strategies take the hint and
    hand the kernel ``is_causal=True`` instead of the (L, S) mask, so the mask must really be causal: on the CPU
    this raises a ``ValueError``; on an accelerator, or under a compiler, the check runs on the device
    (``torch._assert_async``: no host-device synchronisation, the error surfaces asynchronously).

    Every call checks: a remembered verdict (it was kept per tensor and in-place version) went stale when the mask
    changed through ``.data`` or through numpy memory it shares, which no version counter sees. The check reads
    the (L, S) mask once: 39 us for a bool and 188 us for a float 256 x 256 mask on this project's 2-core CPU.
    """
    if not host_read_is_free(attn_mask):
        torch._assert_async(is_causal_attn_mask(attn_mask), _not_causal_message(strategy))
        return
    if not bool(is_causal_attn_mask(attn_mask)):
        raise ValueError(_not_causal_message(strategy))


def _not_causal_message(strategy: str) -> str:
    return (
        f"is_causal=True says attn_mask is the causal mask (torch's hint), and strategy={strategy!r} applies the "
        f"causal kernel in its place, but this attn_mask is not causal (masked exactly above the diagonal: True or "
        f"-inf there, False or 0.0 elsewhere). Pass is_causal=False to apply the mask as given, or use "
        f"strategy='merged_bool' for the mask AND causal"
    )


# ----------------------------------------------------------------------------------------------------------
# FlexAttention mask_mods: (b, h, q_idx, kv_idx) -> bool, True = may attend
# ----------------------------------------------------------------------------------------------------------

MaskMod = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]


def causal_mask_mod(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
    """Causal (top-left aligned, as SDPA's): a query sees the keys at and before its own position."""
    return kv_idx <= q_idx


def not_pad_mask_mod(is_pad: Tensor) -> MaskMod:
    """Never onto a padding key: ``is_pad`` (B, S), True = pad (``key_padding_mask``). Reads two entries per
    (query, key) pair, so it costs the B * S of ``is_pad`` and no (L, S) tensor."""

    def mask_mod(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return ~is_pad[b, kv_idx]

    return mask_mod


def same_document_mask_mod(document_ids: Tensor) -> MaskMod:
    """Within one document of a packed row, never onto padding: ``document_ids`` (B, L), -1 on padding (as
    :class:`mhaplug.PackCollator` emits them), a document a contiguous run of one id (:func:`document_runs`, taken
    once here). Costs the B * L of ``document_ids`` and no (L, L) tensor."""
    document_ids = document_runs(document_ids)

    def mask_mod(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        key_document = document_ids[b, kv_idx]
        return (document_ids[b, q_idx] == key_document) & (key_document >= 0)

    return mask_mod


def document_causal_mask_mod(document_ids: Tensor) -> MaskMod:
    """:func:`document_causal_keep` as a predicate: causal and within one document (``and_masks`` of the two),
    evaluated per block by FlexAttention instead of read from a (B, 1, L, L) tensor."""
    from torch.nn.attention.flex_attention import and_masks

    return and_masks(causal_mask_mod, same_document_mask_mod(document_ids))


def padded_causal_mask_mod(is_pad: Tensor) -> MaskMod:
    """Causal and never onto padding, for padded rows: ``and_masks`` of :func:`causal_mask_mod` and
    :func:`not_pad_mask_mod`."""
    from torch.nn.attention.flex_attention import and_masks

    return and_masks(causal_mask_mod, not_pad_mask_mod(is_pad))


def keep_mask_mod(keep: Tensor | None, *, is_causal: bool) -> MaskMod:
    """A ``mask_mod`` that looks a dense keep mask up (True = may attend), broadcastable to (B, H, L, S), for masks
    that are not a predicate (a caller's ``attn_mask``); causal too with ``is_causal``.

    Size-1 dimensions of ``keep`` are indexed at 0, so a (B, 1, 1, S) padding mask costs B*S bytes.
    """

    def mask_mod(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        allowed = kv_idx <= q_idx if is_causal else torch.ones_like(q_idx, dtype=torch.bool)
        if keep is None:
            return allowed
        index = _broadcast_index(keep.shape, (b, h, q_idx, kv_idx))
        return allowed & keep[index]

    return mask_mod


def _broadcast_index(shape: Sequence[int], index: tuple[Tensor, Tensor, Tensor, Tensor]) -> tuple[Tensor | int, ...]:
    return tuple(0 if size == 1 else idx for size, idx in zip(shape, index))
