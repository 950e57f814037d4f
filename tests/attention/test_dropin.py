"""mhaplug.MultiheadAttention where users put it: the capability table, ``auto``, torch's ``is_causal`` hint,
``nn.Transformer*`` models after ``swap_attention`` (training and eval), and the compilers."""

from __future__ import annotations

import copy
import dataclasses
import subprocess
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from unittest.mock import patch

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import mhaplug
from mhaplug import MultiheadAttention
from mhaplug import attention as attention_module
from mhaplug.attention import CAPABILITIES, STRATEGIES, capability_table, masks, strategies_where, swap_attention

E, H = 16, 4
INF = float("-inf")
README = Path(__file__).resolve().parents[2] / "README.md"


def twin(strategy: str, like: MultiheadAttention | None = None, **kwargs: object) -> MultiheadAttention:
    """A layer with ``strategy`` and, if given, ``like``'s weights."""
    mha = MultiheadAttention(E, H, batch_first=True, strategy=strategy, **kwargs)  # type: ignore[arg-type]
    if like is not None:
        mha.load_state_dict(like.state_dict())
    return mha


def run(mha: MultiheadAttention, x: Tensor, **call: object) -> tuple[Tensor, list[Tensor]]:
    """Output and the gradients (input, parameters) of a square loss, on a fresh copy of ``x``."""
    x = x.detach().clone().requires_grad_()
    out, _ = mha(x, x, x, need_weights=False, **call)
    out.square().sum().backward()
    return out, [x.grad, *(p.grad for p in mha.parameters())]  # type: ignore[list-item]


def assert_same(a: tuple[Tensor, list[Tensor]], b: tuple[Tensor, list[Tensor]], tol: float = 1e-5) -> None:
    torch.testing.assert_close(a[0], b[0], atol=tol, rtol=tol)
    for got, expected in zip(a[1], b[1], strict=True):
        torch.testing.assert_close(got, expected, atol=tol, rtol=tol)


@contextmanager
def sdpa_masks() -> Iterator[list[Tensor | None]]:
    """The ``attn_mask`` of every ``F.scaled_dot_product_attention`` call made inside the block."""
    seen: list[Tensor | None] = []
    sdpa = F.scaled_dot_product_attention

    def spy(*args: object, **kwargs: object) -> Tensor:
        seen.append(kwargs.get("attn_mask"))  # type: ignore[arg-type]
        return sdpa(*args, **kwargs)  # type: ignore[arg-type]

    with patch.object(F, "scaled_dot_product_attention", spy):
        yield seen


def left_padded(batch: int = 3, length: int = 7) -> Tensor:
    return masks.is_pad_from_lengths(torch.tensor([length, 4, 1][:batch]), length, padding_side="left")


# ----------------------------------------------------------------------------------------------------------
# The capability table: every flag is what the strategy does
# ----------------------------------------------------------------------------------------------------------


def test_capability_rows_literal() -> None:
    flags = (
        "needs_is_causal",
        "document_masks",
        "left_padding",
        "trains_on_cpu",
        "dropout",
        "returns_weights",
        "empty_rows_zero",
    )
    table = {name: tuple(getattr(caps, f) for f in flags) for name, caps in CAPABILITIES.items()}
    assert table == {
        "auto": (False, True, True, True, True, True, True),
        "reference": (False, True, True, True, True, True, True),
        "torch_mha": (False, True, True, True, True, True, False),
        "merged_bool": (False, True, True, True, True, True, True),
        "merged_additive": (False, True, True, True, True, True, True),
        "causal_kpm": (True, False, True, True, True, True, True),
        "causal_only": (True, False, False, True, True, True, True),
        "flex": (False, True, True, False, False, True, True),
    }
    assert STRATEGIES == tuple(CAPABILITIES) and mhaplug.STRATEGIES == STRATEGIES
    assert strategies_where(needs_is_causal=True) == ("causal_kpm", "causal_only")


