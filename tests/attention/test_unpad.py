"""mhaplug.attention.unpad: the real tokens' order and the attention layouts, as literal tensors."""

from __future__ import annotations

import torch

from mhaplug.attention import unpad
from mhaplug.attention.unpad import TokenLayout, plan_tokens


def is_pad(*rows: str) -> torch.Tensor:
    """Rows written as in the module docstring: a letter is a real token, ``.`` a pad."""
    return torch.tensor([[c == "." for c in row] for row in rows])


def as_lists(layouts: tuple[TokenLayout, ...]) -> list[tuple]:
    return [
        (lay.start, lay.stop, None if lay.index is None else lay.index.tolist(), lay.batch_size, lay.seq_len,
         None if lay.key_padding_mask is None else lay.key_padding_mask.int().tolist())
        for lay in layouts
    ]  # fmt: skip


def test_the_docstring_picture() -> None:
    token_index, layouts = plan_tokens(is_pad("aa....", "bbbbbb", "c....."), 3, 6, bucket_cost=2)
    assert token_index.tolist() == [6, 7, 8, 9, 10, 11, 0, 1, 12]
    assert as_lists(layouts) == [(0, 6, None, 1, 6, None), (6, 9, [0, 1, 2], 2, 2, [[0, 0], [0, 1]])]
    assert "b b b b b b | a a | c" in unpad.__doc__ and "6 7 8 9 10 11 0 1 12" in unpad.__doc__


def test_one_bucket_when_another_call_costs_more_than_it_saves() -> None:
    token_index, layouts = plan_tokens(is_pad("aa....", "bbbbbb", "c....."), 3, 6)  # BUCKET_COST: one call
    assert token_index.tolist() == [6, 7, 8, 9, 10, 11, 0, 1, 12]  # longest row first, all in one layout
    assert as_lists(layouts) == [
        (0, 9, [0, 1, 2, 3, 4, 5, 6, 7, 12], 3, 6, [[0] * 6, [0, 0, 1, 1, 1, 1], [0, 1, 1, 1, 1, 1]])
    ]


def test_left_padding_keeps_each_buckets_columns_and_cuts_only_shared_padding() -> None:
    token_index, layouts = plan_tokens(is_pad("....aa", "bbbbbb", "...ccc"), 3, 6, bucket_cost=3)
    assert token_index.tolist() == [6, 7, 8, 9, 10, 11, 15, 16, 17, 4, 5]
    assert as_lists(layouts) == [(0, 6, None, 1, 6, None), (6, 11, [0, 1, 2, 4, 5], 2, 3, [[0, 0, 0], [1, 0, 0]])]


def test_every_distinct_length_its_own_bucket_at_zero_cost_and_empty_rows_dropped() -> None:
    token_index, layouts = plan_tokens(is_pad("aaa.", "....", "bb..", "cc.."), 4, 4, bucket_cost=0)
    assert token_index.tolist() == [0, 1, 2, 8, 9, 12, 13]
    assert as_lists(layouts) == [(0, 3, None, 1, 3, None), (3, 7, None, 2, 2, None)]


def test_packed_documents_become_rows_of_their_own() -> None:
    document_ids = torch.tensor([[0, 0, 0, 1, 1, -1], [0, 1, 1, 1, 1, 1]])
    token_index, layouts = plan_tokens(document_ids < 0, 2, 6, document_ids=document_ids, bucket_cost=0)
    # documents: row 0 (3 tokens), row 0 (2), row 1 (1), row 1 (5) -> longest first: 5, 3, 2, 1
    assert token_index.tolist() == [7, 8, 9, 10, 11, 0, 1, 2, 3, 4, 6]
    assert as_lists(layouts) == [(0, 5, None, 1, 5, None), (5, 8, None, 1, 3, None), (8, 10, None, 1, 2, None),
                                 (10, 11, None, 1, 1, None)]  # fmt: skip
    token_index, layouts = plan_tokens(document_ids < 0, 2, 6, document_ids=document_ids)  # one call
    assert token_index.tolist() == [7, 8, 9, 10, 11, 0, 1, 2, 3, 4, 6]
    assert as_lists(layouts) == [
        (0, 11, [0, 1, 2, 3, 4, 5, 6, 7, 10, 11, 15], 4, 5,
         [[0, 0, 0, 0, 0], [0, 0, 0, 1, 1], [0, 0, 1, 1, 1], [0, 1, 1, 1, 1]])
    ]  # fmt: skip


def test_without_padding_nothing_is_taken_out() -> None:
    assert plan_tokens(None, 2, 3)[0] is None
    token_index, layouts = plan_tokens(is_pad("aaa", "bbb"), 2, 3)
    assert token_index is None and as_lists(layouts) == [(0, 6, None, 2, 3, None)]


def test_without_buckets_one_layout_in_batch_order() -> None:
    token_index, layouts = plan_tokens(is_pad("aa..", "bbbb"), 2, 4, buckets=False)
    assert token_index.tolist() == [0, 1, 4, 5, 6, 7]
    assert as_lists(layouts) == [(0, 6, [0, 1, 4, 5, 6, 7], 2, 4, [[0, 0, 1, 1], [0, 0, 0, 0]])]


def test_off_the_host_one_layout_and_no_bucketing(monkeypatch) -> None:
    monkeypatch.setattr(unpad.masks, "host_read_is_free", lambda tensor: False)  # as on an accelerator
    token_index, layouts = plan_tokens(is_pad("aa..", "bbbb"), 2, 4)
    assert token_index.tolist() == [0, 1, 4, 5, 6, 7] and len(layouts) == 1 and layouts[0].batch_size == 2
