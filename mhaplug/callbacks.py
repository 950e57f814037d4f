"""Lightning callbacks of mhaplug (HParamsSummary, for TensorBoard's HParams view: mhaplug.hparams)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import resource
import signal
import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Checkpoint, ModelCheckpoint
from pytorch_lightning.utilities.exceptions import SIGTERMException
from torch import Tensor

from mhaplug.audit import AuditReport, audit
from mhaplug.collate import add_token_counts

__all__ = [
    "BatchLog",
    "CheckpointOnSigterm",
    "DivergedError",
    "MaskAudit",
    "MaskAuditError",
    "ResumeMarker",
    "StopOnNonFiniteLoss",
    "ThroughputMonitor",
    "peak_memory_mb",
]

log = logging.getLogger(__name__)


class BatchLog(pl.Callback):
    """Append one JSON line per training batch (global step, batch index, a hash of ``input_ids``) to ``path``.

    Proof that a run resumed from a checkpoint sees exactly the batches an uninterrupted run sees:
    ``python train.py +callbacks.batch_log._target_=mhaplug.callbacks.BatchLog +callbacks.batch_log.path=b.jsonl``.
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

    A step ends where ``trainer.global_step`` advances: with :class:`mhaplug.lit.LitDecoderLM`'s manual optimisation
    every ``accumulate_grad_batches`` micro-batches and at an epoch's last batch; with automatic optimisation at every
    optimizer step. Logged then, over the step's micro-batches::

        train/real_tokens_per_sec     real tokens / step time
        train/padded_tokens_per_sec   B * L tokens (pads included) / step time
        train/pad_fraction            1 - real / padded tokens
        train/step_time_s             host seconds from the previous step's end to this step's end
        train/peak_memory_mb          peak_memory_mb(pl_module.device): the run's peak so far

    Tokens are the batches' ``num_real_tokens`` and ``num_padded_tokens``, which :class:`mhaplug.PadCollator` and
    :class:`mhaplug.PackCollator` count on the CPU; a batch without them is counted with
    :func:`mhaplug.collate.add_token_counts` (on an accelerator, a synchronisation). Under DDP a rank's counts are
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


