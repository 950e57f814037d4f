"""Nested tensors into and out of :class:`mhaplug.attention.MultiheadAttention`: the padded layout plus
``key_padding_mask`` on the way in, the nested layout on the way out.

``nn.TransformerEncoder`` (``enable_nested_tensor=True``, its default) turns a padded batch with a
``src_key_padding_mask`` into a strided nested tensor in eval mode and hands it to each layer; users build jagged
ones with ``torch.nested.nested_tensor(..., layout=torch.jagged)``. Both hold B sequences of their own lengths
(B, j, E), batch first by construction. :func:`unnest` pads them once, right-aligned::

    nested lengths [3, 1]  ->  padded (B=2, L=3, E)    key_padding_mask (True = pad)
                               [[x00 x01 x02],          [[F F F],
                                [x10  0   0 ]]           [F T T]]

and :func:`renest` takes the output back to the query's layout and lengths. Both are differentiable.

Cost: one copy in (to (B, L, E), zeros at pads) per distinct input and one copy out. The lengths come from the
nested tensor's own metadata: a strided tensor keeps its sizes on the CPU (free to read); a jagged tensor keeps
its offsets on the device, and its maximum length cached where torch's constructors stored it
(``torch.nested.nested_tensor`` and ``as_nested_tensor`` do); otherwise reading it costs one host-device
synchronisation on an accelerator (none on the CPU). No other value is read on the host, but for a key and a
value that are different nested tensors (not one object, as in self-attention): their lengths are compared.

Shapes: B batch, L target (query) length, S source (key) length, E features, j a ragged (per-sequence) length.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from mhaplug.attention import masks

__all__ = ["Unnested", "any_nested", "renest", "unnest", "zero_pad_queries"]


@dataclass(frozen=True)
class Unnested:
    """A nested call in the padded layout: query (B, L, E), key (B, S, kdim), value (B, S, vdim), zeros at pads,
    and which positions are padding, bool True = pad: ``query_is_pad`` (B, L), ``key_is_pad`` (B, S), the
    ``key_padding_mask`` of the call. ``query is key`` and ``key is value`` hold here when they held for the
    nested inputs (so self-attention keeps its one packed projection)."""

    query: Tensor
    key: Tensor
    value: Tensor
    query_is_pad: Tensor
    key_is_pad: Tensor


def any_nested(*tensors: object) -> bool:
    """Whether any argument is a nested tensor (non-tensors are not)."""
    return any(isinstance(t, Tensor) and t.is_nested for t in tensors)


def unnest(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    *,
    key_padding_mask: Tensor | None,
    attn_mask: object,
    features: tuple[int, int, int],
) -> Unnested:
    """Nested (B, j, E) query, key and value, checked, each distinct one padded once (see the module docstring).

    Args:
        features: the last dims expected of query, key and value (``embed_dim``, ``kdim``, ``vdim``).

    Raises:
        TypeError: if some of query/key/value are nested and some not, or their layouts differ.
        ValueError: for a ``key_padding_mask`` or ``attn_mask`` (a nested tensor already says where its
            sequences end, and its sequences differ in length, so an (L, S) mask has no one meaning), a nested
            tensor that is not (B, j, E), or key and value of different lengths.
    """
    named = {"query": query, "key": key, "value": value}
    plain = [name for name, t in named.items() if not (isinstance(t, Tensor) and t.is_nested)]
    if plain:
        raise TypeError(
            f"query, key and value must be all nested or all padded; {', '.join(plain)} "
            f"{'is' if len(plain) == 1 else 'are'} not nested. Give the same kind for all three (nested as "
            f"nn.TransformerEncoder makes them, or padded with key_padding_mask)"
        )
    layouts = {name: t.layout for name, t in named.items()}
    if len(set(layouts.values())) > 1:
        raise TypeError(
            f"query, key and value must share one nested layout, got {layouts}; convert with "
            f"torch.nested.nested_tensor(list(x.unbind()), layout=...)"
        )
    if key_padding_mask is not None:
        raise ValueError(
            f"key_padding_mask must be None with nested query/key/value, got {_shape(key_padding_mask)}: a "
            f"nested tensor holds its real positions only, so it is its own padding mask (torch's layer refuses the "
            f"pair too). Drop key_padding_mask, or pass padded tensors (x.to_padded_tensor(0.0)) with it"
        )
    if attn_mask is not None:
        raise ValueError(
            f"attn_mask must be None with nested query/key/value, got {_shape(attn_mask)}: the sequences differ in "
            f"length, so one (L, S) mask has no one meaning (torch's layer refuses it too). For a causal mask per "
            f"sequence pass is_causal=True; otherwise pass padded tensors (x.to_padded_tensor(0.0)) with "
            f"key_padding_mask and attn_mask"
        )
    for (name, tensor), width in zip(named.items(), features, strict=True):
        _check_nested(name, tensor, width)
    batch = {name: t.size(0) for name, t in named.items()}
    if len(set(batch.values())) > 1:
        raise ValueError(f"query, key and value must hold the same number of sequences, got {batch}")

    q_padded, q_is_pad = _pad(query)
    if key is query:
        k_padded, k_is_pad = q_padded, q_is_pad
    else:
        k_padded, k_is_pad = _pad(key)
    if value is key:
        v_padded = k_padded
    elif value is query:
        v_padded = q_padded
    else:
        _check_same_lengths(key, value)
        v_padded, _ = _pad(value)
    return Unnested(query=q_padded, key=k_padded, value=v_padded, query_is_pad=q_is_pad, key_is_pad=k_is_pad)


def renest(padded: Tensor, like: Tensor) -> Tensor:
    """(B, L, F) padded output -> a nested tensor with ``like``'s layout and lengths (B, j, F); pads dropped.

    A strided result has ``like``'s sizes, a jagged one ``like``'s offsets (so ``like + result`` works, as
    ``nn.TransformerEncoderLayer``'s residual needs)."""
    if like.layout == torch.jagged:
        from torch.nested._internal.nested_tensor import nested_from_padded

        # torch's own route from padded to jagged (its binary ops use it): the same offsets, hence the same
        # ragged dimension, and a copy of the real positions only
        return nested_from_padded(
            padded,
            offsets=like.offsets(),
            min_seqlen=like._maybe_min_seqlen,
            max_seqlen=like._maybe_max_seqlen,
            sum_S=like.values().shape[0],
        )
    sizes = like._nested_tensor_size().clone()  # (B, 2) on the CPU: each sequence's (length, features)
    sizes[:, 1] = padded.shape[-1]
    return torch._nested_from_padded(padded, sizes)  # the inverse of to_padded_tensor (its backward)


def zero_pad_queries(weights: Tensor, query_is_pad: Tensor) -> Tensor:
    """Attention weights (B, L, S) or (B, H, L, S) with the rows of padding queries set to 0, as torch's
    ``nn.MultiheadAttention`` returns them for nested input (its columns of padding keys are 0 already)."""
    rows = query_is_pad[:, :, None] if weights.dim() == 3 else query_is_pad[:, None, :, None]  # (B, [1,] L, 1)
    return weights.masked_fill(rows, 0.0)


def _shape(mask: object) -> str:
    return f"shape {tuple(mask.shape)}" if isinstance(mask, Tensor) else type(mask).__name__


def _check_nested(name: str, tensor: Tensor, width: int) -> None:
    """A nested tensor of B sequences (j, width), contiguous, ragged in dim 1."""
    if tensor.dim() != 3:
        raise ValueError(
            f"{name} must be a nested tensor of B sequences (length, {width}), i.e. 3-D (B, j, {width}); "
            f"got {tensor.dim()}-D"
        )
    if tensor.layout == torch.jagged:
        if tensor._ragged_idx != 1 or tensor.shape[-1] != width:
            raise ValueError(
                f"{name} must be (B, j, {width}) with the ragged dim second, got shape {tuple(tensor.shape)}"
            )
        if tensor.lengths() is not None:
            raise ValueError(
                f"{name} is a jagged nested tensor with holes (from torch.nested.narrow); pass "
                f"{name}.contiguous(), which keeps each sequence's real positions only"
            )
        return
    features = tensor._nested_tensor_size()[:, 1]  # (B,) on the CPU
    if features.numel() and not bool((features == width).all()):
        raise ValueError(
            f"{name} must have {width} features in every sequence (B, j, {width}), got {sorted(set(features.tolist()))}"
        )


def _pad(nested: Tensor) -> tuple[Tensor, Tensor]:
    """Nested (B, j, F) -> padded (B, L, F), zeros at pads, L the longest sequence; and is_pad (B, L), True = pad."""
    if nested.layout == torch.jagged:
        lengths = nested.offsets().diff()  # (B,), on nested's device
        # cached by torch's constructors; else computed from the offsets (one device sync on an accelerator)
        max_len = nested._get_max_seqlen() if nested.size(0) else 0
        padded = torch.nested.to_padded_tensor(nested, 0.0, output_size=(nested.size(0), max_len, nested.shape[-1]))
    else:
        lengths = nested._nested_tensor_size()[:, 0].to(nested.device)  # (B,), read from the CPU copy: no sync
        padded = nested.to_padded_tensor(0.0)  # (B, L, F)
        max_len = padded.shape[1]
    return padded, masks.is_pad_from_lengths(lengths, max_len)  # (B, L, F), (B, L)


def _check_same_lengths(key: Tensor, value: Tensor) -> None:
    if key.layout == torch.jagged:
        same = key.offsets() is value.offsets() or (
            key.offsets().shape == value.offsets().shape and bool(torch.equal(key.offsets(), value.offsets()))
        )
        lengths = (key.offsets().diff(), value.offsets().diff())
    else:
        lengths = (key._nested_tensor_size()[:, 0], value._nested_tensor_size()[:, 0])
        same = bool(torch.equal(*lengths))
    if not same:
        raise ValueError(
            f"key and value must hold sequences of the same lengths, got {lengths[0].tolist()} and "
            f"{lengths[1].tolist()}"
        )
