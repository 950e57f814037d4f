"""What :class:`mhaplug.attention.MultiheadAttention` (a ``torch.nn.MultiheadAttention``) accepts: its inputs checked
before any work, with errors that name the argument, the shape or dtype given and the one expected, where torch raises a
bare assertion or misreads the input silently.

Shapes: B batch, L target (query) length, S source (key) length, E embed dim, H heads.
"""

from __future__ import annotations

from torch import Tensor, nn

from mhaplug.attention import masks

__all__ = ["check_inputs"]


def check_inputs(
    mha: nn.MultiheadAttention,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    key_padding_mask: Tensor | None,
    attn_mask: object,
    *,
    strategy: str,
) -> None:
    """Raise ``TypeError`` / ``ValueError`` naming the argument for inputs that ``mha``, a layer of ``strategy``,
    cannot serve as given."""
    _check_query_key_value(mha, query, key, value)
    batched = query.dim() == 3
    seq_dim = 1 if (batched and mha.batch_first) else 0
    tgt_len, src_len = query.shape[seq_dim], key.shape[seq_dim]
    batch_size = query.shape[1 - seq_dim] if batched else 1
    if batched and key.shape[1 - seq_dim] != batch_size:
        raise ValueError(f"key has batch size {key.shape[1 - seq_dim]} but query has {batch_size}")
    _check_key_padding_mask(key_padding_mask, batch_size, src_len, batched=batched)
    for name, mask in (("key_padding_mask", key_padding_mask), ("attn_mask", attn_mask)):
        if isinstance(mask, Tensor) and mask.device != query.device:
            raise ValueError(
                f"{name} is on {mask.device} but query is on {query.device}; move it with "
                f"{name}.to(query.device) (mhaplug merges masks on the tensors' own device)"
            )
    _check_attn_mask(mha, attn_mask, key_padding_mask, batch_size, tgt_len, src_len, batched=batched, strategy=strategy)


def _check_query_key_value(mha: nn.MultiheadAttention, query: Tensor, key: Tensor, value: Tensor) -> None:
    for name, tensor in (("query", query), ("key", key), ("value", value)):
        if not isinstance(tensor, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
        if not tensor.is_floating_point():
            raise TypeError(f"{name} must be a floating point tensor, got dtype {tensor.dtype}")
    for name, tensor in (("key", key), ("value", value)):
        if tensor.dtype != query.dtype or tensor.device != query.device:
            raise TypeError(
                f"{name} is {tensor.dtype} on {tensor.device} but query is {query.dtype} on {query.device}; "
                f"give query, key and value one dtype and device (e.g. {name}.to(query))"
            )
    if query.dim() not in (2, 3):
        raise ValueError(f"query must be 3-D (batched) or 2-D (unbatched), got shape {tuple(query.shape)}")
    for name, tensor in (("key", key), ("value", value)):
        if tensor.dim() != query.dim():
            raise ValueError(
                f"{name} must be {query.dim()}-D like query (shape {tuple(query.shape)}), "
                f"got shape {tuple(tensor.shape)}"
            )
    layout = "(L, E)" if query.dim() == 2 else "(B, L, E)" if mha.batch_first else "(L, B, E)"
    for name, tensor, features in (("query", query, mha.embed_dim), ("key", key, mha.kdim), ("value", value, mha.vdim)):
        if tensor.shape[-1] != features:
            raise ValueError(
                f"{name} must have {features} features in its last dim {layout}, got shape {tuple(tensor.shape)}"
            )
    if key.shape[:-1] != value.shape[:-1]:
        raise ValueError(
            f"key and value must agree in batch and length, got shapes {tuple(key.shape)} and {tuple(value.shape)}"
        )


def _check_key_padding_mask(key_padding_mask: Tensor | None, batch_size: int, src_len: int, *, batched: bool) -> None:
    masks.check_mask(key_padding_mask, name="key_padding_mask")
    if key_padding_mask is None:
        return
    expected = (batch_size, src_len) if batched else (src_len,)
    if tuple(key_padding_mask.shape) != expected:
        raise ValueError(
            f"key_padding_mask must have shape {expected} "
            f"({'batch, source length' if batched else 'source length,'}), True = padding; "
            f"got {tuple(key_padding_mask.shape)}"
        )


def _check_attn_mask(
    mha: nn.MultiheadAttention,
    attn_mask: object,
    key_padding_mask: Tensor | None,
    batch_size: int,
    tgt_len: int,
    src_len: int,
    *,
    batched: bool,
    strategy: str,
) -> None:
    if attn_mask is None:
        return
    if not isinstance(attn_mask, Tensor):
        from torch.nn.attention.flex_attention import BlockMask

        if isinstance(attn_mask, BlockMask) and strategy == "flex":
            if key_padding_mask is not None:
                raise ValueError(
                    "with a BlockMask attn_mask, fold the padding into the BlockMask and pass key_padding_mask=None"
                )
            return
        raise TypeError(
            f"attn_mask must be a torch.Tensor (or a BlockMask with strategy='flex'), got {type(attn_mask).__name__}"
        )
    masks.check_mask(attn_mask, name="attn_mask")
    per_head = (batch_size * mha.num_heads if batched else mha.num_heads, tgt_len, src_len)
    four_d = [(batch_size, 1, tgt_len, src_len), (batch_size, mha.num_heads, tgt_len, src_len)] if batched else []
    if tuple(attn_mask.shape) not in [(tgt_len, src_len), per_head, *four_d]:
        raise ValueError(
            f"attn_mask must have shape {(tgt_len, src_len)} (L, S) or {per_head} "
            f"({'B*H' if batched else 'H'}, L, S)"
            + (f", or (mhaplug only) {four_d[0]} / {four_d[1]} (B, 1|H, L, S)" if batched else "")
            + f"; got {tuple(attn_mask.shape)}"
        )
