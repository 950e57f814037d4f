"""Every conversion in mhaplug.attention.masks and the merge in mhaplug.attention.merge, against literal matrices or a
brute-force union."""

from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from mhaplug.attention import masks, merge

T, F = True, False
INF = float("-inf")


def test_is_pad_from_lengths_right_and_left() -> None:
    lengths = torch.tensor([3, 1, 0, 4])
    right = masks.is_pad_from_lengths(lengths, 4, padding_side="right")
    left = masks.is_pad_from_lengths(lengths, 4, padding_side="left")
    assert right.tolist() == [[F, F, F, T], [F, T, T, T], [T, T, T, T], [F, F, F, F]]
    assert left.tolist() == [[T, F, F, F], [T, T, T, F], [T, T, T, T], [F, F, F, F]]
    assert masks.lengths_from_is_pad(left).tolist() == [3, 1, 0, 4]


def test_is_pad_from_lengths_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="padding_side must be one of right, left; got 'middle'"):
        masks.is_pad_from_lengths(torch.tensor([1]), 2, padding_side="middle")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"lengths must be a 1-D integer tensor \(B,\), got torch.float32"):
        masks.is_pad_from_lengths(torch.tensor([1.0]), 2)


def test_has_pad_before_real_token() -> None:
    assert not masks.has_pad_before_real_token(torch.tensor([[F, F, T], [F, T, T], [T, T, T]]))  # right padding
    assert masks.has_pad_before_real_token(torch.tensor([[F, F, F], [T, F, F]]))  # left padding
    assert masks.has_pad_before_real_token(torch.tensor([[F, T, F]]))  # a hole


def test_hugging_face_attention_mask_round_trip() -> None:
    attention_mask = torch.tensor([[1, 1, 0], [0, 1, 1]])
    is_pad = masks.is_pad_from_attention_mask(attention_mask)
    assert is_pad.tolist() == [[F, F, T], [T, F, F]]
    back = masks.attention_mask_from_is_pad(is_pad)
    assert back.dtype == torch.int64 and back.tolist() == attention_mask.tolist()
    with pytest.raises(TypeError, match="attention_mask must be an integer 0/1 tensor"):
        masks.is_pad_from_attention_mask(is_pad)


def test_polarity_conversions() -> None:
    is_masked = torch.tensor([[F, T], [T, F]])
    keep = masks.keep_from_is_masked(is_masked)
    assert keep.tolist() == [[T, F], [F, T]]
    assert masks.is_masked_from_keep(keep).tolist() == is_masked.tolist()
    additive = masks.additive_from_keep(keep, torch.float16)
    assert additive.dtype == torch.float16
    assert additive.tolist() == [[0.0, INF], [INF, 0.0]]
    assert masks.keep_from_additive(torch.tensor([[0.0, INF], [-1e30, 2.0]])).tolist() == [[T, F], [T, T]]


def test_causal_keep_is_top_left_aligned_and_cached() -> None:
    assert masks.causal_keep(3, 4).tolist() == [[T, F, F, F], [T, T, F, F], [T, T, T, F]]
    assert masks.causal_keep(4, 2).tolist() == [[T, F], [T, T], [T, T], [T, T]]
    assert masks.causal_keep(3, 4) is masks.causal_keep(3, 4)


