"""How the mask audit handles a model and a batch (:func:`mhaplug.training.audit.audit`): calling any model for its
logits, changing ids and embeddings where they must not matter, and leaving the model as it was.

Shapes: B batch, L length, V vocabulary, E embedding width.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from mhaplug.attention import masks
from mhaplug.common import IGNORE_INDEX
from mhaplug.decoder import DecoderLM

__all__ = [
    "FLASH_KEYS",
    "ForwardFn",
    "after_cut",
    "append_pad_columns",
    "describe",
    "eval_mode",
    "input_embedding",
    "is_pad",
    "laid_out",
    "name_in",
    "noise_on",
    "pad_noise",
    "resolve_forward",
]

ForwardFn = Callable[[nn.Module, dict[str, Any]], Any]


# transformers' flash-attention varlen keys (PackCollator adds them on request): documents for flash kernels.
FLASH_KEYS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")


def resolve_forward(model: nn.Module, forward: ForwardFn | None) -> tuple[ForwardFn, str]:
    """(a function (model, batch) -> logits (B, L, V), and how it calls the model, for the report)."""
    if forward is not None:
        if not callable(forward):
            raise TypeError(f"forward must be a callable (model, batch) -> logits, got {type(forward).__name__}")
        return lambda m, b: logits_of(forward(m, b)), "forward="
    if isinstance(model, DecoderLM):
        return decoder_lm_forward, "DecoderLM"
    if isinstance(getattr(model, "model", None), DecoderLM):  # LitDecoderLM, or any wrapper that holds one
        return lambda m, b: decoder_lm_forward(m.model, b), f"{type(model).__name__}.model (DecoderLM)"
    if is_transformers_model(model):
        return transformers_forward, f"transformers {type(model).__name__}"
    return lambda m, b: logits_of(m(b)), f"{type(model).__name__}(batch)"


def decoder_lm_forward(model: nn.Module, batch: dict[str, Any]) -> Tensor:
    # Every position computed (a token_index over all B * L), pads included. DecoderLM computes real tokens
    # only and hands the kernel zeros at pads, so pad content could not move anything there; computed, pads
    # carry their ids and noise into attention, where only a correct mask keeps them out.
    input_ids = batch["input_ids"]
    return model(
        input_ids,
        key_padding_mask=is_pad(batch),
        position_ids=batch.get("position_ids"),
        document_ids=batch.get("document_ids"),
        token_index=torch.arange(input_ids.numel(), device=input_ids.device),
    )


def transformers_forward(model: nn.Module, batch: dict[str, Any]) -> Tensor:
    """The logits of ``model(**batch)`` as ``transformers.Trainer`` makes the call: the model's own ``use_cache``
    (``model.config.use_cache``), so that a KV cache that makes transformers ignore packed positions is audited
    too."""
    kwargs: dict[str, Any] = {"input_ids": batch["input_ids"]}
    if batch.get("position_ids") is not None:
        kwargs["position_ids"] = batch["position_ids"]
    attention_mask = batch.get("attention_mask")
    if attention_mask is None and batch.get("document_ids") is None and batch.get("key_padding_mask") is not None:
        attention_mask = masks.attention_mask_from_is_pad(batch["key_padding_mask"])  # padded rows: pads hidden
    if attention_mask is not None:
        kwargs["attention_mask"] = attention_mask
    kwargs.update({key: batch[key] for key in FLASH_KEYS if key in batch})
    return model(**kwargs).logits


def is_transformers_model(model: nn.Module) -> bool:
    transformers = sys.modules.get("transformers")  # a transformers model means transformers is imported already
    return transformers is not None and isinstance(model, transformers.PreTrainedModel)


def logits_of(output: Any) -> Tensor:
    if isinstance(output, Tensor):
        return output
    if isinstance(output, Mapping) and isinstance(output.get("logits"), Tensor):
        return output["logits"]
    if isinstance(getattr(output, "logits", None), Tensor):
        return output.logits
    raise TypeError(
        f"the model returned {type(output).__name__}; expected logits (B, L, V), or an output with "
        f"'logits'. Pass forward=lambda model, batch: <logits> to audit()"
    )


def input_embedding(model: nn.Module) -> nn.Module | None:
    get = getattr(model, "get_input_embeddings", None)
    if callable(get):
        try:
            found = get()
        except NotImplementedError:
            found = None
        if isinstance(found, nn.Module):
            return found
    return next((m for m in model.modules() if isinstance(m, nn.Embedding)), None)


def is_pad(batch: Mapping[str, Any]) -> Tensor:
    """(B, L) bool, True = pad: ``key_padding_mask``, else from ``attention_mask``, else no padding."""
    if batch.get("key_padding_mask") is not None:
        is_pad = batch["key_padding_mask"]
        if is_pad.dtype != torch.bool or is_pad.shape != batch["input_ids"].shape:
            raise ValueError(
                f"batch['key_padding_mask'] must be bool (B, L) = {tuple(batch['input_ids'].shape)} "
                f"(True = pad), got {describe(is_pad)}"
            )
        return is_pad
    if batch.get("attention_mask") is not None and batch["attention_mask"].dim() == 2:
        return masks.is_pad_from_attention_mask(batch["attention_mask"])
    return torch.zeros_like(batch["input_ids"], dtype=torch.bool)


def after_cut(real: Tensor) -> tuple[Tensor, Tensor]:
    """Per row, cut after the middle real token t: (real positions after t, real positions up to t), (B, L) each."""
    rank = real.long().cumsum(dim=-1) - 1  # (B, L) index among the row's real tokens
    cut = (real.sum(dim=-1, keepdim=True) - 1) // 2  # (B, 1) rank of t; rows of 1 real token change nothing
    return real & (rank > cut), real & (rank <= cut)


def pad_noise(embedding: nn.Module, real: Tensor, factor: float, generator: torch.Generator) -> Tensor | None:
    """Noise (B, L, E) for the pad positions of the embedding output, exactly 0 at real ones; ``factor`` standard
    deviations of the embedding table. None when the module has no (vocabulary, E) ``weight``."""
    weight = getattr(embedding, "weight", None)
    if not isinstance(weight, Tensor) or weight.dim() != 2:
        return None
    scale = float(weight.detach().float().std()) or 1.0
    noise = torch.randn((*real.shape, weight.shape[1]), generator=generator, device=real.device)  # (B, L, E)
    return (noise * factor * scale).masked_fill(real[..., None], 0.0)


# What a pad column holds, per batch key (PadCollator's and PackCollator's conventions).
PAD_VALUES: dict[str, int | bool] = {
    "input_ids": 0,
    "labels": IGNORE_INDEX,
    "key_padding_mask": True,
    "attention_mask": 0,
    "position_ids": 0,
    "document_ids": -1,
}


def append_pad_columns(batch: dict[str, Any], count: int) -> tuple[dict[str, Any] | None, str]:
    """``batch`` with ``count`` pad columns appended to every (B, L) key, or (None, why not)."""
    input_ids = batch["input_ids"]
    if batch.get("key_padding_mask") is None and batch.get("attention_mask") is None:
        return None, "it has neither key_padding_mask nor attention_mask to mark pads with"
    flash = [key for key in FLASH_KEYS if key in batch]
    if flash:
        return None, f"its flash-attention keys ({', '.join(flash)}) would need the pads as segments"
    extended = dict(batch)
    for key, value in batch.items():
        if not isinstance(value, Tensor) or value.dim() < 2 or value.shape[:2] != input_ids.shape:
            continue  # (B,) lengths, cu_seqlens, counts: real tokens only, unchanged
        if key not in PAD_VALUES or value.dim() != 2:
            return None, f"it does not know what pads hold in batch[{key!r}] {describe(value)}"
        pad = value.new_full((value.shape[0], count), PAD_VALUES[key])  # (B, count)
        extended[key] = torch.cat([value, pad], dim=1)  # (B, L + count)
    return extended, ""


@contextmanager
def noise_on(embedding: nn.Module | None, noise: Tensor | None, input_ids: Tensor) -> Iterator[list[str]]:
    """Add ``noise`` (B, L, E) to ``embedding``'s output while the block runs, in the output's layout (see
    :func:`laid_out`). Yields one entry per call of the embedding: "" where the noise was added, else what the
    output was."""
    calls: list[str] = []

    def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
        placed = laid_out(noise, output, args, input_ids) if noise is not None else None
        calls.append("" if placed is not None else describe(output))
        return None if placed is None else output + placed.to(output.dtype)  # + 0.0 at real positions: bit-identical

    handle = embedding.register_forward_hook(hook) if embedding is not None and noise is not None else None
    try:
        yield calls
    finally:
        if handle is not None:
            handle.remove()


def laid_out(noise: Tensor, output: Any, args: tuple[Any, ...], input_ids: Tensor) -> Tensor | None:
    """``noise`` (B, L, E) as ``output`` lays out positions: (B, L, E), (L, B, E) (sequence first; when B = L, told
    by the ids the embedding was given) or (B * L, E) (mhaplug's DecoderLM); None for any other output."""
    if not isinstance(output, Tensor):
        return None
    batch, length, width = noise.shape
    if output.shape == (batch * length, width):
        return noise.flatten(0, 1)  # (B * L, E)
    ids = args[0] if args and isinstance(args[0], Tensor) else None
    transposed = ids is not None and torch.equal(ids, input_ids.T) and not torch.equal(ids, input_ids)
    if output.shape == (length, batch, width) and (batch != length or transposed):
        return noise.transpose(0, 1)  # (L, B, E)
    return noise if output.shape == noise.shape else None


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode inside, and every submodule's own mode restored after (some may have been in eval on purpose)."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


def name_in(model: nn.Module, module: nn.Module) -> str:
    return next((name for name, m in model.named_modules() if m is module), type(module).__name__) or "the model"


def describe(value: Any) -> str:
    if isinstance(value, Tensor):
        return f"{value.dtype} {tuple(value.shape)}"
    return type(value).__name__
