"""mhaplug.loss: the fused, chunked output layer + cross-entropy against F.cross_entropy of the whole logits."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from mhaplug.common import IGNORE_INDEX
from mhaplug.loss import linear_cross_entropy, next_token_targets

N, E, V = 37, 8, 23


def inputs(dtype: torch.dtype = torch.float64, *, scale: float = 1.0) -> tuple[Tensor, Tensor, Tensor]:
    generator = torch.Generator().manual_seed(0)
    hidden = (torch.randn(N, E, generator=generator, dtype=dtype) * scale).requires_grad_()
    weight = torch.randn(V, E, generator=generator, dtype=dtype).requires_grad_()
    targets = torch.randint(0, V, (N,), generator=generator)
    targets[::5] = IGNORE_INDEX
    return hidden, weight, targets


def reference(hidden: Tensor, weight: Tensor, targets: Tensor) -> Tensor:
    return F.cross_entropy(hidden @ weight.T, targets, ignore_index=IGNORE_INDEX, reduction="sum")


@pytest.mark.parametrize("chunk_size", [1, 7, N, 1000, None])
def test_loss_and_gradients_equal_cross_entropy_of_the_whole_logits(chunk_size: int | None) -> None:
    hidden, weight, targets = inputs()
    expected = reference(hidden, weight, targets)
    grad_hidden, grad_weight = torch.autograd.grad(expected * 3.0, (hidden, weight))
    loss = linear_cross_entropy(hidden, weight, targets, chunk_size=chunk_size)
    got_hidden, got_weight = torch.autograd.grad(loss * 3.0, (hidden, weight))  # the backward scales the gradients
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got_hidden, grad_hidden, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got_weight, grad_weight, rtol=1e-12, atol=1e-12)
    assert got_hidden[::5].abs().max() == 0.0  # positions without a target get no gradient


def test_tied_weight_gets_the_embedding_gradient_plus_the_output_gradient() -> None:
    torch.manual_seed(0)
    embedding = torch.nn.Embedding(V, E).double()
    ids, targets = torch.randint(0, V, (N,)), torch.randint(0, V, (N,))
    linear_cross_entropy(torch.tanh(embedding(ids)), embedding.weight, targets).backward()
    fused = embedding.weight.grad.clone()
    embedding.weight.grad = None
    reference(torch.tanh(embedding(ids)), embedding.weight, targets).backward()
    torch.testing.assert_close(fused, embedding.weight.grad, rtol=1e-12, atol=1e-12)


def test_without_grad_only_the_loss_is_computed() -> None:
    hidden, weight, targets = inputs()
    with torch.no_grad():
        loss = linear_cross_entropy(hidden, weight, targets, chunk_size=5)
    assert not loss.requires_grad
    torch.testing.assert_close(loss, reference(hidden, weight, targets).detach(), rtol=1e-12, atol=1e-12)


def test_every_target_ignored_gives_zero_loss_and_zero_gradients() -> None:
    hidden, weight, _ = inputs()
    loss = linear_cross_entropy(hidden, weight, torch.full((N,), IGNORE_INDEX))
    loss.backward()
    assert loss.item() == 0.0 and hidden.grad.abs().max() == 0.0 and weight.grad.abs().max() == 0.0


def test_a_target_far_below_the_max_keeps_its_exact_loss() -> None:
    """A target whose probability underflows in float32 (losses up to about 400 here) gets its exact loss from
    the logits, not inf and not the few bits of a subnormal probability."""
    hidden, weight, targets = inputs(torch.float32, scale=40.0)
    loss = linear_cross_entropy(hidden, weight, targets)
    expected = reference(hidden.double(), weight.double(), targets)
    per_token_max = F.cross_entropy(hidden.double() @ weight.double().T, targets, reduction="none").max()
    assert per_token_max > 200  # p(target) = exp(-200) is 0 in float32
    assert torch.isfinite(loss) and loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_under_bf16_autocast_matmuls_run_in_bf16_and_the_softmax_in_float32() -> None:
    hidden, weight, targets = inputs(torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = linear_cross_entropy(hidden, weight, targets, chunk_size=8)
        expected = reference(hidden, weight, targets)  # autocast: bf16 matmul, float32 cross-entropy
    assert loss.dtype == torch.float32 and expected.dtype == torch.float32
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    got = torch.autograd.grad(loss, (hidden, weight))
    want = torch.autograd.grad(expected, (hidden, weight))
    assert got[0].dtype == got[1].dtype == torch.float32
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)  # bf16 products, float32 accumulation on both sides


def test_next_token_targets_shift_the_labels_not_the_logits() -> None:
    labels = torch.tensor([[-100, 5, 6, 7], [-100, 8, -100, -100]])
    assert next_token_targets(labels).tolist() == [[5, 6, 7, -100], [8, -100, -100, -100]]
    assert next_token_targets(labels, ignore_index=-1).tolist() == [[5, 6, 7, -1], [8, -100, -100, -1]]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"hidden": torch.zeros(3, 4), "weight": torch.zeros(5, 6)}, r"hidden must be \(N, E\) and weight \(V, E\)"),
        ({"targets": torch.zeros(4, dtype=torch.int64)}, r"targets must be \(N,\) = \(3,\)"),
        ({"chunk_size": 0}, "chunk_size must be an int >= 1, got 0"),
    ],
)
def test_bad_input_is_named(kwargs: dict, message: str) -> None:
    args = {"hidden": torch.zeros(3, 4), "weight": torch.zeros(5, 4), "targets": torch.zeros(3, dtype=torch.int64)}
    chunk = kwargs.pop("chunk_size", None)
    with pytest.raises(ValueError, match=message):
        linear_cross_entropy(**{**args, **kwargs}, chunk_size=chunk)


def test_off_the_host_the_loss_takes_log_sum_exp_from_the_argmax(monkeypatch: pytest.MonkeyPatch) -> None:
    """The branch an accelerator takes (no host read to find underflowing rows) gives the same loss."""
    from mhaplug import loss as loss_module

    hidden, weight, targets = inputs(torch.float32, scale=40.0)
    on_host = linear_cross_entropy(hidden, weight, targets)
    monkeypatch.setattr(loss_module.masks, "host_read_is_free", lambda tensor: False)
    off_host = linear_cross_entropy(hidden, weight, targets)
    assert off_host.item() == pytest.approx(on_host.item(), rel=1e-6)
    expected = reference(hidden.double(), weight.double(), targets)
    assert off_host.item() == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize(
    ("targets", "error", "message"),
    [
        (torch.tensor([0, 5, 1]), ValueError, r"targets \[5\] \(first of 1\) are outside the vocabulary \[0, V=5\)"),
        (torch.tensor([-5, 0, -100]), ValueError, r"targets \[-5\] .* not ignore_index=-100; mark positions"),
        (torch.tensor([0.0, 1.0, 2.0]), TypeError, r"targets must be int64 class ids .* got dtype torch.float32"),
        (torch.tensor([True, False, True]), TypeError, r"targets must be int64 class ids .* got dtype torch.bool"),
    ],
)
def test_targets_outside_the_vocabulary_are_named_not_a_bare_gather_error(
    targets: torch.Tensor, error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        linear_cross_entropy(torch.zeros(3, 4), torch.zeros(5, 4), targets)
    assert linear_cross_entropy(
        torch.zeros(3, 4), torch.zeros(5, 4), torch.tensor([4, -100, 0])
    ).item() == pytest.approx(2 * math.log(5))
