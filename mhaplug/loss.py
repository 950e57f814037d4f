"""Next-token cross-entropy of a language model: :func:`lm_loss_sum` of whole logits, the reference, and
:func:`linear_cross_entropy`, the same loss of a linear output layer without the (N, V) logits tensor.

A language model's last matmul and its loss are most of a small model's step: for N positions and a vocabulary
of V, ``F.cross_entropy(hidden @ weight.T, targets)`` keeps the (N, V) logits, their log-softmax and, in the
backward, a gradient of the same size (and a slice ``logits[:, :-1]`` copies all of it once more).
:func:`linear_cross_entropy` computes the loss chunk by chunk, and with it the gradients of ``hidden`` and
``weight``, so at most one (chunk, V) block lives at a time; the backward only scales the stored gradients.
Same matmuls, same FLOPs, as the unfused path: (C, E) x (E, V) for the logits, (C, V) x (V, E) for the
gradient of the hidden states and (V, C) x (C, E) for the weight's. Liger-Kernel's fused linear cross-entropy
and Apple's Cut Cross-Entropy (Wijmans et al. 2024) do the same on GPUs with custom kernels; this is plain torch.

Shapes: N positions, E features, V vocabulary, C chunk.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from mhaplug.attention import masks
from mhaplug.common import IGNORE_INDEX, check_int

__all__ = ["linear_cross_entropy", "lm_loss_sum", "next_token_targets"]

DEFAULT_CHUNK_ELEMENTS = 2**21  # logits per chunk (8 MiB in float32): large GEMMs, little live memory


def next_token_targets(labels: Tensor, *, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Labels (B, L) -> targets (B, L): position t is trained to predict the label at t + 1 (the last gets
    ``ignore_index``). Shifting the labels, not the logits, copies B * L integers instead of B * L * V floats."""
    return F.pad(labels[:, 1:], (0, 1), value=ignore_index)


