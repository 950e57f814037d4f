"""Benchmark: training throughput (real tokens/s) of mhaplug's configurations against the stock PyTorch path.

One decoder (configs/model/small.yaml: d_model 128, 4 heads, 2 layers, d_ff 512, GELU, pre-norm, tied head; vocab
4096, max_length 256) is trained in one process, once per configuration, for the same number of AdamW steps from the
same initial weights, by a plain PyTorch loop (no Lightning Trainer) over the real ``TextDataModule`` train loader
(stdlib docstrings), with mhaplug.training.lit's loss (sum over real targets / their count: ``DecoderLM.loss_sum``, real
tokens only with the fused output layer + cross-entropy; baseline A ``lm_loss_sum`` of its logits):

- baseline A, what users write today: ``nn.TransformerEncoderLayer(norm_first=True)`` blocks (``nn.MultiheadAttention``)
  given ``src_key_padding_mask`` and a float causal ``src_mask``; random batching, right padding;
- baseline B: ``mhaplug.decoder.DecoderLM``, strategy ``merged_bool``, random batching, right padding;
- mhaplug: ``merged_bool``, ``merged_additive``, ``causal_kpm``, ``causal_only`` with ``length_grouped`` and
  ``token_budget`` batching; the strategies valid for packed rows with ``layout=packed``.

Run from the repository root::

    python benchmarks/train_throughput.py               # 60 steps per configuration -> results/train-<device>.md
    python benchmarks/train_throughput.py --quick       # smoke check: 5 steps, 2 configurations -> ...-quick.md
    python benchmarks/train_throughput.py --steps 100 --warmup 5 --device cuda --out /tmp/train.md
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import gc
import resource
import shlex
import sys
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from _report import device_slug, markdown_table, write_report  # benchmarks/_report.py
from torch import Tensor, nn

import mhaplug
from mhaplug.attention import PACKED_STRATEGIES
from mhaplug.data import TextDataModule
from mhaplug.decoder import DecoderConfig, DecoderLM
from mhaplug.loss import lm_loss_sum

SEED, BATCH_SIZE, MAX_LENGTH, LR = 0, 16, 256, 3e-3
MODEL = {"d_model": 128, "num_heads": 4, "num_layers": 2, "d_ff": 512}  # configs/model/small.yaml
TARGET_VS_A, TARGET_VS_B = 4.0, 2.0
STRATEGIES = ("merged_bool", "merged_additive", "causal_kpm", "causal_only")  # reference, torch_mha, flex: skipped
A_NAME, B_NAME = "A: torch TransformerEncoderLayer", "B: mhaplug merged_bool"
Batch = dict[str, Any]


@dataclass(frozen=True)
class Config:
    name: str
    strategy: str  # an mhaplug strategy, or "torch" for baseline A
    batching: str
    layout: str = "padded"


def configurations(quick: bool) -> list[Config]:
    a, b = Config(A_NAME, "torch", "random"), Config(B_NAME, "merged_bool", "random")
    packed = [Config(f"{s} packed", s, "random", "packed") for s in STRATEGIES if s in PACKED_STRATEGIES]
    grouped = [Config(f"{s} {g}", s, g) for g in ("length_grouped", "token_budget") for s in STRATEGIES]
    return [a, packed[0]] if quick else [a, b, *grouped, *packed]


class TorchDecoder(nn.Module):
    """Baseline A: DecoderLM's architecture from stock torch modules (weights copied from a DecoderLM)."""

    RENAMES = (
        ("blocks.", "layers."),
        (".ln_1.", ".norm1."),
        (".ln_2.", ".norm2."),
        (".attn.", ".self_attn."),
        (".mlp.0.", ".linear1."),
        (".mlp.2.", ".linear2."),
    )

    def __init__(self, decoder: DecoderLM) -> None:
        super().__init__()
        c = decoder.config
        self.tok_emb = nn.Embedding(c.vocab_size, c.d_model)
        self.pos_emb = nn.Embedding(c.max_positions, c.d_model)
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(
                c.d_model, c.num_heads, c.d_ff, dropout=0.0, activation="gelu", batch_first=True, norm_first=True
            )
            for _ in range(c.num_layers)
        )
        self.ln_f = nn.LayerNorm(c.d_model)
        self.lm_head = nn.Linear(c.d_model, c.vocab_size, bias=False)
        self.lm_head.weight = self.tok_emb.weight
        state = {}
        for key, value in decoder.state_dict().items():  # DecoderLM's attention has torch's state_dict keys
            for old, new in self.RENAMES:
                key = key.replace(old, new)
            state[key] = value
        self.load_state_dict(state, strict=True)

    def forward(self, input_ids: Tensor, *, key_padding_mask: Tensor, position_ids: Tensor, **_: Any) -> Tensor:
        causal = nn.Transformer.generate_square_subsequent_mask(input_ids.shape[1], device=input_ids.device)
        x = self.tok_emb(input_ids) + self.pos_emb(position_ids)  # (B, L, E)
        for layer in self.layers:
            x = layer(x, src_mask=causal, src_key_padding_mask=key_padding_mask)  # (L, L) 0/-inf, (B, L) bool
        return self.lm_head(self.ln_f(x))  # (B, L, V)


