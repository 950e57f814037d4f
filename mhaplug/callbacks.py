"""Lightning callbacks of mhaplug."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any, Literal

import pytorch_lightning as pl

from mhaplug.audit import AuditReport, audit

__all__ = ["BatchLog", "MaskAudit", "MaskAuditError"]

log = logging.getLogger(__name__)


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


class MaskAuditError(RuntimeError):
    """A run that should be correct failed the mask audit: pads, the future or other documents reach its logits."""


class MaskAudit(pl.Callback):
    """Audit the model's masks (:func:`mhaplug.audit.audit`) on the first training batch, before the first optimizer
    step, on the batch's device; log the verdict and keep the report (``self.report``) for the run's summary.

    A failure stops the run with :class:`MaskAuditError` (``on_failure="raise"``, the default: a mask bug must not
    train for hours), or is logged as a warning (``on_failure="warn"``). A run that is wrong on purpose
    (``on_invalid=run``: train.py sets ``expected_failure`` to the reason) is expected to fail: its failure is
    recorded, never raised.

    The cost is a few forwards of one batch: eval mode, no grad, under the run's precision (bf16 autocast, ...), as
    validation runs. Under DDP every rank audits its own batch and the ranks agree on the verdict. A run resumed
    from a checkpoint keeps the report of its step 0 (saved in the checkpoint) and does not audit again.

    Logged at step 0: ``audit/passed`` (1 or 0) and ``audit/<check>``, the largest change (``audit/finite``: how
    many positions have NaN/inf logits); see :class:`mhaplug.audit.AuditCheck`.
    """

    def __init__(
        self, *, on_failure: Literal["raise", "warn"] = "raise", tolerance: float = 1e-4, seed: int = 0
    ) -> None:
        if on_failure not in ("raise", "warn"):
            raise ValueError(f"on_failure must be 'raise' or 'warn', got {on_failure!r}")
        self.on_failure = on_failure
        self.tolerance = tolerance
        self.seed = seed
        self.expected_failure: str | None = None  # why this run is invalid on purpose, if it is
        self.report: AuditReport | None = None

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.report is not None or trainer.global_step != 0:
            return
        with trainer.precision_plugin.val_step_context():  # the run's numerics (bf16 autocast, ...), as validation
            report = audit(pl_module, batch, tolerance=self.tolerance, seed=self.seed)
        passed = trainer.strategy.reduce_boolean_decision(report.passed, all=True)  # every rank raises, or none
        self.report = report
        metrics = {f"audit/{c.name}": float(c.moved) if c.max_change is None else c.max_change for c in report.checks}
        pl_module.log_dict({"audit/passed": float(passed), **metrics}, on_step=True, on_epoch=False)
        if passed and self.expected_failure is None:
            log.info("%s", report)
        elif passed:
            log.warning("%s; expected to fail (invalid on purpose: %s)", report, self.expected_failure)
        elif self.expected_failure is not None:
            log.warning("%s; as expected for a run that is invalid on purpose", report)
        elif self.on_failure == "warn":
            log.warning("%s", report)
        else:
            found = report if not report.passed else "mask audit failed on another rank"
            raise MaskAuditError(
                f"{found}. Pads, later tokens or other documents reach the logits of real positions, so this run "
                f"would train the wrong thing. Use a strategy valid for this layout and padding side, or set "
                f"callbacks.mask_audit.on_failure=warn to train anyway"
            )

    def state_dict(self) -> dict[str, Any]:
        return {"report": self.report.as_dict()} if self.report is not None else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("report") is not None:
            self.report = AuditReport.from_dict(state_dict["report"])
