"""PadCollator and PackCollator: literal expected batches, every input kind, properties, and errors."""

from __future__ import annotations

import datasets
import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.utils.data import DataLoader

from mhaplug.attention import masks
from mhaplug.common import round_up
from mhaplug.data.collate import COMPUTED_KEYS, PackCollator, PadCollator, add_token_counts

T, F = True, False


def as_lists(batch: dict) -> dict:
    return {k: (v.tolist() if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


def test_pad_right_literal() -> None:
    batch = as_lists(PadCollator(pad_token_id=0)([[5, 6, 7], [8]]))
    assert batch == {
        "input_ids": [[5, 6, 7], [8, 0, 0]],
        "labels": [[-100, 6, 7], [-100, -100, -100]],
        "key_padding_mask": [[F, F, F], [F, T, T]],
        "attention_mask": [[1, 1, 1], [1, 0, 0]],
        "position_ids": [[0, 1, 2], [0, 0, 0]],
        "lengths": [3, 1],
        "num_targets": 2,  # 6 and 7: nothing predicts a first token
        "num_real_tokens": 4,
        "num_padded_tokens": 6,
    }


def test_pad_left_with_multiple_literal() -> None:
    batch = as_lists(PadCollator(pad_token_id=0, padding_side="left", pad_to_multiple_of=4)([[5, 6, 7], [8]]))
    assert batch == {
        "input_ids": [[0, 5, 6, 7], [0, 0, 0, 8]],
        "labels": [[-100, -100, 6, 7], [-100, -100, -100, -100]],
        "key_padding_mask": [[T, F, F, F], [T, T, T, F]],
        "attention_mask": [[0, 1, 1, 1], [0, 0, 0, 1]],
        "position_ids": [[0, 0, 1, 2], [0, 0, 0, 0]],
        "lengths": [3, 1],
        "num_targets": 2,
        "num_real_tokens": 4,
        "num_padded_tokens": 8,
    }


@pytest.mark.parametrize(
    ("longest", "multiple", "expected"), [(8, 8, 8), (9, 8, 16), (1, 8, 8), (7, None, 7), (64, 64, 64)]
)
def test_pad_to_multiple_adds_no_extra_block(longest: int, multiple: int | None, expected: int) -> None:
    batch = PadCollator(pad_to_multiple_of=multiple)([[1] * longest, [2]])
    assert batch["input_ids"].shape == (2, expected)
    assert round_up(longest, multiple) == expected


COUNTS = ("num_targets", "num_real_tokens", "num_padded_tokens")


@pytest.mark.parametrize(
    ("collator", "rows", "input_ids", "labels", "counts"),
    [
        (
            PadCollator(ignore_index=-1),
            [[5, 6, 7], [8, 9]],
            [[5, 6, 7], [8, 9, 0]],
            [[-1, 6, 7], [-1, 9, -1]],
            (3, 5, 6),
        ),
        (
            PadCollator(padding_side="left", pad_to_multiple_of=4, ignore_index=-1),
            [[5, 6, 7], [8, 9]],
            [[0, 5, 6, 7], [0, 0, 8, 9]],
            [[-1, -1, 6, 7], [-1, -1, -1, 9]],
            (3, 5, 8),
        ),
        (
            PackCollator(max_length=4, ignore_index=-1),
            [[5, 6, 7], [8, 9], [4]],  # first-fit: [5 6 7] + [4]; [8 9]
            [[5, 6, 7, 4], [8, 9, 0, 0]],
            [[-1, 6, 7, -1], [-1, 9, -1, -1]],
            (3, 6, 8),
        ),
    ],
    ids=["right", "left", "packed"],
)
def test_counts_literal_with_an_ignore_index_of_its_own(
    collator,
    rows: list,
    input_ids: list,
    labels: list,  # type: ignore[no-untyped-def]
    counts: tuple[int, int, int],
) -> None:
    """(num_targets, num_real_tokens, num_padded_tokens): targets are the labels other than the collator's
    ignore_index after the next-token shift."""
    batch = collator(rows)
    assert batch["input_ids"].tolist() == input_ids and batch["labels"].tolist() == labels
    assert tuple(batch[k] for k in COUNTS) == counts
    assert all(type(batch[k]) is int for k in COUNTS)  # Python ints: reading them needs no device sync


def test_add_token_counts_counts_a_batch_from_another_collator() -> None:
    """A user's batch with no lengths: real tokens from key_padding_mask; the collators' own counts agree."""
    batch = PadCollator(padding_side="left")([[5, 6, 7], [8]])
    theirs = {"labels": batch["labels"], "key_padding_mask": batch["key_padding_mask"]}
    assert add_token_counts(theirs) is theirs
    assert {k: theirs[k] for k in COUNTS} == {k: batch[k] for k in COUNTS} == dict(zip(COUNTS, (2, 4, 6)))
    assert (
        add_token_counts({"labels": torch.tensor([[1, 2, -7]]), "lengths": torch.tensor([3])}, ignore_index=-7)[
            "num_targets"
        ]
        == 1
    )
    with pytest.raises(
        ValueError, match=r"batch\['labels'\] must be a \(B, L\) tensor to count the targets, got shape \(3,\)"
    ):
        add_token_counts({"labels": torch.tensor([1, 2, 3]), "lengths": torch.tensor([3])})
    with pytest.raises(KeyError, match=r"neither 'lengths' nor 'key_padding_mask'.*\['input_ids', 'labels'\]"):
        add_token_counts({"input_ids": torch.ones(1, 2), "labels": torch.ones(1, 2)})


def test_labels_come_from_lengths_not_pad_id() -> None:
    """pad_token_id == EOS: the real EOS keeps its label, so the model still learns to stop."""
    eos = 1
    batch = PadCollator(pad_token_id=eos)([[7, 8, eos], [9, eos]])
    assert batch["labels"].tolist() == [[-100, 8, eos], [-100, eos, -100]]


def test_max_length_error_and_truncate() -> None:
    with pytest.raises(ValueError, match=r"row 1 has 5 tokens, more than max_length=4; .*overflow='truncate'"):
        PadCollator(max_length=4)([[1, 2], [1, 2, 3, 4, 5]])
    batch = PadCollator(max_length=4, overflow="truncate")([[1, 2], [1, 2, 3, 4, 5]])
    assert batch["input_ids"].tolist() == [[1, 2, 0, 0], [1, 2, 3, 4]]
    assert batch["lengths"].tolist() == [2, 4]


@pytest.mark.parametrize(
    "rows",
    [
        [[5, 6, 7], [8]],
        [np.array([5, 6, 7]), np.array([8], dtype=np.int32)],
        [torch.tensor([5, 6, 7]), torch.tensor([8], dtype=torch.int16)],
        [{"input_ids": [5, 6, 7], "text": "ignored"}, {"input_ids": torch.tensor([8])}],
        [(5, 6, 7), (8,)],
    ],
    ids=["lists", "numpy", "tensors", "dicts", "tuples"],
)
def test_every_row_kind_gives_the_same_batch(rows: list) -> None:
    batch = PadCollator()(rows)
    assert batch["input_ids"].dtype == torch.int64
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]


@pytest.mark.parametrize("torch_format", [False, True])
def test_works_as_dataloader_collate_fn_on_a_datasets_dataset(torch_format: bool) -> None:
    dataset = datasets.Dataset.from_dict({"input_ids": [[5, 6, 7], [8], [9, 10]], "text": ["a", "b", "c"]})
    if torch_format:
        dataset.set_format("torch", columns=["input_ids"])
    loader = DataLoader(dataset, batch_size=3, collate_fn=PadCollator(padding_side="left"))
    (batch,) = list(loader)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8], [0, 9, 10]]
    assert batch["position_ids"].tolist() == [[0, 1, 2], [0, 0, 0], [0, 0, 1]]


