"""mhaplug.audit and the MaskAudit callback: correct masks pass every check, each kind of leak fails the check that
targets it (per check, literal expectations), on mhaplug's DecoderLM, LitDecoderLM, any module that takes the batch
and a tiny random GPT-2; the callback audits step 0 in a real Trainer, stops a valid run that fails, records a
teaching run's failure, and keeps its report across a resume."""

from __future__ import annotations

import copy
import json
import logging
import math
import re
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from mhaplug.attention import MultiheadAttention, masks
from mhaplug.data.collate import PackCollator, PadCollator
from mhaplug.decoder import DecoderConfig, DecoderLM
from mhaplug.training.audit import AuditReport, audit
from mhaplug.training.callbacks import MaskAudit, MaskAuditError
from mhaplug.training.lit import LitDecoderLM

VOCAB = 64
LENGTHS = (3, 14, 7, 11, 5, 9)  # packed into rows of 24: two or three documents each


def rows() -> list[list[int]]:
    generator = torch.Generator().manual_seed(1)
    return [torch.randint(2, VOCAB, (n,), generator=generator).tolist() for n in LENGTHS]


def make_batch(layout: str) -> dict[str, Any]:
    """``right`` / ``left``: padded; ``packed``: documents per row, no 2-D attention_mask (whatever the collator
    of the day emits); ``packed+attention_mask``: the same with the HF padding mask a packed batch must not carry."""
    if layout in ("right", "left"):
        return PadCollator(padding_side=layout)(rows())
    batch = PackCollator(max_length=24)(rows())
    batch.pop("attention_mask", None)
    if layout == "packed+attention_mask":
        batch["attention_mask"] = masks.attention_mask_from_is_pad(batch["key_padding_mask"])
    return batch


def decoder(strategy: str, *, num_layers: int = 2) -> DecoderLM:
    torch.manual_seed(0)
    config = DecoderConfig(
        vocab_size=VOCAB, max_positions=32, d_model=32, num_heads=2, num_layers=num_layers, d_ff=64, strategy=strategy
    )
    return DecoderLM(config)


def verdicts(report: AuditReport) -> dict[str, bool]:
    return {check.name: check.passed for check in report.checks}


ALL_PASS_PADDED = {"finite": True, "padding": True, "loss": True, "causality": True}
ALL_PASS_PACKED = {**ALL_PASS_PADDED, "documents": True}


# ----------------------------------------------------------------------------------------------------------
# mhaplug's DecoderLM: every valid strategy passes, bit for bit; the teaching runs fail
# ----------------------------------------------------------------------------------------------------------

VALID = [(s, side) for s in ("reference", "merged_bool", "merged_additive", "causal_kpm") for side in ("right", "left")]
VALID += [("torch_mha", "right"), ("causal_only", "right")]
VALID += [(s, "packed") for s in ("reference", "merged_bool", "merged_additive")]


@pytest.mark.parametrize(("strategy", "layout"), VALID, ids=[f"{s}-{lay}" for s, lay in VALID])
def test_valid_strategies_pass_every_check_with_logits_unchanged_bit_for_bit(strategy: str, layout: str) -> None:
    model, batch = decoder(strategy), make_batch(layout)
    report = audit(model, batch)
    assert verdicts(report) == (ALL_PASS_PACKED if layout == "packed" else ALL_PASS_PADDED), str(report)
    assert all(c.max_change == 0.0 and c.moved == 0 for c in report.checks if c.name != "finite")
    assert report.passed and report.failed == () and report.call == "DecoderLM"
    assert report.forwards == (4 if layout == "packed" else 3)
    expected_skipped = {} if layout == "packed" else {"documents": "not packed (no document_ids)"}
    assert report.skipped == expected_skipped