def build(config: Config, device: torch.device) -> tuple[Iterator[Batch], nn.Module, torch.optim.Optimizer]:
    """Endless train batches (``set_epoch`` per epoch), the model from seed SEED, and its AdamW."""
    dm = TextDataModule(
        batching=config.batching,
        layout=config.layout,
        batch_size=BATCH_SIZE,
        max_length=MAX_LENGTH,
        max_tokens=BATCH_SIZE * MAX_LENGTH,
        seed=SEED,
    )
    dm.setup("fit")

    def batches() -> Iterator[Batch]:
        for epoch in range(10**9):
            loader = dm.train_dataloader()
            loader.batch_sampler.set_epoch(epoch)
            yield from loader

    torch.manual_seed(SEED)
    strategy = "merged_bool" if config.strategy == "torch" else config.strategy
    model = DecoderLM(DecoderConfig(vocab_size=dm.vocab_size, max_positions=MAX_LENGTH, strategy=strategy, **MODEL))
    model = (TorchDecoder(model) if config.strategy == "torch" else model).to(device)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}]
    return batches(), model, torch.optim.AdamW(groups, lr=LR, betas=(0.9, 0.95))


def forward_loss(model: nn.Module, batch: Batch, device: torch.device) -> Tensor:
    """Mean next-token loss over the batch's real targets (their count read on the CPU, before the transfer)."""
    targets = int((batch["labels"][:, 1:] != -100).sum())
    on = {k: v.to(device, non_blocking=True) for k, v in batch.items() if isinstance(v, Tensor)}
    if isinstance(model, DecoderLM):  # LitDecoderLM's training path: real tokens only, fused loss
        return model.loss_sum(on) / max(targets, 1)
    logits = model(
        on["input_ids"],
        key_padding_mask=on["key_padding_mask"],
        position_ids=on["position_ids"],
        document_ids=on.get("document_ids"),
    )
    return lm_loss_sum(logits, on["labels"]) / max(targets, 1)


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, batch: Batch, device: torch.device) -> Tensor:
    loss = forward_loss(model, batch, device)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