def test_passthrough_keys_are_stacked() -> None:
    batch = PadCollator(passthrough_keys=("label",))(
        [{"input_ids": [1], "label": 3}, {"input_ids": [2, 2], "label": 4}]
    )
    assert batch["label"].tolist() == [3, 4]
    with pytest.raises(KeyError, match=r"passthrough key 'label' is missing from rows \[1\]"):
        PadCollator(passthrough_keys=("label",))([{"input_ids": [1], "label": 3}, {"input_ids": [2]}])


BATCH_KEYS = (
    "input_ids",
    "labels",
    "key_padding_mask",
    "position_ids",
    "lengths",
    "attention_mask",
    "document_ids",
    "cu_seqlens",
    "max_seqlen",
    "cu_seq_lens_q",
    "cu_seq_lens_k",
    "max_length_q",
    "max_length_k",
    "num_targets",
    "num_real_tokens",
    "num_padded_tokens",
)


def test_computed_keys_are_every_key_the_collators_emit() -> None:
    padded = PadCollator()([[1, 2], [3]])
    packed = PackCollator(max_length=4, return_flash_attn_kwargs=True)([[1, 2], [3]])
    assert set(padded) | set(packed) == set(COMPUTED_KEYS) == set(BATCH_KEYS)


@pytest.mark.parametrize("key", BATCH_KEYS)
@pytest.mark.parametrize("cls", [PadCollator, PackCollator])
def test_passthrough_keys_may_not_name_a_computed_key(cls: type, key: str) -> None:
    """Before issue 10 PadCollator silently replaced its own key with the rows' (PackCollator raised at the first
    batch, without naming the key)."""
    kwargs = {"max_length": 8} if cls is PackCollator else {}
    with pytest.raises(
        ValueError,
        match=rf"passthrough_keys names {key!r}, a key the collator computes; "
        rf"rename that row key \(e.g. 'row_{key}'\)",
    ):
        cls(passthrough_keys=("label", key), **kwargs)


