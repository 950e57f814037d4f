"""mhaplug's attention in a model that already exists: every ``torch.nn.MultiheadAttention`` replaced in place."""

from __future__ import annotations

import logging

from torch import nn

from mhaplug.attention.mha import MultiheadAttention
from mhaplug.attention.strategies import DEFAULT_STRATEGY, STRATEGIES
from mhaplug.common import check_choice

__all__ = ["swap_attention"]

logger = logging.getLogger(__name__)


def swap_attention(model: nn.Module, strategy: str = DEFAULT_STRATEGY) -> dict[str, str]:
    """Serve every ``torch.nn.MultiheadAttention`` in ``model`` with mhaplug's, in place; return what changed.

    Each torch layer is replaced by :meth:`MultiheadAttention.from_torch`: the same parameters (the same
    objects: an optimizer built before the swap keeps training them), device, dtype and training mode. mhaplug
    layers already in the model get ``strategy``. ``nn.TransformerEncoder``'s conversion of padded input into
    nested tensors in eval is switched off (``use_nested_tensor = False``): mhaplug's layer serves nested input
    too (padded once, returned nested), so the conversion would only add a copy in and a copy out per layer.

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
