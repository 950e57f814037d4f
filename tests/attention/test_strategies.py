"""mhaplug.MultiheadAttention: conformance with torch.nn.MultiheadAttention, every strategy against
``reference``, fully masked rows, the causal_kpm fallback, and the errors bad input gets."""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import Tensor, nn

import mhaplug
from mhaplug import MultiheadAttention
from mhaplug import attention as attention_module
from mhaplug.attention import masks, strategies

E, H = 16, 4
INF = float("-inf")
GENERAL = ("reference", "merged_bool", "merged_additive")  # serve any mask (is_causal + attn_mask: intersection)
CAUSAL_HINT = ("auto", "causal_kpm", "causal_only")  # is_causal + 2-D attn_mask: the mask must be causal
TORCH_EQUAL = ("reference", "torch_mha", "merged_bool", "merged_additive")


def pair(strategy: str, **kwargs: object) -> tuple[MultiheadAttention, nn.MultiheadAttention]:
    """An mhaplug module and a torch module with the same weights (non-zero biases, so they show)."""
    ref = nn.MultiheadAttention(E, H, **kwargs)  # type: ignore[arg-type]
    with torch.no_grad():
        for name, param in ref.named_parameters():
            if "bias" in name:
                param.normal_()
    ours = MultiheadAttention(E, H, **kwargs, strategy=strategy)  # type: ignore[arg-type]
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ours, ref


def grads(module: nn.Module, *inputs: Tensor) -> list[Tensor]:
    return [t.grad for t in inputs] + [p.grad for p in module.parameters()]  # type: ignore[misc]


def torch_causal(attn_mask: Tensor | None, tgt: int, src: int, *, as_float: bool = False) -> Tensor:
    """The causal mask written out for torch (True / -inf = masked), independent of mhaplug.attention.masks."""
    causal = torch.ones(tgt, src, dtype=torch.bool).triu(1)
    if attn_mask is None:
        return torch.zeros(tgt, src).masked_fill(causal, INF) if as_float else causal
    if attn_mask.dtype == torch.bool:
        return attn_mask | causal
    return attn_mask.masked_fill(causal, INF)


# ----------------------------------------------------------------------------------------------------------
# Conformance with torch over a grid (no fully masked rows here, so torch's gradients are finite too)
# ----------------------------------------------------------------------------------------------------------

MASK_KINDS = (
    "none",
    "kpm",
    "attn2d",
    "attn3d",
    "kpm+attn2d",
    "kpm+attn3d",
    "causal",
    "kpm+causal",
    "kpm+attn2d+causal",
)


@dataclass
class Case:
    query: Tensor
    key: Tensor
    value: Tensor
    kpm: Tensor | None
    attn: Tensor | None
    is_causal: bool
    tgt: int
    src: int

    def torch_attn(self) -> Tensor | None:
        """attn_mask for torch, with the causal mask folded in, of the same type as the padding mask."""
        if not self.is_causal:
            return self.attn
        as_float = self.kpm is not None and self.kpm.dtype != torch.bool
        return torch_causal(self.attn, self.tgt, self.src, as_float=as_float)


def make_case(kind: str, *, float_masks: bool, batch_first: bool, cross: bool, batch: int = 3) -> Case:
    tgt, src = (5, 7) if cross else (6, 6)
    kdim, vdim = (12, 10) if cross else (E, E)
    query = torch.randn(batch, tgt, E, requires_grad=True)
    key = torch.randn(batch, src, kdim, requires_grad=True) if cross else query
    value = torch.randn(batch, src, vdim, requires_grad=True) if cross else query
    kpm = attn = None
    if "kpm" in kind:
        kpm = masks.is_pad_from_lengths(torch.tensor([src, 3, 1, 4][:batch]), src)  # right padding: key 0 real
        kpm[0, 2] = True  # a hole
    if "attn2d" in kind:
        attn = torch.rand(tgt, src) < 0.4
    if "attn3d" in kind:
        attn = torch.rand(batch * H, tgt, src) < 0.4
    if attn is not None:
        attn[..., 0] = False  # key 0 always visible: no fully masked row
    if float_masks:
        kpm = None if kpm is None else torch.zeros(kpm.shape).masked_fill(kpm, INF)
        attn = None if attn is None else torch.randn(attn.shape).masked_fill(attn, INF)
    if not batch_first and query.dim() == 3:
        query, key, value = (t.detach().transpose(0, 1).requires_grad_() for t in (query, key, value))
        if not cross:
            key = value = query
    return Case(query, key, value, kpm, attn, "causal" in kind, tgt, src)


