"""The data wing: from text to the batches a model trains on.

- :mod:`~mhaplug.data.collate`: the drop-in :class:`PadCollator` and :class:`PackCollator` (the rows they take:
  :mod:`~mhaplug.data.rows`), and the token counts of a batch;
- :mod:`~mhaplug.data.packing`: first-fit decreasing packing of whole documents;
- :mod:`~mhaplug.data.sampling`: the batch samplers (random, length-grouped, token-budget), DDP-aware and resumable;
- :mod:`~mhaplug.data.sources`: where text comes from; :mod:`~mhaplug.data.tokenizer`: the BPE and the check of a
  tokenised split; :mod:`~mhaplug.data.cache`: the cache on disk;
- :mod:`~mhaplug.data.datamodule`: :class:`TextDataModule`, all of it as a LightningDataModule.

Modules here import :mod:`mhaplug.common` and the attention wing's masks and token layouts, never the decoder,
training or reporting code. :class:`TextDataModule` is imported on first use (it pulls in Lightning and datasets).
"""

from typing import Any

from mhaplug.data.collate import COMPUTED_KEYS, PackCollator, PadCollator, add_token_counts
from mhaplug.data.packing import first_fit_pack
from mhaplug.data.sampling import (
    LengthGroupedBatchSampler,
    RandomBatchSampler,
    ResumableDataLoader,
    TokenBudgetBatchSampler,
)

__all__ = [
    "COMPUTED_KEYS",
    "LengthGroupedBatchSampler",
    "PackCollator",
    "PadCollator",
    "RandomBatchSampler",
    "ResumableDataLoader",
    "TextDataModule",
    "TokenBudgetBatchSampler",
    "add_token_counts",
    "first_fit_pack",
]


def __getattr__(name: str) -> Any:
    # A name no submodule has: the attribute is always the class, whatever has been imported.
    if name == "TextDataModule":
        from mhaplug.data.datamodule import TextDataModule

        return TextDataModule
    raise AttributeError(f"module 'mhaplug.data' has no attribute {name!r}")