def test_passthrough_keys_settings() -> None:
    with pytest.raises(
        TypeError, match=r"passthrough_keys must be a tuple of row keys, got str 'label'; write \('label',\)"
    ):
        PadCollator(passthrough_keys="label")  # type: ignore[arg-type]
    with pytest.raises(
        ValueError,
        match=r"PackCollator cannot pass keys through \(rows are regrouped\), got "
        r"passthrough_keys=\('label',\); use passthrough_keys=\(\)",
    ):
        PackCollator(max_length=8, passthrough_keys=("label",))
    assert PadCollator(passthrough_keys=["label"]).passthrough_keys == ("label",)  # a list (Hydra's) is kept as a tuple


@pytest.mark.parametrize(
    ("values", "error", "rows"),
    [
        (
            [[1, 2], [3, 4], [5, 6, 7]],
            ValueError,
            r"rows \[2\] differ from row 0 \(row 0: list \[1, 2\]; row 2: list \[5, 6, 7\]\)",
        ),
        (
            [torch.zeros(2), torch.zeros(2), torch.zeros(3)],
            ValueError,
            r"rows \[2\] differ from row 0 \(row 0: Tensor of shape \(2,\); row 2: Tensor of shape \(3,\)\)",
        ),
        ([3, "a", 4], TypeError, r"rows \[1\] differ from row 0 \(row 0: int 3; row 1: str 'a'\)"),
        ([3, None, None], TypeError, r"rows \[1, 2\] differ from row 0 \(row 0: int 3; row 1: NoneType None\)"),
        (
            [[[1], [2]], [[1], [2, 3]], [[1], [2]]],
            ValueError,
            r"rows \[1\] differ from row 0 \(row 0: list \[\[1\], \[2\]\]; row 1: list \[\[1\], \[2, 3\]\]\)",
        ),
    ],
    ids=["ragged-lists", "ragged-tensors", "int-and-str", "int-and-none", "nested-ragged"],
)
def test_passthrough_values_that_cannot_be_stacked_name_the_rows(
    values: list, error: type[Exception], rows: str
) -> None:
    """Before issue 10: default_collate's bare error ("each element in list of batch should be of equal size")."""
    batch = [{"input_ids": [1, 2], "extra": value} for value in values]
    with pytest.raises(
        error,
        match=r"passthrough key 'extra' cannot be stacked: "
        + rows
        + r"; give 'extra' one type and shape in every row, or leave it out of passthrough_keys",
    ):
        PadCollator(passthrough_keys=("extra",))(batch)