def test_document_causal_keep() -> None:
    keep = masks.document_causal_keep(torch.tensor([[0, 0, 1, 1, -1]]))
    assert keep.shape == (1, 1, 5, 5)
    assert keep[0, 0].int().tolist() == [
        [1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [0, 0, 1, 0, 0],
        [0, 0, 1, 1, 0],
        [0, 0, 0, 0, 0],
    ]


def test_merge_padding_alone_stays_b11s() -> None:
    kpm = torch.tensor([[F, F, T], [T, F, F]])
    merged = merge.merge_masks(kpm, None, batch_size=2, num_heads=4, tgt_len=3, src_len=3)
    assert merged is not None and merged.shape == (2, 1, 1, 3) and merged.dtype == torch.bool
    assert merged[:, 0, 0].tolist() == [[T, T, F], [F, T, T]]


def test_merge_padding_and_causal_docstring_picture() -> None:
    kpm = torch.tensor([[F, F, F, F], [T, F, F, F]])
    merged = merge.merge_masks(kpm, None, batch_size=2, num_heads=2, tgt_len=4, src_len=4, is_causal=True)
    assert merged is not None and merged.shape == (2, 1, 4, 4)
    assert merged[1, 0].int().tolist() == [[0, 0, 0, 0], [0, 1, 0, 0], [0, 1, 1, 0], [0, 1, 1, 1]]
    assert merged[0, 0].int().tolist() == [[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]]


def test_merge_bool_attn_mask_alone_is_not_expanded_over_batch() -> None:
    attn = torch.tensor([[F, T], [F, F]])
    merged = merge.merge_masks(None, attn, batch_size=8, num_heads=4, tgt_len=2, src_len=2)
    assert merged is not None and merged.shape == (1, 1, 2, 2)
    assert merged[0, 0].tolist() == [[T, F], [T, T]]


def test_merge_float_attn_mask_with_bool_padding_is_additive() -> None:
    attn = torch.tensor([[0.5, -1.0], [0.0, 2.0]])
    kpm = torch.tensor([[F, T]])
    merged = merge.merge_masks(kpm, attn, batch_size=1, num_heads=1, tgt_len=2, src_len=2, dtype=torch.float64)
    assert merged is not None and merged.dtype == torch.float64 and merged.shape == (1, 1, 2, 2)
    assert merged[0, 0].tolist() == [[0.5, INF], [0.0, INF]]


def test_merge_float_padding_mask_is_added() -> None:
    kpm = torch.tensor([[0.0, -2.0]])
    attn = torch.tensor([[F, T], [F, F]])
    merged = merge.merge_masks(kpm, attn, batch_size=1, num_heads=1, tgt_len=2, src_len=2)
    assert merged is not None
    assert merged[0, 0].tolist() == [[0.0, INF], [0.0, -2.0]]


def test_merge_per_head_mask_keeps_heads_and_appends_visible_keys() -> None:
    per_head = torch.zeros(2 * 3, 2, 2, dtype=torch.bool)  # (B*H, L, S)
    per_head[4, 1, 0] = True  # batch 1, head 1, query 1, key 0
    merged = merge.merge_masks(None, per_head, batch_size=2, num_heads=3, tgt_len=2, src_len=2, extra_visible_keys=1)
    assert merged is not None and merged.shape == (2, 3, 2, 3)
    assert merged[1, 1].tolist() == [[T, T, T], [F, T, T]]
    assert merged.sum().item() == 2 * 3 * 2 * 3 - 1


@pytest.mark.parametrize("float_masks", [False, True])
def test_merge_equals_torch_union(float_masks: bool) -> None:
    """The broadcast merge is torch's (B*H, L, S) union, without the expansion."""
    gen = torch.Generator().manual_seed(0)
    batch, heads, tgt, src = 3, 2, 4, 5
    kpm = torch.rand(batch, src, generator=gen) < 0.3
    attn = torch.rand(batch * heads, tgt, src, generator=gen) < 0.3
    if float_masks:
        kpm = torch.zeros(batch, src).masked_fill(kpm, INF)
        attn = torch.randn(batch * heads, tgt, src, generator=gen).masked_fill(attn, INF)
    merged = merge.merge_masks(kpm, attn, batch_size=batch, num_heads=heads, tgt_len=tgt, src_len=src)
    # torch: F.multi_head_attention_forward turns bool masks into -inf and adds the expanded padding mask.
    as_float = [torch.zeros(m.shape).masked_fill(m, INF) if m.dtype == torch.bool else m for m in (kpm, attn)]
    expected = as_float[1] + as_float[0].view(batch, 1, 1, src).expand(-1, heads, -1, -1).reshape(batch * heads, 1, src)
    expected = expected.view(batch, heads, tgt, src)
    assert merged is not None and merged.shape == (batch, heads, tgt, src)
    if float_masks:
        torch.testing.assert_close(merged, expected)
    else:
        assert torch.equal(merged, ~torch.isneginf(expected))


def test_merge_nothing_is_none() -> None:
    assert merge.merge_masks(None, None, batch_size=2, num_heads=2, tgt_len=3, src_len=3) is None


def test_guard_empty_rows_bool_and_float() -> None:
    keep = torch.tensor([[[[T, F], [F, F]]]])  # (1, 1, 2, 2): query 1 sees nothing
    safe, has_key = merge.guard_empty_rows(keep)
    assert safe[0, 0].tolist() == [[T, F], [T, T]]
    assert has_key[0, 0].tolist() == [[T], [F]]
    additive = torch.tensor([[[[0.0, INF], [INF, INF]]]])
    safe, has_key = merge.guard_empty_rows(additive)
    assert safe[0, 0].tolist() == [[0.0, INF], [0.0, 0.0]]
    assert has_key[0, 0].tolist() == [[T], [F]]


@pytest.mark.parametrize(("tgt", "src"), [(5, 5), (3, 5), (6, 2)])
def test_causal_row_has_key_matches_brute_force(tgt: int, src: int) -> None:
    gen = torch.Generator().manual_seed(tgt * 10 + src)
    keep = torch.rand(4, 1, 1, src, generator=gen) < 0.5  # (B, 1, 1, S)
    keep[0] = False  # an all-pad row
    expected = (keep & masks.causal_keep(tgt, src)).any(-1, keepdim=True)
    got = merge.causal_row_has_key(keep, tgt, src, device=keep.device)
    assert got is not None and got.shape == (4, 1, tgt, 1)
    assert torch.equal(got, expected)
    full = keep.expand(4, 1, tgt, src)  # a mask with an L dimension takes the general path
    assert torch.equal(merge.causal_row_has_key(full, tgt, src, device=keep.device), expected)
    additive = masks.additive_from_keep(keep)
    assert torch.equal(merge.causal_row_has_key(additive, tgt, src, device=keep.device), expected)


def test_keep_mask_mod_matches_dense_mask() -> None:
    keep = torch.tensor([[F, T, T], [T, T, F]])[:, None, None, :]  # (B, 1, 1, S)
    mask_mod = masks.keep_mask_mod(keep, is_causal=True)
    b, h, q, kv = torch.meshgrid(torch.arange(2), torch.arange(1), torch.arange(3), torch.arange(3), indexing="ij")
    assert torch.equal(mask_mod(b, h, q, kv), keep & masks.causal_keep(3, 3))


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int64, torch.int32])
def test_check_mask_rejects_integer_masks(dtype: torch.dtype) -> None:
    with pytest.raises(TypeError, match=rf"key_padding_mask must be a bool tensor .* got dtype {dtype}\..*\.bool\(\)"):
        masks.check_mask(torch.zeros(2, 3, dtype=dtype), name="key_padding_mask")