@pytest.mark.parametrize("strategy", ("auto", *GENERAL, "torch_mha"))
@pytest.mark.parametrize("kind", MASK_KINDS)
@pytest.mark.parametrize("float_masks", [False, True], ids=["bool", "float"])
@pytest.mark.parametrize("batch_first", [True, False], ids=["bf", "lbe"])
@pytest.mark.parametrize("cross", [False, True], ids=["self", "cross"])
@pytest.mark.parametrize("need_weights", [False, True], ids=["no_w", "w"])
def test_matches_torch(
    strategy: str, kind: str, float_masks: bool, batch_first: bool, cross: bool, need_weights: bool
) -> None:
    extra = {"kdim": 12, "vdim": 10} if cross else {}
    ours, ref = pair(strategy, batch_first=batch_first, **extra)
    case = make_case(kind, float_masks=float_masks, batch_first=batch_first, cross=cross)
    inputs = [case.query] if not cross else [case.query, case.key, case.value]
    if strategy == "auto" and "attn2d" in kind and case.is_causal:  # a random 2-D mask is no causal mask
        with pytest.raises(ValueError, match="this attn_mask is not causal"):
            ours(
                case.query,
                case.key,
                case.value,
                key_padding_mask=case.kpm,
                attn_mask=case.attn,
                is_causal=True,
                need_weights=need_weights,
            )
        return

    out, weights = ours(
        case.query,
        case.key,
        case.value,
        key_padding_mask=case.kpm,
        attn_mask=case.attn,
        is_causal=case.is_causal,
        need_weights=need_weights,
    )
    out.square().sum().backward()
    got = grads(ours, *inputs)
    for t in inputs:
        t.grad = None
    out_ref, weights_ref = ref(
        case.query,
        case.key,
        case.value,
        key_padding_mask=case.kpm,
        attn_mask=case.torch_attn(),
        need_weights=need_weights,
    )
    out_ref.square().sum().backward()
    expected = grads(ref, *inputs)

    torch.testing.assert_close(out, out_ref, atol=1e-5, rtol=1e-5)
    if need_weights:
        torch.testing.assert_close(weights, weights_ref, atol=1e-5, rtol=1e-5)
    else:
        assert weights is None and weights_ref is None
    for g, g_ref in zip(got, expected, strict=True):
        torch.testing.assert_close(g, g_ref, atol=1e-4, rtol=1e-4)
    served = {"auto": "causal_kpm" if case.is_causal else "merged_bool"}.get(strategy, strategy)
    assert ours.last_dispatch == ("explicit" if need_weights and strategy != "torch_mha" else served)


