"""Lightning callbacks that watch a run: the step-0 mask audit (:class:`MaskAudit`), throughput, padding and peak
memory (:class:`ThroughputMonitor`), and which batches a run saw (:class:`BatchLog`).

The run's lifecycle (SIGTERM, divergence, resume) is :mod:`mhaplug.training.lifecycle`'s; each run's settings and
results for TensorBoard's HParams view are :mod:`mhaplug.training.hparams`'.
"""

from __future__ import annotations

import hashlib
import json
import logging
import resource
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import pytorch_lightning as pl
import torch

from mhaplug.data.collate import add_token_counts
from mhaplug.training.audit import AuditReport, audit
from mhaplug.training.fsdp import gathered

__all__ = ["BatchLog", "MaskAudit", "MaskAuditError", "ThroughputMonitor", "peak_memory_mb"]

log = logging.getLogger(__name__)


class BatchLog(pl.Callback):
    """Append one JSON line per training batch (global step, batch index, a hash of ``input_ids``) to ``path``.

    Proof that a run resumed from a checkpoint sees exactly the batches an uninterrupted run sees::

        python train.py +callbacks.batch_log.path=b.jsonl \\
          +callbacks.batch_log._target_=mhaplug.training.callbacks.BatchLog

    Hashing copies each batch to the host, which synchronises with an accelerator: for checking, not for speed.
    """

    def __init__(self, path: str) -> None:
        self.path = Path(path)

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if not trainer.is_global_zero:
            return
        digest = hashlib.sha256(batch["input_ids"].cpu().numpy().tobytes()).hexdigest()[:16]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:
            f.write(json.dumps({"step": trainer.global_step, "batch_idx": batch_idx, "input_ids": digest}) + "\n")


class MaskAuditError(RuntimeError):
    """A run that should be correct failed the mask audit: pads, the future or other documents reach its logits."""


