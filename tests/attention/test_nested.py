"""Nested tensors in, nested tensors out: mhaplug.MultiheadAttention against torch's own nn.MultiheadAttention
(which takes strided nested input on its inference fast path) and against nn.TransformerEncoder with torch's layer
(which makes the nested tensors), for strided and jagged layouts, every strategy that serves the call."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
from torch import Tensor, nn

from mhaplug import MultiheadAttention
from mhaplug.attention import CAPABILITIES, STRATEGIES, masks, strategies_where

E, H = 16, 4
LENGTHS = [5, 1, 3, 1]  # length-1 rows included; the longest is 5
NON_CAUSAL = strategies_where(needs_is_causal=False)  # auto, reference, torch_mha, merged_bool, merged_additive, flex
LAYOUTS = [torch.strided, torch.jagged]
FLEX_EAGER = "ignore:flex_attention called without torch.compile:UserWarning"  # flex's CPU forward is for checking
TOL = {"atol": 1e-5, "rtol": 1e-5}


@contextmanager
def nested_prototype_ok() -> Iterator[None]:
    """torch warns on every strided nested tensor it makes (the encoder's own included); only that warning."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "The PyTorch API of nested tensors is in prototype stage", UserWarning)
        yield


def nest(padded: Tensor, lengths: list[int], layout: torch.layout) -> Tensor:
    """(B, L, E) -> nested (B, j, E) of each row's first ``lengths[b]`` positions (differentiable)."""
    with nested_prototype_ok():
        return torch.nested.as_nested_tensor([padded[b, :n] for b, n in enumerate(lengths)], layout=layout)


def to_padded(x: Tensor) -> Tensor:
    return x.to_padded_tensor(0.0)


def lengths_of(x: Tensor) -> list[int]:
    return [t.shape[0] for t in x.unbind()]


def layer_pair(strategy: str, *, batch_first: bool = True) -> tuple[nn.MultiheadAttention, MultiheadAttention]:
    """torch's layer and mhaplug's with the same weights, both in eval mode."""
    torch.manual_seed(0)
    theirs = nn.MultiheadAttention(E, H, batch_first=True).eval()
    ours = MultiheadAttention(E, H, batch_first=batch_first, strategy=strategy).eval()
    ours.load_state_dict(theirs.state_dict())
    return theirs, ours


def torch_on_nested(theirs: nn.MultiheadAttention, x: Tensor, **call: object) -> tuple[Tensor, Tensor | None]:
    """torch's own answer for nested self-attention: its inference fast path on the strided twin of ``x``."""
    strided = nest(to_padded(x), lengths_of(x), torch.strided)
    with torch.no_grad():
        out, weights = theirs(strided, strided, strided, **call)
    assert out.is_nested  # torch's fast path served it
    return out, weights


# ----------------------------------------------------------------------------------------------------------
# The layer alone: torch's numbers, nested out in the input's layout
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.filterwarnings(FLEX_EAGER)
@pytest.mark.parametrize("layout", LAYOUTS, ids=str)
@pytest.mark.parametrize("strategy", NON_CAUSAL)
def test_nested_self_attention_equals_torch(strategy: str, layout: torch.layout) -> None:
    theirs, ours = layer_pair(strategy)
    x = nest(torch.randn(len(LENGTHS), max(LENGTHS), E), LENGTHS, layout)
    expected, _ = torch_on_nested(theirs, x, need_weights=False)
    with torch.no_grad():  # flex has no CPU backward
        out, weights = ours(x, x, x, need_weights=False)
    assert out.is_nested and out.layout == layout and weights is None
    assert lengths_of(out) == LENGTHS
    torch.testing.assert_close(to_padded(out), to_padded(expected), **TOL)
    expected_dispatch = {"auto": "merged_bool"}.get(strategy, strategy)
    assert ours.last_dispatch == expected_dispatch  # the strategy served it, not a fallback


@pytest.mark.parametrize("average", [True, False])
@pytest.mark.parametrize("layout", LAYOUTS, ids=str)
@pytest.mark.parametrize("strategy", strategies_where(needs_is_causal=False, returns_weights=True))
def test_nested_weights_equal_torch(strategy: str, layout: torch.layout, average: bool) -> None:
    """torch returns padded weights for nested input: (B, [H,] L, S), zeros in pad rows and pad columns."""
    theirs, ours = layer_pair(strategy)
    x = nest(torch.randn(len(LENGTHS), max(LENGTHS), E), LENGTHS, layout)
    expected, expected_weights = torch_on_nested(theirs, x, need_weights=True, average_attn_weights=average)
    with torch.no_grad():
        out, weights = ours(x, x, x, need_weights=True, average_attn_weights=average)
    assert weights is not None and expected_weights is not None and not weights.is_nested
    assert weights.shape == expected_weights.shape == ((4, 5, 5) if average else (4, H, 5, 5))
    torch.testing.assert_close(weights, expected_weights, **TOL)
    torch.testing.assert_close(to_padded(out), to_padded(expected), **TOL)
    assert weights[1, ..., 1:, :].abs().max() == 0 and weights[1, ..., 1:].abs().max() == 0  # a length-1 row


@pytest.mark.parametrize("layout", LAYOUTS, ids=str)
def test_nested_input_with_batch_first_false_is_batch_first(layout: torch.layout) -> None:
    """torch refuses nested input when batch_first=False (its fast path needs batch_first); a nested tensor has
    no other layout than (B, j, E), so mhaplug serves it as such: the numbers of torch's batch-first layer."""
    theirs, ours = layer_pair("auto", batch_first=False)
    x = nest(torch.randn(len(LENGTHS), max(LENGTHS), E), LENGTHS, layout)
    expected, expected_weights = torch_on_nested(theirs, x, need_weights=True)
    with torch.no_grad():
        out, weights = ours(x, x, x)
    assert out.layout == layout and lengths_of(out) == LENGTHS
    torch.testing.assert_close(to_padded(out), to_padded(expected), **TOL)
    torch.testing.assert_close(weights, expected_weights, **TOL)


@pytest.mark.parametrize("layout", LAYOUTS, ids=str)
def test_nested_with_an_empty_sequence_equals_torch(layout: torch.layout) -> None:
    theirs, ours = layer_pair("auto")
    lengths = [3, 0, 1]
    x = nest(torch.randn(3, 3, E), lengths, layout)
    expected, expected_weights = torch_on_nested(theirs, x, need_weights=True)
    with torch.no_grad():
        out, weights = ours(x, x, x)
    assert lengths_of(out) == lengths
    torch.testing.assert_close(to_padded(out), to_padded(expected), **TOL)
    torch.testing.assert_close(weights, expected_weights, **TOL)


@pytest.mark.filterwarnings(FLEX_EAGER)
@pytest.mark.parametrize("layout", LAYOUTS, ids=str)
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_nested_is_causal_is_causal_per_sequence(strategy: str, layout: torch.layout) -> None:
    """is_causal=True with nested input: each sequence causal on its own, as torch's layer on each sequence alone
    with the causal attn_mask (torch's nested fast path has no causal mask). Every strategy serves it: the padding
    is on the right, so even causal_only is right."""
    theirs, ours = layer_pair(strategy)
    padded = torch.randn(len(LENGTHS), max(LENGTHS), E)
    x = nest(padded, LENGTHS, layout)
    with torch.no_grad():
        out, _ = ours(x, x, x, need_weights=False, is_causal=True)
        for b, n in enumerate(LENGTHS):
            row = padded[b, :n]  # (n, E), unbatched: torch's slow path
            expected, _ = theirs(row, row, row, need_weights=False, attn_mask=~masks.causal_keep(n, n))
            torch.testing.assert_close(out.unbind()[b], expected, **TOL)
    assert ours.last_dispatch == {"auto": "causal_kpm"}.get(strategy, strategy)


@pytest.mark.parametrize("layout", LAYOUTS, ids=str)
def test_nested_cross_attention_equals_torch_per_sequence(layout: torch.layout) -> None:
    """Queries and keys of their own lengths (torch's fast path takes self-attention only): each sequence as
    torch's layer computes it alone; key and value one nested tensor, or two of the same lengths."""
    theirs, ours = layer_pair("merged_bool")
    q_lengths, kv_lengths = [2, 4, 1, 3], [5, 1, 3, 1]
    queries, keys, values = torch.randn(4, 4, E), torch.randn(4, 5, E), torch.randn(4, 5, E)
    q, k, v = nest(queries, q_lengths, layout), nest(keys, kv_lengths, layout), nest(values, kv_lengths, layout)
    with torch.no_grad():
        out_kv, weights = ours(q, k, k)
        out, _ = ours(q, k, v, need_weights=False)
        for b, (n, s) in enumerate(zip(q_lengths, kv_lengths, strict=True)):
            expected_kv, expected_weights = theirs(queries[b, :n], keys[b, :s], keys[b, :s])
            expected, _ = theirs(queries[b, :n], keys[b, :s], values[b, :s], need_weights=False)
            torch.testing.assert_close(out_kv.unbind()[b], expected_kv, **TOL)
            torch.testing.assert_close(out.unbind()[b], expected, **TOL)
            torch.testing.assert_close(weights[b, :n, :s], expected_weights, **TOL)
    assert lengths_of(out) == q_lengths and weights.shape == (4, 4, 5)


@pytest.mark.parametrize("layout", LAYOUTS, ids=str)
@pytest.mark.parametrize("strategy", strategies_where(needs_is_causal=False, trains_on_cpu=True))
def test_nested_training_gradients_equal_torch_on_padded(strategy: str, layout: torch.layout) -> None:
    """In training, with gradients (torch's layer refuses nested input there): outputs and gradients of the input
    and every parameter equal torch's layer on the padded batch with its key_padding_mask, at the real positions."""
    theirs, ours = layer_pair(strategy)
    theirs.train(), ours.train()
    padded = torch.randn(len(LENGTHS), max(LENGTHS), E)
    is_pad = masks.is_pad_from_lengths(torch.tensor(LENGTHS), max(LENGTHS))

    x = padded.clone().requires_grad_()
    out, _ = ours(*3 * [nest(x, LENGTHS, layout)], need_weights=False)
    to_padded(out).square().sum().backward()

    x_ref = padded.clone().requires_grad_()
    expected, _ = theirs(x_ref, x_ref, x_ref, key_padding_mask=is_pad, need_weights=False)
    expected.masked_fill(is_pad[..., None], 0.0).square().sum().backward()

    torch.testing.assert_close(to_padded(out), expected.masked_fill(is_pad[..., None], 0.0), **TOL)
    torch.testing.assert_close(x.grad, x_ref.grad, **TOL)
    for (name, p), p_ref in zip(ours.named_parameters(), theirs.parameters(), strict=True):
        torch.testing.assert_close(p.grad, p_ref.grad, **TOL, msg=lambda m, name=name: f"{name}: {m}")


# ----------------------------------------------------------------------------------------------------------
# nn.TransformerEncoder makes nested tensors: mhaplug's layer put in by hand equals torch's layer
# ----------------------------------------------------------------------------------------------------------


def encoder_pair(strategy: str, num_layers: int = 2) -> tuple[nn.TransformerEncoder, nn.TransformerEncoder]:
    """An encoder with torch's layers and its copy with mhaplug's attention put in by hand (no swap_attention:
    the encoder keeps its nested-tensor conversion), the same weights, both in eval mode."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(E, H, dim_feedforward=32, dropout=0.0, batch_first=True)
    theirs = nn.TransformerEncoder(layer, num_layers=num_layers, enable_nested_tensor=True).eval()
    ours = copy.deepcopy(theirs)
    for block in ours.layers:
        block.self_attn = MultiheadAttention.from_torch(block.self_attn, strategy=strategy)
    assert theirs.use_nested_tensor and ours.use_nested_tensor
    return theirs, ours


@pytest.mark.filterwarnings(FLEX_EAGER)
@pytest.mark.parametrize("strategy", NON_CAUSAL)
def test_transformer_encoder_nested_path_equals_torch(strategy: str) -> None:
    theirs, ours = encoder_pair(strategy)
    lengths = [6, 1, 4, 1]  # right padding, as the encoder's nested conversion needs (its mask check)
    src = torch.randn(4, 6, E)
    kpm = masks.is_pad_from_lengths(torch.tensor(lengths), 6)
    seen: list[tuple[bool, torch.layout]] = []
    ours.layers[0].self_attn.register_forward_pre_hook(lambda _, args: seen.append((args[0].is_nested, args[0].layout)))
    with torch.no_grad(), nested_prototype_ok():
        expected = theirs(src, src_key_padding_mask=kpm)
        got = ours(src, src_key_padding_mask=kpm)
    assert seen == [(True, torch.strided)]  # the encoder handed mhaplug's layer its nested tensor
    assert got.shape == expected.shape == (4, 6, E)
    torch.testing.assert_close(got, expected, **TOL)  # pads: 0 in both (the encoder pads the nested output)


@pytest.mark.parametrize("training", [True, False])
def test_transformer_encoder_layer_on_jagged_input_equals_torch_on_padded(training: bool) -> None:
    """A jagged batch through nn.TransformerEncoderLayer (residuals, norms and feed-forward run on the jagged
    tensor itself): torch's layer cannot take it, so the reference is torch's layer on the padded batch."""
    theirs, ours = encoder_pair("auto", num_layers=1)
    layer, ref_layer = ours.layers[0].train(training), theirs.layers[0].train(training)
    src = torch.randn(len(LENGTHS), max(LENGTHS), E)
    kpm = masks.is_pad_from_lengths(torch.tensor(LENGTHS), max(LENGTHS))
    out = layer(nest(src, LENGTHS, torch.jagged))
    expected = ref_layer(src, src_key_padding_mask=kpm)
    assert out.layout == torch.jagged and lengths_of(out) == LENGTHS
    torch.testing.assert_close(to_padded(out), expected.masked_fill(kpm[..., None], 0.0), **TOL)


# ----------------------------------------------------------------------------------------------------------
# What a nested call cannot be: one message each, naming the argument
# ----------------------------------------------------------------------------------------------------------


def test_nested_refusals_name_the_argument() -> None:
    mha = MultiheadAttention(E, H, batch_first=True)
    x = nest(torch.randn(3, 4, E), [4, 2, 1], torch.strided)
    kpm = torch.zeros(3, 4, dtype=torch.bool)
    with pytest.raises(
        ValueError, match=r"key_padding_mask must be None with nested query/key/value, got shape \(3, 4\)"
    ):
        mha(x, x, x, key_padding_mask=kpm)
    with pytest.raises(ValueError, match=r"attn_mask must be None with nested .* pass is_causal=True"):
        mha(x, x, x, attn_mask=torch.zeros(4, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match="all nested or all padded; key, value are not nested"):
        mha(x, torch.randn(3, 4, E), torch.randn(3, 4, E))
    jagged = nest(torch.randn(3, 4, E), [4, 2, 1], torch.jagged)
    with pytest.raises(TypeError, match="share one nested layout"):
        mha(x, x, jagged)
    other = nest(torch.randn(3, 4, E), [3, 2, 1], torch.strided)
    with pytest.raises(
        ValueError, match=r"key and value must hold sequences of the same lengths, got \[4, 2, 1\] and \[3, 2, 1\]"
    ):
        mha(x, x, other)
    with pytest.raises(ValueError, match="same number of sequences"):
        mha(x, *2 * [nest(torch.randn(2, 4, E), [4, 2], torch.strided)])
    narrow = torch.nested.narrow(
        torch.randn(2, 5, E), 1, torch.tensor([0, 1]), torch.tensor([3, 2]), layout=torch.jagged
    )
    with pytest.raises(ValueError, match=r"jagged nested tensor with holes .* query.contiguous\(\)"):
        mha(narrow, narrow, narrow)
    with nested_prototype_ok():
        wide = torch.nested.nested_tensor([torch.randn(2, E), torch.randn(2, E + 1)])
        flat = torch.nested.nested_tensor([torch.randn(2), torch.randn(3)])
    with pytest.raises(ValueError, match=rf"query must have {E} features in every sequence"):
        mha(wide, wide, wide)
    with pytest.raises(ValueError, match=r"query must be a nested tensor of B sequences .* got 2-D"):
        mha(flat, flat, flat)


def test_causal_strategies_still_need_is_causal_on_nested_input() -> None:
    x = nest(torch.randn(2, 3, E), [3, 1], torch.jagged)
    for strategy in strategies_where(needs_is_causal=True):
        assert CAPABILITIES[strategy].needs_is_causal
        with pytest.raises(ValueError, match="needs is_causal=True"):
            MultiheadAttention(E, H, batch_first=True, strategy=strategy)(x, x, x, need_weights=False)
