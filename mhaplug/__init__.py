"""mhaplug: variable-length sequences, their padding and their attention masks, done right and fast.

The package, by role (arrows point down; the attention and data faces re-export their public names)::

    mhaplug/compare.py, show.py    command lines: python -m mhaplug.compare, python -m mhaplug.show
    mhaplug/reporting/             runs, tables, figures, the HTML page, the mask picture's panels
    mhaplug/training/              the LightningModule, callbacks, the mask audit, the config schema
    mhaplug/decoder.py, loss.py    the decoder LM and its fused loss
    mhaplug/hf.py                  attn_implementation="mhaplug" for transformers (import it to register)
    mhaplug/data/                  collators, packing, samplers, text sources, cache, the DataModule
    mhaplug/attention/             masks made, merged and consumed: the strategies, MultiheadAttention
    mhaplug/common.py              constants, choices, checks, atomic writes (standard library only)
"""

from typing import Any

from mhaplug.attention import STRATEGIES, MultiheadAttention, swap_attention
from mhaplug.data import PackCollator, PadCollator
from mhaplug.decoder import DecoderLM
from mhaplug.training.audit import audit

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


def __getattr__(name: str) -> Any:
    # These pull in Lightning and datasets: imported on first use, so `import mhaplug` stays light. Neither name is
    # a submodule's, so the attribute is always the class, whatever has been imported.
    if name == "TextDataModule":
        from mhaplug.data.datamodule import TextDataModule

        return TextDataModule
    if name == "LitDecoderLM":
        from mhaplug.training.lit import LitDecoderLM

        return LitDecoderLM
    raise AttributeError(f"module 'mhaplug' has no attribute {name!r}")
