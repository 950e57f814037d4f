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
below what a leak moves: 0.05 to 1.3 times the largest logit in tests/test_audit.py, on randomly initialised models,
where a leak's effect is smallest. Each perturbation is seeded, and the audit restores the training mode of every
submodule.

Models it knows how to call (``forward=`` overrides; it gets ``(model, batch)`` and returns logits (B, L, V)):

- :class:`mhaplug.model.DecoderLM`, or a module holding one as ``.model`` (:class:`mhaplug.lit.LitDecoderLM`):
  ``model(input_ids, key_padding_mask=, position_ids=, document_ids=, token_index=)`` with every position
  computed (DecoderLM trains on real tokens only, and pads reach its attention as zeros: computed, they carry
  the perturbations into attention, where only a correct mask keeps them out);
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
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from mhaplug import masks
from mhaplug.collate import IGNORE_INDEX
from mhaplug.model import DecoderLM, lm_loss_sum

__all__ = ["AuditCheck", "AuditReport", "audit"]

ForwardFn = Callable[[nn.Module, dict[str, Any]], Any]
CHECKS = ("finite", "padding", "loss", "causality", "documents")
# transformers' flash-attention varlen keys (PackCollator adds them on request): documents for flash kernels.
_FLASH_KEYS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")


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
        raise ValueError(f"batch['input_ids'] must be an integer tensor (B, L), got {_describe(input_ids)}")
    if not tolerance >= 0:
        raise ValueError(f"tolerance must be >= 0, got {tolerance!r}")
    call, how = _resolve_forward(model, forward)
    skipped: dict[str, str] = {}
    appended = ""
    batch = dict(batch)
    if not _is_pad(batch).any() and pad_columns > 0:
        extended, why_not = _append_pad_columns(batch, pad_columns)
        if extended is None:
            skipped["padding"] = skipped["loss"] = f"the batch has no padding, and {why_not}"
        else:
            batch, appended = extended, f", on {pad_columns} pad columns appended (the batch has none)"
    input_ids = batch["input_ids"]
    is_pad = _is_pad(batch)  # (B, L), True = pad
    real = ~is_pad
    if embedding is None:
        embedding = _input_embedding(model)
    vocab = vocab_size or getattr(embedding, "num_embeddings", None) or int(input_ids.max()) + 1
    if vocab < 2:
        raise ValueError(f"vocab_size must be >= 2 to change a token, got {vocab}")
    generator = torch.Generator(device=input_ids.device).manual_seed(seed)

    def replace_ids(where: Tensor) -> dict[str, Any]:
        """The batch with ``input_ids`` changed (to other ids) where ``where`` (B, L) is True."""
        offset = torch.randint(1, vocab, input_ids.shape, generator=generator, device=input_ids.device)
        changed = torch.where(where, (input_ids + offset) % vocab, input_ids)  # never the same id
        return {**batch, "input_ids": changed}

    checks: list[AuditCheck] = []
    forwards = 0
    with _eval_mode(model), torch.no_grad():
        reference = call(model, dict(batch)).float()  # (B, L, V)
        forwards += 1
        if reference.shape[:2] != input_ids.shape:
            raise ValueError(
                f"the model's logits have shape {tuple(reference.shape)}; expected (B, L, V) with "
                f"(B, L) = {tuple(input_ids.shape)} ({how})"
            )
        checks.append(_finite_check(reference, real))
        largest = reference.abs().amax(dim=-1)  # (B, L), NaN where a logit is NaN
        largest = largest[real & torch.isfinite(largest)]  # (N,)
        threshold = max(tolerance * float(largest.max()) if largest.numel() else 0.0, 1e-7)  # floor: all-zero logits
        loss = _loss(reference, batch.get("labels"))

        def compare(
            name: str, changed: dict[str, Any], keep: Tensor, detail: str, noise: Tensor | None = None
        ) -> Tensor:
            nonlocal forwards
            with _noise_on(embedding, noise):
                logits = call(model, changed).float()  # (B, L, V)
            forwards += 1
            change = (logits - reference).abs_().amax(dim=-1)[keep]  # (N,) largest change per compared position
            checks.append(_check(name, change, threshold, detail))
            return logits

        if is_pad.any():
            noise = _pad_noise(embedding, real, pad_noise, generator) if embedding is not None else None
            what = "pad ids" + (f" and pad embeddings ({_name_in(model, embedding)})" if noise is not None else "")
            logits = compare("padding", replace_ids(is_pad), real, what + appended, noise)
            if loss is not None:
                moved_loss = _loss(logits, batch.get("labels"))
                assert moved_loss is not None
                change = (moved_loss - loss).abs().reshape(1)
                # Cross-entropy moves at most twice the largest logit change: the logits' threshold, doubled.
                checks.append(_check("loss", change, 2 * threshold, what + appended))
            else:
                skipped["loss"] = "the batch has no labels"
        elif "padding" not in skipped:
            skipped["padding"] = skipped["loss"] = "the batch has no padding"

        changed, keep = _after_cut(real)
        if changed.any() and keep.any():
            compare("causality", replace_ids(changed), keep, "real tokens after the middle of each row")
        else:
            skipped["causality"] = "no row has two real tokens"

        document_ids = batch.get("document_ids")
        if document_ids is None:
            skipped["documents"] = "not packed (no document_ids)"
        elif not (keep := real & (document_ids > 0)).any():
            skipped["documents"] = "no row holds two documents"
        else:
            compare("documents", replace_ids(real & (document_ids == 0)), keep, "each row's first document")
    order = {name: i for i, name in enumerate(CHECKS)}
    return AuditReport(
        checks=tuple(sorted(checks, key=lambda c: order[c.name])),
        skipped={name: skipped[name] for name in CHECKS if name in skipped},
        call=how,
        tolerance=tolerance,
        forwards=forwards,
        seconds=time.perf_counter() - started,
    )


