"""mhaplug: variable-length sequences, their padding and their attention masks, done right and fast."""

from typing import Any

from mhaplug.attention import STRATEGIES, MultiheadAttention, swap_attention
from mhaplug.collate import PackCollator, PadCollator

__all__ = [
    "STRATEGIES",
    "DecoderLM",
    "LitDecoderLM",
    "MultiheadAttention",
    "PackCollator",
    "PadCollator",
    "TextDataModule",
    "audit",
    "swap_attention",
]
__version__ = "0.1.0"

# These pull in Lightning and datasets: imported on first use, so `import mhaplug` stays light.
_LAZY = {
    "TextDataModule": "mhaplug.data",
    "LitDecoderLM": "mhaplug.lit",
    "DecoderLM": "mhaplug.model",
    "audit": "mhaplug.audit",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mhaplug' has no attribute {name!r}")