TEACHING = [
    # causal_only ignores padding: with left padding real tokens attend the pads before them; nothing else is wrong.
    ("causal_only", "left", {"finite": True, "padding": False, "loss": False, "causality": True}),
    # torch's eval fast path: NaN for the pad rows that may attend nothing, spread to every row by the next layer.
    ("torch_mha", "left", {"finite": False, "padding": False, "loss": False, "causality": False}),
    # Packed: only the row with a padding tail goes NaN (all of it); it holds one document, so the documents of the
    # other rows, where the document mask itself is right, do not move.
    ("torch_mha", "packed", {"finite": False, "padding": False, "loss": False, "causality": False, "documents": True}),
]


@pytest.mark.parametrize(("strategy", "layout", "expected"), TEACHING, ids=[f"{s}-{lay}" for s, lay, _ in TEACHING])
def test_teaching_runs_fail_the_checks_their_mask_breaks(strategy: str, layout: str, expected: dict[str, bool]) -> None:
    report = audit(decoder(strategy), make_batch(layout))
    assert verdicts(report) == expected, str(report)
    assert not report.passed and report.failed == tuple(name for name, ok in expected.items() if not ok)
    padding = report["padding"]
    assert padding.moved > 0 and not padding.max_change <= 1e-2  # a real leak: far above the threshold (or NaN)


def test_one_layer_torch_mha_fails_only_on_its_nan_pad_rows() -> None:
    """With one layer nothing reads the NaN of the pad rows that may attend nothing (torch's eval fast path), so the
    real logits are right; the NaN is still there, and a second layer, or a masked mean, spreads it."""
    model = decoder("torch_mha", num_layers=1)
    report = audit(model, make_batch("left"))
    assert verdicts(report) == {**ALL_PASS_PADDED, "finite": False}, str(report)
    assert (
        report["finite"].detail == "NaN, +inf or no finite logit at 0/49 real and 35/35 pad positions"
    )  # every left pad


FULL_LENGTHS = (3, 5, 8, 6, 2)  # packed into rows of 8 without a pad: 8 | 6 2 | 5 3


@pytest.mark.parametrize(
    ("strategy", "expected"), [("merged_bool", ALL_PASS_PACKED), ("torch_mha", dict.fromkeys(ALL_PASS_PACKED, False))]
)  # NaN spread
def test_a_batch_without_padding_gets_pad_columns_so_padding_is_always_audited(
    strategy: str, expected: dict[str, bool]
) -> None:
    generator = torch.Generator().manual_seed(2)
    documents = [torch.randint(2, VOCAB, (n,), generator=generator).tolist() for n in FULL_LENGTHS]
    batch = PackCollator(max_length=8)(documents)
    assert not batch["key_padding_mask"].any()
    report = audit(decoder(strategy), batch)
    assert verdicts(report) == expected, str(report)
    assert report["padding"].detail == (
        "pad ids and pad embeddings (tok_emb), on 4 pad columns appended (the batch has none)"
    )
    assert report["padding"].positions == report["finite"].positions - 3 * 4 == 3 * 8
    assert audit(decoder(strategy), batch, pad_columns=0).skipped["padding"] == "the batch has no padding"
    odd = {**batch, "segment_ids": batch["document_ids"].clone()}
    assert audit(decoder(strategy), odd).skipped["padding"] == (
        "the batch has no padding, and it does not know what pads hold in batch['segment_ids'] torch.int64 (3, 8)"
    )


def test_failed_report_is_one_line_and_strict_json() -> None:
    report = audit(decoder("torch_mha"), make_batch("left"))
    line = str(report)
    assert "\n" not in line
    assert re.fullmatch(
        r"mask audit FAILED \(DecoderLM, 3 forwards, \d+ ms\): finite FAIL \(NaN, \+inf or no finite logit at 35/49 "
        r"real and 35/35 pad positions\), "
        r"padding FAIL \(nan > [0-9.e+-]+ at \d+/\d+\), loss FAIL .*, causality FAIL .*, documents skipped",
        line,
    )
    data = json.loads(json.dumps(report.as_dict(), allow_nan=False))  # NaN changes are written as null
    assert data["passed"] is False and data["checks"]["padding"]["max_change"] is None
    assert data["failed"] == ["finite", "padding", "loss", "causality"]


