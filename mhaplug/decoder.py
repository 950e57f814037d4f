"""A small GPT-style decoder whose attention is ``mhaplug.MultiheadAttention`` with a chosen mask strategy.

Only the real tokens are computed: embeddings, norms, projections, MLP, output layer and loss run on the N real
tokens of a batch, taken out of the (B, L) layout once (``token_index``); only the attention kernel sees the
padded (or packed) layout, with its masks. Padding then costs attention and nothing else, and the loss never
builds the (N, V) logits (:func:`mhaplug.loss.linear_cross_entropy`).

One call per batch plans every layer's attention (:func:`mhaplug.attention.plan_attention`, on the batch's
device): the tokens computed and the layouts the kernel sees them in (length buckets on the CPU), the padding mask,
the document-causal mask of packed rows or the FlexAttention ``BlockMask``. Each block consumes that plan. Pass
``token_index`` (all B * L positions) to compute every position in the batch's own layout, as :func:`mhaplug.audit`
does.

Shapes: B batch, L length, N real tokens, E = d_model, V vocabulary.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from mhaplug.attention import masks
from mhaplug.attention.mha import MultiheadAttention
from mhaplug.attention.plan import AttentionPlan, plan_attention
from mhaplug.attention.strategies import DEFAULT_STRATEGY, STRATEGIES
from mhaplug.common import IGNORE_INDEX, check_choice, check_int
from mhaplug.loss import linear_cross_entropy, next_token_targets

__all__ = ["Block", "DecoderConfig", "DecoderLM"]


@dataclass
class DecoderConfig:
    """Architecture. ``max_positions`` bounds ``position_ids`` (the data's max_length)."""

    vocab_size: int
    max_positions: int = 256
    d_model: int = 128
    num_heads: int = 4
    num_layers: int = 2
    d_ff: int = 512
    dropout: float = 0.0  # residual and MLP dropout
    attn_dropout: float = 0.0  # attention-weight dropout (not with flex)
    strategy: str = DEFAULT_STRATEGY
    tie_weights: bool = True
    compile: bool = False  # torch.compile the per-token modules (norms, MLP): fused elementwise kernels

    def __post_init__(self) -> None:
        for name in ("vocab_size", "max_positions", "d_model", "num_heads", "num_layers", "d_ff"):
            setattr(self, name, check_int(name, getattr(self, name)))
        if self.d_model % self.num_heads:
            raise ValueError(f"num_heads={self.num_heads} must divide d_model={self.d_model}")
        self.strategy = check_choice("strategy", self.strategy, STRATEGIES)  # a plain str (also from a config's Enum)


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, config: DecoderConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.d_model)
        self.attn = MultiheadAttention(
            config.d_model, config.num_heads, dropout=config.attn_dropout, batch_first=True, strategy=config.strategy
        )
        self.ln_2 = nn.LayerNorm(config.d_model)
        self.mlp = nn.Sequential(
            nn.Linear(config.d_model, config.d_ff),
            nn.GELU(),
            nn.Linear(config.d_ff, config.d_model),
            nn.Dropout(config.dropout),
        )
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor, plan: AttentionPlan) -> Tensor:
        """(N, E) the tokens ``plan`` computes -> (N, E); attention sees them as ``plan`` lays them out."""
        attended = self.attn.forward_tokens(
            self.ln_1(x), plan.layouts, attn_mask=plan.attn_mask, is_causal=plan.is_causal
        )
        return self._feed_forward(x + self.dropout(attended))

    def _feed_forward(self, x: Tensor) -> Tensor:
        return x + self.mlp(self.ln_2(x))

    def compile_feed_forward(self) -> None:
        """``torch.compile`` the norm + MLP + residual (per-token work: one graph whatever the batch, with N
        dynamic). Attention's per-batch layouts and the chunked loss stay eager: they would recompile per shape."""
        self._feed_forward = torch.compile(self._feed_forward, dynamic=True)  # an attribute: state_dict unchanged


