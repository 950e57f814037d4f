"""A small GPT-style decoder whose attention is ``mhaplug.MultiheadAttention`` with a chosen mask strategy.

One forward builds the masks once for all layers, on the batch's device:

- padded rows: ``key_padding_mask`` from the batch plus ``is_causal=True`` (each strategy merges them its way;
  ``causal_only`` gets no padding mask, by definition);
- packed rows: a document-causal keep mask (B, 1, L, L) from ``document_ids`` (causal, within a document, never
  onto padding), handed to every layer as one broadcast ``attn_mask``;
- ``flex``: one FlexAttention ``BlockMask`` per batch (padding or documents, and causality), shared by the layers.

Shapes: B batch, L length, E = d_model, V vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mhaplug import masks
from mhaplug.attention import DEFAULT_STRATEGY, STRATEGIES, MultiheadAttention, strategies_where

__all__ = ["DecoderConfig", "DecoderLM", "PACKED_STRATEGIES"]

PACKED_STRATEGIES = strategies_where(document_masks=True)  # packed rows need a document mask


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

    def __post_init__(self) -> None:
        for name in ("vocab_size", "max_positions", "d_model", "num_heads", "num_layers", "d_ff"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"model.{name} must be a positive int, got {value!r}")
        if self.d_model % self.num_heads:
            raise ValueError(f"model.num_heads={self.num_heads} must divide model.d_model={self.d_model}")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"model.strategy must be one of {', '.join(STRATEGIES)}; got {self.strategy!r}")


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

    def forward(self, x: Tensor, *, key_padding_mask: Tensor | None, attn_mask: object, is_causal: bool) -> Tensor:
        h = self.ln_1(x)
        attended, _ = self.attn(
            h, h, h, key_padding_mask=key_padding_mask, attn_mask=attn_mask, is_causal=is_causal, need_weights=False
        )
        x = x + self.dropout(attended)
        return x + self.mlp(self.ln_2(x))


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
    ) -> Tensor:
        """Logits (B, L, V) for ``input_ids`` (B, L); masks and positions as the collators emit them.

        ``position_ids`` must stay below ``max_positions`` (the collators keep them below ``max_length``).
        """
        batch, length = input_ids.shape
        if position_ids is None:
            position_ids = torch.arange(length, device=input_ids.device).expand(batch, length)  # (B, L)
        x = self.drop(self.tok_emb(input_ids) + self.pos_emb(position_ids))  # (B, L, E)
        key_padding_mask, attn_mask, is_causal = self._masks(key_padding_mask, document_ids, batch, length)
        for block in self.blocks:
            x = block(x, key_padding_mask=key_padding_mask, attn_mask=attn_mask, is_causal=is_causal)
        return self.lm_head(self.ln_f(x))  # (B, L, V)

    def _masks(
        self, key_padding_mask: Tensor | None, document_ids: Tensor | None, batch: int, length: int
    ) -> tuple[Tensor | None, object, bool]:
        """(key_padding_mask, attn_mask, is_causal) for every layer, built once per batch on its device."""
        strategy = self.config.strategy
        if document_ids is not None:
            if strategy not in PACKED_STRATEGIES:
                raise ValueError(
                    f"packed rows need a document mask; strategy={strategy!r} would let documents attend each "
                    f"other. Use one of {', '.join(PACKED_STRATEGIES)}"
                )
            keep = masks.document_causal_keep(document_ids)  # (B, 1, L, L), True = may attend
            if strategy == "flex":
                return None, _block_mask(keep, batch, length), False
            return None, masks.is_masked_from_keep(keep), False  # MHA polarity, broadcast over heads
        if strategy == "causal_only":
            return None, None, True  # ignores padding by definition (valid with right padding only)
        if strategy == "flex" and key_padding_mask is not None:
            keep = masks.keep_from_is_masked(key_padding_mask)[:, None, None, :]  # (B, 1, 1, L)
            return None, _block_mask(keep, batch, length, is_causal=True), False
        return key_padding_mask, None, True


def _block_mask(keep: Tensor, batch: int, length: int, *, is_causal: bool = False) -> object:
    from torch.nn.attention.flex_attention import create_block_mask

    mask_mod = masks.keep_mask_mod(keep, is_causal=is_causal)
    return create_block_mask(mask_mod, batch, None, length, length, device=keep.device)


def lm_loss_sum(logits: Tensor, labels: Tensor) -> Tensor:
    """Sum of next-token cross-entropies: logits at t predict labels at t + 1; -100 labels take no loss."""
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]),  # (B * (L - 1), V)
        labels[:, 1:].reshape(-1),  # (B * (L - 1),)
        ignore_index=-100,
        reduction="sum",
    )