def test_report_round_trips_through_its_dict_and_is_seeded() -> None:
    model, batch = decoder("causal_only"), make_batch("left")
    state = torch.get_rng_state()
    first, second = audit(model, batch, seed=3), audit(model, batch, seed=3)
    assert torch.equal(torch.get_rng_state(), state)  # a private generator: training's random stream is untouched
    assert [c.as_dict() for c in first.checks] == [c.as_dict() for c in second.checks]
    assert AuditReport.from_dict(first.as_dict()) == first
    assert audit(model, batch, seed=4)["padding"].max_change != first["padding"].max_change  # the seed matters
    passing = audit(decoder("reference"), batch)
    assert re.fullmatch(
        r"mask audit passed \(DecoderLM, 3 forwards, \d+ ms\): finite ok, padding ok \(0.0e\+00 <= "
        r"[0-9.]+e-0\d\), loss ok .*, causality ok .*, documents skipped",
        str(passing),
    )


def test_audit_leaves_the_batch_and_the_training_modes_as_they_were() -> None:
    model, batch = decoder("merged_bool"), make_batch("packed")
    before = {k: v.clone() if isinstance(v, Tensor) else v for k, v in batch.items()}
    model.train()
    model.blocks[1].eval()  # a submodule frozen in eval on purpose stays so
    audit(model, batch)
    assert model.training and model.blocks[0].training and not model.blocks[1].training
    assert batch.keys() == before.keys()
    assert all(torch.equal(batch[k], v) if isinstance(v, Tensor) else batch[k] == v for k, v in before.items())


def test_lightning_module_is_audited_through_its_decoder_like_the_decoder() -> None:
    torch.manual_seed(0)
    lit = LitDecoderLM(
        vocab_size=VOCAB,
        max_positions=32,
        d_model=32,
        num_heads=2,
        num_layers=2,
        d_ff=64,
        strategy="causal_kpm",
        layout="padded",
    )
    batch = make_batch("left")
    report, inner = audit(lit, batch), audit(lit.model, batch)
    assert report.call == "LitDecoderLM.model (DecoderLM)" and report.passed
    assert [(c.name, c.max_change, c.threshold, c.moved) for c in report.checks] == [
        (c.name, c.max_change, c.threshold, c.moved) for c in inner.checks
    ]
    assert report["padding"].detail == "pad ids and pad embeddings (model.tok_emb)"
    assert inner["padding"].detail == "pad ids and pad embeddings (tok_emb)"


# ----------------------------------------------------------------------------------------------------------
# Broken models fail the check that targets their bug
# ----------------------------------------------------------------------------------------------------------


