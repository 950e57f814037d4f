"""mhaplug's batches fed to a Hugging Face transformers causal LM: a tiny randomly initialised GPT-2, offline.

``transformers.Trainer`` calls ``model(**batch)``. Called so, a packed batch gives exactly the loss and logits of
every document run alone, and a padded batch those of every sequence run alone. The tests also pin the two ways a
packed batch goes wrong: a 2-D ``attention_mask`` (read as padding only) and the KV cache that ``use_cache=True``
creates (transformers then ignores ``position_ids``); both let documents attend to each other.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import datasets
import pytest
import torch
import torch.nn.functional as F
import transformers.integrations.flash_attention as hf_flash_attention
import transformers.modeling_flash_attention_utils as hf_flash_utils
from hf_reference import assert_logits_per_document, run_alone, spans
from torch import Tensor
from torch.utils.data import DataLoader
from transformers import AttentionInterface, GPT2Config, GPT2LMHeadModel, masking_utils

from mhaplug.attention import masks
from mhaplug.data.collate import PackCollator, PadCollator

VOCAB = 64
LENGTHS = [9, 3, 6, 1, 5, 7, 2, 4, 8]  # a one-token document has no target but still gets logits
ATTENTION = ["sdpa", "eager"]
MHAPLUG_PACKED_KEYS = {
    "key_padding_mask",
    "lengths",
    "document_ids",
    "cu_seqlens",
    "max_seqlen",
    "num_targets",
    "num_real_tokens",
    "num_padded_tokens",
}
FLASH_KEYS = {"cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k"}


@pytest.fixture(scope="module")
def documents() -> datasets.Dataset:
    generator = torch.Generator().manual_seed(0)
    ids = [torch.randint(1, VOCAB, (n,), generator=generator).tolist() for n in LENGTHS]  # 0 is the pad id
    return datasets.Dataset.from_dict({"input_ids": ids})


def tiny_gpt2(attn_implementation: str) -> GPT2LMHeadModel:
    """Random GPT-2, no hub access; left in train mode as for training, with dropout 0 so outputs are exact.

    Weights drawn 5x wider than GPT-2's ``initializer_range=0.02``: attention is then sharp enough that seeing another
    document moves the loss by ~4e-3 rather than ~4e-5 (the logits by ~1 rather than ~0.05).
    """
    shape = {
        "n_layer": 2,
        "n_embd": 32,
        "n_head": 2,
        "n_positions": 64,
        "vocab_size": VOCAB,
        "bos_token_id": 1,
        "eos_token_id": 1,
    }
    no_dropout = {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}
    config = GPT2Config(**shape, **no_dropout, initializer_range=0.1, attn_implementation=attn_implementation)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config)
    model.loss_type = "ForCausalLM"  # the class name maps to no loss type; this is the default it falls back to
    assert model.config.use_cache  # transformers' default, which the cache tests rely on
    return model


def collate(dataset: datasets.Dataset, collator: Callable[[Any], dict[str, Any]]) -> dict[str, Any]:
    (batch,) = DataLoader(dataset, batch_size=len(dataset), collate_fn=collator)
    return batch


def pack(dataset: datasets.Dataset, **options: Any) -> dict[str, Any]:
    batch = collate(dataset, PackCollator(max_length=16, pad_to_multiple_of=8, **options))
    assert batch["input_ids"].shape[0] > 1 and batch["key_padding_mask"].any()  # several rows, with pad tails
    return batch


# ----------------------------------------------------------------------------------------------------------
# Packed batches
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("flash_keys", [False, True], ids=["plain", "flash_keys"])
@pytest.mark.parametrize("attn_implementation", ATTENTION)
def test_packed_batch_gives_the_per_document_loss(
    documents: datasets.Dataset, attn_implementation: str, flash_keys: bool
) -> None:
    """``model(**batch, use_cache=False)``, all of mhaplug's keys included, equals every document run alone."""
    model = tiny_gpt2(attn_implementation)
    batch = pack(documents, return_flash_attn_kwargs=flash_keys)
    assert "attention_mask" not in batch
    extra = MHAPLUG_PACKED_KEYS | (FLASH_KEYS if flash_keys else set())
    assert set(batch) == {"input_ids", "labels", "position_ids"} | extra  # GPT-2 takes the extra keys in **kwargs
    with torch.no_grad():
        out = model(**batch, use_cache=False)
    loss, logits = run_alone(model, batch)
    assert out.loss.item() == pytest.approx(loss, abs=1e-5)
    assert_logits_per_document(out.logits, batch, logits)


