"""Benchmark: forward + backward time and mask memory of mhaplug's strategies against nn.MultiheadAttention,
in the calls users actually make.

Causal self-attention, B=8, E=128, H=4 (D=32), right padding (~40% of tokens), one set of weights for every row.

1. **Call patterns** (every row gets the same call; ``causal_kpm`` / ``causal_only`` also get ``is_causal=True``,
   which they need):

   - *torch default*: ``mha(x, x, x, key_padding_mask=kpm, attn_mask=causal)``, i.e. ``need_weights=True``;
   - *need_weights=False*: the same with ``need_weights=False``;
   - *nn.Transformer style*: ``attn_mask=causal, is_causal=True`` plus ``key_padding_mask``, ``need_weights=False``
     (what ``nn.TransformerDecoderLayer`` passes with ``tgt_is_causal=True``).

   ``causal`` is ``nn.Transformer.generate_square_subsequent_mask`` (float 0 / -inf), ``kpm`` a bool padding mask.
2. **mhaplug's own call**: ``mha(x, x, x, key_padding_mask=kpm, is_causal=True, need_weights=False)`` for every
   strategy, against ``nn.MultiheadAttention`` and bare ``F.scaled_dot_product_attention(is_causal=True)`` with no
   padding mask (same projections).
3. **A whole ``nn.TransformerDecoder``** (2 layers, self- and cross-attention) as torch builds it, and after
   ``mhaplug.swap_attention(decoder, strategy)``, called with ``tgt_mask=causal, tgt_is_causal=True`` and both
   padding masks.

Mask memory is the storage (views count once) of the largest mask reaching an aten SDPA kernel op or
``aten.baddbmm`` in one forward, seen by a TorchDispatchMode, next to the mask handed to
``F.scaled_dot_product_attention`` (or the flex BlockMask).

Run from the repository root::

    python benchmarks/attention.py                  # L = 128, 512, 1024 -> benchmarks/results/attention-<device>.md
    python benchmarks/attention.py --quick          # smoke check: L=128, 2 repeats -> attention-<device>-quick.md
    python benchmarks/attention.py --lengths 512 --repeats 20 --device cuda --out /tmp/attention.md
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import math
import shlex
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from unittest.mock import patch

import torch
import torch.nn.functional as F
from _report import device_slug, markdown_table, write_report  # benchmarks/_report.py
from torch import Tensor, nn
from torch.nn.attention import flex_attention as flex_module
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import mhaplug

BATCH, EMBED, HEADS, FFN, SEED, WARMUP = 8, 128, 4, 512, 0, 2
GENERAL = ("auto", "merged_bool", "merged_additive")  # serve every call, for speed (reference: the ground truth)
TORCH_ROW = "torch nn.MultiheadAttention"
PATTERNS: dict[str, dict[str, object]] = {  # call pattern -> keyword arguments besides the padding and causal masks
    "torch default": {},
    "need_weights=False": {"need_weights": False},
    "nn.Transformer style": {"need_weights": False, "is_causal": True},
}
DEFAULT_ROW, BARE_ROW = "nn.MultiheadAttention default (need_weights=True)", "bare SDPA is_causal (no padding mask)"
NO_FLEX_BWD = "n/a (no Flex backward on CPU)"
Forward = Callable[[Tensor], Tensor]  # x (B, L, E) -> out (B, L, E)


class _Largest:
    """Keeps the largest mask seen: storage bytes (views and broadcasts count once) and dtype/shape."""

    def __init__(self) -> None:
        super().__init__()
        self.nbytes, self.what = 0, "none"

    def record(self, masks: list[Tensor], what: str | None = None) -> None:
        nbytes = sum({m.untyped_storage().data_ptr(): m.untyped_storage().nbytes() for m in masks}.values())
        if nbytes > self.nbytes:
            self.nbytes = nbytes
            self.what = what or f"{str(masks[0].dtype).removeprefix('torch.')} {tuple(masks[0].shape)}"

    def __str__(self) -> str:
        return f"{self.nbytes:,} ({self.what})" if self.nbytes else "0"


class KernelMasks(_Largest, TorchDispatchMode):
    """Masks reaching an SDPA kernel op (its ``attn_mask`` / ``attn_bias``) or ``aten.baddbmm`` (its bias)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        mask = args[0] if func.overloadpacket is torch.ops.aten.baddbmm else None
        if "scaled_dot_product" in str(func):  # e.g. aten._scaled_dot_product_flash_attention_for_cpu
            for i, arg in enumerate(func._schema.arguments):
                if arg.name in ("attn_mask", "attn_bias"):  # CUDA efficient / cuDNN kernels call it attn_bias
                    mask = kwargs.get(arg.name) if arg.kwarg_only or i >= len(args) else args[i]
        if isinstance(mask, Tensor):
            self.record([mask])
        return func(*args, **kwargs)