class CheckpointOnSigterm(Checkpoint):
    """On SIGTERM, stop at the end of the optimizer step in progress and save a checkpoint there
    (``<dirpath>/<filename>.ckpt``), so that nothing trained is lost: ``ckpt_path=`` that file resumes exactly.

    Lightning's signal connector catches SIGTERM (rank 0 forwards it to the other ranks) and its loops stop after the
    batch in progress with :class:`~pytorch_lightning.utilities.exceptions.SIGTERMException`, a ``SystemExit`` of
    code 0, saving nothing. This callback keeps that machinery and adds two things:

    - the stop waits for a step boundary outside validation. With gradient accumulation a checkpoint between two
      micro-batches would drop the micro-batches already summed (LitDecoderLM keeps them outside the checkpoint), and
      a stop inside validation would lose the validation loss summed so far: validation runs to its end first. To
      that end the callback wraps Lightning's SIGTERM handler (from ``on_train_start``) so that Lightning's flag,
      ``trainer.received_sigterm``, is only raised at such a boundary;
    - it saves the checkpoint there (``saved_path``): after the validation, as ModelCheckpoint does (a
      :class:`~pytorch_lightning.callbacks.Checkpoint`, so Lightning calls it after the ModelCheckpoint listed before
      it, whose state it then holds), else when Lightning's ``SIGTERMException`` comes. ``train.py`` then writes
      summary.json with ``"interrupted": true`` and exits 143 (128 + SIGTERM).

    The default ``filename`` is ``last``, where ModelCheckpoint's ``save_last`` writes, so the newest state is always
    ``<run>/checkpoints/last.ckpt``. SLURM: Lightning's ``SLURMEnvironment(auto_requeue=True)`` (its default under
    SLURM) keeps handling the requeue signal (SIGUSR1: ``hpc_ckpt_<n>.ckpt`` in ``trainer.default_root_dir``, then
    ``scontrol requeue``; the requeued job restores from it); a SIGTERM that SLURM sends lands here.
    """

    def __init__(self, *, dirpath: str, filename: str = "last") -> None:
        self.path = Path(dirpath) / f"{filename}.ckpt"
        self.saved_path: Path | None = None  # set once the checkpoint is written
        self._pending = False  # a SIGTERM was received
        self._boundary = False  # Lightning may stop here: between optimizer steps, outside validation
        self._mid_step = False  # the last training batch left a step accumulating
        self._step_at_batch_start = 0
        self._trainer: pl.Trainer | None = None

    # -- the SIGTERM handler --------------------------------------------------------------------------------------

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.saved_path, self._trainer = None, trainer
        self._pending = trainer._signal_connector.received_sigterm  # one may have come before training started
        self._boundary = self._mid_step = False
        self._publish()
        if threading.current_thread() is threading.main_thread():  # where Python delivers signals
            lightning_handler = signal.getsignal(signal.SIGTERM)  # installed by the Trainer for this fit

            def handler(signum: int, frame: Any) -> None:
                if callable(lightning_handler):
                    lightning_handler(signum, frame)  # logs, forwards to the DDP ranks, sets received_sigterm
                self._pending = True
                self._publish()  # in the handler, so Lightning's loops never see the flag out of turn

            signal.signal(signal.SIGTERM, handler)  # Lightning puts its predecessor back when the fit ends

    def _publish(self) -> None:
        """Lightning's flag, as its loops should see it now: raised only for a SIGTERM at a step boundary."""
        if self._trainer is not None:
            self._trainer._signal_connector.received_sigterm = self._pending and self._boundary

    # -- where Lightning may stop ---------------------------------------------------------------------------------

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._step_at_batch_start = trainer.global_step
        self._boundary = False
        self._publish()

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # Lightning checks its flag after this hook, after validation if validation is due now.
        self._mid_step = trainer.global_step == self._step_at_batch_start  # no optimizer step: still accumulating
        self._boundary = not self._mid_step
        self._publish()

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._boundary = False
        self._publish()

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._boundary = not self._mid_step  # validation between two steps, or inside one (val_check_interval)
        if self._trainer is not None and self._pending and self._boundary:
            # Saved here, where ModelCheckpoint saves: Lightning restores a checkpoint of this moment exactly (its
            # loops count the batch after the validation once more on restoring one saved later).
            self._save(trainer)
        self._publish()

    # -- the checkpoint -------------------------------------------------------------------------------------------

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if isinstance(exception, SIGTERMException) and trainer.state.fn == "fit" and self.saved_path is None:
            self._save(trainer)

    def _save(self, trainer: pl.Trainer) -> None:
        for checkpoint in trainer.checkpoint_callbacks:
            if (
                isinstance(checkpoint, ModelCheckpoint)
                and checkpoint.save_last
                and checkpoint.dirpath
                and (
                    os.path.realpath(checkpoint.dirpath) == os.path.realpath(self.path.parent)
                    and self.path.stem == checkpoint.CHECKPOINT_NAME_LAST
                )
            ):
                # Its last.ckpt from now on (saved in the checkpoint's state): after the resume it overwrites this
                # file rather than writing last-v1.ckpt beside it.
                checkpoint.last_model_path = str(self.path)
        trainer.save_checkpoint(self.path)  # every rank calls it (a collective under DDP); rank 0 writes
        self.saved_path = self.path
        log.warning("SIGTERM: stopping at step %d; checkpoint saved to %s", trainer.global_step, self.path)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._trainer = None


class DivergedError(RuntimeError):
    """The training loss became NaN or inf: ``step`` is the first optimizer step whose loss was, ``value`` the loss."""

    def __init__(self, monitor: str, step: int, value: float) -> None:
        super().__init__(
            f"{monitor} is {value} at step {step}: training diverged, and stopped there (no checkpoint of the "
            f"diverged weights is saved). Lower the learning rate (model.lr), keep gradient clipping on "
            f"(model.gradient_clip_val), or resume from an earlier checkpoint"
        )
        self.monitor, self.step, self.value = monitor, step, value


