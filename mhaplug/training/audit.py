"""Prove a model's masks right on a real batch: change what must not matter, check that nothing that counts moves.

:func:`audit` runs the model a few times on one batch (eval mode, no grad) and compares the logits at the positions
that must not move with those of the unperturbed batch::

    check       what changes                                         what must not move
    finite      nothing                                              logits are finite, at pads too (a NaN
                                                                     there spreads in the next layer)
    padding     ids at pad positions, and large noise on the pad     logits at every real position
                positions' input embeddings (a batch without
                padding gets a few pad columns appended first)
    loss        (the padding perturbation; labels are unchanged)     the batch's mean next-token loss
    causality   each row's real tokens after a cut t (the middle     logits at real positions <= t
                of its real tokens)
    documents   packed rows: each row's first document (ids 0)       logits of the row's other documents

One left-padded row (``~`` changed, ``=`` must not move, ``.`` not compared) and one packed row (documents a, b, c)::

                 pad pad  a0  a1  a2  a3  a4                      a0  a1  a2  b0  b1  c0  pad
    padding       ~   ~   =   =   =   =   =        documents     ~   ~   ~   =   =   =   .
    causality     .   .   =   =   =   ~   ~        causality     =   =   =   ~   ~   ~   .

A correct mask gives the same logits bit for bit: masked keys get exactly zero weight, and every other operation
works position by position, with the same shapes, so kernels reduce in the same order. ``tolerance`` (relative to
the largest logit at a real position; default 1e-4) leaves room for backends that do not promise that, and sits far
below what a leak moves: 0.05 to 1.3 times the largest logit in tests/training/test_audit.py, on randomly initialised
models, where a leak's effect is smallest. Each perturbation is seeded, and the audit restores the training mode of
every submodule.

Models it knows how to call (``forward=`` overrides; it gets ``(model, batch)`` and returns logits (B, L, V)):

- :class:`mhaplug.decoder.DecoderLM`, or a module holding one as ``.model``
  (:class:`mhaplug.training.lit.LitDecoderLM`): ``model(input_ids, key_padding_mask=, position_ids=, document_ids=,
  token_index=)`` with every position computed (DecoderLM trains on real tokens only, and pads reach its attention as
  zeros: computed, they carry the perturbations into attention, where only a correct mask keeps them out);
- a transformers ``PreTrainedModel``: ``model(input_ids=, attention_mask=, position_ids=, use_cache=False).logits``,
  with the batch's ``attention_mask`` (derived from ``key_padding_mask`` for padded batches that lack one; a packed
  batch that carries one is audited as it is, and transformers then attends across its documents), and its
  flash-attention keys if present. ``use_cache=False``: with a KV cache transformers ignores packed positions;
- anything else: ``model(batch)``, returning logits, or an object or
  mapping with ``logits``.

Shapes: B batch, L length, V vocabulary, E embedding width.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from mhaplug.common import IGNORE_INDEX
from mhaplug.loss import lm_loss_sum
from mhaplug.training.probing import (
    ForwardFn,
    after_cut,
    append_pad_columns,
    describe,
    eval_mode,
    input_embedding,
    is_pad,
    name_in,
    noise_on,
    pad_noise,
    resolve_forward,
)

__all__ = ["AuditCheck", "AuditReport", "audit"]

CHECKS = ("finite", "padding", "loss", "causality", "documents")


@dataclass(frozen=True)
class AuditCheck:
    """One check. ``positions``: how many positions were compared (finite: every position); ``moved``: how many of
    them changed by more than ``threshold`` or are not finite. ``max_change`` (the largest absolute change of a logit,
    or of the loss, at those positions; NaN when one is not finite) and ``threshold`` are None for ``finite``.
    ``detail``: what was perturbed, or (finite) where the non-finite logits are."""

    name: str
    passed: bool
    positions: int
    moved: int
    max_change: float | None = None
    threshold: float | None = None
    detail: str = ""

    def __str__(self) -> str:
        if self.name == "finite":
            return "finite ok" if self.passed else f"finite FAIL ({self.detail})"
        assert self.max_change is not None and self.threshold is not None
        if self.passed:
            return f"{self.name} ok ({self.max_change:.1e} <= {self.threshold:.1e})"
        return f"{self.name} FAIL ({self.max_change:.3g} > {self.threshold:.1e} at {self.moved}/{self.positions})"

    def as_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "max_change": _json_float(self.max_change),
            "threshold": self.threshold,
            "positions": self.positions,
            "moved": self.moved,
            "detail": self.detail,
        }


@dataclass(frozen=True)
class AuditReport:
    """What :func:`audit` found: ``checks`` that ran (in the order of :data:`CHECKS`), ``skipped`` checks with the
    reason (no padding, no packed rows, ...), how the model was called, the cost."""

    checks: tuple[AuditCheck, ...]
    skipped: dict[str, str] = field(default_factory=dict)
    call: str = ""
    tolerance: float = 1e-4
    forwards: int = 0
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return all(check.passed for check in self.checks)

    @property
    def failed(self) -> tuple[str, ...]:
        """Names of the checks that failed."""
        return tuple(check.name for check in self.checks if not check.passed)

    def __getitem__(self, name: str) -> AuditCheck:
        for check in self.checks:
            if check.name == name:
                return check
        raise KeyError(f"no check {name!r} ran; ran {[c.name for c in self.checks]}, skipped {sorted(self.skipped)}")

    def __str__(self) -> str:
        verdict = "passed" if self.passed else "FAILED"
        parts = [str(check) for check in self.checks] + [f"{name} skipped" for name in self.skipped]
        return (
            f"mask audit {verdict} ({self.call}, {self.forwards} forwards, {self.seconds * 1e3:.0f} ms): "
            + ", ".join(parts)
        )

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON types only (a non-finite change is null; its check failed)."""
        return {
            "passed": self.passed,
            "failed": list(self.failed),
            "checks": {check.name: check.as_dict() for check in self.checks},
            "skipped": dict(self.skipped),
            "call": self.call,
            "tolerance": self.tolerance,
            "forwards": self.forwards,
            "seconds": self.seconds,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AuditReport:
        """The inverse of :meth:`as_dict` (a null ``max_change`` comes back as NaN)."""
        checks = tuple(
            AuditCheck(
                name=name,
                passed=bool(c["passed"]),
                positions=int(c["positions"]),
                moved=int(c["moved"]),
                max_change=None if name == "finite" else _float(c.get("max_change")),
                threshold=None if name == "finite" else _float(c.get("threshold")),
                detail=str(c.get("detail", "")),
            )
            for name, c in data["checks"].items()
        )
        return cls(
            checks,
            dict(data.get("skipped", {})),
            str(data.get("call", "")),
            float(data.get("tolerance", 1e-4)),
            int(data.get("forwards", 0)),
            float(data.get("seconds", 0.0)),
        )


def audit(
    model: nn.Module,
    batch: Mapping[str, Any],
    *,
    forward: ForwardFn | None = None,
    embedding: nn.Module | None = None,
    vocab_size: int | None = None,
    tolerance: float = 1e-4,
    pad_noise: float = 10.0,
    pad_columns: int = 4,
    seed: int = 0,
) -> AuditReport:
    """Check that pads, the future and other documents cannot reach the logits of ``model`` on ``batch``.

    Args:
        model: the model (any ``nn.Module``; see the module docstring for how it is called).
        batch: a collated batch on the model's device: ``input_ids`` int (B, L); ``key_padding_mask`` bool (B, L)
            (True = pad) or ``attention_mask`` (1 = real); optional ``labels`` (B, L) (for the loss check),
            ``position_ids`` (B, L), and for packed rows ``document_ids`` (B, L) (-1 on padding). Not modified.
        forward: ``(model, batch) -> logits (B, L, V)`` (or an output with ``.logits``), for models called
            another way.
        embedding: the module whose output (B, L, E) are the input embeddings, to perturb at pad positions; by
            default ``model.get_input_embeddings()`` where it exists, else the first ``nn.Embedding``.
        vocab_size: ids are replaced by ids below this; default: the embedding's ``num_embeddings``.
        tolerance: largest change allowed, relative to the largest absolute logit at a real position (the loss:
            twice that, the most a cross-entropy moves when no logit moves more).
        pad_noise: noise added to pad embeddings, in standard deviations of the embedding table.
        pad_columns: a batch without padding (fully packed rows, rows of equal length) gets this many pad
            columns appended on the right, where packed rows and right padding put them, so that padding is
            always audited (0: audit the batch as it is).
        seed: seeds every perturbation (a private generator: the global RNG is not touched).

    Returns:
        An :class:`AuditReport`; ``report.passed`` is the verdict, ``str(report)`` one line.
    """
    started = time.perf_counter()
    input_ids = batch.get("input_ids") if isinstance(batch, Mapping) else None
    if not isinstance(input_ids, Tensor) or input_ids.dim() != 2 or input_ids.is_floating_point():
        raise ValueError(f"batch['input_ids'] must be an integer tensor (B, L), got {describe(input_ids)}")
    if not tolerance >= 0:
        raise ValueError(f"tolerance must be >= 0, got {tolerance!r}")
    call, how = resolve_forward(model, forward)
    batch, skipped, appended = _with_padding(dict(batch), pad_columns)
    if embedding is None:
        embedding = input_embedding(model)
    vocab = vocab_size or getattr(embedding, "num_embeddings", None) or int(batch["input_ids"].max()) + 1
    if vocab < 2:
        raise ValueError(f"vocab_size must be >= 2 to change a token, got {vocab}")
    with eval_mode(model), torch.no_grad():
        probe = _Probe.start(model, call, batch, how=how, vocab=vocab, tolerance=tolerance, seed=seed)
        if probe.is_pad.any():
            _padding_checks(probe, embedding, pad_noise, appended, skipped)
        elif "padding" not in skipped:
            skipped["padding"] = skipped["loss"] = "the batch has no padding"
        _causality_check(probe, skipped)
        _documents_check(probe, skipped)
    order = {name: i for i, name in enumerate(CHECKS)}
    return AuditReport(
        checks=tuple(sorted(probe.checks, key=lambda c: order[c.name])),
        skipped={name: skipped[name] for name in CHECKS if name in skipped},
        call=how,
        tolerance=tolerance,
        forwards=probe.forwards,
        seconds=time.perf_counter() - started,
    )


def _with_padding(batch: dict[str, Any], pad_columns: int) -> tuple[dict[str, Any], dict[str, str], str]:
    """(the batch to audit, the checks skipped and why, a note for the padding check): a batch without padding
    gets ``pad_columns`` pad columns appended, where packed rows and right padding put them, so that padding is
    audited too; where that cannot be done, the padding and loss checks are skipped, saying why."""
    if is_pad(batch).any() or pad_columns <= 0:
        return batch, {}, ""
    extended, why_not = append_pad_columns(batch, pad_columns)
    if extended is None:
        reason = f"the batch has no padding, and {why_not}"
        return batch, {"padding": reason, "loss": reason}, ""
    return extended, {}, f", on {pad_columns} pad columns appended (the batch has none)"


@dataclass
class _Probe:
    """One batch under audit: the model's call, the reference logits every check compares with, the bar a change
    must stay under, and the checks run so far. Every perturbation draws from ``generator``, in the order the
    checks run, so that a seed gives the same audit."""

    model: nn.Module
    call: ForwardFn
    batch: dict[str, Any]
    is_pad: Tensor  # (B, L), True = pad
    vocab: int
    generator: torch.Generator
    reference: Tensor  # (B, L, V) float
    threshold: float
    checks: list[AuditCheck] = field(default_factory=list)
    forwards: int = 1

    @classmethod
    def start(
        cls, model: nn.Module, call: ForwardFn, batch: dict[str, Any], *, how: str, vocab: int, tolerance: float,
        seed: int,
    ) -> _Probe:  # fmt: skip
        """The reference forward, its ``finite`` check, and the threshold: ``tolerance`` times the largest
        absolute logit at a real position (at least 1e-7, for all-zero logits)."""
        input_ids, padding = batch["input_ids"], is_pad(batch)  # (B, L) each; is_pad checks the mask first
        reference = call(model, dict(batch)).float()  # (B, L, V)
        if reference.shape[:2] != input_ids.shape:
            raise ValueError(
                f"the model's logits have shape {tuple(reference.shape)}; expected (B, L, V) with "
                f"(B, L) = {tuple(input_ids.shape)} ({how})"
            )
        real = ~padding
        largest = reference.abs().amax(dim=-1)  # (B, L), NaN where a logit is NaN
        largest = largest[real & torch.isfinite(largest)]  # (N,)
        threshold = max(tolerance * float(largest.max()) if largest.numel() else 0.0, 1e-7)
        generator = torch.Generator(device=input_ids.device).manual_seed(seed)
        probe = cls(model, call, batch, padding, vocab, generator, reference, threshold)
        probe.checks.append(_finite_check(reference, real))
        return probe

    def with_ids_changed(self, where: Tensor) -> dict[str, Any]:
        """The batch with ``input_ids`` changed to other ids where ``where`` (B, L) is True."""
        input_ids = self.batch["input_ids"]
        offset = torch.randint(1, self.vocab, input_ids.shape, generator=self.generator, device=input_ids.device)
        changed = torch.where(where, (input_ids + offset) % self.vocab, input_ids)  # never the same id
        return {**self.batch, "input_ids": changed}

    def compare(
        self, name: str, changed: dict[str, Any], keep: Tensor, detail: str, *, embedding: nn.Module | None = None,
        noise: Tensor | None = None,
    ) -> Tensor:  # fmt: skip
        """Run the model on ``changed`` (with ``noise`` on ``embedding``'s output), record the check ``name`` over
        the positions ``keep`` (B, L), and return the logits (B, L, V)."""
        with noise_on(embedding, noise):
            logits = self.call(self.model, changed).float()  # (B, L, V)
        self.forwards += 1
        change = (logits - self.reference).abs_().amax(dim=-1)[keep]  # (N,) largest change per compared position
        self.checks.append(_check(name, change, self.threshold, detail))
        return logits


def _padding_checks(
    probe: _Probe, embedding: nn.Module | None, noise_scale: float, appended: str, skipped: dict[str, str]
) -> None:
    """``padding``: pad ids and pad embeddings changed, logits at real positions compared; ``loss``: the batch's
    mean loss under the same change (cross-entropy moves at most twice the largest logit change)."""
    real = ~probe.is_pad
    noise = pad_noise(embedding, real, noise_scale, probe.generator) if embedding is not None else None
    what = "pad ids" + (f" and pad embeddings ({name_in(probe.model, embedding)})" if noise is not None else "")
    changed = probe.with_ids_changed(probe.is_pad)
    logits = probe.compare("padding", changed, real, what + appended, embedding=embedding, noise=noise)
    labels = probe.batch.get("labels")
    loss = _loss(probe.reference, labels)
    if loss is None:
        skipped["loss"] = "the batch has no labels"
        return
    moved_loss = _loss(logits, labels)
    assert moved_loss is not None
    change = (moved_loss - loss).abs().reshape(1)
    probe.checks.append(_check("loss", change, 2 * probe.threshold, what + appended))


def _causality_check(probe: _Probe, skipped: dict[str, str]) -> None:
    """``causality``: each row's real tokens after its middle one changed, logits up to it compared."""
    changed, keep = after_cut(~probe.is_pad)
    if changed.any() and keep.any():
        probe.compare("causality", probe.with_ids_changed(changed), keep, "real tokens after the middle of each row")
    else:
        skipped["causality"] = "no row has two real tokens"


def _documents_check(probe: _Probe, skipped: dict[str, str]) -> None:
    """``documents``: packed rows' first document changed, the other documents' logits compared."""
    document_ids = probe.batch.get("document_ids")
    real = ~probe.is_pad
    if document_ids is None:
        skipped["documents"] = "not packed (no document_ids)"
    elif not (keep := real & (document_ids > 0)).any():
        skipped["documents"] = "no row holds two documents"
    else:
        changed = probe.with_ids_changed(real & (document_ids == 0))
        probe.compare("documents", changed, keep, "each row's first document")


# ----------------------------------------------------------------------------------------------------------
# Comparisons
# ----------------------------------------------------------------------------------------------------------


def _finite_check(logits: Tensor, real: Tensor) -> AuditCheck:
    """Logits (B, L, V) finite at every position. A NaN at a pad position (a query row with nothing to attend to,
    on torch's fast path) is harmless only while nothing reads it: the next layer spreads it to every row of the
    sequence, and so does a loss that multiplies by a mask (0 * NaN = NaN)."""
    bad = ~torch.isfinite(logits).all(dim=-1)  # (B, L)
    at_real, at_pad = int((bad & real).sum()), int((bad & ~real).sum())
    return AuditCheck(
        "finite",
        not (at_real or at_pad),
        positions=bad.numel(),
        moved=at_real + at_pad,
        detail=f"NaN/inf logits at {at_real}/{int(real.sum())} real and {at_pad}/{int((~real).sum())} pad positions",
    )


def _check(name: str, change: Tensor, threshold: float, detail: str) -> AuditCheck:
    """``change`` (N,): the largest absolute change per compared position (NaN where not finite)."""
    moved = ~(change <= threshold)  # NaN compares False: a NaN moved
    max_change = float(change.amax()) if change.numel() else 0.0
    if bool(torch.isnan(change).any()):
        max_change = math.nan
    return AuditCheck(
        name,
        not bool(moved.any()),
        positions=change.numel(),
        moved=int(moved.sum()),
        max_change=max_change,
        threshold=threshold,
        detail=detail,
    )


def _loss(logits: Tensor, labels: Tensor | None) -> Tensor | None:
    """Mean next-token loss over the labels that take one (shifted), or None without labels or targets."""
    if labels is None:
        return None
    count = (labels[:, 1:] != IGNORE_INDEX).sum()
    if not bool(count):
        return None
    return lm_loss_sum(logits, labels) / count


def _json_float(value: float | None) -> float | None:
    return value if value is None or math.isfinite(value) else None


def _float(value: Any) -> float:
    return math.nan if value is None else float(value)