class EntryMasks(_Largest):
    """Masks handed to ``F.scaled_dot_product_attention`` (before torch converts them), or a flex BlockMask."""

    @contextlib.contextmanager
    def watching(self) -> Iterator[None]:
        sdpa, create_block_mask = F.scaled_dot_product_attention, flex_module.create_block_mask

        def sdpa_spy(*args, **kwargs):  # type: ignore[no-untyped-def]
            mask = kwargs.get("attn_mask", args[3] if len(args) > 3 else None)
            if isinstance(mask, Tensor):
                self.record([mask])
            return sdpa(*args, **kwargs)

        def create_block_mask_spy(*args, **kwargs):  # type: ignore[no-untyped-def]
            block_mask = create_block_mask(*args, **kwargs)
            leaves = [t for t in tree_leaves(block_mask.as_tuple()) if isinstance(t, Tensor)]
            self.record(leaves, f"BlockMask, {len(leaves)} tensors")
            return block_mask

        with (
            patch.object(F, "scaled_dot_product_attention", sdpa_spy),
            patch.object(flex_module, "create_block_mask", create_block_mask_spy),
        ):
            yield


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_inputs(length: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """x (B, L, E) requiring grad; right-padded key_padding_mask (B, L), True = pad; float causal mask (L, L)."""
    gen = torch.Generator().manual_seed(SEED + length)
    x = torch.randn(BATCH, length, EMBED, generator=gen).to(device).requires_grad_()
    lengths = (length * torch.linspace(0.2, 1.0, BATCH)).round().long()  # mean 0.6 L: 40% padding, longest = L
    kpm = (torch.arange(length)[None, :] >= lengths[:, None]).to(device)
    causal = nn.Transformer.generate_square_subsequent_mask(length, device=device)  # 0 / -inf, as users write it
    return x, kpm, causal


def bare_sdpa(mha: nn.MultiheadAttention, x: Tensor) -> Tensor:
    """``mha``'s projections around SDPA(is_causal=True) on (B, H, L, D), with no padding mask."""
    batch, length, _ = x.shape
    qkv = F.linear(x, mha.in_proj_weight, mha.in_proj_bias).chunk(3, dim=-1)  # 3 x (B, L, E)
    q, k, v = (t.view(batch, length, HEADS, -1).transpose(1, 2) for t in qkv)  # (B, H, L, D)
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return mha.out_proj(out.transpose(1, 2).reshape(batch, length, EMBED))


def configurations(
    ref: nn.MultiheadAttention, mods: dict[str, mhaplug.MultiheadAttention], kpm: Tensor, causal: Tensor
) -> dict[str, Forward]:
    rows: dict[str, Forward] = {
        DEFAULT_ROW: lambda x: ref(x, x, x, key_padding_mask=kpm, attn_mask=causal)[0],
        "nn.MultiheadAttention need_weights=False": lambda x: ref(
            x, x, x, key_padding_mask=kpm, attn_mask=causal, need_weights=False
        )[0],
        BARE_ROW: lambda x: bare_sdpa(ref, x),
    }
    for name, mha in mods.items():
        rows[f"mhaplug {name}"] = lambda x, m=mha: m(x, x, x, key_padding_mask=kpm, need_weights=False, is_causal=True)[
            0
        ]
    return rows


def step_ms(fn: Forward, x: Tensor, kpm: Tensor, params: list[nn.Parameter], backward: bool) -> float:
    """Wall time (ms) of fn(x), plus backward of a loss over non-pad rows (NaN rows or not, they carry none)."""
    x.grad = None
    for p in params:
        p.grad = None
    sync(x.device)
    start = time.perf_counter()
    if backward:
        fn(x).masked_fill(kpm[..., None], 0.0).sum().backward()
    else:
        with torch.no_grad():
            fn(x)
    sync(x.device)
    return (time.perf_counter() - start) * 1e3


def time_round_robin(
    rows: dict[str, Forward], x: Tensor, kpm: Tensor, params: list[nn.Parameter], repeats: int
) -> dict[str, tuple[float, bool]]:
    """Median ms per row and whether it includes backward. Rows take turns within each repeat, so a drift of
    the machine (another process, clock changes) spreads over all rows instead of biasing the last ones."""
    backward = {}
    for name, fn in rows.items():
        try:
            step_ms(fn, x, kpm, params, backward=True)
            backward[name] = True
        except NotImplementedError:  # flex: mhaplug refuses a backward on CPU; time its forward alone
            backward[name] = False
        for _ in range(WARMUP - 1):
            step_ms(fn, x, kpm, params, backward[name])
    times: dict[str, list[float]] = {name: [] for name in rows}
    for _ in range(repeats):
        for name, fn in rows.items():
            times[name].append(step_ms(fn, x, kpm, params, backward[name]))
    return {name: (statistics.median(t), backward[name]) for name, t in times.items()}


def bench_length(
    length: int, ref: nn.MultiheadAttention, mods: dict[str, mhaplug.MultiheadAttention], args: argparse.Namespace
) -> tuple[list[list[str]], list[str], float, dict[str, float]]:
    """Section 2 at one L: table rows, notes, the pad fraction and {row: row ms / bare SDPA ms}."""
    device = torch.device(args.device)
    x, kpm, causal = make_inputs(length, device)
    params = [p for m in (ref, *mods.values()) for p in m.parameters()]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    results = measure(configurations(ref, mods, kpm, causal), x, kpm, params, args.repeats)
    base, bare = results[DEFAULT_ROW], results[BARE_ROW]
    table, notes, over_bare = [], [], {}
    for name, r in results.items():
        timing = [NO_FLEX_BWD, "n/a", "n/a"]
        if r["ms"] is None:
            notes.append(
                f"`{name}` forward only, under torch.no_grad() (eager Flex on CPU): {r['forward_ms']:.1f} ms median"
            )
        else:
            over_bare[name] = r["ms"] / bare["ms"]
            timing = [f"{r['ms']:.1f}", f"{base['ms'] / r['ms']:.2f}x", f"{over_bare[name]:.2f}x"]
        row = [name, *timing, str(r["kernel"]), str(r["entry"]), real_rows_diff(r["out"], base["out"], kpm)]
        if device.type == "cuda":
            row.append(f"{torch.cuda.max_memory_allocated(device) / 2**20:.0f} (all rows so far)")
        table.append(row)
    return table, notes, kpm.float().mean().item(), over_bare


# ----------------------------------------------------------------------------------------------------------
# 1. Call patterns: the same call for torch and for each strategy
# ----------------------------------------------------------------------------------------------------------


def pattern_rows(
    pattern: str, ref: nn.MultiheadAttention, mods: dict[str, mhaplug.MultiheadAttention], kpm: Tensor, causal: Tensor
) -> dict[str, Forward]:
    call = {"key_padding_mask": kpm, "attn_mask": causal, **PATTERNS[pattern]}
    rows: dict[str, Forward] = {TORCH_ROW: lambda x: ref(x, x, x, **call)[0]}  # type: ignore[arg-type]
    for name, mha in mods.items():
        if name == "flex":  # no backward on CPU; its forward is timed in section 2
            continue
        own = {**call, "is_causal": True} if mhaplug.attention.CAPABILITIES[name].needs_is_causal else call
        rows[f"mhaplug {name}"] = lambda x, m=mha, c=own: m(x, x, x, **c)[0]  # type: ignore[arg-type]
    return rows


def measure(
    rows: dict[str, Forward], x: Tensor, kpm: Tensor, params: list[nn.Parameter], repeats: int
) -> dict[str, dict]:
    """Median ms (None without a backward), masks reaching the kernel and the F.sdpa entry, output, per row."""
    timings = time_round_robin(rows, x, kpm, params, repeats)
    results = {}
    for name, fn in rows.items():
        median_ms, with_backward = timings[name]
        # One more forward to see the masks. Flex goes through torch.compile even in eager mode, which refuses a
        # Python dispatch mode: for flex the BlockMask is what reaches the kernel.
        is_flex = name == "mhaplug flex"
        entry, kernel = EntryMasks(), KernelMasks()
        with (
            torch.enable_grad() if with_backward else torch.no_grad(),
            entry.watching(),
            contextlib.nullcontext() if is_flex else kernel,
        ):
            out = fn(x).detach()
        results[name] = {
            "ms": median_ms if with_backward else None,
            "forward_ms": median_ms,
            "kernel": entry if is_flex else kernel,
            "entry": entry,
            "out": out,
        }
    return results


def real_rows_diff(out: Tensor, base: Tensor, kpm: Tensor) -> str:
    return f"{(out - base).abs().masked_fill(kpm[..., None], 0.0).max().item():.1e}"


def bench_patterns(
    length: int, ref: nn.MultiheadAttention, mods: dict[str, mhaplug.MultiheadAttention], args: argparse.Namespace
) -> tuple[list[list[str]], dict[tuple[str, str], float]]:
    """One table row per implementation: ms and speed vs torch for each pattern, and the nn.Transformer-style
    call's kernel mask bytes and difference from torch. Also {(pattern, row): torch ms / row ms}."""
    device = torch.device(args.device)
    x, kpm, causal = make_inputs(length, device)
    params = [p for m in (ref, *mods.values()) for p in m.parameters()]
    per_pattern = {
        pattern: measure(pattern_rows(pattern, ref, mods, kpm, causal), x, kpm, params, args.repeats)
        for pattern in PATTERNS
    }
    ratios: dict[tuple[str, str], float] = {}
    table = []
    last = list(PATTERNS)[-1]
    for name in per_pattern[last]:
        row = [name]
        for pattern, results in per_pattern.items():
            ms, base = results[name]["ms"], results[TORCH_ROW]["ms"]
            ratios[(pattern, name)] = base / ms
            row += [f"{ms:.1f}", f"{base / ms:.2f}x"]
        styled = per_pattern[last]
        row += [str(styled[name]["kernel"]), real_rows_diff(styled[name]["out"], styled[TORCH_ROW]["out"], kpm)]
        table.append(row)
    return table, ratios


# ----------------------------------------------------------------------------------------------------------
# 3. A whole nn.TransformerDecoder, as torch builds it and after swap_attention
# ----------------------------------------------------------------------------------------------------------


def bench_decoder(length: int, args: argparse.Namespace) -> tuple[list[list[str]], dict[str, float]]:
    device = torch.device(args.device)
    x, kpm, causal = make_inputs(length, device)
    torch.manual_seed(SEED)
    layer = nn.TransformerDecoderLayer(EMBED, HEADS, dim_feedforward=FFN, dropout=0.0, batch_first=True, device=device)
    decoders = {
        TORCH_ROW.replace("MultiheadAttention", "TransformerDecoder"): nn.TransformerDecoder(layer, num_layers=2)
    }
    for strategy in GENERAL + ("reference",):
        swapped = nn.TransformerDecoder(layer, num_layers=2)
        swapped.load_state_dict(next(iter(decoders.values())).state_dict())
        mhaplug.swap_attention(swapped, strategy)
        decoders[f"swap_attention(decoder, {strategy!r})"] = swapped
    call = {"tgt_mask": causal, "tgt_is_causal": True, "tgt_key_padding_mask": kpm, "memory_key_padding_mask": kpm}
    rows: dict[str, Forward] = {name: (lambda x, d=d: d(x, x, **call)) for name, d in decoders.items()}
    params = [p for d in decoders.values() for p in d.parameters()]
    results = measure(rows, x, kpm, params, args.repeats)
    base_name = next(iter(rows))
    base = results[base_name]
    table, ratios = [], {}
    for name, r in results.items():
        ratios[name] = base["ms"] / r["ms"]
        table.append(
            [
                name,
                f"{r['ms']:.1f}",
                f"{ratios[name]:.2f}x",
                str(r["kernel"]),
                str(r["entry"]),
                real_rows_diff(r["out"], base["out"], kpm),
            ]
        )
    return table, ratios


def profile_table(fn: Forward, x: Tensor, kpm: Tensor, rows: int = 8) -> str:
    """Where the time of one forward + backward goes, by aten op (self time), from torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if x.device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        fn(x).masked_fill(kpm[..., None], 0.0).sum().backward()
        sync(x.device)
    sort_by = "self_cuda_time_total" if x.device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=sort_by, row_limit=rows, max_name_column_width=60)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[128, 512, 1024], help="sequence lengths L (= S)")
    parser.add_argument("--repeats", type=int, default=10, help=f"timed repeats per row, after {WARMUP} warm-up")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    parser.add_argument("--out", type=Path, help="Markdown file (default benchmarks/results/attention-<device>.md)")
    parser.add_argument("--quick", action="store_true", help="smoke check: L=128, 2 repeats")
    args = parser.parse_args(argv)
    if args.quick:
        args.lengths, args.repeats = [128], 2
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda asked for, but torch.cuda.is_available() is False")
    # Users' own calls mix a bool padding mask with nn.Transformer's float causal mask; torch warns on each.
    warnings.filterwarnings("ignore", message=".*mismatched (key_padding_mask|tgt_key_padding_mask) and")
    warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")  # eager flex on CPU
    torch.manual_seed(SEED)
    ref = nn.MultiheadAttention(EMBED, HEADS, batch_first=True, device=device)
    mods = {}
    for strategy in mhaplug.STRATEGIES:
        mods[strategy] = mhaplug.MultiheadAttention(EMBED, HEADS, batch_first=True, device=device, strategy=strategy)
        mods[strategy].load_state_dict(ref.state_dict(), strict=True)
    slug = device_slug(device)
    name = f"attention-{slug}{'-quick' if args.quick else ''}.md"
    out_path = args.out or Path(__file__).resolve().parent / "results" / name
    sections = [
        "# Attention benchmark: mask strategies in the calls users make, forward + backward",
        "",
        f"- command: `python {' '.join(shlex.quote(a) for a in sys.argv)}`",
        (
            f"- torch {torch.__version__}, mhaplug {mhaplug.__version__}, device `{slug}`, "
            f"threads {torch.get_num_threads()}"
        ),
        f"- date {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}",
        (
            f"- B={BATCH}, E={EMBED}, H={HEADS}, D={EMBED // HEADS}, causal self-attention, right padding, float32; "
            f"median of {args.repeats} after {WARMUP} warm-up, rows timed in turn within each repeat; "
            f"lengths round(L * linspace(0.2, 1, B)); loss = sum of outputs over non-pad rows"
        ),
        "- `vs torch` = torch's ms / row ms in the same call pattern (higher is faster; >= 1.00x: at least as fast)",
        (
            "- mask bytes reaching kernel: storage of the largest `attn_mask`/`attn_bias` of an aten SDPA kernel op, "
            "or bias of `aten.baddbmm`, in one forward (torch turns a bool SDPA mask into float before its CPU "
            "kernel); `reference` and the `need_weights=True` path apply their mask with `masked_fill`, not counted. "
            "Passed to F.sdpa: the mask before that conversion; for flex, the BlockMask's tensors (eager Flex on CPU "
            "still materialises the scores)"
        ),
    ]
    print("\n".join(sections), flush=True)
    pattern_header = ["configuration"]
    for pattern in PATTERNS:
        pattern_header += [f"{pattern} ms", "vs torch"]
    pattern_header += ["mask bytes reaching kernel (nn.Transformer style)", "max abs diff vs torch (real rows)"]
    own_header = ["configuration", "fwd+bwd ms (median)", "speed-up vs nn.MHA default", "time / bare SDPA is_causal"]
    own_header += ["mask bytes reaching kernel", "mask bytes passed to F.sdpa / BlockMask"]
    own_header += ["max abs diff vs nn.MHA (real rows)"] + (["peak MiB"] if device.type == "cuda" else [])
    decoder_header = [
        "nn.TransformerDecoder, 2 layers",
        "fwd+bwd ms",
        "vs torch",
        "largest mask reaching kernel",
        "largest mask passed to F.sdpa",
        "max abs diff vs torch (real rows)",
    ]
    worst: dict[str, tuple[float, str]] = {}  # general strategy -> (lowest speed vs torch, where)
    over_bare_auto: dict[int, float] = {}
    for length in args.lengths:
        patterns, ratios = bench_patterns(length, ref, mods, args)
        own, notes, pad, over_bare = bench_length(length, ref, mods, args)
        decoder, decoder_ratios = bench_decoder(length, args)
        for (pattern, row), ratio in ratios.items():
            strategy = row.removeprefix("mhaplug ")
            if strategy in GENERAL and ratio < worst.get(strategy, (math.inf, ""))[0]:
                worst[strategy] = (ratio, f"{pattern}, L={length}")
        for row, ratio in decoder_ratios.items():
            strategy = next((s for s in GENERAL if f"{s!r}" in row), None)
            if strategy and ratio < worst[strategy][0]:
                worst[strategy] = (ratio, f"nn.TransformerDecoder, L={length}")
        over_bare_auto[length] = over_bare["mhaplug auto"]
        block = [
            "",
            f"## L = S = {length} (pad fraction {pad:.3f})",
            "",
            "### 1. Call patterns",
            "",
            markdown_table(pattern_header, patterns),
            "",
            "### 2. mhaplug's own call (`is_causal=True`, no `attn_mask`)",
            "",
            markdown_table(own_header, own),
        ]
        block += ["", *(f"- {n}" for n in notes)] if notes else []
        block += [
            "",
            "### 3. A whole nn.TransformerDecoder, torch's and after `swap_attention`",
            "",
            markdown_table(decoder_header, decoder),
        ]
        print("\n".join(block), flush=True)
        sections += block
    block = ["", "## Targets", ""]
    for strategy, (ratio, where) in worst.items():
        verdict = "met" if ratio >= 1.0 else "NOT met"
        block.append(f"- `{strategy}` at least 1.0x torch in every pattern: {verdict} (lowest {ratio:.2f}x: {where})")
    for length, ratio in over_bare_auto.items():
        verdict = "met" if ratio <= 1.1 else "NOT met"
        block.append(
            f"- causal self-attention with padding (`auto`) within 1.1x of bare SDPA is_causal at L={length}: "
            f"{verdict} ({ratio:.2f}x)"
        )
    print("\n".join(block), flush=True)
    sections += block
    # Where the time goes for the fastest padded-mask strategy at the largest L: the attention kernel itself.
    length = max(args.lengths)
    x, kpm, causal = make_inputs(length, device)
    fn = configurations(ref, mods, kpm, causal)["mhaplug auto"]
    block = [
        "",
        f"## Profile: mhaplug auto (causal_kpm), L = {length}, one forward + backward",
        "",
        "```",
        profile_table(fn, x, kpm).rstrip(),
        "```",
    ]
    print("\n".join(block), flush=True)
    sections += block
    write_report(out_path, sections)


if __name__ == "__main__":
    main()
