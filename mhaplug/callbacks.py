"""Lightning callbacks of mhaplug."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytorch_lightning as pl

__all__ = ["BatchLog"]


class BatchLog(pl.Callback):
    """Append one JSON line per training batch (global step, batch index, a hash of ``input_ids``) to ``path``.

    Proof that a run resumed from a checkpoint sees exactly the batches an uninterrupted run sees:
    ``python train.py +callbacks.batch_log._target_=mhaplug.callbacks.BatchLog +callbacks.batch_log.path=b.jsonl``.
    Hashing copies each batch to the host, which synchronises with an accelerator: for checking, not for speed.
    """

    def __init__(self, path: str) -> None:
        self.path = Path(path)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        if not trainer.is_global_zero:
            return
        digest = hashlib.sha256(batch["input_ids"].cpu().numpy().tobytes()).hexdigest()[:16]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:
            f.write(json.dumps({"step": trainer.global_step, "batch_idx": batch_idx, "input_ids": digest}) + "\n")