@pytest.mark.parametrize("attn_implementation", ATTENTION)
def test_packed_batch_with_a_2d_attention_mask_attends_across_documents(
    documents: datasets.Dataset, attn_implementation: str
) -> None:
    """Why packed batches carry no attention_mask: transformers reads it as padding only, not documents."""
    model = tiny_gpt2(attn_implementation)
    batch = pack(documents)
    batch["attention_mask"] = masks.attention_mask_from_is_pad(batch["key_padding_mask"])  # what it used to carry
    with torch.no_grad():
        out = model(**batch, use_cache=False)
    loss, logits = run_alone(model, batch)
    assert abs(out.loss.item() - loss) > 1e-3  # measured 4.3e-3 (sdpa and eager); 1e-5 when right
    for (row, where), alone in zip(spans(batch), logits):
        first_of_row = where.nonzero()[0, 0] == 0  # has no document before it to see
        moved = (out.logits[row, where] - alone).abs().max().item()
        assert moved < 1e-5 if first_of_row else moved > 0.1  # measured 0.8 to 1.3


@pytest.mark.parametrize("attn_implementation", ATTENTION)
def test_packed_batch_with_use_cache_attends_across_documents(
    documents: datasets.Dataset, attn_implementation: str
) -> None:
    """With a KV cache (GPT-2's default ``use_cache=True``) transformers skips the position_ids document check.

    ``model.config.use_cache = False`` (what ``transformers.Trainer`` sets, from ``TrainingArguments.use_cache``)
    keeps documents apart.
    """
    model = tiny_gpt2(attn_implementation)
    batch = pack(documents)
    loss, _ = run_alone(model, batch)
    with torch.no_grad():
        assert abs(model(**batch).loss.item() - loss) > 1e-3  # measured 4.3e-3, as with the 2-D attention_mask
        model.config.use_cache = False
        assert model(**batch).loss.item() == pytest.approx(loss, abs=1e-5)


def segment_ids(cu_seq_lens: Tensor, shape: torch.Size) -> Tensor:
    """cu_seq_lens over the flattened (B * L,) tokens -> (B, L) segment numbers, restarting at 0 in every row."""
    starts = torch.zeros(shape.numel(), dtype=torch.int64)
    starts[cu_seq_lens[:-1].long()] = 1
    segments = starts.cumsum(0).reshape(shape)  # (B, L)
    return segments - segments[:, :1]


def test_flash_attn_kwargs_are_transformers_own_segmentation(documents: datasets.Dataset) -> None:
    """The keys equal what transformers derives from these position_ids: for flash (B = 1 only) and for masks."""
    batch = pack(documents, return_flash_attn_kwargs=True)
    (cu_seq_lens, _), (max_length, _) = hf_flash_utils.prepare_fa_kwargs_from_position_ids(batch["position_ids"])
    assert batch["cu_seq_lens_q"].tolist() == batch["cu_seq_lens_k"].tolist() == cu_seq_lens.tolist()
    assert batch["max_length_q"] == batch["max_length_k"] == int(max_length)
    packed_segments = masking_utils.find_packed_sequence_indices(batch["position_ids"])  # what sdpa / eager mask by
    assert packed_segments is not None
    assert segment_ids(batch["cu_seq_lens_q"], batch["input_ids"].shape).tolist() == packed_segments.tolist()


