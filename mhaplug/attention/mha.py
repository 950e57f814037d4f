"""A drop-in ``torch.nn.MultiheadAttention`` whose mask merge is explicit, correct and switchable.

``torch.nn.MultiheadAttention`` expands ``key_padding_mask`` (B, S) to (B*H, 1, S), adds it to ``attn_mask``
and runs one softmax; the (B*H, L, S) float mask it builds keeps the fast kernels out, and query rows with
nothing to attend to come out NaN. :class:`MultiheadAttention` takes the same arguments and weights, projects the
inputs as torch does, and hands the heads with the masks to one of the strategies of
:mod:`mhaplug.attention.strategies`, which merges them on the tensors' own device. ``torch_mha`` is torch's own
path, kept here. :func:`mhaplug.attention.swap_attention` puts the layer into any model, ``nn.Transformer*``
included.

``is_causal=True`` means "apply a causal mask" (top-left aligned when L != S, as SDPA's), built on the device;
with a 2-D ``attn_mask`` it is torch's hint that the mask is causal, which the causal strategies verify and then
replace by the causal kernel (:func:`mhaplug.attention.masks.check_causal_hint`), and the merged strategies
intersect with the mask.

Shapes: B batch, L target (query) length, S source (key) length, E embed dim, H heads, D = E / H.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mhaplug.attention import merge, nested, strategies
from mhaplug.attention.inputs import check_inputs
from mhaplug.attention.strategies import DEFAULT_STRATEGY, STRATEGIES, AttentionCall
from mhaplug.attention.unpad import TokenLayout
from mhaplug.common import check_choice, check_int

__all__ = ["MultiheadAttention"]


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
            :data:`~mhaplug.attention.strategies.STRATEGIES` (see
            :data:`~mhaplug.attention.strategies.CAPABILITIES`). ``"auto"``, the default, serves every call: the causal
            kernel path for causal calls, ``merged_bool`` for the others.

    ``need_weights=True`` (torch's default) is served by the explicit softmax, as in torch, at no more cost;
    pass ``need_weights=False`` to reach the strategy's kernel. After each call, :attr:`last_dispatch` names
    what served it: a strategy name (``"causal_kpm"`` or ``"merged_bool"`` under ``auto``, or when
    ``causal_kpm`` falls back), or ``"explicit"`` for ``need_weights=True`` (eager calls; compiled graphs do not
    update it).

    Inside ``nn.TransformerEncoderLayer`` the layer's inference fast path would skip this ``forward``; a no-op
    forward pre-hook keeps it out (see :func:`mhaplug.attention.swap_attention`). Nested query/key/value, which
    ``nn.TransformerEncoder`` makes in eval mode from a ``src_key_padding_mask``, are served too (padded once, by
    the strategy, returned nested: :mod:`mhaplug.attention.nested`). ``torch.compile`` and ``torch.export`` work;
    ``torch.jit.script`` does not.
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
        strategies.mark_compile_constants()

    def __setstate__(self, state: dict[str, object]) -> None:  # torch.load of a whole module skips __init__
        super().__setstate__(state)
        strategies.mark_compile_constants()

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
                output (and weights) are empty, shaped as torch's. Or a nested tensor (B, j, E), strided or
                jagged, with nested key and value: batch first whatever ``batch_first`` says (nested tensors have
                no other layout), no ``key_padding_mask`` or ``attn_mask`` (the nested tensors are the padding
                mask); ``is_causal`` applies per sequence. See :meth:`_forward_nested`.
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
            ``(output, weights)``: output shaped like ``query`` with E features (nested like a nested ``query``);
            weights (B, L, S') averaged or (B, H, L, S'), S' = S plus add_bias_kv / add_zero_attn columns, or None.
        """
        if nested.any_nested(query, key, value):
            return self._forward_nested(
                query, key, value, key_padding_mask, need_weights, attn_mask, average_attn_weights, is_causal
            )
        check_inputs(self, query, key, value, key_padding_mask, attn_mask, strategy=self.strategy)
        if self.strategy == "torch_mha":
            return self._forward_torch(
                query, key, value, key_padding_mask, need_weights, attn_mask, average_attn_weights, is_causal
            )
        is_batched = query.dim() == 3
        call = self._heads_call(query, key, value, key_padding_mask, attn_mask, is_causal, is_batched=is_batched)
        weights = None
        if need_weights:
            mask = strategies.weights_mask(self.strategy, call)
            out, weights, row_has_key = strategies.explicit_attention(
                call.q, call.k, call.v, mask, dropout_p=call.dropout_p
            )
            weights = _finish_weights(weights, row_has_key, average=average_attn_weights)
            self._record_dispatch("explicit")
        else:
            out, dispatch = strategies.dispatch(self.strategy, call)
            self._record_dispatch(dispatch)

        batch_size, _, tgt_len, _ = out.shape
        out = out.transpose(1, 2).reshape(batch_size, tgt_len, self.embed_dim)  # (B, L, E)
        out = F.linear(out, self.out_proj.weight, self.out_proj.bias)
        if not is_batched:
            return out.squeeze(0), None if weights is None else weights.squeeze(0)
        if not self.batch_first:
            out = out.transpose(0, 1)  # (L, B, E)
        return out, weights

    def _forward_nested(
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
        """:meth:`forward` of nested (B, j, E) query/key/value, as ``nn.TransformerEncoder`` makes them.

        Each distinct input is padded once to (B, L | S, E) with its ``key_padding_mask`` (True = pad)
        (:func:`mhaplug.attention.nested.unnest`; the cost is in that module's docstring), served exactly as
        that padded call by the layer's strategy, and the output returned nested, in the query's layout and
        lengths. Weights, as torch's ``nn.MultiheadAttention`` returns them for nested input: a padded tensor
        (B, L, S) or (B, H, L, S), L and S the longest query and key, 0 in the rows of padding queries and
        the columns of padding keys. torch's layer takes nested input on its inference fast path only (eval,
        no grad, ``batch_first=True``, self-attention, strided layout); this one takes it in training too,
        with gradients, jagged or strided, and for cross-attention.
        """
        call = nested.unnest(
            query,
            key,
            value,
            key_padding_mask=key_padding_mask,
            attn_mask=attn_mask,
            features=(self.embed_dim, self.kdim, self.vdim),
        )
        q, k, v = call.query, call.key, call.value  # (B, L, E), (B, S, kdim), (B, S, vdim)
        if not self.batch_first:  # views in the layer's own layout; `is` between them kept
            k_t = k.transpose(0, 1)
            v_t = k_t if v is k else v.transpose(0, 1)
            q_t = k_t if q is k else q.transpose(0, 1)
            q, k, v = q_t, k_t, v_t  # (L, B, E), (S, B, kdim), (S, B, vdim)
        out, weights = self.forward(
            q, k, v, key_padding_mask=call.key_is_pad, need_weights=need_weights,
            average_attn_weights=average_attn_weights, is_causal=is_causal,
        )  # fmt: skip
        if not self.batch_first:
            out = out.transpose(0, 1)  # (B, L, E)
        if weights is not None:
            weights = nested.zero_pad_queries(weights, call.query_is_pad)
        return nested.renest(out, like=query), weights

    def _heads_call(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None,
        attn_mask: object,
        is_causal: bool,
        *,
        is_batched: bool,
    ) -> AttentionCall:
        """The inputs of one :meth:`forward` as a strategy sees them: batch first, projected, with the
        ``add_bias_kv`` / ``add_zero_attn`` keys appended, and split into heads (B, H, L | S', D)."""
        same_qk, same_kv = query is key, key is value
        if not is_batched:
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)  # (1, L|S, E)
            key_padding_mask = None if key_padding_mask is None else key_padding_mask.unsqueeze(0)  # (1, S)
        elif not self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)  # (B, L|S, E)
        q, k, v = self._project(query, key, value, same_qk and same_kv, same_kv)  # (B, L, E), (B, S, E), (B, S, E)
        src_len = k.shape[1]
        k, v = self._extra_keys(k, v)  # (B, S', E), S' = S + extra keys
        return AttentionCall(
            q=self._split_heads(q),  # (B, H, L, D)
            k=self._split_heads(k),  # (B, H, S', D)
            v=self._split_heads(v),  # (B, H, S', D)
            key_padding_mask=key_padding_mask,
            attn_mask=attn_mask,
            is_causal=is_causal,
            dropout_p=self.dropout if self.training else 0.0,
            src_len=src_len,
            extra_keys=k.shape[1] - src_len,
        )

    def _extra_keys(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """(B, S, E) keys and values with torch's extra columns appended, every query may attend them: the learned
        ``bias_k`` / ``bias_v`` (``add_bias_kv``), then zeros (``add_zero_attn``)."""
        batch_size = k.shape[0]
        if self.bias_k is not None and self.bias_v is not None:
            k = torch.cat([k, self.bias_k.expand(batch_size, 1, -1)], dim=1)  # (B, S + 1, E)
            v = torch.cat([v, self.bias_v.expand(batch_size, 1, -1)], dim=1)
        if self.add_zero_attn:
            k = torch.cat([k, k.new_zeros(batch_size, 1, k.shape[-1])], dim=1)  # (B, S' + 1, E)
            v = torch.cat([v, v.new_zeros(batch_size, 1, v.shape[-1])], dim=1)
        return k, v

    def _split_heads(self, x: Tensor) -> Tensor:
        """(B, L, E) -> (B, H, L, D), a view."""
        batch_size, length, _ = x.shape
        return x.view(batch_size, length, self.num_heads, self.head_dim).transpose(1, 2)  # no -1: B may be 0

    def forward_tokens(
        self, x: Tensor, layouts: Sequence[TokenLayout], *, attn_mask: object = None, is_causal: bool = False
    ) -> Tensor:
        """Self-attention of the real tokens of a batch, given flat as (N, E): projections on the N tokens only.

        Each :class:`mhaplug.attention.unpad.TokenLayout` places a slice of ``x`` in the padded layout one kernel call
        sees, with its ``key_padding_mask``; ``attn_mask`` and ``is_causal`` are as :meth:`forward`'s (batch first; an
        ``attn_mask`` needs a single layout, the batch's own). Pads enter the kernel as zero vectors, which the masks
        keep away from every real query. :func:`mhaplug.attention.unpad.plan_tokens` makes ``x``'s order and the
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
            call = AttentionCall(
                q=q, k=k, v=v, key_padding_mask=lay.key_padding_mask, attn_mask=attn_mask, is_causal=is_causal,
                dropout_p=self.dropout if self.training else 0.0, src_len=length, extra_keys=0,
            )  # fmt: skip
            out, dispatch = strategies.dispatch(self.strategy, call)  # (rows, H, length, D)
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
            attn_mask = merge.add_causal_to_attn_mask(
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