# ----------------------------------------------------------------------------------------------------------
# How a model is called
# ----------------------------------------------------------------------------------------------------------


def _resolve_forward(model: nn.Module, forward: ForwardFn | None) -> tuple[ForwardFn, str]:
    """(a function (model, batch) -> logits (B, L, V), and how it calls the model, for the report)."""
    if forward is not None:
        if not callable(forward):
            raise TypeError(f"forward must be a callable (model, batch) -> logits, got {type(forward).__name__}")
        return lambda m, b: _logits_of(forward(m, b)), "forward="
    if isinstance(model, DecoderLM):
        return _decoder_lm_forward, "DecoderLM"
    if isinstance(getattr(model, "model", None), DecoderLM):  # LitDecoderLM, or any wrapper that holds one
        return lambda m, b: _decoder_lm_forward(m.model, b), f"{type(model).__name__}.model (DecoderLM)"
    if _is_transformers_model(model):
        return _transformers_forward, f"transformers {type(model).__name__}"
    return lambda m, b: _logits_of(m(b)), f"{type(model).__name__}(batch)"


def _decoder_lm_forward(model: nn.Module, batch: dict[str, Any]) -> Tensor:
    # Every position computed (a token_index over all B * L), pads included. DecoderLM computes real tokens
    # only and hands the kernel zeros at pads, so pad content could not move anything there; computed, pads
    # carry their ids and noise into attention, where only a correct mask keeps them out.
    input_ids = batch["input_ids"]
    return model(
        input_ids,
        key_padding_mask=_is_pad(batch),
        position_ids=batch.get("position_ids"),
        document_ids=batch.get("document_ids"),
        token_index=torch.arange(input_ids.numel(), device=input_ids.device),
    )


def _transformers_forward(model: nn.Module, batch: dict[str, Any]) -> Tensor:
    kwargs: dict[str, Any] = {"input_ids": batch["input_ids"], "use_cache": False}
    if batch.get("position_ids") is not None:
        kwargs["position_ids"] = batch["position_ids"]
    attention_mask = batch.get("attention_mask")
    if attention_mask is None and batch.get("document_ids") is None and batch.get("key_padding_mask") is not None:
        attention_mask = masks.attention_mask_from_is_pad(batch["key_padding_mask"])  # padded rows: pads hidden
    if attention_mask is not None:
        kwargs["attention_mask"] = attention_mask
    kwargs.update({key: batch[key] for key in _FLASH_KEYS if key in batch})
    return model(**kwargs).logits


def _is_transformers_model(model: nn.Module) -> bool:
    import sys

    transformers = sys.modules.get("transformers")  # a transformers model means transformers is imported already
    return transformers is not None and isinstance(model, transformers.PreTrainedModel)


def _logits_of(output: Any) -> Tensor:
    if isinstance(output, Tensor):
        return output
    if isinstance(output, Mapping) and isinstance(output.get("logits"), Tensor):
        return output["logits"]
    if isinstance(getattr(output, "logits", None), Tensor):
        return output.logits
    raise TypeError(
        f"the model returned {type(output).__name__}; expected logits (B, L, V), or an output with "
        f"'logits'. Pass forward=lambda model, batch: <logits> to audit()"
    )


def _input_embedding(model: nn.Module) -> nn.Module | None:
    get = getattr(model, "get_input_embeddings", None)
    if callable(get):
        try:
            found = get()
        except NotImplementedError:
            found = None
        if isinstance(found, nn.Module):
            return found
    return next((m for m in model.modules() if isinstance(m, nn.Embedding)), None)


# ----------------------------------------------------------------------------------------------------------
# Perturbations and comparisons
# ----------------------------------------------------------------------------------------------------------