def linear_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    *,
    ignore_index: int = IGNORE_INDEX,
    chunk_size: int | None = None,
) -> Tensor:
    """Sum over positions of ``cross_entropy(hidden @ weight.T, targets)``; ``ignore_index`` targets take none.

    Equal to ``F.cross_entropy(hidden @ weight.T, targets, ignore_index=ignore_index, reduction="sum")``, loss
    and gradients, within float rounding; the logits are never whole. Under ``torch.autocast`` the matmuls run
    in the autocast dtype and the softmax in float32, as autocast runs ``F.cross_entropy``.

    Args:
        hidden: (N, E) final hidden states.
        weight: (V, E) output layer (a tied embedding matrix works: its gradient adds to the embedding's).
        targets: (N,) int64 class ids in [0, V), or ``ignore_index``.
        chunk_size: positions per chunk; default ``2**21 // V`` (8 MiB of float32 logits).
    """
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            "hidden must be (N, E) and weight (V, E) with the same E; "
            f"got {tuple(hidden.shape)} and {tuple(weight.shape)}"
        )
    if targets.shape != hidden.shape[:1]:
        raise ValueError(
            f"targets must be (N,) = {tuple(hidden.shape[:1])} like hidden's rows, got {tuple(targets.shape)}"
        )
    if targets.dtype == torch.bool or targets.is_floating_point() or targets.is_complex():
        raise TypeError(f"targets must be int64 class ids in [0, V) or ignore_index, got dtype {targets.dtype}")
    vocab = weight.shape[0]
    if masks.host_read_is_free(targets) and targets.numel():
        outside = (targets != ignore_index) & ((targets < 0) | (targets >= vocab))
        if outside.any():
            raise ValueError(
                f"targets {targets[outside][:4].tolist()} (first of {int(outside.sum())}) are outside the vocabulary "
                f"[0, V={vocab}) and are not ignore_index={ignore_index}; mark positions that take no loss with "
                f"ignore_index"
            )
    if chunk_size is None:
        chunk_size = max(1, DEFAULT_CHUNK_ELEMENTS // weight.shape[0])
    chunk_size = check_int("chunk_size", chunk_size)
    return _LinearCrossEntropy.apply(hidden, weight, targets, ignore_index, chunk_size)


class _LinearCrossEntropy(torch.autograd.Function):
    """The forward computes the loss and, when needed, both gradients; the backward scales them."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, targets: Tensor, ignore_index: int, chunk_size: int) -> Tensor:  # type: ignore[override]
        device_type = hidden.device.type
        dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else hidden.dtype
        softmax_dtype = torch.promote_types(dtype, torch.float32)  # float32 at least, as autocast's cross_entropy
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        with torch.autocast(device_type, enabled=False):
            h_all, w = hidden.to(dtype), weight.to(dtype)
            loss = torch.zeros((), dtype=softmax_dtype, device=hidden.device)
            grad_hidden = torch.empty_like(hidden) if need_hidden else None  # (N, E)
            grad_weight = torch.zeros_like(weight, dtype=softmax_dtype) if need_weight else None  # (V, E)
            for start in range(0, hidden.shape[0], chunk_size):
                h = h_all[start : start + chunk_size]  # (C, E)
                target = targets[start : start + chunk_size]  # (C,)
                has_target = target != ignore_index  # (C,)
                safe_target = target.masked_fill(~has_target, 0)[:, None]  # (C, 1): any class; weighted 0 below
                logits = (h @ w.T).to(softmax_dtype)  # (C, V)
                probs = torch.softmax(logits, dim=-1)  # (C, V); one exp per logit (log_softmax + exp take two)
                token_loss = _token_loss(logits, probs, safe_target, has_target)  # (C,)
                del logits
                loss += token_loss.masked_fill(~has_target, 0.0).sum()
                if not (need_hidden or need_weight):
                    continue
                grad_logits = probs  # (C, V): softmax - one_hot(target) is d loss / d logits
                grad_logits.scatter_add_(1, safe_target, has_target.to(grad_logits.dtype).neg()[:, None])
                _zero_rows_without_target(grad_logits, has_target)
                grad_logits = grad_logits.to(dtype)
                if need_hidden:
                    grad_hidden[start : start + chunk_size] = grad_logits @ w  # (C, E)
                if need_weight:
                    chunk_grad = grad_logits.T @ h  # (V, E)
                    grad_weight += chunk_grad
        ctx.save_for_backward(grad_hidden, None if grad_weight is None else grad_weight.to(weight.dtype))
        return loss

    @staticmethod
    def backward(ctx, grad_loss: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        grad_hidden, grad_weight = ctx.saved_tensors
        return (
            None if grad_hidden is None else grad_hidden * grad_loss.to(grad_hidden.dtype),
            None if grad_weight is None else grad_weight * grad_loss.to(grad_weight.dtype),
            None,
            None,
            None,
        )


def _token_loss(logits: Tensor, probs: Tensor, target: Tensor, has_target: Tensor) -> Tensor:
    """-log p(target) per row (C,), from the softmax already computed for the gradient. Where p(target)
    underflows (a loss above about 87 in float32) it is recomputed exactly from the logits as
    log-sum-exp - logit(target); on an accelerator, where finding those rows would read the device, every row
    takes log-sum-exp = max - log p(argmax) (p(argmax) >= 1 / V never underflows) at the cost of a max pass."""
    if not masks.host_read_is_free(probs):
        row_max, argmax = logits.max(dim=1, keepdim=True)  # (C, 1)
        return (row_max - probs.gather(1, argmax).log() - logits.gather(1, target)).squeeze(1)
    target_prob = probs.gather(1, target).squeeze(1)  # (C,)
    token_loss = target_prob.log().neg_()
    # below the smallest normal float the softmax's exp was subnormal (few significant bits) or 0
    underflow = ((target_prob < torch.finfo(probs.dtype).tiny) & has_target).nonzero().squeeze(1)
    if underflow.numel():
        rows = logits.index_select(0, underflow)  # (k, V)
        token_loss[underflow] = torch.logsumexp(rows, dim=1) - rows.gather(1, target[underflow]).squeeze(1)
    return token_loss


def _zero_rows_without_target(grad_logits: Tensor, has_target: Tensor) -> None:
    """Zero the gradient rows of positions that take no loss, in place. There are few (one per document on
    real tokens), so on the CPU only those rows are touched; elsewhere a multiply avoids a host read."""
    if masks.host_read_is_free(has_target):
        rows = (~has_target).nonzero().squeeze(1)
        if rows.numel():
            grad_logits.index_fill_(0, rows, 0.0)
    else:
        grad_logits.mul_(has_target[:, None])


def lm_loss_sum(logits: Tensor, labels: Tensor, *, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Sum of next-token cross-entropies of logits (B, L, V): logits at t predict ``labels`` at t + 1;
    ``ignore_index`` labels take no loss. (The labels are shifted, not the logits: no copy of the logits.)"""
    return F.cross_entropy(
        logits.flatten(0, 1),  # (B * L, V)
        next_token_targets(labels, ignore_index=ignore_index).flatten(),  # (B * L,)
        ignore_index=ignore_index,
        reduction="sum",
    )
