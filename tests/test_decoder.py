"""mhaplug.decoder.DecoderLM: real tokens only, the fused loss and the length buckets give exactly what each
sequence gives alone (no padding, no neighbours), for every strategy and layout that can train it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from mhaplug.attention import unpad
from mhaplug.data.collate import PackCollator, PadCollator
from mhaplug.decoder import DecoderConfig, DecoderLM
from mhaplug.loss import lm_loss_sum

VOCAB, MAX_LENGTH = 50, 32
LENGTHS = (5, 17, 9, 30, 2, 1, 12, 30)
PADDED = ("auto", "reference", "merged_bool", "merged_additive", "causal_kpm")
CASES = [(s, "right") for s in (*PADDED, "causal_only", "torch_mha")] + [(s, "left") for s in PADDED]
CASES += [(s, "packed") for s in ("auto", "reference", "merged_bool", "merged_additive")]


def documents() -> list[list[int]]:
    generator = torch.Generator().manual_seed(0)
    return [torch.randint(1, VOCAB, (n,), generator=generator).tolist() for n in LENGTHS]


def model(strategy: str) -> DecoderLM:
    torch.manual_seed(0)
    config = DecoderConfig(
        vocab_size=VOCAB, max_positions=MAX_LENGTH, d_model=16, num_heads=2, d_ff=32, strategy=strategy
    )
    return DecoderLM(config).double()


def batch_for(layout: str) -> dict:
    rows = [{"input_ids": ids} for ids in documents()]
    if layout == "packed":
        return PackCollator(max_length=MAX_LENGTH)(rows)
    return PadCollator(padding_side=layout)(rows)


def alone(decoder: DecoderLM) -> tuple[Tensor, list[Tensor]]:
    """The reference: each document by itself (B = 1, no mask but causality): summed loss, per-document logits."""
    total, logits = torch.zeros((), dtype=torch.float64), []
    for ids in documents():
        out = decoder(torch.tensor([ids]))[0]  # (n, V)
        total = total + F.cross_entropy(out[:-1], torch.tensor(ids[1:], dtype=torch.int64), reduction="sum")
        logits.append(out)
    return total, logits


def in_batch_order(batch: dict, per_document: list[Tensor]) -> Tensor:
    """Per-document rows (n, V) in the order the batch holds the documents' tokens, row by row."""
    by_ids = {tuple(ids): out for ids, out in zip(documents(), per_document)}
    document_ids = batch.get("document_ids", (~batch["key_padding_mask"]).long() - 1)  # padded: one document a row
    pieces = []
    for ids, docs in zip(batch["input_ids"], document_ids):
        for d in docs[docs >= 0].unique_consecutive():
            pieces.append(by_ids[tuple(ids[docs == d].tolist())])
    return torch.cat(pieces)


@pytest.mark.parametrize(("strategy", "layout"), CASES)
@pytest.mark.parametrize("bucket_cost", [None, 0])
def test_loss_gradients_and_logits_equal_each_document_alone(strategy: str, layout: str, bucket_cost: int | None,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    if bucket_cost is not None:
        monkeypatch.setattr(unpad, "BUCKET_COST", bucket_cost)  # a bucket per distinct length
    decoder, batch = model(strategy), batch_for(layout)
    expected, expected_logits = alone(decoder)
    expected_grads = torch.autograd.grad(expected, list(decoder.parameters()))

    loss = decoder.loss_sum(batch)
    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-10)
    for got, want in zip(torch.autograd.grad(loss, list(decoder.parameters())), expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)

    with torch.no_grad():
        logits = decoder(batch["input_ids"], key_padding_mask=batch["key_padding_mask"],
                         position_ids=batch["position_ids"], document_ids=batch.get("document_ids"))  # fmt: skip
    real = ~batch["key_padding_mask"]
    torch.testing.assert_close(logits[real], in_batch_order(batch, expected_logits), rtol=1e-10, atol=1e-10)
    assert logits[~real].abs().max() == 0.0  # pads are not computed
    torch.testing.assert_close(lm_loss_sum(logits, batch["labels"]), expected.detach(), rtol=1e-10, atol=1e-10)