def _is_pad(batch: Mapping[str, Any]) -> Tensor:
    """(B, L) bool, True = pad: ``key_padding_mask``, else from ``attention_mask``, else no padding."""
    if batch.get("key_padding_mask") is not None:
        is_pad = batch["key_padding_mask"]
        if is_pad.dtype != torch.bool or is_pad.shape != batch["input_ids"].shape:
            raise ValueError(
                f"batch['key_padding_mask'] must be bool (B, L) = {tuple(batch['input_ids'].shape)} "
                f"(True = pad), got {_describe(is_pad)}"
            )
        return is_pad
    if batch.get("attention_mask") is not None and batch["attention_mask"].dim() == 2:
        return masks.is_pad_from_attention_mask(batch["attention_mask"])
    return torch.zeros_like(batch["input_ids"], dtype=torch.bool)


def _after_cut(real: Tensor) -> tuple[Tensor, Tensor]:
    """Per row, cut after the middle real token t: (real positions after t, real positions up to t), (B, L) each."""
    rank = real.long().cumsum(dim=-1) - 1  # (B, L) index among the row's real tokens
    cut = (real.sum(dim=-1, keepdim=True) - 1) // 2  # (B, 1) rank of t; rows of 1 real token change nothing
    return real & (rank > cut), real & (rank <= cut)


def _pad_noise(embedding: nn.Module, real: Tensor, factor: float, generator: torch.Generator) -> Tensor | None:
    """Noise (B, L, E) for the pad positions of the embedding output, exactly 0 at real ones; ``factor`` standard
    deviations of the embedding table. None when the module has no (vocabulary, E) ``weight``."""
    weight = getattr(embedding, "weight", None)
    if not isinstance(weight, Tensor) or weight.dim() != 2:
        return None
    scale = float(weight.detach().float().std()) or 1.0
    noise = torch.randn((*real.shape, weight.shape[1]), generator=generator, device=real.device)  # (B, L, E)
    return (noise * factor * scale).masked_fill(real[..., None], 0.0)


# What a pad column holds, per batch key (PadCollator's and PackCollator's conventions).
_PAD_VALUES: dict[str, int | bool] = {
    "input_ids": 0,
    "labels": IGNORE_INDEX,
    "key_padding_mask": True,
    "attention_mask": 0,
    "position_ids": 0,
    "document_ids": -1,
}


def _append_pad_columns(batch: dict[str, Any], count: int) -> tuple[dict[str, Any] | None, str]:
    """``batch`` with ``count`` pad columns appended to every (B, L) key, or (None, why not)."""
    input_ids = batch["input_ids"]
    if batch.get("key_padding_mask") is None and batch.get("attention_mask") is None:
        return None, "it has neither key_padding_mask nor attention_mask to mark pads with"
    flash = [key for key in _FLASH_KEYS if key in batch]
    if flash:
        return None, f"its flash-attention keys ({', '.join(flash)}) would need the pads as segments"
    extended = dict(batch)
    for key, value in batch.items():
        if not isinstance(value, Tensor) or value.dim() < 2 or value.shape[:2] != input_ids.shape:
            continue  # (B,) lengths, cu_seqlens, counts: real tokens only, unchanged
        if key not in _PAD_VALUES or value.dim() != 2:
            return None, f"it does not know what pads hold in batch[{key!r}] {_describe(value)}"
        pad = value.new_full((value.shape[0], count), _PAD_VALUES[key])  # (B, count)
        extended[key] = torch.cat([value, pad], dim=1)  # (B, L + count)
    return extended, ""


@contextmanager
def _noise_on(embedding: nn.Module | None, noise: Tensor | None) -> Iterator[None]:
    """Add ``noise`` (B, L, E) to ``embedding``'s output while the block runs: output (B, L, E), or (B * L, E)
    flat (mhaplug's DecoderLM); calls of another shape are untouched."""
    if embedding is None or noise is None:
        yield
        return

    def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
        if isinstance(output, Tensor) and output.shape in (noise.shape, noise.flatten(0, 1).shape):
            return output + noise.to(output.dtype).view_as(output)  # + 0.0 at real positions: bit-identical there
        return None

    handle = embedding.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode inside, and every submodule's own mode restored after (some may have been in eval on purpose)."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


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


def _name_in(model: nn.Module, module: nn.Module) -> str:
    return next((name for name, m in model.named_modules() if m is module), type(module).__name__) or "the model"


def _describe(value: Any) -> str:
    if isinstance(value, Tensor):
        return f"{value.dtype} {tuple(value.shape)}"
    return type(value).__name__


def _json_float(value: float | None) -> float | None:
    return value if value is None or math.isfinite(value) else None


def _float(value: Any) -> float:
    return math.nan if value is None else float(value)