BAD_ROWS = [
    ([], ValueError, r"cannot collate an empty batch"),
    ([[1, 2], []], ValueError, r"row 1: input_ids is empty; drop empty documents"),
    ([[1.5, 2.0]], TypeError, r"row 0: input_ids must be integers, got dtype torch.float64"),
    ([[True, False]], TypeError, r"row 0: input_ids must be integers, got dtype torch.bool"),
    # issue 18: a bool row after a numpy or tensor first row was concatenated into ids 1 and 0
    ([np.array([5, 6]), [True, False]], TypeError, r"row 1: input_ids must be integers, got dtype torch.bool"),
    ([torch.tensor([5, 6]), np.array([True])], TypeError, r"row 1: input_ids must be integers, got dtype torch.bool"),
    ([[1], [2, 99]], ValueError, r"row 1: token ids \[99\] are outside the vocabulary \[0, 50\)"),
    ([[1], [[2, 3]]], ValueError, r"row 1: input_ids must be 1-D, got shape \(1, 2\)"),
    ([{"ids": [1]}], KeyError, r"row 0 has no 'input_ids' key; its keys are \['ids'\]"),
    # issue 10: what used to reach numpy or torch as a bare error (or, for uint64, wrap silently to -1)
    ([[1], [2**63]], ValueError, r"row 1: input_ids has token ids \[9223372036854775808\] that do not fit int64"),
    (
        [[1], [3, -(2**63) - 1]],
        ValueError,
        r"row 1: input_ids has token ids \[-9223372036854775809\] that do not fit int64",
    ),
    (
        [np.array([1]), np.array([2**64 - 1], dtype=np.uint64)],
        ValueError,
        r"row 1: input_ids has token ids \[18446744073709551615\] that do not fit int64",
    ),
    (
        [[1], ["a", "b"]],
        TypeError,
        r"row 1: input_ids must be token ids \(ints\), got strings \['a', 'b'\]; tokenise the text first",
    ),
    ([np.array([1]), np.array(["1"])], TypeError, r"row 1: input_ids must be token ids \(ints\), got strings \['1'\]"),
    ([[1], "ab"], TypeError, r"row 1: input_ids must be token ids \(ints\), got str 'ab'; tokenise the text first"),
    (
        [{"input_ids": [1]}, {"input_ids": "hello"}],
        TypeError,
        r"row 1: input_ids must be token ids \(ints\), got str 'hello'",
    ),
    ([[1], b"ab"], TypeError, r"row 1: input_ids must be token ids \(ints\), got bytes b'ab'; .*list\(data\)"),
    (
        [[1], [[2, 3], [4]]],
        ValueError,
        r"row 1: input_ids must be a flat sequence of ints, got a nested list \[\[2, 3\], \[4\]\]",
    ),
    (
        [[1], [2, [3, 4]]],
        ValueError,
        r"row 1: input_ids must be a flat sequence of ints, got a nested list \[2, \[3, 4\]\]",
    ),
]


