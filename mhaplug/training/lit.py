"""LitDecoderLM: next-token training of :class:`mhaplug.decoder.DecoderLM`, loss normalised by real tokens.

The loss of an optimizer step is the sum of token losses over every micro-batch of the step and every rank,
divided by the number of real target tokens of the whole step: not the mean of per-batch means, which
over-weights short batches (and packing changes tokens per batch). Lightning's automatic optimisation divides
each micro-batch by ``accumulate_grad_batches`` instead, so this module steps the optimizer itself: it
back-propagates token-loss *sums* and, at the end of the step, scales the gradients by
``world_size / total_targets`` (DDP has already averaged them over ranks).

The target count comes with the batch (``num_targets``, counted on the CPU by :class:`mhaplug.PadCollator` and
:class:`mhaplug.PackCollator`), so normalising needs no host-device synchronisation. This module logs ``train/loss``
only; throughput, padding and memory are :class:`mhaplug.training.callbacks.ThroughputMonitor`'s.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor

from mhaplug.common import Batching, Layout, PaddingSide, check_choice, check_int
from mhaplug.data.collate import add_token_counts
from mhaplug.decoder import DecoderConfig, DecoderLM
from mhaplug.training.fsdp import gathered

__all__ = ["LitDecoderLM"]


class LitDecoderLM(pl.LightningModule):
    """A LightningModule that takes plain values (so ``save_hyperparameters`` and ``load_from_checkpoint`` work, also
    with ``weights_only=True``) and builds the model itself.

    Args:
        **model: the :class:`mhaplug.decoder.DecoderConfig` fields (``vocab_size`` is required; ``max_positions``,
            ``d_model``, ``num_heads``, ``num_layers``, ``d_ff``, ``dropout``, ``attn_dropout``, ``strategy``,
            ``tie_weights``, ``compile``), the one definition of the architecture and its defaults; an unknown
            name raises ``TypeError``. Saved with the hyper-parameters as plain values, every field included.
        lr, weight_decay, betas: AdamW (no decay on the 1-D parameters, biases and norms; matrices are decayed,
            the embeddings included).
        warmup_steps, min_lr_ratio: linear warm-up, then cosine decay to ``lr * min_lr_ratio`` at the last step.
        accumulate_grad_batches: micro-batches per optimizer step (this module's, not the Trainer's).
        gradient_clip_val: clip the global gradient norm (0 = off).
        layout, padding_side, batching: recorded with the hyper-parameters so logs say what ran.
    """

    def __init__(
        self,
        *,
        lr: float = 3e-3,
        weight_decay: float = 0.1,
        betas: Sequence[float] = (0.9, 0.95),
        warmup_steps: int = 20,
        min_lr_ratio: float = 0.1,
        accumulate_grad_batches: int = 1,
        gradient_clip_val: float = 1.0,
        layout: str = "packed",
        padding_side: str = "right",
        batching: str = "random",
        **model: Any,
    ) -> None:
        super().__init__()
        config = DecoderConfig(**model)  # checks every field; the strategy becomes a plain str
        self.save_hyperparameters(
            {
                **asdict(config),
                "lr": float(lr),
                "weight_decay": float(weight_decay),
                "betas": tuple(float(b) for b in betas),
                "warmup_steps": check_int("warmup_steps", warmup_steps, minimum=0),
                "min_lr_ratio": float(min_lr_ratio),
                "accumulate_grad_batches": check_int("accumulate_grad_batches", accumulate_grad_batches),
                "gradient_clip_val": float(gradient_clip_val),
                "layout": check_choice("layout", layout, Layout),
                "padding_side": check_choice("padding_side", padding_side, PaddingSide),
                "batching": check_choice("batching", batching, Batching),
            }
        )
        self.automatic_optimization = False
        self.model = DecoderLM(config)
        self._step: dict[str, Any] = self._new_step()
        self._val_sum: Tensor | None = None
        self._val_count = 0

    def configure_model(self) -> None:
        """Under ``trainer=fsdp`` (:class:`mhaplug.training.fsdp.FullyShardedStrategy`, which gives a device mesh),
        shard the decoder: each block, then the rest. Nothing to do otherwise."""
        if self.device_mesh is not None and not getattr(self, "_sharded", False):
            from mhaplug.training.fsdp import shard

            shard(self.model, self.model.blocks, self.device_mesh, methods=("loss_sum",))
            self._sharded = True

    # -- batches --------------------------------------------------------------------------------------------

    @staticmethod
    def _counts(batch: dict[str, Any]) -> dict[str, Any]:
        # mhaplug's collators count on the CPU; a batch from another collator is counted here, on the device (a sync).
        return batch if "num_targets" in batch else add_token_counts(batch)

    def forward(self, batch: dict[str, Any]) -> Tensor:
        return self.model(
            batch["input_ids"],
            key_padding_mask=batch["key_padding_mask"],
            position_ids=batch["position_ids"],
            document_ids=batch.get("document_ids"),
            token_index=batch.get("token_index"),
        )

    # -- training -------------------------------------------------------------------------------------------

    @staticmethod
    def _new_step() -> dict[str, Any]:
        return {"loss_sum": None, "targets": 0, "micro": 0}

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        batch = self._counts(batch)
        loss_sum = self.model.loss_sum(batch)
        self.manual_backward(loss_sum)
        step = self._step
        step["loss_sum"] = loss_sum.detach() if step["loss_sum"] is None else step["loss_sum"] + loss_sum.detach()
        step["targets"] += batch["num_targets"]
        step["micro"] += 1
        last_batch = batch_idx + 1 >= self.trainer.num_training_batches
        if step["micro"] == self.hparams.accumulate_grad_batches or last_batch:
            self._optimizer_step()

    def _optimizer_step(self) -> None:
        step = self._step
        targets = self._sum_over_ranks(torch.tensor(float(step["targets"]), device=self.device))
        # Gradients hold sum-of-token-loss gradients, averaged over ranks by DDP: make them a global mean.
        scale = self.trainer.world_size / targets.clamp(min=1.0)
        for param in self.parameters():
            if param.grad is not None:
                param.grad.mul_(scale)
        optimizer = self.optimizers()
        if self.hparams.gradient_clip_val:
            if optimizer.optimizer.defaults.get("fused"):  # as configure_optimizers chose it
                # torch's own clip: Lightning refuses to clip for a fused optimizer under mixed precision (it
                # assumes the optimizer unscales a GradScaler's gradients), and no GradScaler runs with one
                torch.nn.utils.clip_grad_norm_(self.parameters(), self.hparams.gradient_clip_val)
            else:  # Lightning unscales a GradScaler's gradients (fp16) before clipping
                self.clip_gradients(
                    optimizer, gradient_clip_val=self.hparams.gradient_clip_val, gradient_clip_algorithm="norm"
                )
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        self.lr_schedulers().step()

        loss = self._sum_over_ranks(step["loss_sum"]) / targets.clamp(min=1.0)
        self.log("train/loss", loss, on_step=True, on_epoch=False)
        self.log("loss", loss, prog_bar=True, logger=False)
        self._step = self._new_step()

    # -- validation -----------------------------------------------------------------------------------------

    def on_validation_epoch_start(self) -> None:
        self._val_sum, self._val_count = None, 0
        self._gathered = gathered(self.model)  # sharded: whole parameters for validation (see mhaplug.training.fsdp)
        self._gathered.__enter__()

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        batch = self._counts(batch)
        loss_sum = self.model.loss_sum(batch)
        self._val_sum = loss_sum if self._val_sum is None else self._val_sum + loss_sum
        self._val_count += batch["num_targets"]

    def on_validation_epoch_end(self) -> None:
        self._gathered.__exit__(None, None, None)
        total = self._val_sum if self._val_sum is not None else torch.zeros((), device=self.device)
        total = self._sum_over_ranks(total.float())
        count = self._sum_over_ranks(torch.tensor(float(self._val_count), device=self.device))
        val_loss = total / count.clamp(min=1.0)
        # Already summed over ranks, so every rank holds the same value; sync_dist's mean keeps it (and lets
        # ModelCheckpoint on every rank monitor it without Lightning's distributed-logging warning).
        self.log("val/loss", val_loss, prog_bar=True, sync_dist=True)
        self.log("val/ppl", torch.exp(val_loss.clamp(max=30.0)), sync_dist=True)

    def _sum_over_ranks(self, value: Tensor) -> Tensor:
        """``value`` summed over the ranks of a distributed run (itself on one process), by the Trainer's
        distributed engine (Lightning calls it the Trainer's strategy; not the attention's)."""
        return self.trainer.strategy.reduce(value, reduce_op="sum")

    # -- optimisation ---------------------------------------------------------------------------------------

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        decay = [p for p in self.parameters() if p.dim() >= 2]
        no_decay = [p for p in self.parameters() if p.dim() < 2]
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": hp.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=hp.lr,
            betas=tuple(hp.betas),
            fused=self._fused_adamw(),  # one kernel for all parameters instead of a loop of small ones
        )
        total = self._total_steps()
        warmup = min(hp.warmup_steps, max(total - 1, 0))

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / (warmup + 1)
            progress = min((step - warmup) / max(total - warmup, 1), 1.0)
            return hp.min_lr_ratio + (1 - hp.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def _fused_adamw(self) -> bool:
        """The fused AdamW kernel where torch has one for the device, unless a GradScaler runs (fp16 mixed
        precision): gradients are clipped before the step, which needs them unscaled first."""
        scaler = getattr(self.trainer.precision_plugin, "scaler", None) if self._trainer is not None else None
        return scaler is None and _has_fused_adamw(self.device)

    def _total_steps(self) -> int:
        if self.trainer.max_steps and self.trainer.max_steps > 0:
            return self.trainer.max_steps
        batches = self.trainer.estimated_stepping_batches  # micro-batches, as the Trainer does not accumulate here
        return max(1, math.ceil(batches / self.hparams.accumulate_grad_batches))


def _has_fused_adamw(device: torch.device) -> bool:
    """Whether torch has a fused AdamW kernel for ``device`` (CPU and CUDA do; transformers' default optimizer,
    ``adamw_torch_fused``, is the same kernel)."""
    from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

    return device.type in _get_fused_kernels_supported_devices()