def test_auto_takes_packed_documents_as_rows_and_merged_bool_uses_one_document_mask() -> None:
    batch = batch_for("packed")
    seen: dict[str, list] = {"auto": [], "merged_bool": []}
    for strategy, calls in seen.items():
        decoder = model(strategy)
        attention = decoder.blocks[0].attn
        forward_tokens = attention.forward_tokens

        def spy(x: Tensor, layouts: tuple, *, attn_mask: object, is_causal: bool, calls: list = calls,
                forward_tokens=forward_tokens) -> Tensor:  # fmt: skip
            calls.append([(lay.batch_size, lay.seq_len) for lay in layouts] + [attn_mask is not None, is_causal])
            return forward_tokens(x, layouts, attn_mask=attn_mask, is_causal=is_causal)

        attention.forward_tokens = spy  # the block calls self.attn.forward_tokens: this instance's spy
        with torch.no_grad():
            decoder.loss_sum(batch)
    batch_size, length = batch["input_ids"].shape
    assert seen["merged_bool"] == [[(batch_size, length), True, False]]  # (B, 1, L, L) document mask, no causal flag
    assert seen["auto"] == [[(len(LENGTHS), max(LENGTHS)), False, True]]  # 8 documents as rows, causal kernel


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile:UserWarning")
@pytest.mark.parametrize("layout", ["right", "left", "packed"])
def test_flex_forward_builds_its_block_mask_from_predicates_and_equals_reference(
    layout: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """flex (forward only on the CPU): the BlockMask comes from and_masks of predicates on document_ids or
    key_padding_mask, never from a dense (B, 1, L, L) keep tensor, and the real logits equal reference's."""
    from mhaplug.attention import masks

    batch = batch_for(layout)

    def logits_of(decoder: DecoderLM) -> Tensor:
        with torch.no_grad():
            return decoder(batch["input_ids"], key_padding_mask=batch["key_padding_mask"],
                           position_ids=batch["position_ids"], document_ids=batch.get("document_ids"))  # fmt: skip

    logits = {"reference": logits_of(model("reference"))}
    monkeypatch.setattr(masks, "document_causal_keep", None)  # calling it would raise: flex must not build it
    logits["flex"] = logits_of(model("flex"))
    real = ~batch["key_padding_mask"]
    torch.testing.assert_close(logits["flex"][real], logits["reference"][real], rtol=1e-10, atol=1e-10)


def test_token_index_given_computes_exactly_those_positions() -> None:
    """What mhaplug.audit does: every position computed, pads included, with the same real logits."""
    decoder, batch = model("auto"), batch_for("right")
    everything = torch.arange(batch["input_ids"].numel())
    with torch.no_grad():
        full = decoder(batch["input_ids"], key_padding_mask=batch["key_padding_mask"], token_index=everything)
        real_only = decoder(batch["input_ids"], key_padding_mask=batch["key_padding_mask"])
    real = ~batch["key_padding_mask"]
    torch.testing.assert_close(full[real], real_only[real], rtol=1e-10, atol=1e-10)
    assert full[~real].abs().min() > 0.0  # pads computed this time


def test_compile_switch_compiles_the_feed_forward_and_keeps_loss_gradients_and_state_dict() -> None:
    from torch._dynamo.utils import counters

    batch = batch_for("right")
    eager = model("auto")
    torch.manual_seed(0)
    config = DecoderConfig(vocab_size=VOCAB, max_positions=MAX_LENGTH, d_model=16, num_heads=2, d_ff=32, compile=True)
    compiled = DecoderLM(config).double()
    assert list(compiled.state_dict()) == list(eager.state_dict())
    compiled.load_state_dict(eager.state_dict())
    captured = counters["stats"]["calls_captured"]
    expected, got = eager.loss_sum(batch), compiled.loss_sum(batch)
    assert counters["stats"]["calls_captured"] > captured  # Dynamo traced the blocks' feed-forward
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
    for a, b in zip(
        torch.autograd.grad(got, list(compiled.parameters())), torch.autograd.grad(expected, list(eager.parameters()))
    ):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)