@pytest.mark.parametrize(("rows", "error", "message"), BAD_ROWS)
@pytest.mark.parametrize(
    "collator", [PadCollator(vocab_size=50), PackCollator(max_length=8, vocab_size=50)], ids=["pad", "pack"]
)
def test_bad_rows_name_the_row(collator, rows: list, error: type[Exception], message: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(error, match=message):
        collator(rows)


def test_bad_settings() -> None:
    with pytest.raises(ValueError, match="padding_side must be one of right, left; got 'up'"):
        PadCollator(padding_side="up")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="pad_to_multiple_of must be an int >= 1 or None, got 0"):
        PadCollator(pad_to_multiple_of=0)
    with pytest.raises(TypeError, match="missing 1 required keyword-only argument: 'max_length'"):
        PackCollator()  # type: ignore[call-arg]  # required, and the signature says so
    with pytest.raises(ValueError, match="max_length must be an int >= 1, got 0"):
        PackCollator(max_length=0)
    with pytest.raises(ValueError, match=r"pad_token_id must be in \[0, vocab_size=10\), got 10"):
        PadCollator(pad_token_id=10, vocab_size=10)


@pytest.mark.parametrize("cls", [PadCollator, PackCollator])
@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        (
            {"pad_token_id": None},
            TypeError,
            (
                r"pad_token_id must be an int \(the id written on padding\), got None \(NoneType\); "
                r"tokenizer.pad_token_id is None when the tokenizer has no pad token"
            ),
        ),
        (
            {"pad_token_id": 1.5},
            TypeError,
            r"pad_token_id must be an int \(the id written on padding\), got 1.5 \(float\)",
        ),
        (
            {"pad_token_id": "0"},
            TypeError,
            r"pad_token_id must be an int \(the id written on padding\), got '0' \(str\)",
        ),
        (
            {"pad_token_id": True},
            TypeError,
            r"pad_token_id must be an int \(the id written on padding\), got True \(bool\)",
        ),
        ({"pad_token_id": 2**63}, ValueError, r"pad_token_id must fit int64, got 9223372036854775808"),
        (
            {"ignore_index": None},
            TypeError,
            r"ignore_index must be an int \(the label where no loss is taken\), got None",
        ),
        ({"ignore_index": -100.0}, TypeError, r"ignore_index must be an int .*got -100.0 \(float\)"),
    ],
)
def test_bad_pad_ids(cls: type, kwargs: dict, error: type[Exception], message: str) -> None:
    """Before issue 10: None and '0' failed at the first batch inside torch.full, 1.5 and True padded with 1."""
    with pytest.raises(error, match=message):
        cls(max_length=8, **kwargs) if cls is PackCollator else cls(**kwargs)


def test_numpy_integer_pad_ids_are_ints() -> None:
    batch = PadCollator(pad_token_id=np.int64(7), ignore_index=np.int32(-1))([[5, 6], [8]])
    assert batch["input_ids"].tolist() == [[5, 6], [8, 7]] and batch["labels"].tolist() == [[-1, 6], [-1, -1]]


@given(
    lengths=st.lists(st.integers(1, 12), min_size=1, max_size=6),
    padding_side=st.sampled_from(["right", "left"]),
    multiple=st.sampled_from([None, 1, 4, 8]),
)
def test_property_masks_labels_positions_agree_with_lengths(
    lengths: list[int], padding_side: str, multiple: int | None
) -> None:
    rows = [list(range(100 + i, 100 + i + n)) for i, n in enumerate(lengths)]
    batch = PadCollator(pad_token_id=3, padding_side=padding_side, pad_to_multiple_of=multiple)(rows)  # type: ignore[arg-type]
    width = round_up(max(lengths), multiple)
    is_pad = masks.is_pad_from_lengths(torch.tensor(lengths), width, padding_side=padding_side)  # type: ignore[arg-type]
    assert batch["input_ids"].shape == (len(rows), width)
    assert torch.equal(batch["key_padding_mask"], is_pad)
    assert torch.equal(batch["attention_mask"], (~is_pad).long())
    assert batch["lengths"].tolist() == lengths
    assert (batch["num_targets"], batch["num_real_tokens"], batch["num_padded_tokens"]) == (
        sum(lengths) - len(lengths),
        sum(lengths),
        len(rows) * width,
    )
    for b, row in enumerate(rows):
        real = ~is_pad[b]
        assert batch["input_ids"][b][real].tolist() == row
        assert batch["labels"][b][real].tolist() == [-100] + row[1:]  # nothing predicts a first token
        assert (batch["labels"][b][~real] == -100).all() and (batch["input_ids"][b][~real] == 3).all()
        assert batch["position_ids"][b][real].tolist() == list(range(len(row)))
        assert (batch["position_ids"][b][~real] == 0).all()