def test_check_mask_rejects_nan() -> None:
    mask = torch.zeros(2, 3)
    mask[1, 2] = float("nan")
    with pytest.raises(ValueError, match=r"attn_mask contains NaN at \[\[1, 2\]\]"):
        masks.check_mask(mask, name="attn_mask")


@pytest.mark.parametrize("strategy", ["auto", "merged_additive", "reference"])
def test_a_plus_inf_in_a_float_attn_mask_is_refused_where_it_gave_nan_rows(strategy: str) -> None:
    from mhaplug.attention import MultiheadAttention

    mask = torch.zeros(4, 4)
    mask[2, 0] = float("inf")
    mha, x = MultiheadAttention(8, 2, batch_first=True, strategy=strategy), torch.randn(1, 4, 8)
    with pytest.raises(ValueError, match=r"attn_mask contains \+inf at \[\[2, 0\]\]"):
        mha(x, x, x, attn_mask=mask)


def test_is_pad_from_lengths_refuses_lengths_outside_zero_to_max_length() -> None:
    for lengths in ([3, 5], [-1, 2]):
        with pytest.raises(ValueError, match=r"lengths must be in \[0, max_length=4\], got -?\d\.\.\d"):
            masks.is_pad_from_lengths(torch.tensor(lengths), 4)
    assert masks.is_pad_from_lengths(torch.tensor([0, 4]), 4).tolist() == [[True] * 4, [False] * 4]


