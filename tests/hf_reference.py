"""The reference for a transformers model on mhaplug's batches: each document (sequence) run by itself.

Shared by tests/test_hf.py and tests/test_hf_attention.py (pytest puts this folder on ``sys.path``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn


def spans(batch: dict[str, Any]) -> list[tuple[int, Tensor]]:
    """(row, bool (L,) where) of every document of a packed batch, or every sequence of a padded one."""
    if "document_ids" in batch:
        doc_ids = batch["document_ids"]
        return [(r, doc_ids[r] == d) for r in range(len(doc_ids)) for d in range(int(doc_ids[r].max()) + 1)]
    return [(r, ~is_pad) for r, is_pad in enumerate(batch["key_padding_mask"])]


@torch.no_grad()
def run_alone(model: nn.Module, batch: dict[str, Any]) -> tuple[float, list[Tensor]]:
    """Each document (sequence) of the batch through the model by itself, with its own labels.

    Returns the mean loss over all target tokens of all documents (HF shifts labels: every token but the first is a
    target) and each document's logits, (n, V).
    """
    total, count, logits = 0.0, 0, []
    for row, where in spans(batch):
        ids = batch["input_ids"][row, where][None]  # (1, n)
        out = model(input_ids=ids, labels=ids, use_cache=False)
        if ids.shape[1] > 1:
            total += out.loss.item() * (ids.shape[1] - 1)
            count += ids.shape[1] - 1
        logits.append(out.logits[0])
    return total / count, logits


def assert_logits_per_document(logits: Tensor, batch: dict[str, Any], expected: list[Tensor]) -> None:
    for (row, where), alone in zip(spans(batch), expected, strict=True):
        torch.testing.assert_close(logits[row, where], alone, atol=1e-5, rtol=1e-5)
