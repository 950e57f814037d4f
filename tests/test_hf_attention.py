"""``attn_implementation="mhaplug"`` in transformers models (tiny, randomly initialised, offline).

References: every document (sequence) run through the model alone, and transformers' own ``sdpa`` on the same
weights (with ``use_cache=False`` on packed rows, the only way ``sdpa`` keeps documents apart).
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from typing import Any

import datasets
import pytest
import torch
import transformers
from hf_reference import assert_logits_per_document, run_alone
from torch import Tensor
from transformers import (
    GemmaConfig,
    GemmaForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    masking_utils,
)

import mhaplug.hf
from mhaplug import PackCollator, PadCollator, audit
from mhaplug.attention import strategies

VOCAB = 64
LENGTHS = [9, 3, 6, 1, 5, 7, 2, 4, 8, 12]


def documents(lengths: list[int] = LENGTHS, seed: int = 0) -> list[dict[str, list[int]]]:
    generator = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(2, VOCAB, (n,), generator=generator).tolist()} for n in lengths]


def _llama(impl: str) -> transformers.PreTrainedModel:
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.1, attn_implementation=impl,
    )  # fmt: skip
    return LlamaForCausalLM(config)


def _qwen2(impl: str) -> transformers.PreTrainedModel:
    config = Qwen2Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=1, max_position_embeddings=64, initializer_range=0.1, attn_implementation=impl,
    )  # fmt: skip
    return Qwen2ForCausalLM(config)


def _mistral(impl: str, sliding_window: int | None = None) -> transformers.PreTrainedModel:
    config = MistralConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.1, sliding_window=sliding_window,
        attn_implementation=impl,
    )  # fmt: skip
    return MistralForCausalLM(config)


def _gemma(impl: str) -> transformers.PreTrainedModel:
    """Gemma scales scores by query_pre_attn_scalar**-0.5, here 16**-0.5 with heads of 8: not the kernels' default."""
    config = GemmaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=1, head_dim=8, query_pre_attn_scalar=16, max_position_embeddings=64,
        initializer_range=0.1, attn_implementation=impl,
    )  # fmt: skip
    return GemmaForCausalLM(config)


def _gpt2(impl: str) -> transformers.PreTrainedModel:
    config = GPT2Config(
        n_layer=2, n_embd=32, n_head=2, n_positions=64, vocab_size=VOCAB, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0, initializer_range=0.1, attn_implementation=impl,
    )  # fmt: skip
    model = GPT2LMHeadModel(config)
    model.loss_type = "ForCausalLM"  # the class name maps to no loss type; this is the default it falls back to
    return model


MODELS: dict[str, Callable[[str], transformers.PreTrainedModel]] = {
    "llama": _llama,
    "qwen2": _qwen2,
    "mistral": _mistral,
    "gemma": _gemma,
    "gpt2": _gpt2,
}


def pair(name: str, impl: str = "mhaplug") -> tuple[transformers.PreTrainedModel, transformers.PreTrainedModel]:
    """The model with ``impl`` and the same weights with ``sdpa``; train mode (dropout is 0 in every config)."""
    torch.manual_seed(0)
    model = MODELS[name](impl)
    reference = MODELS[name]("sdpa")
    reference.load_state_dict(model.state_dict())
    return model.train(), reference.train()


def packed() -> dict[str, Any]:
    batch = PackCollator(max_length=16, pad_to_multiple_of=8)(documents())
    assert batch["input_ids"].shape[0] > 1 and batch["key_padding_mask"].any()  # several rows, with pad tails
    return batch


def grads(model: transformers.PreTrainedModel) -> dict[str, Tensor]:
    return {name: p.grad for name, p in model.named_parameters() if p.grad is not None}


def assert_same_grads(model: transformers.PreTrainedModel, reference: transformers.PreTrainedModel) -> None:
    got, expected = grads(model), grads(reference)
    assert got.keys() == expected.keys() and len(got) > 0
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=2e-5, rtol=1e-4, msg=name)


# ----------------------------------------------------------------------------------------------------------
# Registration
# ----------------------------------------------------------------------------------------------------------


