"""mhaplug: variable-length sequences, their padding and their attention masks, done right and fast."""

from mhaplug.attention import STRATEGIES, MultiheadAttention

__all__ = ["STRATEGIES", "MultiheadAttention"]
__version__ = "0.1.0"