@pytest.mark.parametrize("strategy", TORCH_EQUAL)
@pytest.mark.parametrize("kind", ["kpm+attn2d", "kpm+causal", "attn3d"])
def test_matches_torch_in_eval_mode_and_per_head_weights(strategy: str, kind: str) -> None:
    ours, ref = pair(strategy, batch_first=True, dropout=0.3)
    ours.eval(), ref.eval()
    case = make_case(kind, float_masks=False, batch_first=True, cross=False)
    with torch.no_grad():
        for need_weights in (False, True):
            out, w = ours(
                case.query,
                case.key,
                case.value,
                key_padding_mask=case.kpm,
                attn_mask=case.attn,
                is_causal=case.is_causal,
                need_weights=need_weights,
                average_attn_weights=False,
            )
            out_ref, w_ref = ref(
                case.query,
                case.key,
                case.value,
                key_padding_mask=case.kpm,
                attn_mask=case.torch_attn(),
                need_weights=need_weights,
                average_attn_weights=False,
            )
            torch.testing.assert_close(out, out_ref, atol=1e-5, rtol=1e-5)
            if need_weights:
                assert w is not None and w.shape == (3, H, 6, 6)
                torch.testing.assert_close(w, w_ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("strategy", TORCH_EQUAL)
@pytest.mark.parametrize(("add_bias_kv", "add_zero_attn"), [(True, False), (False, True), (True, True)])
def test_matches_torch_with_bias_kv_and_zero_attn(strategy: str, add_bias_kv: bool, add_zero_attn: bool) -> None:
    ours, ref = pair(strategy, batch_first=True, add_bias_kv=add_bias_kv, add_zero_attn=add_zero_attn)
    case = make_case("kpm+attn2d+causal", float_masks=False, batch_first=True, cross=False)
    for need_weights in (False, True):
        out, w = ours(
            case.query,
            case.key,
            case.value,
            key_padding_mask=case.kpm,
            attn_mask=case.attn,
            is_causal=True,
            need_weights=need_weights,
        )
        out_ref, w_ref = ref(
            case.query,
            case.key,
            case.value,
            key_padding_mask=case.kpm,
            attn_mask=case.torch_attn(),
            need_weights=need_weights,
        )
        torch.testing.assert_close(out, out_ref, atol=1e-5, rtol=1e-5)
        if need_weights:
            assert w is not None and w.shape == (3, 6, 6 + add_bias_kv + add_zero_attn)
            torch.testing.assert_close(w, w_ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("strategy", TORCH_EQUAL)
def test_matches_torch_unbatched(strategy: str) -> None:
    ours, ref = pair(strategy)
    x = torch.randn(5, E)
    kpm = torch.tensor([False, False, False, True, True])
    per_head = torch.rand(H, 5, 5) < 0.3
    per_head[..., 0] = False
    for attn in (None, per_head):
        out, w = ours(x, x, x, key_padding_mask=kpm, attn_mask=attn)
        out_ref, w_ref = ref(x, x, x, key_padding_mask=kpm, attn_mask=attn)
        assert out.shape == (5, E) and w is not None and w.shape == (5, 5)
        torch.testing.assert_close(out, out_ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(w, w_ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("strategy", TORCH_EQUAL)
def test_four_d_attn_mask_equals_the_per_head_copy(strategy: str) -> None:
    """mhaplug also takes a (B, 1, L, S) attn_mask (a document mask per sequence) without a per-head copy."""
    mha = MultiheadAttention(E, H, batch_first=True, strategy=strategy)
    x = torch.randn(3, 6, E)
    per_sequence = torch.rand(3, 1, 6, 6) < 0.4
    per_sequence[..., 0] = False
    per_head = per_sequence.expand(3, H, 6, 6).reshape(3 * H, 6, 6)
    with torch.no_grad():
        out, _ = mha(x, x, x, attn_mask=per_sequence, need_weights=False)
        expected, _ = mha(x, x, x, attn_mask=per_head, need_weights=False)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-6)


def test_state_dict_round_trip_with_torch() -> None:
    for kwargs in ({}, {"kdim": 12, "vdim": 10}, {"add_bias_kv": True, "bias": False}):
        ref = nn.MultiheadAttention(E, H, **kwargs)  # type: ignore[arg-type]
        ours = MultiheadAttention(E, H, **kwargs, strategy="causal_kpm")  # type: ignore[arg-type]
        assert list(ours.state_dict()) == list(ref.state_dict())
        ours.load_state_dict(ref.state_dict(), strict=True)
        back = nn.MultiheadAttention(E, H, **kwargs)  # type: ignore[arg-type]
        back.load_state_dict(ours.state_dict(), strict=True)
        for name, tensor in ref.state_dict().items():
            assert torch.equal(back.state_dict()[name], tensor), name


# ----------------------------------------------------------------------------------------------------------
# Fully masked rows and every strategy against reference
# ----------------------------------------------------------------------------------------------------------


def brute_force(mha: MultiheadAttention, x: Tensor, keep: Tensor) -> Tensor:
    """float64 attention from first principles: per (b, h, i) a softmax over the keys i may see, or 0."""
    batch, length, _ = x.shape
    w_q, w_k, w_v = mha.in_proj_weight.double().chunk(3)
    b_q, b_k, b_v = mha.in_proj_bias.double().chunk(3)
    x = x.double()
    heads = []
    for h in range(H):
        cols = slice(h * E // H, (h + 1) * E // H)
        q, k, v = ((x @ w.T + b)[..., cols] for w, b in ((w_q, b_q), (w_k, b_k), (w_v, b_v)))
        out = torch.zeros(batch, length, E // H, dtype=torch.float64)
        for b, i in itertools.product(range(batch), range(length)):
            seen = keep[b, i].nonzero().flatten()
            if len(seen):
                scores = q[b, i] @ k[b, seen].T / (E // H) ** 0.5
                out[b, i] = scores.softmax(-1) @ v[b, seen]
        heads.append(out)
    return torch.cat(heads, -1) @ mha.out_proj.weight.double().T + mha.out_proj.bias.double()


def left_padded_batch(length: int = 6) -> tuple[Tensor, Tensor]:
    """Left padding, a hole, and an all-pad row: pad queries before the first real token see nothing."""
    kpm = masks.is_pad_from_lengths(torch.tensor([length, 3, 0, 1]), length, padding_side="left")
    kpm[0, 1] = True
    return torch.randn(4, length, E, requires_grad=True), kpm


def valid_strategies(*, causal: bool, attn_2d: bool = False) -> list[str]:
    """Strategies that serve a call; with is_causal and a 2-D attn_mask the causal ones need that mask causal."""
    if causal and attn_2d:
        return list(GENERAL)
    return ["auto", *GENERAL] + (["causal_kpm"] if causal else [])


@pytest.mark.parametrize("is_causal", [True, False], ids=["causal", "padding_only"])
def test_reference_matches_brute_force_with_fully_masked_rows(is_causal: bool) -> None:
    mha = MultiheadAttention(E, H, batch_first=True, strategy="reference")
    x, kpm = left_padded_batch()
    keep = (~kpm[:, None, :] & (masks.causal_keep(6, 6) if is_causal else True)).expand(-1, 6, -1)  # (B, L, S)
    out, _ = mha(x, x, x, key_padding_mask=kpm, need_weights=False, is_causal=is_causal)
    torch.testing.assert_close(out.double(), brute_force(mha, x, keep), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("strategy", ["reference", "merged_bool", "merged_additive", "causal_kpm"])
def test_fully_masked_rows_give_bias_output_zero_gradients(strategy: str) -> None:
    mha = MultiheadAttention(E, H, batch_first=True, strategy=strategy)
    with torch.no_grad():
        mha.out_proj.bias.normal_()
    x, kpm = left_padded_batch()
    out, _ = mha(x, x, x, key_padding_mask=kpm, need_weights=False, is_causal=True)
    # Pad queries before the first real token attend nothing: their attention is exactly 0, so the module
    # returns out_proj.bias there (torch's SDPA path does the same where it is finite).
    dead = kpm.cumsum(-1) == torch.arange(1, 7)  # (B, L): every key up to i is a pad
    assert dead.sum() == 3 + 6 + 5
    assert torch.equal(out[dead], mha.out_proj.bias.expand(14, E))
    out.square().sum().backward()
    assert all(p.grad.isfinite().all() for p in mha.parameters())
    # A leading pad is neither a live query nor a visible key: nothing flows back into it.
    assert torch.equal(x.grad[dead], torch.zeros(14, E))


@pytest.mark.parametrize("strategy", ["merged_bool", "merged_additive", "causal_kpm"])
def test_need_weights_gives_zero_weights_for_fully_masked_rows(strategy: str) -> None:
    mha = MultiheadAttention(E, H, batch_first=True, strategy=strategy)
    x, kpm = left_padded_batch()
    _, weights = mha(x, x, x, key_padding_mask=kpm, is_causal=True)
    assert weights is not None and weights.isfinite().all()
    assert torch.equal(weights[2], torch.zeros(6, 6))  # the all-pad row
    torch.testing.assert_close(weights[1, 3:].sum(-1), torch.ones(3))  # real queries: rows sum to 1


def compare_with_reference(strategy: str, x: Tensor, *, rows: Tensor | None = None, **call: object) -> None:
    """Outputs and gradients of ``strategy`` equal ``reference``'s on the same weights and inputs."""
    ours = MultiheadAttention(E, H, batch_first=True, strategy=strategy)
    ref = MultiheadAttention(E, H, batch_first=True, strategy="reference")
    ref.load_state_dict(ours.state_dict())
    results = []
    for module in (ours, ref):
        x_ = x.detach().clone().requires_grad_()
        out, _ = module(x_, x_, x_, need_weights=False, **call)
        selected = out if rows is None else out[rows]
        selected.square().sum().backward()
        results.append([selected, x_.grad, *(p.grad for p in module.parameters())])
    for got, expected in zip(*results, strict=True):
        assert got.isfinite().all()
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("strategy", ["merged_bool", "merged_additive", "causal_kpm"])
@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_strategies_match_reference_on_padded_causal_batches(strategy: str, padding_side: str) -> None:
    kpm = masks.is_pad_from_lengths(torch.tensor([7, 4, 1, 0]), 7, padding_side=padding_side)  # type: ignore[arg-type]
    compare_with_reference(strategy, torch.randn(4, 7, E), key_padding_mask=kpm, is_causal=True)


@pytest.mark.parametrize("strategy", ["merged_bool", "merged_additive", "causal_kpm"])
def test_strategies_match_reference_with_attn_mask_and_causal(strategy: str) -> None:
    kpm = masks.is_pad_from_lengths(torch.tensor([7, 4, 1]), 7, padding_side="left")
    attn = torch.rand(3 * H, 7, 7) < 0.3  # per head, with some fully masked rows
    compare_with_reference(strategy, torch.randn(3, 7, E), key_padding_mask=kpm, attn_mask=attn, is_causal=True)


def test_causal_only_matches_reference_on_real_rows_with_right_padding() -> None:
    lengths = torch.tensor([7, 4, 1])
    kpm = masks.is_pad_from_lengths(lengths, 7)
    compare_with_reference("causal_only", torch.randn(3, 7, E), rows=~kpm, key_padding_mask=kpm, is_causal=True)


def test_causal_only_refuses_left_padding_because_it_would_be_wrong() -> None:
    """causal_only computes attention without the padding mask; with left padding real queries would then
    attend the pads before them, so a left-padded key_padding_mask is refused (checked on CPU)."""
    kpm = masks.is_pad_from_lengths(torch.tensor([7, 4]), 7, padding_side="left")
    x = torch.randn(2, 7, E)
    only = MultiheadAttention(E, H, batch_first=True, strategy="causal_only")
    ref = MultiheadAttention(E, H, batch_first=True, strategy="reference")
    ref.load_state_dict(only.state_dict())
    with torch.no_grad():
        out_only, _ = only(x, x, x, need_weights=False, is_causal=True)  # what it computes
        out_ref, _ = ref(x, x, x, key_padding_mask=kpm, need_weights=False, is_causal=True)
        with pytest.raises(
            ValueError, match=r"has a pad before a real token \(left padding or a hole\); use strategy='causal_kpm'"
        ):
            only(x, x, x, key_padding_mask=kpm, need_weights=False, is_causal=True)
    assert torch.allclose(out_only[0], out_ref[0], atol=1e-6)  # no padding: same
    assert (out_only[1, 3:] - out_ref[1, 3:]).abs().amax() > 1e-2  # left-padded real rows: different


@given(
    lengths=st.lists(st.integers(0, 6), min_size=1, max_size=3),
    padding_side=st.sampled_from(["left", "right"]),
    holes=st.booleans(),
    mask_kind=st.sampled_from(["none", "bool2d", "bool3d", "float2d", "float3d"]),
    is_causal=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_property_every_strategy_matches_reference_and_torch(
    lengths: list[int], padding_side: str, holes: bool, mask_kind: str, is_causal: bool, seed: int
) -> None:
    gen = torch.Generator().manual_seed(seed)
    batch, length = len(lengths), max(max(lengths), 1)
    kpm = masks.is_pad_from_lengths(torch.tensor(lengths), length, padding_side=padding_side)  # type: ignore[arg-type]
    if holes:
        kpm |= torch.rand(batch, length, generator=gen) < 0.2
    attn = None
    if mask_kind != "none":
        shape = (length, length) if mask_kind.endswith("2d") else (batch * H, length, length)
        attn = torch.rand(shape, generator=gen) < 0.3
        if mask_kind.startswith("float"):
            attn = torch.randn(shape, generator=gen).masked_fill(attn, INF)
    x = torch.randn(batch, length, E, generator=gen)
    call = {"key_padding_mask": kpm, "attn_mask": attn, "is_causal": is_causal}
    for strategy in valid_strategies(causal=is_causal, attn_2d=mask_kind.endswith("2d")):
        compare_with_reference(strategy, x, **call)

    # torch agrees wherever it is finite (its SDPA path, training mode, no dropout).
    ours, ref = pair("reference", batch_first=True)
    attn_torch = torch_causal(attn, length, length) if is_causal else attn
    kpm_torch = kpm if attn is None or attn.dtype == torch.bool else torch.zeros(kpm.shape).masked_fill(kpm, INF)
    with torch.no_grad():
        out, _ = ours(x, x, x, need_weights=False, **call)
        out_ref, _ = ref(x, x, x, key_padding_mask=kpm_torch, attn_mask=attn_torch, need_weights=False)
    finite = out_ref.isfinite().all(-1)
    torch.testing.assert_close(out[finite], out_ref[finite], atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------------------------
# causal_kpm: the fast path, and a visible fallback
# ----------------------------------------------------------------------------------------------------------


def test_causal_kpm_uses_causal_plus_padding_on_cpu() -> None:
    mha = MultiheadAttention(E, H, batch_first=True, strategy="causal_kpm")
    x = torch.randn(2, 5, E)
    kpm = masks.is_pad_from_lengths(torch.tensor([5, 2]), 5)
    mha(x, x, x, key_padding_mask=kpm, need_weights=False, is_causal=True)
    assert mha.last_dispatch == "causal_kpm"


def test_causal_kpm_falls_back_visibly_where_backend_cannot_take_both(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(strategies, "sdpa_takes_mask_with_causal", lambda *args: False)
    kpm = masks.is_pad_from_lengths(torch.tensor([5, 2]), 5, padding_side="left")
    with caplog.at_level(logging.DEBUG, logger="mhaplug.attention"):
        compare_with_reference("causal_kpm", torch.randn(2, 5, E), key_padding_mask=kpm, is_causal=True)
    assert "causal_kpm falls back to merged_bool: the SDPA backend" in caplog.text


def test_causal_kpm_falls_back_with_dropout_on_cpu() -> None:
    """On CPU, attention dropout selects SDPA's math backend, which refuses is_causal with a mask."""
    kpm = masks.is_pad_from_lengths(torch.tensor([6, 3]), 6)
    x = torch.randn(2, 6, E)
    outs = {}
    for strategy in ("causal_kpm", "merged_bool"):
        mha = MultiheadAttention(E, H, dropout=0.5, batch_first=True, strategy=strategy)
        torch.manual_seed(1)
        mha.load_state_dict(MultiheadAttention(E, H).state_dict())
        torch.manual_seed(2)
        outs[strategy], _ = mha(x, x, x, key_padding_mask=kpm, need_weights=False, is_causal=True)
        assert mha.last_dispatch == "merged_bool"
    assert torch.equal(outs["causal_kpm"], outs["merged_bool"])
    assert (
        strategies.sdpa_takes_mask_with_causal(
            *(torch.randn(1, 1, 2, 4),) * 3, torch.ones(1, 1, 1, 2, dtype=torch.bool), 0.5
        )
        is False
    )


def test_is_causal_alone_and_cross_length_is_top_left() -> None:
    mha = MultiheadAttention(E, H, batch_first=True, strategy="merged_bool")
    ref = MultiheadAttention(E, H, batch_first=True, strategy="reference")
    ref.load_state_dict(mha.state_dict())
    q, kv = torch.randn(2, 3, E), torch.randn(2, 5, E)
    out, _ = mha(q, kv, kv, need_weights=False, is_causal=True)
    expected, _ = ref(q, kv, kv, need_weights=False, attn_mask=~masks.causal_keep(3, 5))
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-6)


# ----------------------------------------------------------------------------------------------------------
# flex: forward on CPU where torch allows it; training needs CUDA (tests/test_gpu.py)
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile:UserWarning")
@pytest.mark.parametrize("is_causal", [True, False])
def test_flex_forward_on_cpu_matches_reference(is_causal: bool) -> None:
    flex = MultiheadAttention(E, H, batch_first=True, strategy="flex")
    ref = MultiheadAttention(E, H, batch_first=True, strategy="reference")
    ref.load_state_dict(flex.state_dict())
    kpm = masks.is_pad_from_lengths(torch.tensor([9, 4, 0]), 9, padding_side="left")
    x = torch.randn(3, 9, E)
    with torch.no_grad():
        out, _ = flex(x, x, x, key_padding_mask=kpm, need_weights=False, is_causal=is_causal)
        expected, _ = ref(x, x, x, key_padding_mask=kpm, need_weights=False, is_causal=is_causal)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    assert flex.last_dispatch == "flex"


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile:UserWarning")
def test_flex_takes_a_prebuilt_block_mask() -> None:
    from torch.nn.attention.flex_attention import create_block_mask

    document_ids = torch.tensor([[0, 0, 0, 1, 1, 2, -1, -1]])
    keep = masks.document_causal_keep(document_ids)  # (1, 1, L, L)
    block_mask = create_block_mask(masks.keep_mask_mod(keep, is_causal=False), None, None, 8, 8, device="cpu")
    flex = MultiheadAttention(E, H, batch_first=True, strategy="flex")
    ref = MultiheadAttention(E, H, batch_first=True, strategy="reference")
    ref.load_state_dict(flex.state_dict())
    x = torch.randn(1, 8, E)
    with torch.no_grad():
        out, _ = flex(x, x, x, attn_mask=block_mask, need_weights=False)
        expected, _ = ref(x, x, x, attn_mask=~keep[0, 0], need_weights=False)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------------------------
# Bad input: one clear error naming the argument, what was given and what to do
# ----------------------------------------------------------------------------------------------------------


def test_constructor_errors() -> None:
    with pytest.raises(
        ValueError,
        match=(
            r"num_heads must divide embed_dim, got embed_dim=10 and num_heads=4; "
            r"pick num_heads among \[1, 2, 5, 10\]"
        ),
    ):
        MultiheadAttention(10, 4)
    with pytest.raises(
        ValueError,
        match=(
            "strategy must be one of auto, reference, torch_mha, merged_bool, merged_additive, causal_kpm, "
            "causal_only, flex; got 'fast'"
        ),
    ):
        MultiheadAttention(E, H, strategy="fast")
    with pytest.raises(ValueError, match=r"dropout must be in \[0, 1\), got 1.5"):
        MultiheadAttention(E, H, dropout=1.5)
    with pytest.raises(ValueError, match="embed_dim must be an int >= 1, got 0"):
        MultiheadAttention(0, 1)


X = torch.randn(2, 5, E)
BAD_CALLS = [
    (
        {"key_padding_mask": torch.zeros(2, 5, dtype=torch.uint8)},
        TypeError,
        r"key_padding_mask must be a bool tensor .*got dtype torch.uint8",
    ),
    (
        {"attn_mask": torch.zeros(5, 5, dtype=torch.int64)},
        TypeError,
        r"attn_mask must be a bool tensor .*got dtype torch.int64",
    ),
    ({"attn_mask": torch.full((5, 5), float("nan"))}, ValueError, r"attn_mask contains NaN"),
    (
        {"attn_mask": torch.zeros(5, 5).index_put_((torch.tensor([1]), torch.tensor([3])), torch.tensor(float("inf")))},
        ValueError,
        r"attn_mask contains \+inf at \[\[1, 3\]\] \(first positions\): a softmax row with it is NaN",
    ),
    (
        {"key_padding_mask": torch.zeros(2, 5, dtype=torch.bool, device="meta")},
        ValueError,
        r"key_padding_mask is on meta but query is on cpu; move it with key_padding_mask.to\(query.device\)",
    ),
    (
        {"attn_mask": torch.zeros(5, 5, device="meta")},
        ValueError,
        r"attn_mask is on meta but query is on cpu",
    ),
    (
        {"key_padding_mask": torch.zeros(5, 2, dtype=torch.bool)},
        ValueError,
        r"key_padding_mask must have shape \(2, 5\) \(batch, source length\), True = padding; got \(5, 2\)",
    ),
    (
        {"attn_mask": torch.zeros(2, 5, 5, dtype=torch.bool)},
        ValueError,
        (
            r"attn_mask must have shape \(5, 5\) \(L, S\) or \(8, 5, 5\) \(B\*H, L, S\), "
            r"or \(mhaplug only\) \(2, 1, 5, 5\) / \(2, 4, 5, 5\) \(B, 1\|H, L, S\); got \(2, 5, 5\)"
        ),
    ),
    (
        {"attn_mask": [[0.0]]},
        TypeError,
        r"attn_mask must be a torch.Tensor \(or a BlockMask with strategy='flex'\), got list",
    ),
]


@pytest.mark.parametrize(("kwargs", "error", "message"), BAD_CALLS)
def test_forward_rejects_bad_masks(kwargs: dict, error: type[Exception], message: str) -> None:
    mha = MultiheadAttention(E, H, batch_first=True)
    with pytest.raises(error, match=message):
        mha(X, X, X, **kwargs)


def test_forward_rejects_bad_shapes() -> None:
    mha = MultiheadAttention(E, H, batch_first=True)
    with pytest.raises(
        ValueError, match=r"query must have 16 features in its last dim \(B, L, E\), got shape \(2, 5, 8\)"
    ):
        mha(torch.randn(2, 5, 8), X, X)
    with pytest.raises(ValueError, match=r"key must be 3-D like query \(shape \(2, 5, 16\)\), got shape \(5, 16\)"):
        mha(X, X[0], X[0])
    with pytest.raises(TypeError, match="query must be a floating point tensor, got dtype torch.int64"):
        mha(X.long(), X, X)
    with pytest.raises(
        TypeError,
        match=r"key is torch.float64 on cpu but query is torch.float32 on cpu; give query, key and value one dtype",
    ):
        mha(X, X.double(), X.double())


@pytest.mark.parametrize(
    ("strategy", "call", "message"),
    [
        (
            "causal_only",
            {},
            r"strategy='causal_only' serves causal self-attention and needs is_causal=True.*merged_bool",
        ),
        ("causal_kpm", {}, r"strategy='causal_kpm' serves causal self-attention and needs is_causal=True.*merged_bool"),
        ("causal_kpm", {}, r"or use strategy='auto' \(which also serves the non-causal calls"),
        (
            "causal_only",
            {"is_causal": True, "attn_mask": torch.zeros(2 * H, 5, 5, dtype=torch.bool)},
            r"use strategy='causal_kpm' or 'merged_bool'",
        ),
    ],
)
def test_strategy_that_cannot_serve_a_call_says_which_would(strategy: str, call: dict, message: str) -> None:
    mha = MultiheadAttention(E, H, batch_first=True, strategy=strategy)
    for need_weights in (False, True):
        with pytest.raises(ValueError, match=message):
            mha(X, X, X, need_weights=need_weights, **call)


def test_flex_errors_name_a_working_strategy() -> None:
    x = torch.randn(2, 5, E, requires_grad=True)
    with pytest.raises(
        NotImplementedError, match=r"strategy='flex' has no backward on CPU.*strategy='auto' or 'merged_bool'"
    ):
        MultiheadAttention(E, H, batch_first=True, strategy="flex")(x, x, x, need_weights=False, is_causal=True)
    with pytest.raises(
        ValueError, match=r"strategy='flex' has no attention dropout; set dropout=0.0 or use strategy='merged_bool'"
    ):
        MultiheadAttention(E, H, dropout=0.1, batch_first=True, strategy="flex")(X, X, X, need_weights=False)


def test_public_names() -> None:
    assert mhaplug.MultiheadAttention is attention_module.MultiheadAttention
    assert mhaplug.STRATEGIES == (
        "auto",
        "reference",
        "torch_mha",
        "merged_bool",
        "merged_additive",
        "causal_kpm",
        "causal_only",
        "flex",
    )
    assert MultiheadAttention(E, H).strategy == "auto"
    assert isinstance(MultiheadAttention(E, H), nn.MultiheadAttention)


@pytest.mark.parametrize(
    "strategy", ["auto", "reference", "merged_bool", "merged_additive", "causal_kpm", "causal_only"]
)
def test_forward_and_backward_never_read_tensor_values(strategy: str) -> None:
    """On the meta device any host read of a value (.item(), ``if tensor:``) raises, and like an accelerator it
    is not CPU (so the CPU-only input checks stay off): passing proves the whole path, masks included, forward
    and backward, never synchronises. (The meta SDPA is the math backend, so causal_kpm takes its fallback
    here; its fast-path helpers are checked the same way in test_masks.py.)"""
    mha = MultiheadAttention(E, H, batch_first=True, strategy=strategy, device="meta")
    x = torch.randn(2, 5, E, device="meta", requires_grad=True)
    kpm = torch.zeros(2, 5, dtype=torch.bool, device="meta")
    out, _ = mha(x, x, x, key_padding_mask=kpm, need_weights=False, is_causal=True)
    out.sum().backward()
    assert out.shape == (2, 5, E) and x.grad is not None and x.grad.shape == (2, 5, E)
    assert mha.last_dispatch == ("merged_bool" if strategy in ("auto", "causal_kpm") else strategy)
    with pytest.raises(RuntimeError, match="cannot be called on meta tensors"):
        bool(kpm.any())  # the premise: reading a value here fails


# ----------------------------------------------------------------------------------------------------------
# forward_tokens: the real tokens flat, projections on them only, the same outputs as forward
# ----------------------------------------------------------------------------------------------------------


TOKENS_CASES = [(s, {}) for s in ("auto", "reference", "merged_bool", "merged_additive", "causal_kpm", "torch_mha")]
TOKENS_CASES += [(s, {"add_bias_kv": True}) for s in ("reference", "merged_bool", "torch_mha")]  # through forward


@pytest.mark.parametrize(("strategy", "module_kwargs"), TOKENS_CASES)
@pytest.mark.parametrize("bucket_cost", [None, 0])
def test_forward_tokens_equals_forward_at_the_real_positions(
    strategy: str, module_kwargs: dict, bucket_cost: int | None
) -> None:
    from mhaplug.attention.unpad import plan_tokens

    torch.manual_seed(0)
    ours, _ = pair(strategy, batch_first=True, **module_kwargs)
    is_pad = masks.is_pad_from_lengths(torch.tensor([5, 1, 3]), 6, padding_side="left")  # (3, 6)
    x = torch.randn(3, 6, E)
    expected, _ = ours(x, x, x, key_padding_mask=is_pad, need_weights=False, is_causal=True)
    token_index, layouts = plan_tokens(is_pad, 3, 6, bucket_cost=bucket_cost)
    got = ours.forward_tokens(x.flatten(0, 1)[token_index], layouts, is_causal=True)
    torch.testing.assert_close(got, expected.flatten(0, 1)[token_index], rtol=1e-5, atol=1e-6)


def test_forward_tokens_errors() -> None:
    from mhaplug.attention.unpad import plan_tokens

    ours = MultiheadAttention(E, H, batch_first=True)
    _token_index, layouts = plan_tokens(torch.tensor([[False, True], [False, False]]), 2, 2, bucket_cost=0)
    with pytest.raises(ValueError, match=r"x must be \(N, embed_dim=16\), got shape \(3, 8\)"):
        ours.forward_tokens(torch.zeros(3, 8), layouts)
    with pytest.raises(ValueError, match="an attn_mask describes one \\(B, L\\) layout; got 2 layouts"):
        ours.forward_tokens(torch.zeros(3, E), layouts, attn_mask=torch.zeros(2, 2, dtype=torch.bool))


# ----------------------------------------------------------------------------------------------------------
# Batch size 0: an empty output of torch's shapes, from every strategy (issue 10)
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile:UserWarning")
@pytest.mark.parametrize("strategy", attention_module.STRATEGIES)
@pytest.mark.parametrize("batch_first", [True, False], ids=["bf", "lbe"])
@pytest.mark.parametrize("need_weights", [False, True], ids=["no_w", "w"])
@pytest.mark.parametrize("with_kpm", [False, True], ids=["no_kpm", "kpm"])
def test_batch_size_zero_gives_torchs_empty_shapes(
    strategy: str, batch_first: bool, need_weights: bool, with_kpm: bool
) -> None:
    """Query (0, L, E) batch first or (L, 0, E), cross-attention (L=5, S=7): output and weights (averaged and
    per head) shaped as torch's own module returns them, and a backward that runs. flex runs under no_grad
    (forward-only on CPU). torch's own module fails with a (0, S) key_padding_mask and need_weights=False
    (a reshape with -1); torch_mha is torch's path, so it keeps that error and the others must not."""
    causal = attention_module.CAPABILITIES[strategy].needs_is_causal
    ours, ref = pair(strategy, batch_first=batch_first, kdim=12, vdim=10)
    shape = (lambda n, f: (0, n, f)) if batch_first else (lambda n, f: (n, 0, f))
    query, key, value = (
        torch.randn(shape(5, E), requires_grad=True),
        torch.randn(shape(7, 12)),
        torch.randn(shape(7, 10)),
    )
    kpm = torch.zeros(0, 7, dtype=torch.bool) if with_kpm else None
    torch_attn = torch_causal(None, 5, 7) if causal else None
    torch_fails = with_kpm and not need_weights
    if torch_fails:
        with pytest.raises(RuntimeError, match="cannot reshape tensor of 0 elements"):
            ref(query, key, value, key_padding_mask=kpm, attn_mask=torch_attn, need_weights=False)
    for average in (True, False):
        call = {
            "key_padding_mask": kpm,
            "need_weights": need_weights,
            "average_attn_weights": average,
            "is_causal": causal,
        }
        expected, expected_weights = ref(
            query,
            key,
            value,
            **{**call, "key_padding_mask": None if torch_fails else kpm, "attn_mask": torch_attn, "is_causal": False},
        )
        if strategy == "torch_mha" and torch_fails:
            with pytest.raises(RuntimeError, match="cannot reshape tensor of 0 elements"):
                ours(query, key, value, **call)
            continue
        with torch.no_grad() if strategy == "flex" else torch.enable_grad():
            out, weights = ours(query, key, value, **call)
        assert out.shape == expected.shape == shape(5, E) and out.dtype == expected.dtype
        if need_weights:
            assert weights is not None and weights.shape == expected_weights.shape == (
                (0, 5, 7) if average else (0, H, 5, 7)
            )
        else:
            assert weights is None and expected_weights is None
        if strategy != "flex":
            out.sum().backward()
            assert query.grad is not None and query.grad.shape == query.shape
            assert all(p.grad is not None and not p.grad.any() for p in ours.parameters())  # no token: zero gradients
            ours.zero_grad(set_to_none=True)
            query.grad = None


@pytest.mark.parametrize("strategy", ["auto", "reference", "merged_bool", "causal_kpm", "torch_mha"])
def test_forward_tokens_with_zero_tokens(strategy: str) -> None:
    """A batch with no row, planned by plan_tokens as the model does: (0, E) in, (0, E) out."""
    from mhaplug.attention.unpad import plan_tokens

    ours = MultiheadAttention(E, H, batch_first=True, strategy=strategy)
    is_pad = torch.zeros(0, 6, dtype=torch.bool)  # (0, 6)
    token_index, layouts = plan_tokens(is_pad, 0, 6)
    x = torch.randn(0, E, requires_grad=True)
    out = ours.forward_tokens(x if token_index is None else x[token_index], layouts, is_causal=True)
    assert out.shape == (0, E)
    out.sum().backward()
    assert x.grad is not None and x.grad.shape == (0, E)


@pytest.mark.parametrize("strategy", TORCH_EQUAL)
def test_batch_size_zero_with_a_four_d_attn_mask(strategy: str) -> None:
    """mhaplug's (B, 1, L, S) attn_mask with B = 0: torch_mha copies it per head, (0, L, S), as torch takes it."""
    ours, ref = pair(strategy, batch_first=True)
    x = torch.randn(0, 5, E)
    out, weights = ours(x, x, x, attn_mask=torch.zeros(0, 1, 5, 5, dtype=torch.bool))
    expected, expected_weights = ref(x, x, x, attn_mask=torch.zeros(0, 5, 5, dtype=torch.bool))
    assert out.shape == expected.shape == (0, 5, E) and weights.shape == expected_weights.shape == (0, 5, 5)


@pytest.mark.parametrize("change", ["data", "numpy"])
def test_a_causal_mask_changed_behind_torch_s_version_counter_is_checked_again(change: str) -> None:
    """A mask that passed once, then opened above the diagonal through ``.data`` or the numpy array it shares memory
    with (neither bumps ``_version``): it was served as causal from the remembered verdict."""
    mha, x = MultiheadAttention(E, H, batch_first=True, strategy="causal_kpm"), torch.randn(2, 5, E)
    if change == "data":
        mask = torch.ones(5, 5, dtype=torch.bool).triu_(1)
    else:
        array = np.triu(np.ones((5, 5), dtype=bool), 1)
        mask = torch.from_numpy(array)
    mha(x, x, x, attn_mask=mask, is_causal=True)
    version = mask._version
    if change == "data":
        mask.data[0, 3] = False
    else:
        array[0, 3] = False
    assert mask._version == version and not mask[0, 3]
    with pytest.raises(ValueError, match=r"this attn_mask is not causal"):
        mha(x, x, x, attn_mask=mask, is_causal=True)