def test_import_mhaplug_does_not_import_transformers() -> None:
    code = "import sys, mhaplug; mhaplug.MultiheadAttention; print('transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_every_name_is_registered_with_both_interfaces() -> None:
    assert mhaplug.hf.register() == tuple(mhaplug.hf.IMPLEMENTATIONS)
    assert mhaplug.hf.IMPLEMENTATIONS["mhaplug"] == "auto"
    assert set(mhaplug.hf.IMPLEMENTATIONS.values()) == set(mhaplug.STRATEGIES) - {"torch_mha"}
    for name in mhaplug.hf.IMPLEMENTATIONS:
        assert name in transformers.AttentionInterface._global_mapping
        assert name in masking_utils.AttentionMaskInterface._global_mapping


def test_set_attn_implementation_switches_a_built_model() -> None:
    model, reference = pair("llama", "sdpa")
    model.set_attn_implementation("mhaplug")
    assert model.config._attn_implementation == "mhaplug"
    batch = packed()
    keys = {k: batch[k] for k in ("input_ids", "labels", "position_ids")}
    with torch.no_grad():
        assert model(**keys).loss.item() == pytest.approx(run_alone(reference, batch)[0], abs=1e-5)


# ----------------------------------------------------------------------------------------------------------
# Packed rows
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(MODELS))
def test_packed_rows_give_the_per_document_loss_logits_and_sdpa_gradients(name: str) -> None:
    model, reference = pair(name)
    batch = packed()
    keys = {k: batch[k] for k in ("input_ids", "labels", "position_ids")}
    out = model(**keys)  # use_cache left at its default (True): documents still come from position_ids
    expected = reference(**keys, use_cache=False)
    loss_alone, logits_alone = run_alone(reference, batch)
    assert out.loss.item() == pytest.approx(loss_alone, abs=1e-5)
    assert out.loss.item() == pytest.approx(expected.loss.item(), abs=1e-5)
    assert_logits_per_document(out.logits, batch, logits_alone)
    assert torch.isfinite(out.logits).all()
    out.loss.backward()
    expected.loss.backward()
    assert_same_grads(model, reference)


def test_packed_batch_called_as_trainer_calls_it_with_every_key() -> None:
    """``model(**batch)`` with all of mhaplug's keys, and with the 2-D attention_mask sdpa would misread."""
    model, reference = pair("llama")
    batch = packed()
    loss_alone, _ = run_alone(reference, batch)
    with torch.no_grad():
        assert model(**batch).loss.item() == pytest.approx(loss_alone, abs=1e-5)
        attention_mask = batch["key_padding_mask"].logical_not().long()
        assert model(**batch, attention_mask=attention_mask).loss.item() == pytest.approx(loss_alone, abs=1e-5)


@pytest.mark.parametrize("source", ["cu_seq_lens", "flattened"])
def test_documents_from_flash_keys_and_from_one_flattened_row(source: str) -> None:
    model, reference = pair("qwen2")
    if source == "cu_seq_lens":
        batch = PackCollator(max_length=16, pad_to_multiple_of=8, return_flash_attn_kwargs=True)(documents())
        keys = {k: batch[k] for k in ("input_ids", "labels", "cu_seq_lens_q", "cu_seq_lens_k")}
        keys.update(max_length_q=batch["max_length_q"], max_length_k=batch["max_length_k"])  # no position_ids
    else:  # transformers' DataCollatorWithFlattening: one row, position_ids restarting per document
        batch = transformers.DataCollatorWithFlattening()(documents())
        batch["document_ids"] = segment_numbers(batch["position_ids"])
        keys = {k: batch[k] for k in ("input_ids", "labels", "position_ids")}
    loss_alone, logits_alone = run_alone(reference, batch)
    with torch.no_grad():
        out = model(**keys)
    assert out.loss.item() == pytest.approx(loss_alone, abs=1e-5)
    assert_logits_per_document(out.logits, batch, logits_alone)


