"""A run's lifecycle, as Lightning callbacks: stopped by SIGTERM with a checkpoint at a step boundary
(:class:`CheckpointOnSigterm`), stopped where the loss stops being finite (:class:`StopOnNonFiniteLoss`), validated
at its last step (:class:`ValidateAtEnd`), and a resumed attempt's log marked where it resumed
(:class:`ResumeMarker`). ``train.py`` turns each ending into
summary.json and an exit code."""

from __future__ import annotations

import logging
import os
import signal
import threading
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Checkpoint, ModelCheckpoint
from pytorch_lightning.utilities.exceptions import SIGTERMException
from torch import Tensor

__all__ = ["CheckpointOnSigterm", "DivergedError", "ResumeMarker", "StopOnNonFiniteLoss", "ValidateAtEnd"]

log = logging.getLogger(__name__)


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
    """The training loss became NaN or inf: ``step`` is the logger step of the first optimizer step whose loss was
    (the ``step`` metrics.csv logged it at, counted from 0), ``value`` the loss."""

    def __init__(self, monitor: str, step: int, value: float) -> None:
        super().__init__(
            f"{monitor} is {value} at step {step}: training diverged, and stopped there (no checkpoint of the "
            f"diverged weights is saved). Lower the learning rate (model.lr), keep gradient clipping on "
            f"(model.gradient_clip_val), or resume from an earlier checkpoint"
        )
        self.monitor, self.step, self.value = monitor, step, value


class StopOnNonFiniteLoss(pl.Callback):
    """Stop training with :class:`DivergedError` once ``monitor`` (the logged ``train/loss``) is NaN or inf, naming
    the step the loggers logged the first such value at (metrics.csv's ``step``: the second optimizer step logs at
    step 1); ``train.py`` writes summary.json with ``"diverged": true`` and exits 3.

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
        self._last_step = trainer.global_step
        # The loggers' step for this batch, as ResumeMarker takes it: Lightning logs the batch's metrics after this
        # hook at that step, before it counts the batch (trainer.global_step already counts the optimizer step).
        step = trainer.fit_loop.epoch_loop._batches_that_stepped
        value = value.detach()
        if self._first is None:
            self._first = (torch.full((), -1, dtype=torch.long, device=value.device), torch.zeros_like(value))
        first_step, first_value = self._first
        new = ~torch.isfinite(value) & (first_step < 0)
        self._first = (torch.where(new, step, first_step), torch.where(new, value, first_value))  # no sync
        if trainer.global_step % max(trainer.log_every_n_steps, 1) == 0:  # when Lightning reads the values too
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


class ValidateAtEnd(pl.Callback):
    """Validate at the last training batch of the fit, where Lightning's schedule would not: every run then ends with
    a val/loss of its final weights, and ModelCheckpoint (which saves after each validation) writes its best and
    ``last.ckpt`` there.

    Lightning validates every ``trainer.val_check_interval`` batches, so ``trainer.max_steps=50`` with
    ``val_check_interval: 100`` never validated, and a run of 250 steps ended with the val loss of step 200. At the
    batch that reaches ``trainer.max_steps`` (or the last batch of the last epoch, for a run limited by
    ``trainer.max_epochs``), when Lightning's schedule does not validate there, this callback raises
    ``trainer.should_stop``, Lightning's own way to end a fit early (its EarlyStopping raises it), and Lightning
    validates after a batch that stops the fit. Every rank has the same ``global_step`` and decides the same, so the
    ranks of DDP validate together. Where validation is off (``trainer.limit_val_batches=0``, or an epoch that
    ``trainer.check_val_every_n_epoch`` skips) nothing is validated, as before.

    A fit resumed from a checkpoint saved in that validation (``last.ckpt``, to train on with a larger
    ``trainer.max_steps``): Lightning finishes the saved batch on restoring a checkpoint of a scheduled validation
    (one more logger step), but not this one, whose validation it does not know about. The callback's state says
    where it validated, and it counts that logger step itself, so the resumed attempt logs from the step after the
    checkpoint's (as :class:`ResumeMarker` and mhaplug.compare's reading of the attempts expect). This is all there
    is to finish with manual optimisation (:class:`mhaplug.training.lit.LitDecoderLM` steps its scheduler itself).
    """

    def __init__(self) -> None:
        self.validated_at: int | None = None  # the global step this callback asked a validation for

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # after the batch's optimizer step (global_step counts it), before Lightning decides whether to validate
        epochs, loop = trainer.max_epochs, trainer.fit_loop.epoch_loop
        steps_done = trainer.max_steps >= 0 and trainer.global_step >= trainer.max_steps
        last_epoch = (
            epochs is not None and 0 <= epochs <= trainer.current_epoch + 1 and loop.batch_progress.is_last_batch
        )
        if not (steps_done or last_epoch) or trainer.should_stop:
            return
        if not loop._should_check_val_fx(trainer.fit_loop._data_fetcher):  # Lightning's own schedule, asked first
            trainer.should_stop = True  # Lightning validates after this batch and ends the fit
            self.validated_at = trainer.global_step

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.ckpt_path is not None and self.validated_at == trainer.global_step:
            trainer.fit_loop.epoch_loop._batches_that_stepped += 1  # what Lightning's loop does after a validation

    def state_dict(self) -> dict[str, Any]:
        return {"validated_at": self.validated_at}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.validated_at = state_dict.get("validated_at")


class ResumeMarker(pl.Callback):
    """On a resumed fit, log ``resumed_at_step`` (the checkpoint's global step) at the logger step of the first batch
    trained, as the first row of the attempt's log.

    A run resumed in its own folder logs each attempt to a new logger version (``csv/version_<n>/``, since
    ``configs/logger/csv.yaml`` leaves ``version`` to the logger), so nothing logged before is overwritten.
    :func:`mhaplug.reporting.runs.read_curve` reads the versions as one run: from a later version's first logged step
    on, its rows replace the earlier ones (the steps trained after the checkpoint and lost with the interruption). This
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