class StopOnNonFiniteLoss(pl.Callback):
    """Stop training with :class:`DivergedError` once ``monitor`` (the logged ``train/loss``) is NaN or inf, naming
    the first optimizer step where it was; ``train.py`` writes summary.json with ``"diverged": true`` and exits 3.

    Every step's loss is folded into a "first non-finite step" tensor on the loss's device, so that no step waits for
    the device. It is read (one synchronisation) when Lightning reads the logged values anyway (every
    ``trainer.log_every_n_steps`` steps), before any checkpoint is written (so none holds diverged weights) and when
    training ends. The error is raised at the next hook after the read, once Lightning has logged the step (the
    NaN is in metrics.csv) and before validation runs: the run stops at most ``log_every_n_steps - 1`` steps after it
    diverged, and says where it did.
    """

    def __init__(self, *, monitor: str = "train/loss") -> None:
        self.monitor = monitor
        self._first: tuple[Tensor, Tensor] | None = None  # (step, value) of the first non-finite value; step -1: none
        self._found: tuple[int, float] | None = None  # the same, read on the host
        self._last_step = -1

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._first, self._found, self._last_step = None, None, trainer.global_step

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._raise_if_found()

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        value = trainer.callback_metrics.get(self.monitor)
        if trainer.global_step == self._last_step or value is None:
            return  # a micro-batch of a step still accumulating: no new loss
        self._last_step = step = trainer.global_step
        value = value.detach()
        if self._first is None:
            self._first = (torch.full((), -1, dtype=torch.long, device=value.device), torch.zeros_like(value))
        first_step, first_value = self._first
        new = ~torch.isfinite(value) & (first_step < 0)
        self._first = (torch.where(new, step, first_step), torch.where(new, value, first_value))  # no sync
        if step % max(trainer.log_every_n_steps, 1) == 0:
            self._read()

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._raise_if_found()

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        self._read()
        self._raise_if_found()  # before the checkpoint is written: raising here writes none

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._read()
        self._raise_if_found()

    def _read(self) -> None:
        if self._found is None and self._first is not None and int(self._first[0]) >= 0:
            self._found = (int(self._first[0]), float(self._first[1]))

    def _raise_if_found(self) -> None:
        if self._found is not None:
            raise DivergedError(self.monitor, *self._found)


class ResumeMarker(pl.Callback):
    """On a resumed fit, log ``resumed_at_step`` (the checkpoint's global step) at the logger step of the first batch
    trained, as the first row of the attempt's log.

    A run resumed in its own folder logs each attempt to a new logger version (``csv/version_<n>/``, since
    ``configs/logger/csv.yaml`` leaves ``version`` to the logger), so nothing logged before is overwritten.
    :func:`mhaplug.compare.read_curve` reads the versions as one run: from a later version's first logged step on,
    its rows replace the earlier ones (the steps trained after the checkpoint and lost with the interruption). This
    row makes that first step exactly the one training resumed at. Logged at the first batch, not at the start of
    training: restoring a checkpoint saved after validation, Lightning counts one more logger step before it.
    """

    def __init__(self) -> None:
        self._resumed = False

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._resumed = trainer.ckpt_path is not None

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if not self._resumed:
            return
        self._resumed = False
        step = trainer.fit_loop.epoch_loop._batches_that_stepped  # the loggers' step for this batch
        for logger in trainer.loggers:
            logger.log_metrics({"resumed_at_step": float(trainer.global_step)}, step=step)


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory in MiB: on CUDA ``torch.cuda.max_memory_allocated(device)`` (tensors only, not the caching
    allocator's reserve); elsewhere the process's peak resident set size (``getrusage``: everything the process
    ever held, Python and libraries included)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, KiB on Linux