def test_off_the_cpu_the_real_tokens_are_found_before_the_transfer() -> None:
    """On an accelerator, ``token_index`` is built on the CPU (no sync); on the CPU the model plans its buckets.
    TextDataModule.on_before_batch_transfer calls this with the trainer's device."""
    from mhaplug.attention.unpad import add_token_index

    padded = PadCollator()([{"input_ids": [5]}, {"input_ids": [8, 9, 7]}])  # (2, 3): a . . / b b b
    full = PadCollator()([{"input_ids": [5, 6]}, {"input_ids": [8, 9]}])  # no padding
    assert "token_index" not in add_token_index(dict(padded), torch.device("cpu"))
    assert add_token_index(dict(padded), torch.device("meta"))["token_index"].tolist() == [0, 3, 4, 5]
    assert add_token_index(dict(full), torch.device("meta"))["token_index"].tolist() == [0, 1, 2, 3]


def relabelled(batch: dict, ids_of: object) -> dict:
    """The batch with each row's document ids d (d >= 0) replaced by ids_of(d): the same documents, other ids."""
    document_ids = batch["document_ids"]
    return {**batch, "document_ids": torch.where(document_ids >= 0, ids_of(document_ids), document_ids)}


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile:UserWarning")
@pytest.mark.parametrize("strategy", ["auto", "reference", "merged_bool", "merged_additive", "flex"])
def test_a_document_is_a_contiguous_run_of_one_id_in_every_strategy(strategy: str) -> None:
    """Ids shifted (5, 6, ...), or coming back in a row (0 1 0 1 ...): the same documents, the same logits. Before,
    merged_bool, merged_additive, reference and flex let a returning id attend its first run (0.2 apart)."""
    batch = PackCollator(max_length=MAX_LENGTH)([{"input_ids": documents()[i]} for i in (0, 1, 2, 4, 5, 6)])
    assert batch["document_ids"].amax(-1).tolist() == [3, 1]  # four documents in a row: parity makes ids return
    decoder = model(strategy)

    def logits_of(b: dict) -> Tensor:
        with torch.no_grad():
            return decoder(b["input_ids"], key_padding_mask=b["key_padding_mask"], position_ids=b["position_ids"],
                           document_ids=b["document_ids"])  # fmt: skip

    expected = logits_of(batch)
    real = ~batch["key_padding_mask"]
    for ids_of in (lambda d: d + 5, lambda d: d % 2, lambda d: 7 - 3 * (d % 2)):
        torch.testing.assert_close(logits_of(relabelled(batch, ids_of))[real], expected[real], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            {"input_ids": [[3, VOCAB, 4]]},
            rf"input_ids \[{VOCAB}\] \(first of 1, real tokens\) are outside \[0, vocab_size={VOCAB}\)",
        ),
        ({"input_ids": [[3, -2, 4]]}, r"input_ids \[-2\] .* outside \[0, vocab_size=50\); tokenise with the model's"),
        ({"position_ids": [[0, 1, MAX_LENGTH]]}, rf"position_ids \[{MAX_LENGTH}\] .* outside \[0, max_positions=32\)"),
    ],
)
def test_ids_and_positions_outside_the_model_are_named_not_a_bare_index_error(change: dict, message: str) -> None:
    decoder = model("auto")
    args = {"input_ids": [[3, 5, 4]], "position_ids": [[0, 1, 2]], **change}
    with pytest.raises(ValueError, match=message):
        decoder(torch.tensor(args["input_ids"]), position_ids=torch.tensor(args["position_ids"]))
    with pytest.raises(ValueError, match=rf"input_ids \[{VOCAB}, {VOCAB + 1}\] \(first of 2"):
        decoder(torch.tensor([[VOCAB] * 1 + [VOCAB + 1]]))  # no positions given: 0, 1
    # the pad of a padded row may hold any id: only real tokens are embedded
    logits = decoder(torch.tensor([[3, 999]]), key_padding_mask=torch.tensor([[False, True]]))
    assert logits.shape == (1, 2, VOCAB)
