"""What only a GPU can show: strategies on CUDA kernels, FlexAttention training, no host-device sync.

Every test here skips cleanly without CUDA.
"""

from __future__ import annotations

import pytest
import torch

from mhaplug import MultiheadAttention
from mhaplug.attention import masks

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

E, H = 128, 4  # head dim 32: every CUDA SDPA backend takes it
CUDA_STRATEGIES = ("auto", "merged_bool", "merged_additive", "causal_kpm")


def batch(padding_side: str, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = torch.tensor([64, 40, 1, 0, 17], device="cuda")
    kpm = masks.is_pad_from_lengths(lengths, 64, padding_side=padding_side)  # type: ignore[arg-type]
    return torch.randn(5, 64, E, device="cuda", dtype=dtype), kpm


def run(
    strategy: str, x: torch.Tensor, kpm: torch.Tensor, state: dict | None = None
) -> tuple[list[torch.Tensor], MultiheadAttention]:
    mha = MultiheadAttention(E, H, batch_first=True, strategy=strategy, device="cuda", dtype=x.dtype)
    if state is not None:
        mha.load_state_dict(state)
    x = x.detach().clone().requires_grad_()
    out, _ = mha(x, x, x, key_padding_mask=kpm, need_weights=False, is_causal=True)
    out.float().square().sum().backward()
    return [out, x.grad, *(p.grad for p in mha.parameters())], mha


@pytest.mark.parametrize("strategy", CUDA_STRATEGIES + ("flex",))
@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_strategies_match_reference_on_cuda(strategy: str, padding_side: str) -> None:
    x, kpm = batch(padding_side)
    expected, ref = run("reference", x, kpm)
    got, _ = run(strategy, x, kpm, ref.state_dict())
    for g, e in zip(got, expected, strict=True):
        assert g.isfinite().all()
        torch.testing.assert_close(g, e, atol=2e-4, rtol=2e-4)


@pytest.mark.parametrize("strategy", CUDA_STRATEGIES)
def test_strategies_match_reference_in_bfloat16(strategy: str) -> None:
    x, kpm = batch("left", torch.bfloat16)
    expected, ref = run("reference", x, kpm)
    got, _ = run(strategy, x, kpm, ref.state_dict())
    for g, e in zip(got[:2], expected[:2], strict=True):
        assert g.isfinite().all()
        torch.testing.assert_close(g.float(), e.float(), atol=5e-2, rtol=5e-2)


@pytest.mark.parametrize("strategy", ("reference",) + CUDA_STRATEGIES + ("causal_only",))
def test_mask_path_never_synchronises(strategy: str) -> None:
    x, kpm = batch("right")
    x.requires_grad_()
    mha = MultiheadAttention(E, H, batch_first=True, strategy=strategy, device="cuda")
    for sync_mode in ("default", "error"):  # the first pass warms caches and lazy initialisation
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode(sync_mode)
        try:
            out, _ = mha(x, x, x, key_padding_mask=kpm, need_weights=False, is_causal=True)
            out.sum().backward()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert mha.last_dispatch in (strategy, "causal_kpm", "merged_bool")


@pytest.mark.parametrize("strategy", ("auto", "causal_kpm"))
def test_causal_hint_is_checked_on_the_device_without_a_sync(strategy: str) -> None:
    """nn.TransformerDecoderLayer's call (a float causal attn_mask with is_causal=True): the causal strategies
    check the mask with an asynchronous device assert, never read it on the host, and equal reference."""
    x, kpm = batch("left")
    causal = torch.nn.Transformer.generate_square_subsequent_mask(64, device="cuda")
    expected, ref = run("reference", x, kpm)
    mha = MultiheadAttention(E, H, batch_first=True, strategy=strategy, device="cuda")
    mha.load_state_dict(ref.state_dict())
    x = x.detach().clone().requires_grad_()
    for sync_mode in ("default", "error"):
        x.grad = None
        mha.zero_grad()
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode(sync_mode)
        try:
            out, _ = mha(x, x, x, key_padding_mask=kpm, attn_mask=causal, is_causal=True, need_weights=False)
            out.float().square().sum().backward()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.testing.assert_close(out, expected[0], atol=2e-4, rtol=2e-4)
    torch.testing.assert_close(x.grad, expected[1], atol=2e-4, rtol=2e-4)
    assert mha.last_dispatch in ("causal_kpm", "merged_bool")


def test_audit_passes_on_cuda_in_bfloat16() -> None:
    from mhaplug.data.collate import PadCollator
    from mhaplug.decoder import DecoderConfig, DecoderLM
    from mhaplug.training.audit import audit

    rows = [list(range(3, 3 + n)) for n in (40, 7, 25, 1, 60, 12)]
    batch_ = {
        k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in PadCollator(padding_side="left")(rows).items()
    }
    model = DecoderLM(DecoderConfig(vocab_size=128, max_positions=64)).cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        report = audit(model, batch_)
    assert report.passed, str(report)


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_decoder_trains_with_flex_like_merged_bool(packed: bool) -> None:
    """FlexAttention training (one BlockMask per batch, shared by the layers) = merged_bool, loss and grads."""
    from mhaplug.data.collate import PackCollator, PadCollator
    from mhaplug.decoder import DecoderConfig, DecoderLM
    from mhaplug.loss import lm_loss_sum

    rows = [list(range(3, 3 + n)) for n in (40, 7, 25, 1, 60, 12)]
    batch = (PackCollator(max_length=64) if packed else PadCollator())(rows)
    batch = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    results = []
    for strategy in ("merged_bool", "flex"):
        torch.manual_seed(0)
        model = DecoderLM(DecoderConfig(vocab_size=128, max_positions=64, strategy=strategy)).cuda()
        logits = model(
            batch["input_ids"],
            key_padding_mask=batch["key_padding_mask"],
            position_ids=batch["position_ids"],
            document_ids=batch.get("document_ids"),
        )
        loss = lm_loss_sum(logits, batch["labels"])
        loss.backward()
        results.append([loss.detach(), *(p.grad for p in model.parameters())])
    for got, expected in zip(results[1], results[0], strict=True):
        torch.testing.assert_close(got, expected, atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_decoder_step_with_a_cpu_token_index_never_syncs(packed: bool) -> None:
    """LitDecoderLM's path on CUDA: token_index built on the CPU, then loss_sum (real tokens, fused loss) and
    backward with no host-device sync; equal to the CPU model."""
    from mhaplug.attention import masks
    from mhaplug.data.collate import PackCollator, PadCollator
    from mhaplug.decoder import DecoderConfig, DecoderLM

    rows = [list(range(3, 3 + n)) for n in (40, 7, 25, 1, 60, 12)]
    batch = (PackCollator(max_length=64) if packed else PadCollator(padding_side="left"))(rows)
    batch["token_index"] = masks.token_index_from_is_pad(batch["key_padding_mask"])
    torch.manual_seed(0)
    cpu_model = DecoderLM(DecoderConfig(vocab_size=128, max_positions=64))
    expected = cpu_model.loss_sum(batch)
    model = DecoderLM(DecoderConfig(vocab_size=128, max_positions=64)).cuda()
    model.load_state_dict(cpu_model.state_dict())
    on_gpu = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    for sync_mode in ("default", "error"):  # the first pass warms caches and lazy initialisation
        model.zero_grad()
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode(sync_mode)
        try:
            loss = model.loss_sum(on_gpu)
            loss.backward()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.testing.assert_close(loss.cpu(), expected.detach(), atol=1e-3, rtol=1e-4)


@pytest.mark.parametrize("layout", ["packed", "left"])
def test_hf_mhaplug_on_cuda_equals_sdpa(layout: str) -> None:
    """attn_implementation="mhaplug" on CUDA (documents planned on the host, indices moved to the device): the
    loss and gradients of transformers' sdpa on the same weights (sdpa with use_cache=False keeps documents apart)."""
    transformers = pytest.importorskip("transformers")
    import mhaplug.hf  # noqa: F401  registers the names
    from mhaplug import PackCollator, PadCollator

    generator = torch.Generator().manual_seed(0)
    docs = [{"input_ids": torch.randint(2, 64, (n,), generator=generator).tolist()} for n in (9, 3, 6, 1, 5, 12)]
    batch = PackCollator(max_length=16)(docs) if layout == "packed" else PadCollator(padding_side="left")(docs)
    keys = ("input_ids", "labels", "position_ids") + (("attention_mask",) if layout == "left" else ())
    batch = {k: batch[k].cuda() for k in keys}
    models = []
    for impl in ("mhaplug", "sdpa"):
        torch.manual_seed(0)
        config = transformers.LlamaConfig(
            vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, attn_implementation=impl,
        )  # fmt: skip
        models.append(transformers.LlamaForCausalLM(config).cuda())
    models[1].load_state_dict(models[0].state_dict())
    losses = []
    for model in models:
        loss = model(**batch, use_cache=False).loss
        loss.backward()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(losses[1], abs=1e-4)
    for (name, p), q in zip(models[0].named_parameters(), models[1].parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-4, rtol=1e-3, msg=name)
