"""Benchmark: forward + backward time and mask memory of each mhaplug strategy against nn.MultiheadAttention.

Causal self-attention, B=8, E=128, H=4 (D=32), right padding (~40% of tokens), one set of weights for every row:
``nn.MultiheadAttention`` as users call it today (``need_weights=True`` by default, ``key_padding_mask`` plus a
float causal ``attn_mask``), the same with ``need_weights=False``, bare ``F.scaled_dot_product_attention(
is_causal=True)`` with no padding mask (same projections), and each strategy in ``mhaplug.STRATEGIES`` called as
``mha(x, x, x, key_padding_mask=kpm, need_weights=False, is_causal=True)``. Mask memory is the storage (views
count once) of the largest mask reaching an aten SDPA kernel op or ``aten.baddbmm`` in one forward, seen by a
TorchDispatchMode, next to the mask handed to ``F.scaled_dot_product_attention`` (or the flex BlockMask).

Run from the repository root::

    python benchmarks/attention.py                  # L = 128, 512, 1024 -> benchmarks/results/attention-<device>.md
    python benchmarks/attention.py --quick          # smoke check: L=128, 2 repeats -> attention-<device>-quick.md
    python benchmarks/attention.py --lengths 512 --repeats 20 --device cuda --out /tmp/attention.md
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
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
from torch import Tensor, nn
from torch.nn.attention import flex_attention as flex_module
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import mhaplug
from _report import device_slug, markdown_table, write_report  # benchmarks/_report.py

BATCH, EMBED, HEADS, SEED, WARMUP = 8, 128, 4, 0, 2
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

        with patch.object(F, "scaled_dot_product_attention", sdpa_spy):
            with patch.object(flex_module, "create_block_mask", create_block_mask_spy):
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
        rows[f"mhaplug {name}"] = lambda x, m=mha: m(
            x, x, x, key_padding_mask=kpm, need_weights=False, is_causal=True
        )[0]
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
) -> tuple[list[list[str]], list[str], float]:
    """Time and probe every configuration at one L; return table rows, notes and the pad fraction."""
    device = torch.device(args.device)
    x, kpm, causal = make_inputs(length, device)
    params = [p for m in (ref, *mods.values()) for p in m.parameters()]
    results: dict[str, tuple[float | None, str, str, Tensor, str]] = {}  # ms, kernel, entry, out, peak MiB
    notes: list[str] = []
    rows = configurations(ref, mods, kpm, causal)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    timings = time_round_robin(rows, x, kpm, params, args.repeats)
    for name, fn in rows.items():
        is_flex, (median_ms, with_backward), peak = name == "mhaplug flex", timings[name], ""
        ms = median_ms if with_backward else None
        if not with_backward:
            notes.append(f"`{name}` forward only, under torch.no_grad() (eager Flex on CPU): {median_ms:.1f} ms median")
        if device.type == "cuda":
            peak = f"{torch.cuda.max_memory_allocated(device) / 2**20:.0f} (all rows so far)"
        # One more forward to see the masks. Flex goes through torch.compile even in eager mode, which refuses a
        # Python dispatch mode: for flex the BlockMask is what reaches the kernel.
        entry, kernel = EntryMasks(), KernelMasks()
        with torch.enable_grad() if ms is not None else torch.no_grad(), entry.watching():
            with contextlib.nullcontext() if is_flex else kernel:
                out = fn(x).detach()
        results[name] = (ms, str(entry if is_flex else kernel), str(entry), out, peak)

    base_ms, bare_ms, base_out = results[DEFAULT_ROW][0], results[BARE_ROW][0], results[DEFAULT_ROW][3]
    assert base_ms is not None and bare_ms is not None
    table = []
    for name, (ms, kernel_bytes, entry_bytes, out, peak) in results.items():
        diff = (out - base_out).abs().masked_fill(kpm[..., None], 0.0).max().item()
        timing = [NO_FLEX_BWD, "n/a", "n/a"]
        if ms is not None:
            timing = [f"{ms:.1f}", f"{base_ms / ms:.2f}x", f"{ms / bare_ms:.2f}x"]
        row = [name, *timing, kernel_bytes, entry_bytes, f"{diff:.1e}"]
        table.append(row + ([peak] if device.type == "cuda" else []))
    return table, notes, kpm.float().mean().item()


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
    warnings.filterwarnings("ignore", message=".*mismatched key_padding_mask and attn_mask")  # bool kpm + float mask
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
    header = ["configuration", "fwd+bwd ms (median)", "speed-up vs nn.MHA default", "time / bare SDPA is_causal"]
    header += ["mask bytes reaching kernel", "mask bytes passed to F.sdpa / BlockMask"]
    header += ["max abs diff vs nn.MHA (real rows)"] + (["peak MiB"] if device.type == "cuda" else [])
    sections = [
        "# Attention benchmark: mask strategies, forward + backward",
        "",
        f"- command: `python {' '.join(shlex.quote(a) for a in sys.argv)}`",
        f"- torch {torch.__version__}, mhaplug {mhaplug.__version__}, device `{slug}`, "
        f"threads {torch.get_num_threads()}",
        f"- date {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}",
        f"- B={BATCH}, E={EMBED}, H={HEADS}, D={EMBED // HEADS}, causal self-attention, right padding, float32; "
        f"median of {args.repeats} after {WARMUP} warm-up, rows timed in turn within each repeat; "
        f"lengths round(L * linspace(0.2, 1, B)); loss = sum of outputs over non-pad rows",
        "- speed-up = nn.MHA default ms / row ms (higher is faster); time / bare = row ms / bare SDPA ms",
        "- mask bytes reaching kernel: storage of the largest `attn_mask`/`attn_bias` of an aten SDPA kernel op, or "
        "bias of `aten.baddbmm`, in one forward (torch turns a bool SDPA mask into float before its CPU kernel); "
        "`reference` applies its mask with `masked_fill`, not counted. Passed to F.sdpa: the mask before that "
        "conversion; for flex, the BlockMask's tensors (eager Flex on CPU still materialises the scores)",
    ]
    print("\n".join(sections), flush=True)
    for length in args.lengths:
        table, notes, pad = bench_length(length, ref, mods, args)
        block = ["", f"## L = S = {length} (pad fraction {pad:.3f})", "", markdown_table(header, table)]
        block += ["", *(f"- {n}" for n in notes)] if notes else []
        print("\n".join(block), flush=True)
        sections += block
    # Where the time goes for the fastest padded-mask strategy at the largest L: the attention kernel itself.
    length = max(args.lengths)
    x, kpm, causal = make_inputs(length, device)
    fn = configurations(ref, mods, kpm, causal)["mhaplug causal_kpm"]
    block = ["", f"## Profile: mhaplug causal_kpm, L = {length}, one forward + backward", "", "```",
             profile_table(fn, x, kpm).rstrip(), "```"]
    print("\n".join(block), flush=True)
    sections += block
    write_report(out_path, sections)


if __name__ == "__main__":
    main()