@pytest.fixture
def flash_gpt2(monkeypatch: pytest.MonkeyPatch) -> tuple[GPT2LMHeadModel, list[str]]:
    """GPT-2 running transformers' own flash-attention code path, with pure-torch kernels in place of flash-attn.

    transformers' ``flash_attention_forward`` and ``_flash_attention_forward`` run as they are (the unpad, varlen
    and dense branches, the flattening to B * L tokens); only the kernels are swapped: a varlen kernel with
    flash-attn's signature that runs causal SDPA per segment, and a dense one. Returns the model and the names of the
    kernels called.
    """
    calls: list[str] = []

    def varlen_kernel(
        q: Tensor,
        k: Tensor,
        v: Tensor,
        cu_seqlens_q: Tensor,
        cu_seqlens_k: Tensor,
        max_seqlen_q: int,
        max_seqlen_k: int,
        dropout_p: float = 0.0,
        softmax_scale: float | None = None,
        causal: bool = False,
    ) -> Tensor:
        # q, k, v: (T, H, D), every token of the batch; flash-attn reads only the tokens cu_seqlens cover.
        assert cu_seqlens_q.dtype == torch.int32 and int(cu_seqlens_q[-1]) == q.shape[0], (cu_seqlens_q, q.shape)
        assert torch.equal(cu_seqlens_q, cu_seqlens_k) and max_seqlen_q == max_seqlen_k
        lengths = cu_seqlens_q.diff()
        assert int(lengths.min()) >= 1 and int(lengths.max()) <= int(max_seqlen_q)
        calls.append(f"varlen max_seqlen={type(max_seqlen_q).__name__}")
        out = torch.empty_like(q)
        for start, stop in zip(cu_seqlens_q[:-1].tolist(), cu_seqlens_q[1:].tolist()):
            qs, ks, vs = (x[start:stop].transpose(0, 1) for x in (q, k, v))  # (H, n, D)
            attn = F.scaled_dot_product_attention(qs, ks, vs, is_causal=causal, scale=softmax_scale)
            out[start:stop] = attn.transpose(0, 1)  # (n, H, D)
        return out

    def dense_kernel(
        q: Tensor, k: Tensor, v: Tensor, *, dropout_p: float = 0.0, softmax_scale: float | None = None, causal: bool
    ) -> Tensor:
        calls.append("dense")
        qs, ks, vs = (x.transpose(1, 2) for x in (q, k, v))  # (B, H, L, D)
        attn = F.scaled_dot_product_attention(qs, ks, vs, is_causal=causal, scale=softmax_scale)
        return attn.transpose(1, 2)  # (B, L, H, D)

    # (flash, varlen, kvcache, pad, unpad) kernels, (varlen, kvcache) kwarg filters: lazy_import_flash_attention's
    # return value; the filter reads the varlen kernel's signature, as for flash-attn's own.
    process_kwargs = hf_flash_utils._lazy_define_process_function(varlen_kernel)
    kernels = ((dense_kernel, varlen_kernel, None, None, None), (process_kwargs, dict))
    monkeypatch.setattr(hf_flash_utils, "lazy_import_flash_attention", lambda *args, **kwargs: kernels)
    # float32 on CPU: transformers would look for an nn.Linear to pick a half dtype (GPT-2 has Conv1D only).
    monkeypatch.setattr(hf_flash_attention, "get_target_dtype", lambda query, module: None)
    # A name without "flash" in it, so that model init does not try to import flash-attn.
    name = "mhaplug_test_varlen"
    monkeypatch.setitem(AttentionInterface._global_mapping, name, hf_flash_attention.flash_attention_forward)
    monkeypatch.setitem(masking_utils.AttentionMaskInterface._global_mapping, name, masking_utils.flash_attention_mask)
    return tiny_gpt2(name), calls


@pytest.mark.parametrize("use_cache", [False, True])
def test_flash_attn_kwargs_drive_transformers_varlen_path(
    documents: datasets.Dataset, flash_gpt2: tuple[GPT2LMHeadModel, list[str]], use_cache: bool
) -> None:
    """With the keys, transformers' flash path runs one varlen call over the (B, L) rows: the per-document loss.

    The varlen path does not read the mask, so it keeps documents apart with or without a KV cache.
    """
    model, calls = flash_gpt2
    batch = pack(documents, return_flash_attn_kwargs=True)
    with torch.no_grad():
        out = model(**batch, use_cache=use_cache)
    assert calls == ["varlen max_seqlen=int"] * model.config.n_layer  # a Python int: no device sync in the kernel
    loss, logits = run_alone(model, batch)
    assert out.loss.item() == pytest.approx(loss, abs=1e-5)
    assert_logits_per_document(out.logits, batch, logits)


def test_flash_path_without_the_keys_attends_across_documents(
    documents: datasets.Dataset, flash_gpt2: tuple[GPT2LMHeadModel, list[str]]
) -> None:
    """Why the keys exist: transformers' flash path reads documents from position_ids only when B = 1."""
    model, calls = flash_gpt2
    batch = pack(documents)  # B > 1 rows, no flash keys
    with torch.no_grad():
        out = model(**batch, use_cache=False)
    assert calls == ["dense"] * model.config.n_layer  # one causal attention over each whole row
    loss, _ = run_alone(model, batch)
    assert abs(out.loss.item() - loss) > 1e-3  # measured 4.3e-3, as with the 2-D attention_mask


# ----------------------------------------------------------------------------------------------------------
# Padded batches
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("padding_side", ["right", "left"])
@pytest.mark.parametrize("attn_implementation", ATTENTION)
def test_padded_batch_gives_the_per_sequence_loss(
    documents: datasets.Dataset, attn_implementation: str, padding_side: str
) -> None:
    """``model(**batch)`` as the Trainer calls it (attention_mask and position_ids from the collator)."""
    model = tiny_gpt2(attn_implementation)
    batch = collate(documents, PadCollator(padding_side=padding_side, pad_to_multiple_of=8))  # type: ignore[arg-type]
    assert "attention_mask" in batch and batch["key_padding_mask"].any()
    with torch.no_grad():
        out = model(**batch)
    loss, logits = run_alone(model, batch)
    assert out.loss.item() == pytest.approx(loss, abs=1e-5)
    assert_logits_per_document(out.logits, batch, logits)
