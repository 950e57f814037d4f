"""The panels of the mask picture (:mod:`mhaplug.show`): for one batch, ``key_padding_mask``, ``attn_mask``, and what
each strategy hands its kernel, as the (L, S) cells :mod:`mhaplug.reporting.mask_figure` draws; and the real batches
they come from.

Nothing is redrawn from an idea of the masks: the batch keys come from the collators, the ``attn_mask`` from
:mod:`mhaplug.attention.masks`, and the kernel panels from a :class:`mhaplug.MultiheadAttention` call per strategy with
the masks of :func:`layer_arguments` (one call over the whole batch, as a user calls the layer; a model's
:func:`mhaplug.attention.plan_attention` may lay the same attention out otherwise: a row per document under ``auto``
on the CPU, a BlockMask for ``flex``), spied on where the kernel is called (:func:`kernel_input`), as
``benchmarks/attention.py`` does. Cell colour says what a cell means (the query may attend
the key, or not); cell text is the value the tensor holds there (``T``/``F``, ``0``/``-inf``), so the polarity of each
API is visible.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any
from unittest import mock

import torch
import torch.nn.functional as F
from torch import Tensor

from mhaplug.attention import masks, merge, strategies
from mhaplug.attention.mha import MultiheadAttention
from mhaplug.attention.strategies import CAPABILITIES
from mhaplug.data.collate import PackCollator, PadCollator
from mhaplug.data.packing import first_fit_pack
from mhaplug.reporting.mask_figure import KERNEL_PANELS, NAN, ZEROED, Grid, Section

__all__ = [
    "LAYOUT_NAMES",
    "KernelInput",
    "choose_documents",
    "kernel_grid",
    "kernel_input",
    "layer_arguments",
    "make_batches",
    "pick_row",
    "section",
    "token_text",
]

LAYOUT_NAMES = {"left": "left padding", "right": "right padding", "packed": "packed rows"}


@dataclass(frozen=True)
class KernelInput:
    """What one strategy handed its attention kernel in one call.

    Attributes:
        strategy: the layer's strategy. dispatch: its ``last_dispatch`` (what served the call), or None if refused.
        mask: the ``attn_mask`` given to ``F.scaled_dot_product_attention`` (bool keep, True = MAY attend, or float
            additive 0 / -inf; torch's own path: its merged float (B, H, L, S)); for ``flex`` the BlockMask's
            ``mask_mod`` evaluated on every cell, (B, 1, L, S) keep. None: no mask tensor.
        is_causal: the ``is_causal`` flag the kernel got.
        row_has_key: (B|1, 1, L|1, 1) bool, the rows the layer kept after the kernel (others were set to 0);
            None where the layer zeroed nothing (torch's path never does).
        refused: the error the layer (or, for packed rows, :class:`~mhaplug.decoder.DecoderLM`) raises instead.
    """

    strategy: str
    dispatch: str | None
    mask: Tensor | None = None
    is_causal: bool = False
    row_has_key: Tensor | None = None
    refused: str | None = None


def layer_arguments(batch: Mapping[str, Any], strategy: str) -> dict[str, Any]:
    """The masks a layer gets for ``batch`` in one call over the whole batch: a document-causal ``attn_mask``
    (B, 1, L, L), True = masked, for packed rows (what :func:`mhaplug.attention.plan_attention` hands the merged
    strategies); ``key_padding_mask`` and ``is_causal=True`` for padded rows (``causal_only`` gets the padding mask too,
    so that the layer's own check speaks). ``torch_mha`` gets what a torch user passes: ``key_padding_mask`` and an
    explicit ``attn_mask`` (causal (L, S), or the document mask)."""
    kpm = batch["key_padding_mask"]
    length = kpm.shape[1]
    if "document_ids" in batch:
        document_mask = masks.is_masked_from_keep(masks.document_causal_keep(batch["document_ids"]))  # (B, 1, L, L)
        if strategy == "torch_mha":
            return {"key_padding_mask": kpm, "attn_mask": document_mask}
        return {"attn_mask": document_mask}
    if strategy == "torch_mha":
        return {
            "key_padding_mask": kpm,
            "attn_mask": merge.add_causal_to_attn_mask(None, length, length, device=kpm.device),
        }
    return {"key_padding_mask": kpm, "is_causal": True}


def kernel_input(batch: Mapping[str, Any], strategy: str, *, embed_dim: int = 8, num_heads: int = 2) -> KernelInput:
    """Run one :class:`~mhaplug.MultiheadAttention` call with ``strategy`` on ``batch``'s masks (random inputs) and
    return what reached the kernel: the spies record ``F.scaled_dot_product_attention``'s mask and flag, the flex
    BlockMask (whose kernel is not run: its unfused CPU path only warns), and the rows the layer zeroed."""
    if "document_ids" in batch and not CAPABILITIES[strategy].document_masks:
        return KernelInput(
            strategy,
            None,
            refused=f"refused for packed rows: strategy={strategy!r} takes no document mask, so documents would "
            f"attend each other (DecoderLM and the config check raise)",
        )
    kpm = batch["key_padding_mask"]
    seen: dict[str, Any] = {}
    sdpa, zero_rows = F.scaled_dot_product_attention, strategies.zero_rows

    def sdpa_spy(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, **kwargs):  # type: ignore[no-untyped-def]
        seen.update(mask=attn_mask, is_causal=is_causal)
        return sdpa(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, **kwargs)

    def zero_rows_spy(out: Tensor, row_has_key: Tensor) -> Tensor:
        seen["row_has_key"] = row_has_key
        return zero_rows(out, row_has_key)

    def flex_spy(device_type: str):  # type: ignore[no-untyped-def]
        def kernel(q: Tensor, k: Tensor, v: Tensor, *, block_mask: Any) -> Tensor:
            from torch.nn.attention.flex_attention import create_mask

            batch_size, _, tgt_len, _ = q.shape
            keep = create_mask(block_mask.mask_mod, batch_size, 1, tgt_len, k.shape[2], device=q.device)
            seen.update(mask=keep, is_causal=False)  # (B, 1, L, S): the predicate, causality included
            return torch.zeros_like(q)

        return kernel

    layer = MultiheadAttention(embed_dim, num_heads, batch_first=True, strategy=strategy)
    x = torch.randn(*kpm.shape, embed_dim, generator=torch.Generator().manual_seed(0))  # (B, L, E)
    spies = (
        mock.patch.object(F, "scaled_dot_product_attention", sdpa_spy),
        mock.patch.object(strategies, "zero_rows", zero_rows_spy),
        mock.patch.object(strategies, "_flex_attention", flex_spy),
    )
    with contextlib.ExitStack() as stack, torch.no_grad():  # no_grad: flex has no CPU backward
        for spy in spies:
            stack.enter_context(spy)
        try:
            layer(x, x, x, need_weights=False, **layer_arguments(batch, strategy))
        except ValueError as error:
            return KernelInput(strategy, None, refused=f"refused: {error}")
    return KernelInput(
        strategy, layer.last_dispatch, seen.get("mask"), seen.get("is_causal", False), seen.get("row_has_key")
    )


def _keep(mask: Tensor) -> Tensor:
    return mask if mask.dtype == torch.bool else masks.keep_from_additive(mask)


def kernel_grid(kernel: KernelInput, row: int, length: int, caption: str) -> Grid:
    """The (L, S) cells of row ``row`` as the kernel gets them: the mask tensor (or the keep vector), the causal flag,
    and the rows the layer sets to 0 afterwards."""
    if kernel.refused:
        return Grid(caption, refused=kernel.refused)
    causal = masks.causal_keep(length, length)  # (L, S): what is_causal=True applies inside the kernel
    attends = causal.clone() if kernel.is_causal else torch.ones(length, length, dtype=torch.bool)
    values = vector = None
    if kernel.mask is not None:
        mask = kernel.mask[row if kernel.mask.shape[0] > 1 else 0, 0]  # (L | 1, S), head 0 (torch: per head)
        attends &= _keep(mask)
        if mask.shape[0] == 1:
            vector = mask[0]  # (S,) the (B, 1, 1, S) keep vector
        else:
            values = mask
    if kernel.strategy == "torch_mha":
        return Grid(caption, attends, values, marked_rows=~attends.any(-1), mark=NAN)
    zeroed = None
    if kernel.row_has_key is not None:
        kept = kernel.row_has_key
        zeroed = ~kept[row if kept.shape[0] > 1 else 0, 0, :, 0].expand(length)  # (L,)
    flag = ~causal if kernel.is_causal else None
    return Grid(caption, attends, values, flag, vector, zeroed, ZEROED if zeroed is not None else "")


def _starts(document_ids: Tensor) -> tuple[int, ...]:
    """Positions where a row's next document (or its padding, id -1) starts."""
    return tuple(torch.nonzero(document_ids[1:] != document_ids[:-1]).flatten().add(1).tolist())


def pick_row(batch: Mapping[str, Any]) -> int:
    """The row the (L, S) panels show: packed, the row with most documents (then most padding); padded, the row
    whose length is nearest half the batch's, so that both real and pad queries show."""
    kpm = batch["key_padding_mask"]
    if "document_ids" in batch:
        docs = (batch["document_ids"].amax(-1) + 1).tolist()
        pads = kpm.sum(-1).tolist()
        return max(range(len(docs)), key=lambda b: (docs[b], pads[b], -b))
    lengths = masks.lengths_from_is_pad(kpm).tolist()
    return min(range(len(lengths)), key=lambda b: (abs(2 * lengths[b] - kpm.shape[1]), b))


def section(
    batch: Mapping[str, Any],
    name: str,
    *,
    row: int | None = None,
    tokens: list[list[str]] | None = None,
    embed_dim: int = 8,
    num_heads: int = 2,
) -> Section:
    """Every panel of one layout. ``batch``: a collator's batch (padded, or packed with ``document_ids``); ``row``: the
    b its (L, S) panels show (default :func:`pick_row`); ``tokens``: (B, L) text for the axes; ``embed_dim``,
    ``num_heads``: the layer each strategy runs (:func:`kernel_input`)."""
    kpm = batch["key_padding_mask"]  # (B, S) True = pad
    batch_size, length = kpm.shape
    row = pick_row(batch) if row is None else row
    if not 0 <= row < batch_size:
        raise ValueError(f"row must be in [0, {batch_size}) for a batch of {batch_size} rows, got {row}")
    packed = "document_ids" in batch
    bounds = _starts(batch["document_ids"][row]) if packed else ()
    padding_note = f"row b={row} (framed) is the one drawn below" + ("; | starts a document" if packed else "")
    grids = {"key_padding_mask": Grid(padding_note, ~kpm, kpm)}
    if packed:
        attn_mask = masks.is_masked_from_keep(masks.document_causal_keep(batch["document_ids"]))[row, 0]  # (L, S)
        note = f"document-causal (B,1,L,L), what DecoderLM passes; row b={row}"
    else:
        attn_mask = merge.add_causal_to_attn_mask(None, length, length, device=kpm.device)  # (L, S)
        note = "causal: query i sees keys 0..i (the same for every row)"
    grids["attn_mask"] = Grid(note, ~attn_mask, attn_mask, boundaries=bounds)
    layer = {"embed_dim": embed_dim, "num_heads": num_heads}
    kernels = {strategy: kernel_input(batch, strategy, **layer) for strategy in (*KERNEL_PANELS, "auto")}
    auto = kernels["auto"].dispatch
    for strategy in KERNEL_PANELS:
        grid = kernel_grid(kernels[strategy], row, length, _caption(strategy, kernels[strategy], row, auto, packed))
        if strategy == "causal_only" and grid.attends is not None:  # right padding: pad keys, seen by pads only
            seen = int((grid.attends & kpm[row][None, :]).any(-1).sum())
            if seen:
                grid = replace(grid, caption=f"{grid.caption}; {seen} pad queries attend pad keys: they take no loss")
        grids[strategy] = replace(grid, boundaries=bounds)
    return Section(name, batch, row, tokens, grids, auto)


def _caption(strategy: str, kernel: KernelInput, row: int, auto: str | None, packed: bool) -> str:
    if kernel.refused:
        return ""
    caption = f"row b={row}"
    if strategy == "torch_mha" and kernel.mask is not None:
        caption += f", head 0 of {tuple(kernel.mask.shape)} (B, H, L, S)"
    if strategy != auto:
        return caption
    # DecoderLM under auto on the CPU runs each document of a packed row as a row of its own (causal_kpm there)
    return caption + ("; auto here (DecoderLM on CPU: a row per document)" if packed else "; auto takes this path here")


def choose_documents(
    lengths: Sequence[int], batches: Iterator[Sequence[int]] | Sequence[Sequence[int]], *, rows: int, columns: int
) -> tuple[list[int], list[int]]:
    """(padded, packed) document indices from the sampler's ``batches``, read in order.

    Padded: ``rows`` documents of 2..``columns`` tokens from the first batch that has as many, spread over its
    lengths, longest first. Packed: the first documents of 2..``columns // 2`` tokens, as many as first-fit needs to
    fill ``rows`` rows of ``columns`` tokens (one more would open another row).
    """
    padded: list[int] | None = None
    short: list[int] = []
    packed: list[int] | None = None
    for batch in batches:
        fits = sorted((i for i in batch if 2 <= lengths[i] <= columns), key=lambda i: -lengths[i])
        if padded is None and len(fits) >= rows:
            padded = [fits[round(k * (len(fits) - 1) / max(rows - 1, 1))] for k in range(rows)]
        for i in batch:
            if packed is None and 2 <= lengths[i] <= columns // 2:
                short.append(i)
                if len(first_fit_pack([lengths[j] for j in short], columns)) > rows:
                    packed = short[:-1]
        if padded is not None and packed is not None:
            return padded, packed
    raise ValueError(
        f"--rows {rows} --columns {columns}: the data has no batch with {rows} documents of 2 to {columns} tokens "
        f"(or not enough documents of at most {columns // 2} tokens to pack {rows} rows); "
        "raise --columns or lower --rows"
    )


def make_batches(
    documents: Sequence[Sequence[int]], lengths: Sequence[int], batches: Iterator[Sequence[int]], *,
    rows: int, columns: int, pad_token_id: int = 0, pad_to_multiple_of: int | None = None,
) -> dict[str, dict[str, Any]]:  # fmt: skip
    """{"left", "right", "packed"}: the collators' batches of the documents :func:`choose_documents` picks."""
    padded, packed = choose_documents(lengths, batches, rows=rows, columns=columns)
    common = {"pad_token_id": pad_token_id, "pad_to_multiple_of": pad_to_multiple_of}
    out = {
        side: PadCollator(padding_side=side, **common)([list(documents[i]) for i in padded])  # type: ignore[arg-type]
        for side in ("left", "right")
    }
    out["packed"] = PackCollator(max_length=columns, **common)([list(documents[i]) for i in packed])
    return out


def token_text(ids: Tensor, *, tokenizer: Any = None, pad_token_id: int = 0, eos_token_id: int = 1) -> list[list[str]]:
    """(B, L) ids -> the text of each token for the axes (``<pad>``, ``<eos>``, at most 8 characters), or the ids
    themselves without a ``tokenizers.Tokenizer``."""

    def text(i: int) -> str:
        if i == pad_token_id:
            return "<pad>"
        if i == eos_token_id:
            return "<eos>"
        if tokenizer is None:
            return str(i)
        piece = tokenizer.decode([i]).replace("\n", "\\n").strip() or repr(tokenizer.id_to_token(i))
        return piece if len(piece) <= 8 else piece[:7] + "~"

    return [[text(i) for i in row] for row in ids.tolist()]