class ToyLM(nn.Module):
    """One attention layer, called as ``model(batch)``; ``causal`` / ``padding`` switch its masks off."""

    def __init__(self, *, causal: bool = True, padding: bool = True) -> None:
        super().__init__()
        self.causal, self.padding = causal, padding
        self.emb = nn.Embedding(VOCAB, 32)
        self.attn = MultiheadAttention(32, 2, batch_first=True, strategy="reference")
        self.head = nn.Linear(32, VOCAB)

    def forward(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        x = self.emb(batch["input_ids"])  # (B, L, E)
        kpm = batch["key_padding_mask"] if self.padding else None
        out, _ = self.attn(x, x, x, key_padding_mask=kpm, is_causal=self.causal, need_weights=False)
        return {"logits": self.head(x + out)}  # (B, L, V)


BROKEN = [
    ("no causal mask", ToyLM(causal=False), "right", {**ALL_PASS_PADDED, "causality": False}),
    ("padding ignored, left", ToyLM(padding=False), "left", {**ALL_PASS_PADDED, "padding": False, "loss": False}),
    ("padding ignored, right", ToyLM(padding=False), "right", ALL_PASS_PADDED),  # causal hides right pads: harmless
    ("correct", ToyLM(), "left", ALL_PASS_PADDED),
]


@pytest.mark.parametrize(("model", "layout", "expected"), [b[1:] for b in BROKEN], ids=[b[0] for b in BROKEN])
def test_a_module_that_takes_the_batch_fails_the_check_of_its_bug(
    model: nn.Module, layout: str, expected: dict[str, bool]
) -> None:
    report = audit(model, make_batch(layout))
    assert report.call == "ToyLM(batch)"
    assert verdicts(report) == expected, str(report)


# ----------------------------------------------------------------------------------------------------------
# What a model's vocabulary does to the bar: each position judged on its own log-probabilities
# ----------------------------------------------------------------------------------------------------------


class Offset(nn.Module):
    """``inner``'s logits with entry 0 (the pad id) set to ``pad_logit`` and ``shift`` added to every logit: what a
    model that suppresses a token, or whose logits sit far from 0, returns."""

    def __init__(self, inner: nn.Module, *, pad_logit: float | None = None, shift: float = 0.0) -> None:
        super().__init__()
        self.inner, self.pad_logit, self.shift = inner, pad_logit, shift

    def forward(self, batch: dict[str, Any]) -> Tensor:
        logits = self.inner(batch)["logits"] + self.shift  # (B, L, V)
        if self.pad_logit is not None:
            logits[..., 0] = self.pad_logit
        return logits


LEAKS = {**ALL_PASS_PADDED, "padding": False, "loss": False}
OFFSETS = [("pad logit -1e9", -1e9, 0.0), ("pad logit -inf", -math.inf, 0.0), ("every logit +1e5", None, 1e5)]


@pytest.mark.parametrize(("pad_logit", "shift"), [o[1:] for o in OFFSETS], ids=[o[0] for o in OFFSETS])
@pytest.mark.parametrize(("leaks", "expected"), [(False, ALL_PASS_PADDED), (True, LEAKS)], ids=["correct", "leak"])
def test_a_suppressed_entry_or_a_constant_shift_neither_hides_a_leak_nor_fails_a_correct_model(
    pad_logit: float | None, shift: float, leaks: bool, expected: dict[str, bool]
) -> None:
    torch.manual_seed(0)
    report = audit(Offset(ToyLM(padding=not leaks), pad_logit=pad_logit, shift=shift), make_batch("left"))
    assert verdicts(report) == expected, str(report)
    assert all(c.threshold == 1e-4 for c in report.checks if c.name != "finite")  # nats, whatever the logits
    if leaks:
        assert report["padding"].max_change > 1.0 and report["loss"].max_change > 0.1
    else:
        assert all(c.max_change == 0.0 for c in report.checks if c.name != "finite")


def test_finite_allows_minus_inf_entries_but_not_nan_plus_inf_or_a_position_without_a_finite_logit() -> None:
    """Left padding: row 0 holds pads at 0..10 and real tokens at 11..13."""

    def with_logits(row: int, position: int, columns: slice, value: float) -> Any:
        def forward(model: nn.Module, batch: dict[str, Any]) -> Tensor:
            logits = model(batch)["logits"]  # (B, L, V)
            logits[row, position, columns] = value
            return logits

        return forward

    torch.manual_seed(0)
    model, batch = ToyLM(), make_batch("left")
    suppressed = audit(model, batch, forward=with_logits(0, 13, slice(0, VOCAB - 1), -math.inf))
    assert verdicts(suppressed) == ALL_PASS_PADDED, str(suppressed)  # one finite entry is enough
    cases = [
        (0, 13, slice(5, 6), math.inf, "1/49 real and 0/35 pad"),
        (0, 12, slice(5, 6), math.nan, "1/49 real and 0/35 pad"),
        (0, 0, slice(None), -math.inf, "0/49 real and 1/35 pad"),
    ]
    for row, position, columns, value, where in cases:
        report = audit(model, batch, forward=with_logits(row, position, columns, value))
        assert not report["finite"].passed and report["finite"].moved == 1
        assert report["finite"].detail == f"NaN, +inf or no finite logit at {where} positions"


def test_forward_argument_audits_a_call_that_drops_the_documents() -> None:
    """The same DecoderLM called without document_ids: one causal mask over the packed row, documents leak."""
    model, batch = decoder("merged_bool"), make_batch("packed")

    def without_documents(m: nn.Module, b: dict[str, Any]) -> Tensor:
        return m(b["input_ids"], key_padding_mask=b["key_padding_mask"], position_ids=b["position_ids"])

    report = audit(model, batch, forward=without_documents)
    assert report.call == "forward="
    assert verdicts(report) == {**ALL_PASS_PACKED, "documents": False}, str(report)
    assert report["documents"].moved == report["documents"].positions  # every later document moved


def shifted_documents(batch: dict[str, Any], ids: tuple[int, ...]) -> dict[str, Any]:
    """``batch`` with each row's k-th document given the id ``ids[k]`` (padding keeps -1)."""
    document_ids = batch["document_ids"]
    mapped = torch.tensor(ids)[document_ids.clamp(min=0)]
    return {**batch, "document_ids": torch.where(document_ids >= 0, mapped, document_ids)}


SHIFTED = [("0-based", (0, 1, 2)), ("1-based", (1, 2, 3)), ("5 5 9 9 9", (5, 9, 12)), ("an id that returns", (5, 9, 5))]


@pytest.mark.parametrize("ids", [s[1] for s in SHIFTED], ids=[s[0] for s in SHIFTED])
def test_documents_are_runs_of_one_id_whatever_the_ids(ids: tuple[int, ...]) -> None:
    """A document is a maximal run of one id within a row: ids need not start at 0 nor be new. The rows hold
    documents of 14 + 9, 11 + 7 + 5 and 3 tokens: 9 + 7 + 5 = 21 positions outside each row's first document."""
    model, batch = decoder("merged_bool"), shifted_documents(make_batch("packed"), ids)

    def without_documents(m: nn.Module, b: dict[str, Any]) -> Tensor:
        return m(b["input_ids"], key_padding_mask=b["key_padding_mask"], position_ids=b["position_ids"])

    correct, leak = audit(model, batch), audit(model, batch, forward=without_documents)
    assert verdicts(correct) == ALL_PASS_PACKED, str(correct)
    assert verdicts(leak) == {**ALL_PASS_PACKED, "documents": False}, str(leak)
    assert correct["documents"].positions == leak["documents"].positions == leak["documents"].moved == 21


def test_loss_check_says_why_it_cannot_run() -> None:
    model, batch = decoder("reference"), make_batch("right")
    assert audit(model, {k: v for k, v in batch.items() if k != "labels"}).skipped["loss"] == "the batch has no labels"
    ignored = torch.full_like(batch["labels"], -100)
    assert audit(model, {**batch, "labels": ignored}).skipped["loss"] == "all labels are ignored (-100)"
    first = ignored.clone()
    first[:, 0] = 5
    assert audit(model, {**batch, "labels": first}).skipped["loss"] == (
        "all labels are ignored (-100) but the first position's, which the shifted loss never reads"
    )


class SequenceFirstLM(nn.Module):
    """Padding ignored, sequence first: embeddings (L, B, E). Every id embeds alike, so only the noise on the pad
    embeddings can reach the real logits."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 32)
        self.emb.weight.data = torch.randn(32).expand(VOCAB, 32).clone()  # one row for every id
        self.attn = MultiheadAttention(32, 2, strategy="reference")
        self.head = nn.Linear(32, VOCAB)

    def forward(self, batch: dict[str, Any]) -> Tensor:
        x = self.emb(batch["input_ids"].T)  # (L, B, E)
        out, _ = self.attn(x, x, x, is_causal=True, need_weights=False)  # no key_padding_mask: pads leak
        return self.head(x + out).transpose(0, 1)  # (B, L, V)


def test_pad_embeddings_are_perturbed_sequence_first_and_reported_when_they_cannot_be() -> None:
    torch.manual_seed(0)
    model, batch = SequenceFirstLM(), make_batch("left")  # B = 6, L = 14
    report = audit(model, batch)
    assert verdicts(report) == LEAKS, str(report)  # the noise reached the pads, and through them the real tokens
    assert report["padding"].detail == "pad ids and pad embeddings (emb)"
    square = PadCollator(padding_side="left")([r[:4] for r in rows()[:4]])  # B = L = 4: told apart by the ids
    assert square["input_ids"].shape == (4, 4) and square["key_padding_mask"].any()
    assert verdicts(audit(model, square)) == LEAKS
    elsewhere = audit(model, batch, embedding=model.head)  # output (B, L, V): not an embedding of width 32
    assert verdicts(elsewhere) == ALL_PASS_PADDED, str(elsewhere)
    assert elsewhere["padding"].detail == (
        "pad ids; pad embeddings not perturbed: head's output torch.float32 (14, 6, 64) is not (B, L, E), "
        "(L, B, E) or (B * L, E) with E = 32"
    )


def test_bad_input_is_refused_with_the_fix() -> None:
    with pytest.raises(ValueError, match=r"batch\['input_ids'\] must be an integer tensor \(B, L\), got NoneType"):
        audit(decoder("reference"), {"labels": torch.zeros(2, 3)})
    with pytest.raises(TypeError, match="the model returned tuple.*Pass forward=lambda model, batch"):
        audit(decoder("reference"), make_batch("right"), forward=lambda m, b: (m(b["input_ids"]),))
    with pytest.raises(ValueError, match=r"key_padding_mask'\] must be bool \(B, L\) = \(6, 14\).*got torch.int64"):
        audit(decoder("reference"), {**make_batch("right"), "key_padding_mask": torch.zeros(6, 14, dtype=torch.long)})


# ----------------------------------------------------------------------------------------------------------
# A transformers causal LM (tiny, randomly initialised GPT-2, offline)
# ----------------------------------------------------------------------------------------------------------


def gpt2(attn_implementation: str, *, n_positions: int = 64) -> nn.Module:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        n_layer=2,
        n_embd=32,
        n_head=2,
        n_positions=n_positions,
        vocab_size=VOCAB,
        bos_token_id=1,
        eos_token_id=1,
        attn_implementation=attn_implementation,
    )
    return transformers.GPT2LMHeadModel(config)


GPT2_CASES = [
    ("right", ALL_PASS_PADDED),
    ("left", ALL_PASS_PADDED),
    ("packed", ALL_PASS_PACKED),  # documents found from position_ids restarting at 0
    ("packed+attention_mask", {**ALL_PASS_PACKED, "documents": False}),  # read as padding: documents see each other
]


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
@pytest.mark.parametrize(("layout", "expected"), GPT2_CASES, ids=[c[0] for c in GPT2_CASES])
def test_transformers_gpt2(attn_implementation: str, layout: str, expected: dict[str, bool]) -> None:
    model = gpt2(attn_implementation)
    model.config.use_cache = False  # as transformers.Trainer sets it (TrainingArguments.use_cache)
    report = audit(model, make_batch(layout))
    assert report.call == "transformers GPT2LMHeadModel"
    assert verdicts(report) == expected, str(report)
    assert report["padding"].detail == "pad ids and pad embeddings (transformer.wte)"


KV_CACHE_HINT = (
    "each row's first document; called with model.config.use_cache=True, as model(**batch) is: transformers then "
    "ignores packed position_ids. Set model.config.use_cache = False (transformers.Trainer does), or use "
    "attn_implementation='mhaplug' (import mhaplug.hf)"
)


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_the_plain_call_with_the_default_kv_cache_fails_documents_and_says_why(attn_implementation: str) -> None:
    """GPT-2's default ``use_cache=True``: ``model(**batch)`` attends across documents, and the audit, which makes
    that call, fails it (it used to call with use_cache=False and pass a batch the plain call gets wrong)."""
    model = gpt2(attn_implementation)
    assert model.config.use_cache  # transformers' default
    report = audit(model, make_batch("packed"))
    assert verdicts(report) == {**ALL_PASS_PACKED, "documents": False}, str(report)
    assert report["documents"].detail == KV_CACHE_HINT


def test_mhaplug_attention_passes_the_plain_call_with_the_default_kv_cache() -> None:
    import mhaplug.hf  # noqa: F401  registers attn_implementation="mhaplug"

    model = gpt2("mhaplug")
    assert model.config.use_cache
    report = audit(model, make_batch("packed"))
    assert verdicts(report) == ALL_PASS_PACKED, str(report)
    assert report["documents"].detail == "each row's first document"


def test_fixed_blocks_as_long_as_the_position_limit_are_audited_within_it() -> None:
    """transformers' ``group_texts`` recipe: unpadded rows of exactly ``n_positions`` tokens, no ``position_ids``. The
    appended pad columns get explicit positions, 0, inside the limit; a call that drops them cannot take the pad
    columns, so padding is reported as not audited, with the model's error."""
    input_ids = torch.randint(2, VOCAB, (3, 16), generator=torch.Generator().manual_seed(3))  # (B, L)
    batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": input_ids.clone()}
    model = gpt2("sdpa", n_positions=16)
    report = audit(model, batch)
    assert verdicts(report) == ALL_PASS_PADDED, str(report)
    assert report["padding"].detail == (
        "pad ids and pad embeddings (transformer.wte), on 4 pad columns appended (the batch has none; "
        "position_ids 0..15 made explicit, pads at 0)"
    )
    assert report["padding"].positions == 3 * 16
    unpositioned = audit(model, batch, forward=lambda m, b: m(input_ids=b["input_ids"], use_cache=False).logits)
    assert verdicts(unpositioned) == {"finite": True, "causality": True}, str(unpositioned)
    reason = (
        "the batch has no padding, and the model failed on it with 4 pad columns appended and position_ids made "
        "explicit (IndexError: index out of range in self)"
    )
    assert unpositioned.skipped == {"padding": reason, "loss": reason, "documents": "not packed (no document_ids)"}
    decoder_batch = {"input_ids": torch.randint(2, VOCAB, (2, 32)), "labels": torch.randint(2, VOCAB, (2, 32))}
    decoder_batch["key_padding_mask"] = torch.zeros(2, 32, dtype=torch.bool)
    assert verdicts(audit(decoder("merged_bool"), decoder_batch)) == ALL_PASS_PADDED  # max_positions=32


def test_transformers_with_its_default_kv_cache_attends_across_documents() -> None:
    """``use_cache=True`` (GPT-2's default) makes transformers ignore packed positions: the audit sees it through a
    ``forward=`` too (with no hint: the call is the caller's)."""
    report = audit(
        gpt2("sdpa"),
        make_batch("packed"),
        forward=lambda m, b: m(input_ids=b["input_ids"], position_ids=b["position_ids"]).logits,
    )
    assert verdicts(report) == {**ALL_PASS_PACKED, "documents": False}, str(report)
    assert report["documents"].detail == "each row's first document"


# ----------------------------------------------------------------------------------------------------------
# The callback, in a real Trainer
# ----------------------------------------------------------------------------------------------------------


def lit_model(strategy: str) -> LitDecoderLM:
    torch.manual_seed(0)
    return LitDecoderLM(
        vocab_size=VOCAB,
        max_positions=32,
        d_model=32,
        num_heads=2,
        num_layers=2,
        d_ff=64,
        strategy=strategy,
        layout="padded",
        warmup_steps=0,
    )


def fit(
    model: LitDecoderLM,
    callback: MaskAudit,
    tmp_path: Path,
    *,
    padding_side: str,
    max_steps: int = 2,
    ckpt_path: str | None = None,
) -> pl.Trainer:
    loader = DataLoader(rows(), batch_size=3, collate_fn=PadCollator(padding_side=padding_side))
    trainer = pl.Trainer(
        max_steps=max_steps,
        accelerator="cpu",
        devices=1,
        callbacks=[callback],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(model, train_dataloaders=loader, val_dataloaders=loader, ckpt_path=ckpt_path)
    return trainer


def test_callback_audits_the_first_batch_before_the_first_optimizer_step(tmp_path: Path) -> None:
    model = lit_model("causal_kpm")
    initial = copy.deepcopy(model)
    callback = MaskAudit()
    trainer = fit(model, callback, tmp_path, padding_side="left")
    assert trainer.global_step == 2 and callback.report is not None and callback.report.passed
    first_batch = PadCollator(padding_side="left")(rows()[:3])
    expected = audit(initial, first_batch)  # the initial weights: step 0, before any update
    assert [c.as_dict() for c in callback.report.checks] == [c.as_dict() for c in expected.checks]
    assert trainer.callback_metrics["audit/passed"] == 1.0 and trainer.callback_metrics["audit/padding"] == 0.0


def test_callback_stops_a_valid_run_that_fails_before_any_update(tmp_path: Path) -> None:
    model = lit_model("causal_only")  # with left padding: a mask bug, had the run not been declared invalid
    initial = copy.deepcopy(model.state_dict())
    with pytest.raises(MaskAuditError, match=r"mask audit FAILED .*padding FAIL.*on_failure=warn to train anyway"):
        fit(model, MaskAudit(), tmp_path, padding_side="left")
    assert all(torch.equal(v, initial[k]) for k, v in model.state_dict().items())  # no optimizer step was taken


def test_callback_records_a_teaching_runs_failure(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    callback = MaskAudit()
    callback.expected_failure = "attention=causal_only ignores the padding mask"
    with caplog.at_level(logging.WARNING, logger="mhaplug.training.callbacks"):
        trainer = fit(lit_model("causal_only"), callback, tmp_path, padding_side="left")
    assert trainer.global_step == 2
    assert callback.report is not None and callback.report.failed == ("padding", "loss")
    assert trainer.callback_metrics["audit/passed"] == 0.0
    assert "as expected for a run that is invalid on purpose" in caplog.text
    warned = MaskAudit(on_failure="warn")  # a valid run told to train anyway
    assert fit(lit_model("causal_only"), warned, tmp_path, padding_side="left").global_step == 2
    assert warned.report is not None and not warned.report.passed


def test_callback_keeps_its_report_across_a_resume_without_auditing_again(tmp_path: Path) -> None:
    first = MaskAudit()
    trainer = fit(lit_model("merged_bool"), first, tmp_path, padding_side="right")
    trainer.save_checkpoint(tmp_path / "step2.ckpt")
    resumed = MaskAudit(seed=123)  # a new audit would perturb differently; a restored report is the same
    resumed_trainer = fit(
        lit_model("merged_bool"),
        resumed,
        tmp_path,
        padding_side="right",
        max_steps=3,
        ckpt_path=str(tmp_path / "step2.ckpt"),
    )
    assert resumed_trainer.global_step == 3
    assert resumed.report == first.report
    assert "audit/passed" not in resumed_trainer.callback_metrics  # nothing audited after step 0


def test_callback_refuses_an_unknown_policy() -> None:
    with pytest.raises(ValueError, match="on_failure must be 'raise' or 'warn', got 'ignore'"):
        MaskAudit(on_failure="ignore")  # type: ignore[arg-type]