# ----------------------------------------------------------------------------------------------------------
# Packing
# ----------------------------------------------------------------------------------------------------------


def test_pack_literal_docstring_example() -> None:
    """No attention_mask: Hugging Face models would read it as padding only and attend across documents."""
    batch = as_lists(PackCollator(max_length=6, pad_to_multiple_of=2)([[5, 6, 7], [8, 9]]))
    assert batch == {
        "input_ids": [[5, 6, 7, 8, 9, 0]],
        "labels": [[-100, 6, 7, -100, 9, -100]],
        "key_padding_mask": [[F, F, F, F, F, T]],
        "position_ids": [[0, 1, 2, 0, 1, 0]],
        "lengths": [5],
        "document_ids": [[0, 0, 0, 1, 1, -1]],
        "cu_seqlens": [0, 3, 5],
        "max_seqlen": 3,
        "num_targets": 3,  # 6, 7 and 9: no label on a document's first token
        "num_real_tokens": 5,
        "num_padded_tokens": 6,
    }
    assert PackCollator(max_length=6)([[5, 6, 7], [8, 9]])["cu_seqlens"].dtype == torch.int32


def test_pack_flash_attn_kwargs_literal() -> None:
    """transformers' varlen keys cover all B * L tokens row by row: documents, then each pad token on its own."""
    collator = PackCollator(max_length=4, return_flash_attn_kwargs=True)
    batch = collator([[1, 2, 3], [4, 5], [6, 7], [8], [9]])
    assert batch["input_ids"].tolist() == [[1, 2, 3, 8], [4, 5, 6, 7], [9, 0, 0, 0]]
    flash = {k: batch[k] for k in ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")}
    assert as_lists(flash) == {
        "cu_seq_lens_q": [0, 3, 4, 6, 8, 9, 10, 11, 12],
        "cu_seq_lens_k": [0, 3, 4, 6, 8, 9, 10, 11, 12],
        "max_length_q": 3,
        "max_length_k": 3,
    }
    assert batch["cu_seq_lens_q"].dtype == batch["cu_seq_lens_k"].dtype == torch.int32
    assert type(batch["max_length_q"]) is int and type(batch["max_length_k"]) is int  # no device sync to read
    assert batch["cu_seqlens"].tolist() == [0, 3, 4, 6, 8, 9]  # mhaplug's own key: real tokens only
    assert "cu_seq_lens_q" not in PackCollator(max_length=4)([[1, 2]])
    with pytest.raises(TypeError, match="return_flash_attn_kwargs must be a bool, got 'yes'"):
        PackCollator(max_length=4, return_flash_attn_kwargs="yes")  # type: ignore[arg-type]


def reference_flash_segments(document_ids: torch.Tensor) -> torch.Tensor:
    """cu_seq_lens from document_ids (B, L): a segment starts at each row, each document and each pad token."""
    previous = torch.nn.functional.pad(document_ids, (1, 0), value=-2)[:, :-1]  # (B, L), -2 before each row
    starts = ((document_ids != previous) | (document_ids < 0)).reshape(-1).nonzero().reshape(-1)
    return torch.cat([starts, torch.tensor([document_ids.numel()])])


def test_pack_boundaries_open_new_rows() -> None:
    batch = PackCollator(max_length=4)([[1, 2, 3], [4, 5], [6, 7], [8]])
    # first-fit decreasing: [1 2 3] + [8]; [4 5] + [6 7]
    assert batch["input_ids"].tolist() == [[1, 2, 3, 8], [4, 5, 6, 7]]
    assert batch["document_ids"].tolist() == [[0, 0, 0, 1], [0, 0, 1, 1]]
    assert batch["labels"].tolist() == [[-100, 2, 3, -100], [-100, 5, -100, 7]]
    assert batch["cu_seqlens"].tolist() == [0, 3, 4, 6, 8]
    keep = masks.document_causal_keep(batch["document_ids"])
    assert keep[1, 0].int().tolist() == [[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 1, 1]]


def test_pack_overflow_split_error_truncate() -> None:
    split = PackCollator(max_length=3)([[1, 2, 3, 4, 5, 6, 7]])
    assert split["input_ids"].tolist() == [[1, 2, 3], [4, 5, 6], [7, 0, 0]]
    assert split["position_ids"].tolist() == [[0, 1, 2], [0, 1, 2], [0, 0, 0]]
    with pytest.raises(ValueError, match=r"row 0 has 7 tokens, more than max_length=3; .*overflow='split'"):
        PackCollator(max_length=3, overflow="error")([[1, 2, 3, 4, 5, 6, 7]])
    assert PackCollator(max_length=3, overflow="truncate")([[1, 2, 3, 4]])["input_ids"].tolist() == [[1, 2, 3]]


def test_pack_prepacked_rows_keep_their_documents() -> None:
    rows = [{"input_ids": [1, 2, 3, 4], "document_lengths": [1, 3]}, {"input_ids": [5, 6], "document_lengths": [2]}]
    batch = PackCollator(max_length=4)(rows)
    assert batch["document_ids"].tolist() == [[0, 1, 1, 1], [0, 0, -1, -1]]
    assert batch["cu_seqlens"].tolist() == [0, 1, 4, 6]
    with pytest.raises(ValueError, match=r"row 0: document_lengths \[2, 3\] must be positive and sum to its 4 tokens"):
        PackCollator(max_length=4)([{"input_ids": [1, 2, 3, 4], "document_lengths": [2, 3]}])


@given(lengths=st.lists(st.integers(1, 10), min_size=1, max_size=12), capacity=st.integers(10, 16))
def test_property_packing_keeps_every_token_in_order(lengths: list[int], capacity: int) -> None:
    docs = [[1000 * (i + 1) + t for t in range(n)] for i, n in enumerate(lengths)]
    batch = PackCollator(max_length=capacity, pad_to_multiple_of=4, return_flash_attn_kwargs=True)(docs)
    is_pad = batch["key_padding_mask"]
    assert "attention_mask" not in batch
    assert (batch["lengths"] <= capacity).all()
    cu_seq_lens = batch["cu_seq_lens_q"]
    assert cu_seq_lens.tolist() == reference_flash_segments(batch["document_ids"]).tolist()
    assert batch["max_length_q"] == int(cu_seq_lens.diff().max()) == max(lengths)
    seen = []
    for row, doc_ids, pos, labels in zip(
        batch["input_ids"], batch["document_ids"], batch["position_ids"], batch["labels"]
    ):
        for d in doc_ids.unique().tolist():
            if d < 0:
                continue
            tokens = row[doc_ids == d].tolist()
            seen.append(tokens)
            assert pos[doc_ids == d].tolist() == list(range(len(tokens)))
            assert labels[doc_ids == d].tolist() == [-100] + tokens[1:]
    assert sorted(seen) == sorted(docs)
    assert int((~is_pad).sum()) == sum(lengths) == int(batch["cu_seqlens"][-1]) == batch["num_real_tokens"]
    assert batch["num_targets"] == sum(lengths) - len(lengths) and batch["num_padded_tokens"] == is_pad.numel()