class MaskAudit(pl.Callback):
    """Audit the model's masks (:func:`mhaplug.training.audit.audit`) on the first training batch, before the first
    optimizer step, on the batch's device; log the verdict and keep the report (``self.report``) for the run's summary.

    A failure stops the run with :class:`MaskAuditError` (``on_failure="raise"``, the default: a mask bug must not
    train for hours), or is logged as a warning (``on_failure="warn"``). A run that is wrong on purpose
    (``on_invalid=run``: train.py sets ``expected_failure`` to the reason) is expected to fail: its failure is
    recorded, never raised.

    The cost is a few forwards of one batch: eval mode, no grad, under the run's precision (bf16 autocast, ...), as
    validation runs. Under DDP (and sharded, ``trainer=fsdp``, with the parameters gathered for the audit) every rank
    audits its own batch and the ranks agree on the verdict. A run resumed
    from a checkpoint keeps the report of its step 0 (saved in the checkpoint) and does not audit again.

    Logged at step 0: ``audit/passed`` (1 or 0) and ``audit/<check>``, the largest change in nats of
    log-probability (``audit/finite``: how many positions have NaN or +inf logits, or none finite); see
    :class:`mhaplug.training.audit.AuditCheck`.
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
        # sharded (trainer=fsdp): parameters gathered first, so that each rank's forwards are its own
        with (
            gathered(pl_module),
            trainer.precision_plugin.val_step_context(),
        ):  # the run's numerics (bf16 autocast, ...), as validation
            report = audit(pl_module, batch, tolerance=self.tolerance, seed=self.seed)
        passed = trainer.strategy.reduce_boolean_decision(report.passed, all=True)  # every rank raises, or none
        self.report = report
        metrics = {f"audit/{c.name}": float(c.moved) if c.max_change is None else c.max_change for c in report.checks}
        pl_module.log_dict({"audit/passed": float(passed), **metrics}, on_step=True, on_epoch=False)
        if passed and self.expected_failure is None:
            if trainer.is_global_zero:  # once per run, not once per rank
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


class ThroughputMonitor(pl.Callback):
    """Log throughput, padding and peak memory once per optimizer step, and keep the run's totals.

    A step ends where ``trainer.global_step`` advances: with :class:`mhaplug.training.lit.LitDecoderLM`'s manual
    optimisation every ``accumulate_grad_batches`` micro-batches and at an epoch's last batch; with automatic
    optimisation at every optimizer step. Logged then, over the step's micro-batches::

        train/real_tokens_per_sec     real tokens / step time
        train/padded_tokens_per_sec   B * L tokens (pads included) / step time
        train/pad_fraction            1 - real / padded tokens
        train/step_time_s             host seconds from the previous step's end to this step's end
        train/peak_memory_mb          peak_memory_mb(pl_module.device): the run's peak so far

    Tokens are the batches' ``num_real_tokens`` and ``num_padded_tokens``, which :class:`mhaplug.PadCollator` and
    :class:`mhaplug.PackCollator` count on the CPU; a batch without them is counted with
    :func:`mhaplug.data.collate.add_token_counts` (on an accelerator, a synchronisation). Under DDP a rank's counts are
    multiplied by ``trainer.world_size`` (the ranks' batches are of about the same size; summing them exactly would
    cost a collective per step), and rank 0's values are logged.

    Step time is measured on the host and never synchronises the device: on an accelerator one step's time may be
    off by the work still queued, a run's total by at most what is queued at its end. Validation, the time between
    epochs and loading the first batch after either are not step time: a step that validation interrupts is paused,
    and the first step after a pause starts at its first batch, as the run's first step does. Place this callback
    after callbacks whose ``on_train_batch_start`` work (the step-0 :class:`MaskAudit`) should not count as step
    time: Lightning calls them in list order.

    ``totals`` (``real_tokens``, ``padded_tokens``, ``train_time_s`` and ``steps`` timed, tokens counted as logged)
    is saved in checkpoints, so a run resumed from a checkpoint continues the totals of the run up to that
    checkpoint (the steps after it, lost with the interruption, are trained and counted again); :meth:`rates`
    turns them into the run's throughput for a summary.
    """

    def __init__(self) -> None:
        self.totals: dict[str, float] = {"real_tokens": 0, "padded_tokens": 0, "train_time_s": 0.0, "steps": 0}
        self._pending = {"batches": 0, "real": 0, "padded": 0}  # the micro-batches of the step in progress
        self._start: float | None = None  # when the step in progress began; None: at its first batch
        self._paused_at: float | None = None
        self._global_step = 0  # trainer.global_step when the last step ended

    def rates(self) -> dict[str, float | None]:
        """``real_tokens_per_sec``, ``padded_tokens_per_sec`` and ``pad_fraction`` of the run so far (all steps
        together: tokens over time, not a mean of per-step rates); None before the first step."""
        totals = self.totals
        if not totals["steps"]:
            return {"real_tokens_per_sec": None, "padded_tokens_per_sec": None, "pad_fraction": None}
        seconds = max(totals["train_time_s"], 1e-9)
        return {
            "real_tokens_per_sec": totals["real_tokens"] / seconds,
            "padded_tokens_per_sec": totals["padded_tokens"] / seconds,
            "pad_fraction": 1.0 - totals["real_tokens"] / max(totals["padded_tokens"], 1),
        }

    # -- steps ----------------------------------------------------------------------------------------------

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._global_step = trainer.global_step  # after a resume: the checkpoint's step
        self._pending = {"batches": 0, "real": 0, "padded": 0}
        self._start = self._paused_at = None

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._start is None:
            self._start = time.perf_counter()

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not isinstance(batch, Mapping):
            raise TypeError(
                f"ThroughputMonitor counts tokens of dict batches (num_real_tokens, num_padded_tokens, or labels and "
                f"lengths to count them from), got a {type(batch).__name__}; remove the callback for this model"
            )
        if "num_real_tokens" not in batch or "num_padded_tokens" not in batch:
            add_token_counts(batch)  # type: ignore[arg-type]
        pending = self._pending
        pending["batches"] += 1
        pending["real"] += batch["num_real_tokens"]
        pending["padded"] += batch["num_padded_tokens"]
        if trainer.global_step == self._global_step:
            return  # a micro-batch of a step still accumulating
        self._global_step = trainer.global_step
        now = time.perf_counter()
        seconds = max(now - (self._start if self._start is not None else now), 1e-9)
        self._start = now
        world = trainer.world_size
        real, padded = pending["real"] * world, pending["padded"] * world
        self._pending = {"batches": 0, "real": 0, "padded": 0}
        self.totals["real_tokens"] += real
        self.totals["padded_tokens"] += padded
        self.totals["train_time_s"] += seconds
        self.totals["steps"] += 1
        pl_module.log_dict(
            {
                "train/real_tokens_per_sec": real / seconds,
                "train/padded_tokens_per_sec": padded / seconds,
                "train/pad_fraction": 1.0 - real / max(padded, 1),
                "train/step_time_s": seconds,
                "train/peak_memory_mb": peak_memory_mb(pl_module.device),
            },
            on_step=True,
            on_epoch=False,
        )

    # -- pauses: validation and the time between epochs are not step time -----------------------------------

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._pause()

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._resume()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._pause()

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._resume()

    def _pause(self) -> None:
        if self._paused_at is None:
            self._paused_at = time.perf_counter()

    def _resume(self) -> None:
        if self._paused_at is not None and self._start is not None:
            if self._pending["batches"]:  # a step interrupted: its clock skips the pause
                self._start += time.perf_counter() - self._paused_at
            else:  # between steps: the next one starts at its first batch
                self._start = None
        self._paused_at = None

    # -- checkpoints ----------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {"totals": dict(self.totals)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.totals.update(state_dict.get("totals", {}))


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory in MiB: on CUDA ``torch.cuda.max_memory_allocated(device)`` (tensors only, not the caching
    allocator's reserve); elsewhere the process's peak resident set size (``getrusage``: everything the process
    ever held, Python and libraries included)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, KiB on Linux