def test_merge_path_never_reads_tensor_values() -> None:
    """Under FakeTensorMode any host read of a value (.item(), if tensor:) raises: the merge does none."""
    masks.causal_keep.cache_clear()
    try:
        with FakeTensorMode():
            kpm = torch.zeros(2, 7, dtype=torch.bool)
            attn = torch.zeros(7, 7)
            merged = merge.merge_masks(kpm, attn, batch_size=2, num_heads=2, tgt_len=7, src_len=7, is_causal=True)
            safe, has_key = merge.guard_empty_rows(merged)
            rows = merge.causal_row_has_key(kpm[:, None, None, :], 7, 7, device=kpm.device)
            assert safe.shape == (2, 1, 7, 7) and has_key.shape == (2, 1, 7, 1) and rows.shape == (2, 1, 7, 1)
    finally:
        masks.causal_keep.cache_clear()  # never leave a fake tensor in the cache


def test_flex_mask_mods_are_the_dense_masks_as_predicates() -> None:
    """The predicates FlexAttention evaluates per block (combined with and_masks) allow exactly what the dense keep
    masks allow: document-causal from document_ids, causal and not-pad from key_padding_mask."""
    from torch.nn.attention.flex_attention import create_mask

    document_ids = torch.tensor([[0, 0, 1, 1, -1], [0, 1, 1, 1, 2]])  # (B, L), -1 on padding
    got = create_mask(masks.document_causal_mask_mod(document_ids), 2, 1, 5, 5, device="cpu")  # (B, 1, L, L)
    assert torch.equal(got, masks.document_causal_keep(document_ids))
    assert got[0, 0].int().tolist() == [  # the literal picture of document_causal_keep's docstring
        [1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [0, 0, 1, 0, 0],
        [0, 0, 1, 1, 0],
        [0, 0, 0, 0, 0],
    ]
    is_pad = torch.tensor([[F, F, F, T], [T, F, F, F]])  # right and left padding
    got = create_mask(masks.padded_causal_mask_mod(is_pad), 2, 1, 4, 4, device="cpu")
    assert torch.equal(got, masks.causal_keep(4, 4) & ~is_pad[:, None, None, :])
    assert got[1, 0].int().tolist() == [[0, 0, 0, 0], [0, 1, 0, 0], [0, 1, 1, 0], [0, 1, 1, 1]]


def test_document_runs_and_the_document_mask_read_a_document_as_a_contiguous_run() -> None:
    ids = torch.tensor([[5, 5, 9, 9, 5, -1], [0, -1, 0, 1, 1, -1]])
    assert masks.document_runs(ids).tolist() == [[0, 0, 1, 1, 2, -1], [0, -1, 1, 2, 2, -1]]
    keep = masks.document_causal_keep(torch.tensor([[0, 0, 1, 1, 0, -1]]))[0, 0].int().tolist()
    assert keep == [
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [0, 0, 1, 0, 0, 0],
        [0, 0, 1, 1, 0, 0],
        [0, 0, 0, 0, 1, 0],  # the id 0 that comes back: a document of its own, not the first one's continuation
        [0, 0, 0, 0, 0, 0],
    ]
