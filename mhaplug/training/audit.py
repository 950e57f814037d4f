"""Prove a model's masks right on a real batch: change what must not matter, check that nothing that counts moves.

:func:`audit` runs the model a few times on one batch (eval mode, no grad) and compares the logits at the positions
that must not move with those of the unperturbed batch::

    check       what changes                                         what must not move
    finite      nothing                                              no logit NaN or +inf, a finite one at
                                                                     every position, pads too (a NaN there
                                                                     spreads); -inf (a token ruled out) is fine
    padding     ids at pad positions, and large noise on the pad     logits at every real position
                positions' input embeddings (a batch without
                padding gets a few pad columns appended first)
    loss        (the padding perturbation; labels are unchanged)     the batch's mean next-token loss
    causality   each row's real tokens after a cut t (the middle     logits at real positions <= t
                of its real tokens)
    documents   packed rows: each row's first document (a maximal   logits of the row's other documents
                run of one ``document_ids`` value; any ids)

One left-padded row (``~`` changed, ``=`` must not move, ``.`` not compared) and one packed row (documents a, b, c)::

                 pad pad  a0  a1  a2  a3  a4                      a0  a1  a2  b0  b1  c0  pad
    padding       ~   ~   =   =   =   =   =        documents     ~   ~   ~   =   =   =   .
    causality     .   .   =   =   =   ~   ~        causality     =   =   =   ~   ~   ~   .

A correct mask gives the same logits bit for bit: masked keys get exactly zero weight, and every other operation
works position by position, with the same shapes, so kernels reduce in the same order. Each position is judged on
its own log-probabilities (``log_softmax``: a constant added to a position's logits changes none), floored at -100
(e^-100 ~ 4e-44, the end of float32's range: tokens ruled out at -inf or -1e9 compare equal, never as NaN), so no
single entry sets the bar. A position moved when one of them changed by more than ``tolerance`` nats (default 1e-4:
no probability moved by more than 0.01%); the loss, likewise. That leaves room for backends that are not bit for bit
(logits far from 0, such as 1e5, round to 1e-2 in float32: those pass only bit for bit), and sits far below what a
leak moves in tests/training/test_audit.py, on randomly initialised models, where its effect is smallest: 0.03 to 13
nats (the loss: 5e-4 to 1.5). Each perturbation is seeded; the training mode of every submodule is restored.

Models it knows how to call (``forward=`` overrides; it gets ``(model, batch)`` and returns logits (B, L, V)):

- :class:`mhaplug.decoder.DecoderLM`, or a module holding one as ``.model``
  (:class:`mhaplug.training.lit.LitDecoderLM`): ``model(input_ids, key_padding_mask=, position_ids=, document_ids=,
  token_index=)`` with every position computed (DecoderLM trains on real tokens only, and pads reach its attention as
  zeros: computed, they carry the perturbations into attention, where only a correct mask keeps them out);
- a transformers ``PreTrainedModel``: ``model(input_ids=, attention_mask=, position_ids=).logits``, with the batch's
  ``attention_mask`` (derived from ``key_padding_mask`` for padded batches that lack one; a packed batch that
  carries one is audited as it is, and transformers then attends across its documents), and its flash-attention
  keys if present; ``use_cache`` is the model's own (``model.config.use_cache``), as in ``model(**batch)``: with a
  KV cache transformers' own attentions ignore packed positions, and the audit then fails ``documents``, saying so;
- anything else: ``model(batch)``, returning logits, or an object or mapping with ``logits``.

Shapes: B batch, L length, V vocabulary, E embedding width.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from mhaplug.attention import masks
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
    is_transformers_model,
    name_in,
    noise_on,
    pad_noise,
    resolve_forward,
    transformers_forward,
)

__all__ = ["AuditCheck", "AuditReport", "audit"]

CHECKS = ("finite", "padding", "loss", "causality", "documents")
LOG_PROB_FLOOR = -100.0  # e^-100 ~ 4e-44, at the end of float32's range: lower log-probabilities compare equal


@dataclass(frozen=True)
class AuditCheck:
    """One check. ``positions``: how many positions were compared (finite: every position); ``moved``: how many of
    them changed by more than ``threshold`` (the tolerance, nats) or are not finite. ``max_change``: the largest
    change of a log-probability (floored at -100), or of the loss, at those positions, in nats (NaN when one is not
    finite); it and ``threshold`` are None for ``finite``. ``detail``: what was perturbed, and what was not, or
    (finite) where the bad logits are."""

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
            "passed": self.passed, "max_change": _json_float(self.max_change), "threshold": self.threshold,
            "positions": self.positions, "moved": self.moved, "detail": self.detail,
        }  # fmt: skip


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
                name, bool(c["passed"]), int(c["positions"]), int(c["moved"]),
                max_change=None if name == "finite" else _float(c.get("max_change")),
                threshold=None if name == "finite" else _float(c.get("threshold")),
                detail=str(c.get("detail", "")),
            )
            for name, c in data["checks"].items()
        )  # fmt: skip
        return cls(
            checks, dict(data.get("skipped", {})), str(data.get("call", "")), float(data.get("tolerance", 1e-4)),
            int(data.get("forwards", 0)), float(data.get("seconds", 0.0)),
        )  # fmt: skip


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
        tolerance: the largest change allowed of a log-probability at a compared position, and of the loss, in nats
            (each position on its own: a -inf, -1e9 or +1e5 logit sets no bar; see the module docstring).
        pad_noise: noise added to pad embeddings, in standard deviations of the embedding table.
        pad_columns: a batch without padding (fully packed rows, rows of equal length) gets this many pad
            columns appended on the right, where packed rows and right padding put them, so that padding is
            always audited (0: audit the batch as it is); at position 0 (explicit ``position_ids`` where the batch
            has none), inside any position limit. A model that fails on them is audited on the batch as given,
            the padding check skipped with its error.
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
    given = dict(batch)
    batch, skipped, appended = _with_padding(given, pad_columns)
    if embedding is None:
        embedding = input_embedding(model)
    vocab = vocab_size or getattr(embedding, "num_embeddings", None) or int(batch["input_ids"].max()) + 1
    if vocab < 2:
        raise ValueError(f"vocab_size must be >= 2 to change a token, got {vocab}")
    start = functools.partial(_Probe.start, model, call, how=how, vocab=vocab, tolerance=tolerance, seed=seed)
    with eval_mode(model), torch.no_grad():
        try:
            probe = start(batch)
        except Exception as error:  # anything the model raises on the pad columns the audit added, and only there
            if not appended:
                raise
            message = f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[0][:200]}"
            explicit = " and position_ids made explicit" if given.get("position_ids") is None else ""
            reason = f"the batch has no padding, and the model failed on it with {pad_columns} pad columns appended"
            reason += f"{explicit} ({message})"
            skipped, appended, probe = dict.fromkeys(("padding", "loss"), reason), "", start(given)
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
    positioned, note, input_ids = batch, "", batch["input_ids"]  # (B, L)
    if batch.get("position_ids") is None:
        # Rows without padding sit at 0..L-1 (every model's default). Explicit, the pad columns get position 0
        # instead of L.., past the limit of a model whose rows fill it (transformers' group_texts blocks).
        positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)  # (B, L)
        positioned = {**batch, "position_ids": positions}
        note = f"; position_ids 0..{input_ids.shape[1] - 1} made explicit, pads at 0"
    extended, why_not = append_pad_columns(positioned, pad_columns)
    if extended is None:
        reason = f"the batch has no padding, and {why_not}"
        return batch, {"padding": reason, "loss": reason}, ""
    return extended, {}, f", on {pad_columns} pad columns appended (the batch has none{note})"


@dataclass
class _Probe:
    """One batch under audit: the model's call, the reference every check compares with (log-probabilities and
    loss), the bar a change must stay under, and the checks run so far. Every perturbation draws from
    ``generator``, in the order the checks run, so that a seed gives the same audit."""

    model: nn.Module
    call: ForwardFn
    batch: dict[str, Any]
    is_pad: Tensor  # (B, L), True = pad
    vocab: int
    generator: torch.Generator
    reference: Tensor  # (B, L, V) float, log-probabilities floored at LOG_PROB_FLOOR
    loss: Tensor | None  # () the mean next-token loss, None without a label to take it
    threshold: float
    checks: list[AuditCheck] = field(default_factory=list)
    forwards: int = 1

    @classmethod
    def start(
        cls, model: nn.Module, call: ForwardFn, batch: dict[str, Any], *, how: str, vocab: int, tolerance: float,
        seed: int,
    ) -> _Probe:  # fmt: skip
        """The reference forward and its ``finite`` check."""
        input_ids, padding = batch["input_ids"], is_pad(batch)  # (B, L) each; is_pad checks the mask first
        logits = call(model, dict(batch)).float()  # (B, L, V)
        if logits.shape[:2] != input_ids.shape:
            raise ValueError(
                f"the model's logits have shape {tuple(logits.shape)}; expected (B, L, V) with "
                f"(B, L) = {tuple(input_ids.shape)} ({how})"
            )
        generator = torch.Generator(device=input_ids.device).manual_seed(seed)
        loss = _loss(logits, batch.get("labels"))
        probe = cls(model, call, batch, padding, vocab, generator, _log_probs(logits), loss, tolerance)
        probe.checks.append(_finite_check(logits, ~padding))
        return probe

    def with_ids_changed(self, where: Tensor) -> dict[str, Any]:
        """The batch with ``input_ids`` changed to other ids where ``where`` (B, L) is True."""
        input_ids = self.batch["input_ids"]
        offset = torch.randint(1, self.vocab, input_ids.shape, generator=self.generator, device=input_ids.device)
        changed = torch.where(where, (input_ids + offset) % self.vocab, input_ids)  # never the same id
        return {**self.batch, "input_ids": changed}

    def forward(self, changed: dict[str, Any]) -> Tensor:
        self.forwards += 1
        return self.call(self.model, changed).float()  # (B, L, V)

    def record(self, name: str, logits: Tensor, keep: Tensor, detail: str) -> None:
        """The check ``name`` of ``logits`` (B, L, V) over the positions ``keep`` (B, L)."""
        change = (_log_probs(logits) - self.reference).abs_().amax(dim=-1)[keep]  # (N,) largest change per position
        self.checks.append(_check(name, change, self.threshold, detail))

    def compare(self, name: str, changed: dict[str, Any], keep: Tensor, detail: str) -> None:
        self.record(name, self.forward(changed), keep, detail)


def _padding_checks(
    probe: _Probe, embedding: nn.Module | None, noise_scale: float, appended: str, skipped: dict[str, str]
) -> None:
    """``padding``: pad ids and pad embeddings changed, logits at real positions compared; ``loss``: the batch's
    mean loss under the same change (it moves no more than the log-probabilities of the labels)."""
    real = ~probe.is_pad
    noise = pad_noise(embedding, real, noise_scale, probe.generator) if embedding is not None else None
    changed = probe.with_ids_changed(probe.is_pad)
    with noise_on(embedding, noise, changed["input_ids"]) as calls:
        logits = probe.forward(changed)
    what = _what_changed(probe.model, embedding, noise, calls) + appended
    probe.record("padding", logits, real, what)
    labels = probe.batch.get("labels")
    if probe.loss is None:
        skipped["loss"] = _why_no_loss(labels)
        return
    moved_loss = _loss(logits, labels)
    assert moved_loss is not None
    change = torch.where(moved_loss == probe.loss, 0.0, (moved_loss - probe.loss).abs())  # an inf loss that stays
    probe.checks.append(_check("loss", change.reshape(1), probe.threshold, what))


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
    if document_ids is None:
        skipped["documents"] = "not packed (no document_ids)"
        return
    if not isinstance(document_ids, Tensor) or document_ids.shape != probe.is_pad.shape:
        shape = tuple(probe.is_pad.shape)
        raise ValueError(f"batch['document_ids'] must be (B, L) = {shape}, got {describe(document_ids)}")
    runs = masks.document_runs(document_ids.masked_fill(probe.is_pad, -1))  # (B, L): a document is a run of one id
    if not (runs > 0).any():
        skipped["documents"] = "no row holds two documents"
    else:
        hint = _kv_cache_hint(probe.model) if probe.call is transformers_forward else ""  # not for forward=
        detail = "each row's first document" + hint
        probe.compare("documents", probe.with_ids_changed(runs == 0), runs > 0, detail)


def _kv_cache_hint(model: nn.Module) -> str:
    """For a transformers model called with a KV cache (``config.use_cache``) under an attention that then ignores
    packed positions (every one of transformers' own): why its documents may see each other, and what to do."""
    config = getattr(model, "config", None)
    if not (is_transformers_model(model) and getattr(config, "use_cache", False)):
        return ""
    if str(getattr(config, "_attn_implementation", "")).startswith("mhaplug"):
        return ""  # mhaplug.hf finds the documents in every call
    return (
        "; called with model.config.use_cache=True, as model(**batch) is: transformers then ignores packed "
        "position_ids. Set model.config.use_cache = False (transformers.Trainer does), or use "
        "attn_implementation='mhaplug' (import mhaplug.hf)"
    )


def _what_changed(model: nn.Module, embedding: nn.Module | None, noise: Tensor | None, calls: list[str]) -> str:
    """The padding check's detail: pad ids, and whether and where pad embeddings were perturbed."""
    name = name_in(model, embedding) if embedding is not None else ""
    missed = [call for call in calls if call]
    if embedding is None or noise is None or len(missed) == len(calls):
        why = (
            "no input embedding found (pass embedding=)" if embedding is None
            else f"{name} has no (vocabulary, E) weight" if noise is None
            else f"{name} was not called" if not calls
            else f"{name}'s output {missed[0]} is not (B, L, E), (L, B, E) or (B * L, E) with E = {noise.shape[-1]}"
        )  # fmt: skip
        return f"pad ids; pad embeddings not perturbed: {why}"
    some = f", in {len(calls) - len(missed)} of its {len(calls)} calls" if missed else ""
    return f"pad ids and pad embeddings ({name}{some})"


# ----------------------------------------------------------------------------------------------------------
# Comparisons
# ----------------------------------------------------------------------------------------------------------


def _log_probs(logits: Tensor) -> Tensor:
    """Log-probabilities (B, L, V) of logits (B, L, V), floored at :data:`LOG_PROB_FLOOR`: a constant added to a
    position's logits changes none of them, and entries ruled out (-inf, -1e9) compare equal instead of NaN."""
    return logits.log_softmax(dim=-1).clamp_(min=LOG_PROB_FLOOR)  # clamp keeps NaN: a NaN position moved


def _finite_check(logits: Tensor, real: Tensor) -> AuditCheck:
    """Logits (B, L, V) hold no NaN and no +inf, and a finite entry at every position; -inf for an entry is a token
    the model rules out (probability 0), and fine. A NaN at a pad position (a query row with nothing to attend to,
    on torch's fast path) is harmless only while nothing reads it: the next layer spreads it to every row of the
    sequence, and so does a loss that multiplies by a mask (0 * NaN = NaN)."""
    bad = (torch.isnan(logits) | (logits == math.inf)).any(dim=-1) | ~torch.isfinite(logits).any(dim=-1)  # (B, L)
    at_real, at_pad = int((bad & real).sum()), int((bad & ~real).sum())
    where = f"{at_real}/{int(real.sum())} real and {at_pad}/{int((~real).sum())} pad positions"
    detail = f"NaN, +inf or no finite logit at {where}"
    return AuditCheck("finite", not (at_real or at_pad), positions=bad.numel(), moved=at_real + at_pad, detail=detail)


def _check(name: str, change: Tensor, threshold: float, detail: str) -> AuditCheck:
    """``change`` (N,): the largest absolute change per compared position (NaN where not finite)."""
    moved = ~(change <= threshold)  # NaN compares False: a NaN moved
    max_change = math.nan if bool(torch.isnan(change).any()) else float(change.amax()) if change.numel() else 0.0
    return AuditCheck(
        name, not bool(moved.any()), change.numel(), int(moved.sum()), max_change, threshold=threshold, detail=detail
    )


def _loss(logits: Tensor, labels: Tensor | None) -> Tensor | None:
    """Mean next-token loss over the labels that take one (shifted), or None without labels or targets."""
    count = (labels[:, 1:] != IGNORE_INDEX).sum() if labels is not None else None
    return lm_loss_sum(logits, labels) / count if labels is not None and bool(count) else None


def _why_no_loss(labels: Tensor | None) -> str:
    if labels is None:
        return "the batch has no labels"
    if bool((labels == IGNORE_INDEX).all()):
        return f"all labels are ignored ({IGNORE_INDEX})"
    return f"all labels are ignored ({IGNORE_INDEX}) but the first position's, which the shifted loss never reads"


def _json_float(value: float | None) -> float | None:
    return value if value is None or math.isfinite(value) else None


def _float(value: Any) -> float:
    return math.nan if value is None else float(value)