def test_readme_shows_the_capability_table() -> None:
    assert capability_table() in README.read_text(), "README's strategy table differs: paste capability_table()"


def test_strategy_configs_are_the_table() -> None:
    folder = Path(__file__).resolve().parents[2] / "configs" / "attention"
    files = {p.stem: p.read_text() for p in folder.glob("*.yaml")}
    assert set(files) == set(STRATEGIES)
    for name, text in files.items():
        assert f"strategy: {name}\n" in text


FLEX_EAGER = "ignore:flex_attention called without torch.compile:UserWarning"  # flex's CPU forward is for checking


@pytest.mark.filterwarnings(FLEX_EAGER)
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_needs_is_causal(strategy: str) -> None:
    mha = twin(strategy)
    x = torch.randn(2, 5, E)
    with torch.no_grad():
        if CAPABILITIES[strategy].needs_is_causal:
            with pytest.raises(ValueError, match="needs is_causal=True"):
                mha(x, x, x, need_weights=False)
        else:
            out, _ = mha(x, x, x, need_weights=False)
            expected, _ = twin("reference", mha)(x, x, x, need_weights=False)
            torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.filterwarnings(FLEX_EAGER)
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_document_masks_in_the_model(strategy: str) -> None:
    """DecoderLM hands packed rows a document-causal mask: equal to reference, or refused before it is wrong."""
    from mhaplug.decoder import DecoderConfig, DecoderLM

    document_ids = torch.tensor([[0, 0, 0, 1, 1, 2, -1, -1], [0, 0, 0, 0, 1, 1, 1, -1]])
    input_ids = torch.randint(0, 32, (2, 8))
    positions = torch.tensor([[0, 1, 2, 0, 1, 0, 0, 0], [0, 1, 2, 3, 0, 1, 2, 0]])

    def logits(name: str) -> Tensor:
        torch.manual_seed(0)
        model = DecoderLM(DecoderConfig(vocab_size=32, max_positions=8, d_model=E, num_heads=H, strategy=name))
        with torch.no_grad():  # training mode, no dropout: torch_mha's eval fast path would give NaN rows
            return model(input_ids, position_ids=positions, document_ids=document_ids)

    if not CAPABILITIES[strategy].document_masks:
        with pytest.raises(ValueError, match="packed rows need a document mask"):
            logits(strategy)
        return
    real = document_ids >= 0
    torch.testing.assert_close(logits(strategy)[real], logits("reference")[real], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("strategy", [s for s in STRATEGIES if CAPABILITIES[s].trains_on_cpu])
def test_left_padding(strategy: str) -> None:
    x, kpm = torch.randn(3, 7, E), left_padded()
    mha = twin(strategy)
    if not CAPABILITIES[strategy].left_padding:
        with pytest.raises(ValueError, match="has a pad before a real token"):
            run(mha, x, key_padding_mask=kpm, is_causal=True)
        return
    real = ~kpm  # torch_mha leaves NaN in fully masked rows; real rows are finite everywhere
    ours, ref = (
        mha(x, x, x, key_padding_mask=kpm, is_causal=True, need_weights=False)[0],
        twin("reference", mha)(x, x, x, key_padding_mask=kpm, is_causal=True, need_weights=False)[0],
    )
    torch.testing.assert_close(ours[real], ref[real], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_trains_on_cpu_and_dropout(strategy: str) -> None:
    caps = CAPABILITIES[strategy]
    x = torch.randn(2, 5, E)
    call = {"is_causal": True} if caps.needs_is_causal else {}
    mha = twin(strategy)
    if not caps.trains_on_cpu:
        with pytest.raises(NotImplementedError, match="no backward on CPU"):
            run(mha, x, **call)
    else:
        assert_same(run(mha, x, **call), run(twin("reference", mha), x, **call))
    mha = twin(strategy, dropout=0.5)
    if not caps.dropout:
        with pytest.raises(ValueError, match="has no attention dropout"):
            mha(x, x, x, need_weights=False, **call)
        return
    if caps.trains_on_cpu:  # dropout drops: the output moves between two calls, and stays finite
        first, second = (mha(x, x, x, need_weights=False, **call)[0] for _ in range(2))
        assert first.isfinite().all() and (first - second).abs().amax() > 1e-3


@pytest.mark.filterwarnings(FLEX_EAGER)
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_returns_weights_and_empty_rows(strategy: str) -> None:
    caps = CAPABILITIES[strategy]
    kpm = masks.is_pad_from_lengths(torch.tensor([6, 3, 0]), 6, padding_side="right")  # row 2: nothing to see
    x = torch.randn(3, 6, E)
    mha = twin(strategy)
    with torch.no_grad():
        out, weights = mha(x, x, x, key_padding_mask=kpm, is_causal=True)
    assert caps.returns_weights == (weights is not None)
    assert weights is not None
    if not caps.left_padding:  # causal_only ignores padding: no row is empty, every row sums to 1
        torch.testing.assert_close(weights.sum(-1), torch.ones(3, 6))
    elif caps.empty_rows_zero:
        assert torch.equal(weights[2], torch.zeros(6, 6)) and torch.equal(out[2], mha.out_proj.bias.expand(6, E))
    else:
        assert weights[2].isnan().all() and out[2].isnan().all()  # torch's own behaviour, kept for teaching


# ----------------------------------------------------------------------------------------------------------
# auto: the causal kernel for causal calls, merged_bool for the rest, and last_dispatch says which
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("call", "dispatch"),
    [
        ({"is_causal": True}, "causal_kpm"),
        ({"is_causal": True, "key_padding_mask": "left"}, "causal_kpm"),
        ({"key_padding_mask": "left"}, "merged_bool"),
        ({"attn_mask": "document"}, "merged_bool"),
        ({"attn_mask": "per_head", "is_causal": True, "key_padding_mask": "left"}, "causal_kpm"),
    ],
    ids=["causal", "causal+kpm", "kpm", "documents", "per_head+causal+kpm"],
)
def test_auto_dispatch_and_equals_reference(call: dict, dispatch: str) -> None:
    kpm = left_padded()
    values = {
        "left": kpm,
        "document": masks.is_masked_from_keep(masks.document_causal_keep(torch.tensor([[0, 0, 1, 1, 1, 2, -1]] * 3))),
        "per_head": torch.rand(3 * H, 7, 7) < 0.3,
    }
    call = {k: values.get(v, v) if isinstance(v, str) else v for k, v in call.items()}
    mha = twin("auto")
    x = torch.randn(3, 7, E)
    assert_same(run(mha, x, **call), run(twin("reference", mha), x, **call))
    assert mha.last_dispatch == dispatch


def test_auto_falls_back_with_dropout_on_cpu() -> None:
    mha = twin("auto", dropout=0.5)
    x, kpm = torch.randn(3, 7, E), left_padded()
    mha(x, x, x, key_padding_mask=kpm, is_causal=True, need_weights=False)
    assert mha.last_dispatch == "merged_bool"  # CPU SDPA's math backend (dropout) cannot take causal + mask


# ----------------------------------------------------------------------------------------------------------
# is_causal=True with a 2-D attn_mask: torch's hint that the mask is causal
# ----------------------------------------------------------------------------------------------------------


def causal_float(length: int) -> Tensor:
    return nn.Transformer.generate_square_subsequent_mask(length)  # 0 / -inf, as nn.Transformer users write it


@pytest.mark.parametrize("strategy", ["auto", "causal_kpm", "causal_only"])
@pytest.mark.parametrize("mask_kind", ["float", "bool", "finfo_min"])
def test_causal_hint_gives_the_kernel_only_the_padding_vector(strategy: str, mask_kind: str) -> None:
    length = 7
    causal = {
        "float": causal_float(length),
        "bool": ~masks.causal_keep(length, length),
        "finfo_min": torch.zeros(length, length).masked_fill(~masks.causal_keep(length, length), torch.finfo().min),
    }[mask_kind]
    kpm = None if strategy == "causal_only" else left_padded()
    x = torch.randn(3, length, E)
    mha = twin(strategy)
    with sdpa_masks() as seen:
        got = run(mha, x, key_padding_mask=kpm, attn_mask=causal, is_causal=True)
    expected = run(twin("reference", mha), x, key_padding_mask=kpm, is_causal=True)
    assert_same(got, expected)
    assert mha.last_dispatch == ("causal_only" if strategy == "causal_only" else "causal_kpm")
    # O(B*S): a (B, 1, 1, S) padding vector (or nothing), never L x S
    assert [None if m is None else tuple(m.shape) for m in seen] == [None if kpm is None else (3, 1, 1, length)]


@pytest.mark.parametrize("strategy", ["auto", "causal_kpm", "causal_only"])
@pytest.mark.parametrize("need_weights", [False, True])
def test_causal_hint_refuses_a_mask_that_is_not_causal(strategy: str, need_weights: bool) -> None:
    window = causal_float(5).masked_fill(~masks.causal_keep(5, 5).triu(-1), INF)  # sliding window of 2: not causal
    x = torch.randn(2, 5, E)
    with pytest.raises(ValueError, match=r"this attn_mask is not causal.*Pass is_causal=False.*strategy='merged_bool'"):
        twin(strategy)(x, x, x, attn_mask=window, is_causal=True, need_weights=need_weights)


@pytest.mark.parametrize("strategy", ["merged_bool", "merged_additive", "reference"])
def test_merged_strategies_intersect_the_mask_with_causal(strategy: str) -> None:
    window = causal_float(5).masked_fill(~masks.causal_keep(5, 5).triu(-1), INF)
    both = window.masked_fill(~masks.causal_keep(5, 5), INF)
    x = torch.randn(2, 5, E)
    mha = twin(strategy)
    assert_same(run(mha, x, attn_mask=window, is_causal=True), run(twin("reference", mha), x, attn_mask=both))


def test_causal_hint_is_checked_on_every_call(monkeypatch: pytest.MonkeyPatch) -> None:
    """nn.TransformerDecoder passes one tgt_mask to every layer: each call checks it (a verdict remembered per tensor
    and version went stale through .data or shared numpy memory: test_strategies.py)."""
    calls = []
    check = masks.is_causal_attn_mask
    monkeypatch.setattr(masks, "is_causal_attn_mask", lambda m: calls.append(1) or check(m))
    mask, x = causal_float(6), torch.randn(2, 6, E)
    mha = twin("auto")
    for _ in range(3):
        mha(x, x, x, attn_mask=mask, is_causal=True, need_weights=False)
    assert len(calls) == 3
    mask[0, 1] = 0.0
    with pytest.raises(ValueError, match="not causal"):
        mha(x, x, x, attn_mask=mask, is_causal=True, need_weights=False)


def test_causal_hint_check_reads_no_value_off_the_cpu() -> None:
    """On the meta device (like an accelerator, reading a value raises) the check is a device-side assert."""
    mha = MultiheadAttention(E, H, batch_first=True, strategy="auto", device="meta")
    x = torch.randn(2, 6, E, device="meta")
    out, _ = mha(x, x, x, attn_mask=causal_float(6).to("meta"), is_causal=True, need_weights=False)
    assert out.shape == (2, 6, E)


def test_is_causal_attn_mask_literals() -> None:
    open_, shut = 0.0, INF
    assert bool(
        masks.is_causal_attn_mask(torch.tensor([[open_, shut, shut], [open_, open_, shut], [open_, open_, open_]]))
    )
    assert bool(masks.is_causal_attn_mask(torch.tensor([[False, True, True], [False, False, True]])))  # L=2, S=3
    assert not bool(masks.is_causal_attn_mask(torch.tensor([[open_, shut], [0.5, open_]])))  # a bias below
    assert not bool(masks.is_causal_attn_mask(torch.tensor([[False, False], [False, False]])))  # nothing masked
    assert not bool(masks.is_causal_attn_mask(torch.tensor([[open_, shut], [shut, open_]])))  # diagonal only


# ----------------------------------------------------------------------------------------------------------
# need_weights=True: weights as torch's, 0 in rows that see nothing, per head where emptiness is per head
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("average", [True, False])
def test_weights_with_rows_empty_in_some_heads(average: bool) -> None:
    per_head = torch.zeros(2 * H, 4, 4, dtype=torch.bool)
    per_head[0, 1] = True  # batch 0, head 0, query 1: sees nothing
    x = torch.randn(2, 4, E)
    mha = twin("merged_bool")
    _, weights = mha(x, x, x, attn_mask=per_head, average_attn_weights=average)
    _, per_head_weights = mha(x, x, x, attn_mask=per_head, average_attn_weights=False)
    assert per_head_weights is not None and torch.equal(per_head_weights[0, 0, 1], torch.zeros(4))
    q, k, _ = F.linear(x, mha.in_proj_weight, mha.in_proj_bias).chunk(3, -1)
    q, k = (t.view(2, 4, H, -1).transpose(1, 2) for t in (q, k))  # (B, H, L, D)
    scores = (q @ k.transpose(-2, -1) / (E // H) ** 0.5).masked_fill(per_head.view(2, H, 4, 4), INF)
    manual = scores.softmax(-1).nan_to_num(0.0)  # (B, H, L, S): the empty row is 0
    torch.testing.assert_close(weights, manual.mean(1) if average else manual, atol=1e-6, rtol=1e-6)


# ----------------------------------------------------------------------------------------------------------
# swap_attention and nn.Transformer*
# ----------------------------------------------------------------------------------------------------------


def test_swap_attention_replaces_every_layer_and_keeps_the_parameters() -> None:
    model = nn.Transformer(
        d_model=E,
        nhead=H,
        num_encoder_layers=1,
        num_decoder_layers=1,
        dim_feedforward=32,
        dropout=0.0,
        batch_first=True,
        dtype=torch.float64,
    )
    before = dict(model.named_parameters())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    changed = swap_attention(model)
    assert changed == {
        "encoder": "nested-tensor fast path off",
        "encoder.layers.0.self_attn": "torch.nn.MultiheadAttention",
        "decoder.layers.0.self_attn": "torch.nn.MultiheadAttention",
        "decoder.layers.0.multihead_attn": "torch.nn.MultiheadAttention",
    }
    after = dict(model.named_parameters())
    assert list(after) == list(before) and all(after[n] is before[n] for n in before)  # the same objects
    assert all(
        isinstance(m, MultiheadAttention) and m.strategy == "auto"
        for m in (
            model.encoder.layers[0].self_attn,
            model.decoder.layers[0].self_attn,
            model.decoder.layers[0].multihead_attn,
        )
    )
    assert model.encoder.layers[0].self_attn.in_proj_weight.dtype == torch.float64
    fresh = nn.Transformer(
        d_model=E, nhead=H, num_encoder_layers=1, num_decoder_layers=1, dim_feedforward=32, batch_first=True
    )
    fresh.load_state_dict(model.state_dict(), strict=True)  # torch's keys, both ways
    src, tgt = torch.randn(2, 5, E, dtype=torch.float64), torch.randn(2, 4, E, dtype=torch.float64)
    model(src, tgt).sum().backward()
    weight = model.decoder.layers[0].multihead_attn.in_proj_weight
    old = weight.detach().clone()
    optimizer.step()  # the optimizer built before the swap still trains the swapped layers
    assert not torch.equal(weight, old)
    assert swap_attention(model, "merged_bool") == {
        "encoder.layers.0.self_attn": "mhaplug.MultiheadAttention(strategy='auto')",
        "decoder.layers.0.self_attn": "mhaplug.MultiheadAttention(strategy='auto')",
        "decoder.layers.0.multihead_attn": "mhaplug.MultiheadAttention(strategy='auto')",
    }


def test_swap_attention_errors() -> None:
    with pytest.raises(TypeError, match=r"for a bare nn.MultiheadAttention use mhaplug.MultiheadAttention.from_torch"):
        swap_attention(nn.MultiheadAttention(E, H))
    with pytest.raises(ValueError, match="strategy must be one of auto, reference"):
        swap_attention(nn.Sequential(), "fast")


def as_float(is_masked: Tensor) -> Tensor:
    return torch.zeros(is_masked.shape).masked_fill(is_masked, INF)


def transformer_batch(length: int = 6) -> tuple[Tensor, Tensor, Tensor]:
    """Left-padded src (B, L, E) with its padding mask and a causal mask (L, L), both float 0 / -inf (torch
    deprecates mixing a bool and a float mask)."""
    kpm = masks.is_pad_from_lengths(torch.tensor([length, 3, 1]), length, padding_side="left")
    return torch.randn(3, length, E), as_float(kpm), causal_float(length)


def test_encoder_eval_runs_the_strategy_with_no_nan_rows() -> None:
    """torch's eval fast path (nested tensors, then _transformer_encoder_layer_fwd) skips the attention module
    and gives NaN rows for left padding + causal; after swap_attention eval runs mhaplug, as training does."""
    layer = nn.TransformerEncoderLayer(E, H, dim_feedforward=32, dropout=0.0, batch_first=True)
    encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=True).eval()
    src, kpm, causal = transformer_batch()
    with torch.no_grad():
        torch_out = encoder(src, mask=causal, src_key_padding_mask=kpm, is_causal=True)
    assert torch_out[1:, 0].isnan().all()  # torch: the leading pad rows, and with them, rows after them
    swap_attention(encoder)
    with torch.no_grad():
        eval_out = encoder(src, mask=causal, src_key_padding_mask=kpm, is_causal=True)
        no_mask_eval = encoder(src, src_key_padding_mask=kpm)  # torch's nested-tensor fast path would apply here
    assert encoder.layers[0].self_attn.last_dispatch == "merged_bool"  # forward ran (no causal: merged_bool)
    encoder.train()
    with torch.no_grad():
        train_out = encoder(src, mask=causal, src_key_padding_mask=kpm, is_causal=True)
        no_mask_train = encoder(src, src_key_padding_mask=kpm)
    assert eval_out.isfinite().all() and torch.equal(eval_out, train_out)
    assert torch.equal(no_mask_eval, no_mask_train)


def test_hand_swapped_encoder_layer_is_not_bypassed_and_serves_nested_input() -> None:
    """A layer put in by hand (no swap_attention): the encoder layer's fast path does not bypass it, and the nested
    tensor nn.TransformerEncoder makes in eval reaches it and is served, with torch's numbers."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(E, H, dim_feedforward=32, dropout=0.0, batch_first=True)
    torch_encoder = nn.TransformerEncoder(copy.deepcopy(layer), num_layers=1, enable_nested_tensor=True).eval()
    layer.self_attn = MultiheadAttention.from_torch(layer.self_attn)
    src = torch.randn(3, 6, E)
    kpm = masks.is_pad_from_lengths(torch.tensor([6, 3, 1]), 6)  # right padding: torch's nested-tensor path takes it
    layer.eval()
    with torch.no_grad():
        layer(src, src_key_padding_mask=kpm)
    assert layer.self_attn.last_dispatch == "merged_bool"  # the layer's fast path did not bypass it
    encoder = nn.TransformerEncoder(layer, num_layers=1, enable_nested_tensor=True).eval()
    nested_seen: list[bool] = []
    encoder.layers[0].self_attn.register_forward_pre_hook(lambda _, args: nested_seen.append(args[0].is_nested))
    with torch.no_grad(), warnings.catch_warnings():
        # torch's own warning as its encoder makes the nested tensor
        warnings.filterwarnings("ignore", "The PyTorch API of nested tensors is in prototype stage", UserWarning)
        got = encoder(src, src_key_padding_mask=kpm)
        expected = torch_encoder(src, src_key_padding_mask=kpm)
    assert nested_seen == [True]
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("strategy", ["auto", "merged_bool"])
def test_transformer_decoder_after_swap_equals_torch_on_real_rows(strategy: str) -> None:
    """nn.TransformerDecoder passes tgt_mask + tgt_is_causal + float key padding masks: same numbers as torch
    where torch is finite (right padding, so no empty rows), and auto never builds an L x S mask."""
    torch.manual_seed(0)
    decoder = nn.TransformerDecoder(
        nn.TransformerDecoderLayer(E, H, dim_feedforward=32, dropout=0.0, batch_first=True), num_layers=2
    )
    tgt, memory = torch.randn(3, 6, E), torch.randn(3, 5, E)
    tgt_kpm = masks.is_pad_from_lengths(torch.tensor([6, 4, 2]), 6)
    mem_kpm = masks.is_pad_from_lengths(torch.tensor([5, 5, 3]), 5)
    call = {
        "tgt_mask": causal_float(6),
        "tgt_is_causal": True,
        "tgt_key_padding_mask": as_float(tgt_kpm),
        "memory_key_padding_mask": as_float(mem_kpm),
    }
    expected = decoder(tgt, memory, **call)
    swap_attention(decoder, strategy)
    with sdpa_masks() as seen:
        got = decoder(tgt, memory, **call)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    if strategy == "auto":  # self-attention: (B, 1, 1, S) padding with is_causal; cross-attention: (B, 1, 1, S)
        assert [tuple(m.shape) for m in seen] == [(3, 1, 1, 6), (3, 1, 1, 5)] * 2
        assert decoder.layers[0].self_attn.last_dispatch == "causal_kpm"
        assert decoder.layers[0].multihead_attn.last_dispatch == "merged_bool"


# ----------------------------------------------------------------------------------------------------------
# Compilers: torch.compile(fullgraph=True) and torch.export(strict=True) work; torch.jit.script says no, at once
# ----------------------------------------------------------------------------------------------------------


class SelfAttention(nn.Module):
    def __init__(self, strategy: str) -> None:
        super().__init__()
        self.attn = MultiheadAttention(E, H, batch_first=True, strategy=strategy)

    def forward(self, x: Tensor, key_padding_mask: Tensor, attn_mask: Tensor) -> Tensor:
        return self.attn(
            x, x, x, key_padding_mask=key_padding_mask, attn_mask=attn_mask, is_causal=True, need_weights=False
        )[0]


def compiler_inputs(mask_dtype: str) -> tuple[Tensor, Tensor, Tensor]:
    x, kpm, causal = transformer_batch()
    if mask_dtype == "float":  # what nn.TransformerEncoderLayer passes: both masks float
        return x, kpm, causal
    return x, ~masks.keep_from_additive(kpm), ~masks.causal_keep(6, 6)


@pytest.mark.parametrize("strategy", ["auto", "reference", "merged_bool", "merged_additive", "causal_kpm"])
@pytest.mark.parametrize("mask_dtype", ["bool", "float"])
def test_torch_compile_fullgraph(strategy: str, mask_dtype: str) -> None:
    torch._dynamo.reset()
    module = SelfAttention(strategy).eval()
    args = compiler_inputs(mask_dtype)
    with torch.no_grad():
        expected = module(*args)
        got = torch.compile(module, fullgraph=True, backend="eager")(*args)  # fullgraph: no graph break anywhere
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("strategy", ["auto", "reference", "merged_bool", "merged_additive", "causal_kpm"])
@pytest.mark.parametrize("mask_dtype", ["bool", "float"])
def test_torch_export_strict(strategy: str, mask_dtype: str) -> None:
    module = SelfAttention(strategy).eval()
    args = compiler_inputs(mask_dtype)
    program = torch.export.export(module, args, strict=True)
    with torch.no_grad():
        torch.testing.assert_close(program.module()(*args), module(*args), atol=1e-6, rtol=1e-6)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")  # Inductor's imports
def test_torch_compile_inductor_trains_like_eager() -> None:
    """The real compiler (Inductor), forward and backward, auto with a float causal hint and float padding."""
    torch._dynamo.reset()
    module = SelfAttention("auto")
    compiled = torch.compile(module, fullgraph=True)
    x, kpm, causal = compiler_inputs("float")
    results = []
    for fn in (module, compiled):
        x_ = x.clone().requires_grad_()
        out = fn(x_, kpm, causal)
        out.square().sum().backward()
        results.append((out, [x_.grad, *(p.grad.clone() for p in module.parameters())]))
        module.zero_grad()
    assert_same(*results, tol=1e-5)


@pytest.mark.filterwarnings("ignore:`torch.jit.script:DeprecationWarning")  # torch's own, before ours
def test_jit_script_fails_at_once_naming_what_works() -> None:
    with pytest.raises(
        NotImplementedError, match=r"does not support torch.jit.script.*use torch.compile\(model\) or torch.export"
    ):
        torch.jit.script(SelfAttention("auto"))


def test_capabilities_are_frozen_and_auto_is_the_default() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        CAPABILITIES["auto"].dropout = False  # type: ignore[misc]
    assert attention_module.DEFAULT_STRATEGY == "auto" == MultiheadAttention(E, H).strategy


@pytest.mark.parametrize("need_weights", [True, False])
def test_a_learned_float_mask_gets_torch_gradient(need_weights: bool) -> None:
    """A float attn_mask that requires grad (a learned bias) is added out of place: its gradient is torch's."""
    ref = nn.MultiheadAttention(E, H, batch_first=True)
    ours = MultiheadAttention(E, H, batch_first=True, strategy="merged_additive")
    ours.load_state_dict(ref.state_dict())
    x, learned = torch.randn(2, 5, E), torch.randn(5, 5).masked_fill(~masks.causal_keep(5, 5), INF)
    grads = []
    for mha in (ours, ref):
        bias = learned.clone().requires_grad_()
        out, _ = mha(x, x, x, attn_mask=bias, need_weights=need_weights)
        out.square().sum().backward()
        grads.append(bias.grad.masked_fill(~masks.causal_keep(5, 5), 0.0))
    torch.testing.assert_close(grads[0], grads[1], atol=1e-5, rtol=1e-5)
    assert grads[0].abs().sum() > 0


@pytest.mark.parametrize("average", [True, False])
def test_causal_only_weights_across_lengths(average: bool) -> None:
    """L != S: the weights follow the top-left causal mask, averaged or per head (a shape bug, found by the
    differential check against torch)."""
    ours = twin("causal_only")
    q, kv = torch.randn(1, 3, E), torch.randn(1, 5, E)
    _, weights = ours(q, kv, kv, is_causal=True, average_attn_weights=average)
    _, expected = twin("reference", ours)(q, kv, kv, attn_mask=~masks.causal_keep(3, 5), average_attn_weights=average)
    assert weights is not None and weights.shape == ((1, 3, 5) if average else (1, H, 3, 5))
    torch.testing.assert_close(weights, expected, atol=1e-6, rtol=1e-6)


def test_importing_mhaplug_stays_light() -> None:
    """Collator users do not pay for torch.compile's machinery: torch._dynamo loads with the first layer."""
    code = "import sys, mhaplug; assert 'torch._dynamo' not in sys.modules; mhaplug.MultiheadAttention(8, 2)"
    code += "; assert 'torch._dynamo' in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
