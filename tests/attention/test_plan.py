"""mhaplug.attention.plan_attention: what every layer gets for one batch, per strategy and layout, as literal
tensors (the table in the module docstring), on the CPU."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention.flex_attention import BlockMask, create_mask

from mhaplug.attention import PACKED_STRATEGIES, STRATEGIES, plan_attention
from mhaplug.attention.masks import document_causal_keep, is_masked_from_keep

T, F = True, False
# Two right-padded rows of 3 and 2 real tokens (L = 4), and two packed rows: documents of 2 and 1 tokens then a pad,
# and documents of 1 and 3 tokens.
IS_PAD = torch.tensor([[F, F, F, T], [F, F, T, T]])
DOCUMENT_IDS = torch.tensor([[0, 0, 1, -1], [0, 1, 1, 1]])


def test_padded_rows_get_the_padding_mask_and_the_causal_flag_in_length_buckets() -> None:
    plan = plan_attention("merged_bool", 2, 4, key_padding_mask=IS_PAD)
    assert (plan.attn_mask, plan.is_causal) == (None, True)
    assert plan.token_index.tolist() == [0, 1, 2, 4, 5]  # b * L + t of the real tokens
    (layout,) = plan.layouts  # one bucket: both rows, cut to their longest (3); the all-pad column is left out
    assert (layout.start, layout.stop, layout.batch_size, layout.seq_len) == (0, 5, 2, 3)
    assert layout.index.tolist() == [0, 1, 2, 3, 4]
    assert layout.key_padding_mask.tolist() == [[F, F, F], [F, F, T]]


def test_causal_only_gets_no_padding_mask_by_design() -> None:
    plan = plan_attention("causal_only", 2, 4, key_padding_mask=IS_PAD)
    assert (plan.attn_mask, plan.is_causal) == (None, True)
    assert [layout.key_padding_mask for layout in plan.layouts] == [None]


@pytest.mark.parametrize("strategy", [s for s in STRATEGIES if s not in ("auto", "flex")])
def test_packed_rows_get_one_document_causal_mask_over_whole_rows(strategy: str) -> None:
    if strategy not in PACKED_STRATEGIES:
        with pytest.raises(ValueError, match=rf"packed rows need a document mask; strategy='{strategy}' would let"):
            plan_attention(strategy, 2, 4, key_padding_mask=DOCUMENT_IDS < 0, document_ids=DOCUMENT_IDS)
        return
    plan = plan_attention(strategy, 2, 4, key_padding_mask=DOCUMENT_IDS < 0, document_ids=DOCUMENT_IDS)
    assert plan.is_causal is False
    assert plan.attn_mask.shape == (2, 1, 4, 4) and plan.attn_mask.dtype == torch.bool  # True = may NOT attend
    assert torch.equal(plan.attn_mask, is_masked_from_keep(document_causal_keep(DOCUMENT_IDS)))
    assert plan.attn_mask[1, 0].logical_not().long().tolist() == [  # row 1: documents [0] and [1, 2, 3]
        [1, 0, 0, 0],
        [0, 1, 0, 0],
        [0, 1, 1, 0],
        [0, 1, 1, 1],
    ]
    (layout,) = plan.layouts  # the whole batch: a document mask spans rows, so no buckets
    assert (layout.batch_size, layout.seq_len, layout.key_padding_mask) == (2, 4, None)


def test_auto_on_the_cpu_makes_each_document_a_row_for_the_causal_kernel() -> None:
    plan = plan_attention("auto", 2, 4, key_padding_mask=DOCUMENT_IDS < 0, document_ids=DOCUMENT_IDS)
    assert (plan.attn_mask, plan.is_causal) == (None, True)
    # the documents, longest first: [5 6 7], [0 1], [2], [4] (flat positions b * L + t)
    assert plan.token_index.tolist() == [5, 6, 7, 0, 1, 2, 4]
    (layout,) = plan.layouts
    assert (layout.batch_size, layout.seq_len) == (4, 3)
    assert layout.index.tolist() == [0, 1, 2, 3, 4, 6, 9]
    assert layout.key_padding_mask.tolist() == [[F, F, F], [F, F, T], [F, T, T], [F, T, T]]


def test_given_tokens_are_one_layout_of_the_batch_s_own_shape() -> None:
    every = torch.arange(8)  # all B * L positions, as mhaplug.audit computes them
    plan = plan_attention("auto", 2, 4, key_padding_mask=IS_PAD, token_index=every)
    (layout,) = plan.layouts
    assert plan.token_index is every and (layout.batch_size, layout.seq_len) == (2, 4)
    assert torch.equal(layout.index, every) and torch.equal(layout.key_padding_mask, IS_PAD)
    packed = plan_attention(
        "auto", 2, 4, key_padding_mask=DOCUMENT_IDS < 0, document_ids=DOCUMENT_IDS, token_index=every
    )
    assert torch.equal(
        packed.attn_mask, is_masked_from_keep(document_causal_keep(DOCUMENT_IDS))
    )  # no rows per document


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_flex_gets_one_block_mask_of_the_predicates(packed: bool) -> None:
    kwargs = (
        {"key_padding_mask": DOCUMENT_IDS < 0, "document_ids": DOCUMENT_IDS} if packed else {"key_padding_mask": IS_PAD}
    )
    plan = plan_attention("flex", 2, 4, **kwargs)
    assert isinstance(plan.attn_mask, BlockMask) and plan.is_causal is False
    assert [layout.key_padding_mask for layout in plan.layouts] == [None]
    keep = create_mask(plan.attn_mask.mask_mod, 2, 1, 4, 4, device="cpu")  # (B, 1, L, S), True = may attend
    expected = (
        document_causal_keep(DOCUMENT_IDS) if packed else ~IS_PAD[:, None, None, :] & torch.ones(4, 4).tril().bool()
    )
    assert torch.equal(keep, expected)


def test_an_unknown_strategy_is_refused_with_the_allowed_ones() -> None:
    with pytest.raises(ValueError, match=r"^strategy must be one of auto, reference, .*, flex; got 'fast'$"):
        plan_attention("fast", 2, 4, key_padding_mask=IS_PAD)