@torch.no_grad()
def val_loss(model: nn.Module, batches: list[Batch], device: torch.device) -> float:
    """Token-weighted loss over the validation split (the same padded batches for every configuration)."""
    model.eval()
    total = count = 0.0
    for batch in batches:
        targets = int((batch["labels"][:, 1:] != -100).sum())
        total, count = total + float(forward_loss(model, batch, device)) * targets, count + targets
    model.train()
    return total / count


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak_memory(device: torch.device) -> int:
    """Reset the peak counter; return the baseline in KiB (CPU: ``ru_maxrss`` after malloc_trim and clear_refs)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return 0
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap back, so that this run's growth shows
        Path("/proc/self/clear_refs").write_text("5")  # Linux >= 4.0: resets the peak-RSS mark behind ru_maxrss
    except OSError:
        pass  # then ru_maxrss keeps the process-lifetime peak: runs smaller than an earlier one show ~0
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def peak_memory_mib(device: torch.device, baseline_kib: int) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - baseline_kib) / 1024


def run(config: Config, args: argparse.Namespace, val_batches: list[Batch]) -> dict[str, Any]:
    """Train ``args.warmup + args.steps`` steps; time the last ``args.steps``, data loading included."""
    device = torch.device(args.device)
    stream, model, optimizer = build(config, device)
    baseline = reset_peak_memory(device)
    losses: list[Tensor] = []
    real = padded = doc_sq = 0
    start = data_s = 0.0
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            sync(device)
            start = time.perf_counter()
        fetch = time.perf_counter()
        batch = next(stream)
        if step >= args.warmup:
            data_s += time.perf_counter() - fetch
            real += int(batch["lengths"].sum())
            padded += batch["input_ids"].numel()
            docs = batch["cu_seqlens"].diff().long() if "cu_seqlens" in batch else batch["lengths"]  # packed: per doc
            doc_sq += int((docs**2).sum())
        losses.append(train_step(model, optimizer, batch, device))
    sync(device)
    seconds = time.perf_counter() - start
    return {
        "config": config,
        "real_tps": real / seconds,
        "padded_tps": padded / seconds,
        "pad": 1 - real / padded,
        "step_s": seconds / args.steps,
        "data": data_s / seconds,
        "peak_mib": peak_memory_mib(device, baseline),
        "seq_eff": doc_sq / real,
        "train_loss": float(torch.stack(losses[-10:]).mean()),
        "val_loss": val_loss(model, val_batches, device),
    }


def profile_table(config: Config, args: argparse.Namespace, steps: int = 3, rows: int = 15) -> str:
    """Where ``steps`` training steps of ``config`` spend their time, by op (self time), from torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    device = torch.device(args.device)
    stream, model, optimizer = build(config, device)
    for _ in range(2):
        train_step(model, optimizer, next(stream), device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            train_step(model, optimizer, next(stream), device)
        sync(device)
    sort_by = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=sort_by, row_limit=rows, max_name_column_width=50)


def matmul_gflops(device: torch.device, size: int, repeats: int, rounds: int = 5) -> float:
    """Float32 (size x size) @ (size x size) GFLOP/s (2 size^3 FLOPs each): the best of ``rounds`` timed rounds."""
    a, b = torch.randn(size, size, device=device), torch.randn(size, size, device=device)
    a @ b  # warm-up
    best = 0.0
    for _ in range(rounds):
        sync(device)
        start = time.perf_counter()
        for _ in range(repeats):
            a @ b
        sync(device)
        best = max(best, 2 * size**3 * repeats / (time.perf_counter() - start) / 1e9)
    return best


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=60, help="timed optimizer steps per configuration")
    parser.add_argument("--warmup", type=int, default=5, help="untimed optimizer steps before them")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    parser.add_argument("--out", type=Path, help="Markdown file (default benchmarks/results/train-<device>.md)")
    parser.add_argument("--quick", action="store_true", help="smoke check: 5 steps, 2 configurations")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.warmup = 5, 1
    if args.steps < 1 or args.warmup < 0:
        parser.error("--steps must be >= 1 and --warmup >= 0")
    return args