class DecoderLM(nn.Module):
    """Token + position embeddings, ``num_layers`` blocks, final norm, and a (tied) language-model head."""

    def __init__(self, config: DecoderConfig) -> None:
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.d_model)
        self.pos_emb = nn.Embedding(config.max_positions, config.d_model)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.num_layers))
        self.ln_f = nn.LayerNorm(config.d_model)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_weights:
            self.lm_head.weight = self.tok_emb.weight  # GPT-2's tying: fewer parameters, better small models
        self.apply(self._init_weights)
        if config.compile:
            for block in self.blocks:
                block.compile_feed_forward()

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(
        self,
        input_ids: Tensor,
        *,
        key_padding_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        document_ids: Tensor | None = None,
        token_index: Tensor | None = None,
    ) -> Tensor:
        """Logits (B, L, V) for ``input_ids`` (B, L); masks and positions as the collators emit them.

        Padding positions get logits 0: they are not computed (see the module docstring). To train, use
        :meth:`loss_sum`, which never builds the logits. ``position_ids`` must stay below ``max_positions``
        (the collators keep them below ``max_length``).
        """
        hidden, token_index = self.hidden_states(
            input_ids, key_padding_mask=key_padding_mask, position_ids=position_ids, document_ids=document_ids,
            token_index=token_index,
        )  # fmt: skip
        logits = self.lm_head(hidden)  # (N, V)
        batch, length = input_ids.shape
        if token_index is not None:
            logits = logits.new_zeros(batch * length, logits.shape[1]).index_copy(0, token_index, logits)
        return logits.view(batch, length, -1)  # (B, L, V)

    def loss_sum(self, batch: Mapping[str, Tensor], *, ignore_index: int = IGNORE_INDEX) -> Tensor:
        """Sum of the next-token cross-entropies of a collated batch (``input_ids``, ``labels`` and the masks, as
        :class:`mhaplug.PadCollator` / :class:`mhaplug.PackCollator` emit them; ``token_index`` if present):
        the token at t is trained to predict ``labels[t + 1]``; ``ignore_index`` labels take no loss.

        Equal to :func:`mhaplug.loss.lm_loss_sum` of :meth:`forward`'s logits, but computed on the real tokens with the
        fused output layer + cross-entropy: no (B, L, V) logits, no copy of them."""
        hidden, token_index = self.hidden_states(
            batch["input_ids"], key_padding_mask=batch.get("key_padding_mask"),
            position_ids=batch.get("position_ids"), document_ids=batch.get("document_ids"),
            token_index=batch.get("token_index"),
        )  # fmt: skip
        targets = next_token_targets(batch["labels"], ignore_index=ignore_index).flatten()  # (B * L,)
        if token_index is not None:
            targets = targets.index_select(0, token_index)  # (N,)
        return linear_cross_entropy(hidden, self.lm_head.weight, targets, ignore_index=ignore_index)

    def _check_ids(self, ids: Tensor, positions: Tensor) -> None:
        """Token ids in [0, vocab_size) and positions in [0, max_positions) on the real tokens, where the embedding
        would raise a bare ``IndexError`` (on the CPU; on an accelerator the check would wait for the device)."""
        for name, values, limit, setting in (
            ("input_ids", ids, self.config.vocab_size, "vocab_size"),
            ("position_ids", positions, self.config.max_positions, "max_positions"),
        ):
            if values.dtype == torch.bool or values.is_floating_point() or values.is_complex():
                raise TypeError(f"{name} must be an integer tensor, got dtype {values.dtype}")
            if not masks.host_read_is_free(values) or not values.numel():
                continue
            outside = (values < 0) | (values >= limit)
            if outside.any():
                hint = (
                    "tokenise with the model's tokenizer, or raise vocab_size"
                    if name == "input_ids"
                    else "keep rows to max_positions tokens (max_length <= max_positions), or raise max_positions"
                )
                raise ValueError(
                    f"{name} {values[outside][:4].tolist()} (first of {int(outside.sum())}, real tokens) are outside "
                    f"[0, {setting}={limit}); {hint}"
                )

    def hidden_states(
        self,
        input_ids: Tensor,
        *,
        key_padding_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        document_ids: Tensor | None = None,
        token_index: Tensor | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """The final (normed) hidden states of the real tokens, (N, E), and ``token_index`` (N,): their flat
        positions ``b * L + t`` (None when every position is real; built from ``key_padding_mask`` when not given).
        """
        batch, length = input_ids.shape
        if position_ids is None:
            position_ids = torch.arange(length, device=input_ids.device).expand(batch, length)  # (B, L)
        plan = plan_attention(
            self.config.strategy, batch, length, key_padding_mask=key_padding_mask, document_ids=document_ids,
            token_index=token_index,
        )  # fmt: skip
        ids, positions = input_ids.flatten(), position_ids.flatten()  # (B * L,)
        if plan.token_index is not None:
            ids, positions = ids.index_select(0, plan.token_index), positions.index_select(0, plan.token_index)  # (N,)
        self._check_ids(ids, positions)
        x = self.drop(self.tok_emb(ids) + self.pos_emb(positions))  # (N, E)
        for block in self.blocks:
            x = block(x, plan)
        return self.ln_f(x), plan.token_index
