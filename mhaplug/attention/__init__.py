"""The attention wing: where a mask is made, merged and consumed.

- :mod:`~mhaplug.attention.masks`: every mask convention and the conversions between them; causal and document
  masks; FlexAttention predicates;
- :mod:`~mhaplug.attention.merge`: the union of ``key_padding_mask`` and ``attn_mask``, kept broadcast, and fully
  masked rows made safe;
- :mod:`~mhaplug.attention.strategies`: what each strategy serves (:data:`CAPABILITIES`), one kernel function each,
  one dispatch;
- :mod:`~mhaplug.attention.mha`: the drop-in :class:`MultiheadAttention` (its input checks:
  :mod:`~mhaplug.attention.inputs`), and :mod:`~mhaplug.attention.swap`: :func:`swap_attention` for any model;
- :mod:`~mhaplug.attention.unpad`: a batch's real tokens out of the (B, L) layout, and the layouts a kernel sees
  them in; :mod:`~mhaplug.attention.plan`: all of it planned once per batch for every layer
  (:func:`plan_attention`).

Modules here import torch and :mod:`mhaplug.common`, never the data, decoder, training or reporting code.
"""

from mhaplug.attention.mha import MultiheadAttention
from mhaplug.attention.plan import PACKED_STRATEGIES, AttentionPlan, plan_attention
from mhaplug.attention.strategies import (
    CAPABILITIES,
    DEFAULT_STRATEGY,
    STRATEGIES,
    Capabilities,
    Strategy,
    capability_table,
    strategies_where,
)
from mhaplug.attention.swap import swap_attention
from mhaplug.attention.unpad import TokenLayout, add_token_index, plan_tokens

__all__ = [
    "CAPABILITIES",
    "DEFAULT_STRATEGY",
    "PACKED_STRATEGIES",
    "STRATEGIES",
    "AttentionPlan",
    "Capabilities",
    "MultiheadAttention",
    "Strategy",
    "TokenLayout",
    "add_token_index",
    "capability_table",
    "plan_attention",
    "plan_tokens",
    "strategies_where",
    "swap_attention",
]