def summary(
    results: list[dict[str, Any]],
    n_params: dict[str, int],
    gflops: float,
    args: argparse.Namespace,
) -> tuple[list[str], dict[str, Any], list[str]]:
    """The results table, the notes (ratios, MFU), the best configuration and the targets it missed."""
    by_name = {r["config"].name: r for r in results}
    base_a, base_b = by_name.get(A_NAME), by_name.get(B_NAME)
    best = max((r for r in results if r["config"].name not in (A_NAME, B_NAME)), key=lambda r: r["real_tps"])

    def ratio(result: dict[str, Any], base: dict[str, Any] | None) -> str:
        return f"{result['real_tps'] / base['real_tps']:.2f}x" if base else "n/a"

    header = [
        "configuration",
        "layout",
        "batching",
        "strategy",
        "real tokens/s",
        "padded tokens/s",
        "pad fraction",
        "s / step",
        "data time",
        "peak MiB",
        "train loss (last 10)",
        "val loss",
        "vs A",
        "vs B",
    ]
    rows = [
        [
            r["config"].name,
            r["config"].layout,
            r["config"].batching,
            r["config"].strategy,
            f"{r['real_tps']:,.0f}",
            f"{r['padded_tps']:,.0f}",
            f"{r['pad']:.1%}",
            f"{r['step_s']:.3f}",
            f"{r['data']:.1%}",
            f"{r['peak_mib']:.0f}",
            f"{r['train_loss']:.3f}",
            f"{r['val_loss']:.3f}",
            ratio(r, base_a),
            ratio(r, base_b),
        ]
        for r in results
    ]
    targets = {"A": (TARGET_VS_A, base_a), "B": (TARGET_VS_B, base_b)}
    verdicts = {
        k: "n/a" if b is None else "met" if best["real_tps"] >= g * b["real_tps"] else "NOT met"
        for k, (g, b) in targets.items()
    }
    n_flop = n_params["all"] - n_params["pos"]  # nanoGPT: every parameter but the position table
    flop_token = 6 * n_flop + 12 * MODEL["num_layers"] * MODEL["d_model"] * best["seq_eff"]
    achieved = flop_token * best["real_tps"] / 1e9
    notes = [
        (
            f"best mhaplug configuration: **{best['config'].name}**, {ratio(best, base_a)} baseline A (target >= "
            f"{TARGET_VS_A:.0f}x: {verdicts['A']}) and {ratio(best, base_b)} baseline B (target >= {TARGET_VS_B:.0f}x: "
            f"{verdicts['B']}) in real tokens/s"
        ),
        (
            f"MFU of the best configuration: {achieved:.1f} GFLOP/s of useful model FLOPs / {gflops:.1f} GFLOP/s "
            f"(float32 {args.matmul}^3 matmul, best of 5 rounds before and after the runs in this process: "
            f"{args.ceilings}) = **{achieved / gflops:.1%}**. FLOPs per real "
            "token = 6 N + 12 n_layers d_model T_eff (PaLM appendix B, nanoGPT `estimate_mfu`; attention counted "
            f"non-causal): N = {n_flop:,}, all parameters but the position table ({n_flop - n_params['tok']:,} "
            f"non-embedding + {n_params['tok']:,} in the tied token table, i.e. the LM-head matmul); T_eff = "
            f"sum(n^2) / sum(n) over the documents trained on (packed: per document, not per row) = "
            f"{best['seq_eff']:.1f}; so {flop_token / 1e6:.2f} MFLOP per real token. FLOPs spent on padding or across "
            "documents are not counted"
        ),
        "data time: share of the timed wall time spent in `next(train loader)` (sampling, collation; no workers)",
        (
            "runs see different batches (random: ~930 real tokens per step; token_budget, packed: ~3,900-4,100) "
            "for the same steps: losses compare only roughly. Val loss: the same padded val split for all "
            "(`eval()`, no_grad)"
        ),
        (
            "skipped for time: `reference`, `torch_mha` (baseline A runs torch's own MHA), `flex` (no Flex backward on "
            "CPU); `causal_kpm` / `causal_only` with packed rows are invalid (documents would attend each other)"
        ),
    ]
    return (
        [markdown_table(header, rows)] + [""] + [f"- {n}" for n in notes],
        best,
        [k for k, v in verdicts.items() if v == "NOT met"],
    )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda asked for, but torch.cuda.is_available() is False")
    warnings.filterwarnings("ignore", message=".*mismatched src_key_padding_mask and src_mask")  # baseline A, stock
    import datasets

    datasets.disable_progress_bars()
    slug = device_slug(device)
    out_path = args.out or Path(__file__).resolve().parent / "results" / f"train-{slug}{'-quick' * args.quick}.md"
    val_dm = TextDataModule(layout="padded", batch_size=BATCH_SIZE, max_length=MAX_LENGTH, seed=SEED)
    val_dm.setup("fit")
    val_batches = list(val_dm.val_dataloader())
    probe = DecoderLM(DecoderConfig(vocab_size=val_dm.vocab_size, max_positions=MAX_LENGTH, **MODEL))
    n_params = {
        "all": sum(p.numel() for p in probe.parameters()),
        "pos": probe.pos_emb.weight.numel(),
        "tok": probe.tok_emb.weight.numel(),
    }  # parameters() counts the tied table once
    args.matmul, repeats = (1024, 2) if args.quick else (2048, 20 if device.type == "cuda" else 3)
    ceilings = [matmul_gflops(device, args.matmul, repeats)]  # and again after the runs: the best is the ceiling
    memory = (
        "`torch.cuda.max_memory_allocated` (MiB)"
        if device.type == "cuda"
        else (
            "growth of the process peak RSS during the run, `ru_maxrss` after minus before (MiB), with the peak "
            "mark reset before each run (`malloc_trim`, `/proc/self/clear_refs` 5): activations, gradients, "
            "optimizer state and data"
        )
    )
    sections = [
        "# Training throughput: real tokens per second, mhaplug against the stock PyTorch path",
        "",
        f"- command: `python {' '.join(shlex.quote(a) for a in sys.argv)}`",
        (
            f"- torch {torch.__version__}, mhaplug {mhaplug.__version__}, Python {sys.version.split()[0]}, "
            f"device `{slug}`, threads {torch.get_num_threads()}"
        ),
        f"- date {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}",
        (
            f"- model: {', '.join(f'{k} {v}' for k, v in MODEL.items())}, vocab {val_dm.vocab_size}, max_length "
            f"{MAX_LENGTH}, tied head, {n_params['all']:,} parameters, float32, the same initial weights for every run"
        ),
        (
            f"- data: `TextDataModule(batching=..., layout=..., batch_size={BATCH_SIZE}, max_length={MAX_LENGTH}, "
            f"max_tokens={BATCH_SIZE * MAX_LENGTH}, seed={SEED})` (stdlib_docs); {args.steps} timed optimizer steps "
            f"after {args.warmup} untimed ones, data loading included; real tokens = `lengths.sum()`, "
            "padded = `input_ids.numel()`"
        ),
        f"- AdamW lr {LR} constant, betas (0.9, 0.95), weight decay 0.1 on matrices, gradient norm clipped to 1.0",
        f"- peak memory: {memory}",
    ]
    print("\n".join(sections), flush=True)
    results = []
    for config in configurations(args.quick):
        results.append(result := run(config, args, val_batches))
        print(
            f"  {config.name}: {result['real_tps']:,.0f} real tokens/s, pad {result['pad']:.1%}, "
            f"train loss {result['train_loss']:.3f}, val loss {result['val_loss']:.3f}",
            flush=True,
        )
    ceilings.append(matmul_gflops(device, args.matmul, repeats))
    args.ceilings = ", ".join(f"{c:.1f}" for c in ceilings)
    table, best, misses = summary(results, n_params, max(ceilings), args)
    block = ["", "## Results", "", *table]
    if misses:
        block += [
            "",
            f"## Profile: {best['config'].name}, 3 training steps (target vs {' and '.join(misses)} missed)",
            "",
            "```",
            profile_table(best["config"], args).rstrip(),
            "```",
        ]
    print("\n".join(block), flush=True)
    write_report(out_path, sections + block)


if __name__ == "__main__":
    main()