def segment_numbers(position_ids: Tensor) -> Tensor:
    starts = torch.ones_like(position_ids, dtype=torch.bool)
    starts[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
    return starts.cumsum(1) - 1


def test_packed_rows_attend_over_documents_with_a_b_by_l_mask(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each layer gets the (B, L) padding mask or None, never (B, 1, L, L); each kernel call is as long as its
    longest document, and the calls' score entries are a fraction of rows x L^2."""
    model, _ = pair("llama")
    lengths = [100, 30, 60, 20, 90, 10, 50, 40, 80, 120, 70, 25]
    batch = PackCollator(max_length=256)(documents(lengths))
    rows, length = batch["input_ids"].shape
    seen_masks, calls = [], []
    forward, dispatch = mhaplug.hf.attention_forward, strategies.dispatch

    def spy_forward(module: Any, query: Tensor, key: Tensor, value: Tensor, attention_mask: Any, **kw: Any) -> Any:
        seen_masks.append(attention_mask)
        return forward(module, query, key, value, attention_mask, **kw)

    def spy_dispatch(strategy: str, call: strategies.AttentionCall) -> Any:
        calls.append(tuple(call.q.shape))
        return dispatch(strategy, call)

    monkeypatch.setitem(transformers.AttentionInterface._global_mapping, "mhaplug", spy_forward)
    monkeypatch.setattr(strategies, "dispatch", spy_dispatch)
    with torch.no_grad():
        model(**{k: batch[k] for k in ("input_ids", "position_ids")})
    assert seen_masks == [None, None]  # no padding mask (packed rows carry none), no dense mask: 2 layers
    batch_with_mask = {k: batch[k] for k in ("input_ids", "position_ids")}
    batch_with_mask["attention_mask"] = batch["key_padding_mask"].logical_not()
    seen_masks.clear()
    with torch.no_grad():
        model(**batch_with_mask)
    assert [tuple(m.shape) for m in seen_masks] == [(rows, length)] * 2
    assert (rows, length) == (3, 250)  # 695 tokens, first-fit decreasing into rows of at most 256
    assert max(shape[2] for shape in calls) == max(lengths)
    entries = sum(r * n * n for r, _, n, _ in calls) / (2 * 2)  # per layer and forward: 2 layers, 2 forwards
    assert entries < 0.5 * rows * length * length, calls  # measured 0.41 (buckets of like lengths: 120, 90, 50)


# ----------------------------------------------------------------------------------------------------------
# Padded rows
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("name", list(MODELS))
def test_padded_rows_match_sdpa_and_stay_finite(name: str, side: str) -> None:
    model, reference = pair(name)
    batch = PadCollator(padding_side=side)(documents())
    # position_ids counted from each sequence's first real token (GPT-2's absolute positions need them on the left)
    keys = {k: batch[k] for k in ("input_ids", "labels", "attention_mask", "position_ids")}
    out, expected = model(**keys), reference(**keys)
    real = batch["attention_mask"].bool()
    assert out.loss.item() == pytest.approx(expected.loss.item(), abs=1e-5)
    assert out.loss.item() == pytest.approx(run_alone(reference, batch)[0], abs=1e-5)
    torch.testing.assert_close(out.logits[real], expected.logits[real], atol=1e-5, rtol=1e-5)
    assert torch.isfinite(out.logits).all()
    out.loss.backward()
    expected.loss.backward()
    assert_same_grads(model, reference)


@pytest.mark.parametrize("impl", [n for n in mhaplug.hf.IMPLEMENTATIONS if n not in ("mhaplug", "mhaplug_flex")])
def test_strategies_by_name_match_sdpa(impl: str) -> None:
    """The named strategies: padded rows (each strategy's own layout, right padding for causal_only) and packed
    rows for those that take documents."""
    model, reference = pair("llama", impl)
    batch = PadCollator(padding_side="right")(documents())
    keys = {k: batch[k] for k in ("input_ids", "labels", "attention_mask")}
    with torch.no_grad():
        assert model(**keys).loss.item() == pytest.approx(reference(**keys).loss.item(), abs=1e-5)
        if mhaplug.hf.IMPLEMENTATIONS[impl] in mhaplug.attention.PACKED_STRATEGIES:
            pack = packed()
            keys = {k: pack[k] for k in ("input_ids", "labels", "position_ids")}
            assert model(**keys).loss.item() == pytest.approx(run_alone(reference, pack)[0], abs=1e-5)


def test_sliding_window_matches_sdpa_on_documents_longer_than_the_window() -> None:
    model, reference = pair("mistral")
    for m in (model, reference):
        m.config.sliding_window = 4
    batch = PadCollator(padding_side="left")(documents())
    keys = {k: batch[k] for k in ("input_ids", "labels", "attention_mask")}
    real = batch["attention_mask"].bool()
    with torch.no_grad():
        out, expected = model(**keys), reference(**keys)
        unwindowed = pair("mistral")[1](**keys)
    torch.testing.assert_close(out.logits[real], expected.logits[real], atol=1e-5, rtol=1e-5)
    assert (unwindowed.logits[real] - expected.logits[real]).abs().max() > 1e-2  # the window matters here


def test_generation_with_a_kv_cache_matches_sdpa() -> None:
    """Past tokens in a cache go to transformers' sdpa with its own mask: greedy decoding is the same."""
    model, reference = pair("llama")
    prompts = PadCollator(padding_side="left")(documents([5, 9, 2]))
    settings = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        got = model.eval().generate(prompts["input_ids"], attention_mask=prompts["attention_mask"], **settings)
        expected = reference.eval().generate(prompts["input_ids"], attention_mask=prompts["attention_mask"], **settings)
    assert got.tolist() == expected.tolist()


# ----------------------------------------------------------------------------------------------------------
# The audit, a Trainer run, refusals
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["packed", "left"])
def test_audit_passes(layout: str) -> None:
    model, _ = pair("llama")
    batch = packed() if layout == "packed" else PadCollator(padding_side="left")(documents())
    report = audit(model.eval(), batch)
    assert report.passed, str(report)


def test_trainer_with_pack_collator_trains_as_sdpa_does(tmp_path: Any) -> None:
    """transformers.Trainer, data_collator=PackCollator: the logged losses equal sdpa's step for step (sdpa keeps
    documents apart here because Trainer sets use_cache=False and the batch has no attention_mask)."""
    # documents that count up (mod VOCAB) from a random start: learnable, so the loss falls within a few steps
    starts = torch.randint(2, VOCAB, (len(LENGTHS),), generator=torch.Generator().manual_seed(1)).tolist()
    rows = [{"input_ids": [2 + (s + i) % (VOCAB - 2) for i in range(n)]} for s, n in zip(starts, LENGTHS)]
    dataset = datasets.Dataset.from_list(rows)  # 10 documents: one batch per epoch
    losses = {}
    for impl in ("mhaplug", "sdpa"):
        torch.manual_seed(0)
        model = _llama(impl)
        args = transformers.TrainingArguments(
            output_dir=str(tmp_path / impl), max_steps=8, per_device_train_batch_size=10, learning_rate=1e-2,
            logging_steps=1, report_to=[], save_strategy="no", use_cpu=True, seed=0, data_seed=0,
            dataloader_num_workers=0, disable_tqdm=True,
        )  # fmt: skip
        collator = PackCollator(max_length=32, pad_to_multiple_of=8)
        trainer = transformers.Trainer(model=model, args=args, train_dataset=dataset, data_collator=collator)
        trainer.train()
        losses[impl] = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses["mhaplug"]) == 8
    assert losses["mhaplug"] == pytest.approx(losses["sdpa"], abs=1e-4)
    assert losses["mhaplug"][-1] < losses["mhaplug"][0] - 1.0  # it trains


def test_bad_cu_seq_lens_is_refused_naming_the_key() -> None:
    model, _ = pair("llama")
    batch = PackCollator(max_length=16, return_flash_attn_kwargs=True)(documents())
    bad = batch["cu_seq_lens_q"].clone()
    bad[-1] -= 1
    keys = {"input_ids": batch["input_ids"], "cu_seq_lens_q": bad, "cu_seq_lens_k": bad}
    keys.update(max_length_q=batch["max_length_q"], max_length_k=batch["max_length_k"])
    rows, length = batch["input_ids"].shape
    with pytest.raises(ValueError, match=rf"cu_seq_lens_q must be the .* B \* L = {rows * length} tokens"):
        model(**keys)


def test_softcap_is_refused_naming_it() -> None:
    module = torch.nn.Module()
    q = torch.zeros(1, 2, 3, 4)
    with pytest.raises(ValueError, match=r"does not support softcap .* use attn_implementation='eager'"):
        mhaplug.hf.attention_forward(module, q, q, q, None, softcap=30.0)
