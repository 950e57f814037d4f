"""Benchmark: mhaplug's training throughput against what a transformers user would pick, in one process.

Every row trains the same architecture (d_model 128, 4 heads, 2 layers, d_ff 512, exact GELU, pre-norm, LayerNorm
eps 1e-5, no dropout, tied head, vocab 4096, 256 positions: 953,856 parameters) from the same initial weights on the
same tokenised documents (``TextDataModule``, stdlib_docs train split), with the same optimizer, in float32:

- ``hf random``: ``GPT2LMHeadModel`` (``attn_implementation="sdpa"``) + ``DataCollatorForLanguageModeling(mlm=False)``
  (pads to the longest, with mhaplug's BPE wrapped in ``PreTrainedTokenizerFast``; pad ``<|pad|>`` = 0 is never
  text, so its labels are -100 exactly on padding), 16 documents a batch in random order;
- ``hf group_by_length``: the same with ``LengthGroupedSampler``, Trainer's ``train_sampling_strategy=
  "group_by_length"`` (``group_by_length=True`` before transformers 5); ``hf flattening``:
  ``DataCollatorWithFlattening`` (16 documents in one row, kept apart by ``position_ids``);
- mhaplug: ``DecoderLM`` fed by ``TextDataModule`` loaders: ``random`` and ``length_grouped`` (padded, ``auto``),
  ``packed`` (``auto``: document masks), and ``default``: what ``python train.py`` runs with no overrides, read
  from the composed Hydra config (data knobs, attention strategy, ``trainer.precision``, ``model.compile``);
- what each lever is worth, against its "before" in the same run: ``mhaplug random before`` (every position
  computed and ``lm_loss_sum`` of the (B, L, V) logits: the model before issue 9), ``mhaplug packed logits-loss``
  (the fused loss off), ``mhaplug packed merged_bool`` (one (B, 1, L, L) document mask instead of ``auto``'s
  documents as rows), ``mhaplug packed compiled`` (``model.compile=true``);
- bf16: the fastest float32 mhaplug and HF rows again under ``torch.autocast("cpu", torch.bfloat16)`` (float32
  weights, as Lightning's ``bf16-mixed``), where the CPU has bf16.

At start-up DecoderLM's weights (plus noise) are copied into GPT-2 (Conv1D stores them transposed): one batch must
give the same loss, padded and flattened, within 1e-5. ``hf random``, ``hf flattening`` and ``mhaplug random`` draw
their batches from one seeded permutation (Trainer's ``RandomSampler`` + ``BatchSampler`` is the same distribution,
a uniform shuffle cut into batches of 16), so their losses must agree step for step. Loss: mhaplug ``loss_sum /
num_targets`` as LitDecoderLM; HF the model's ``labels=`` loss (mean over targets != -100). AdamW lr 3e-3, betas
(0.9, 0.95), weight decay 0.1 on >= 2-D parameters, gradient norm clipped to 1.0, ``fused`` as transformers' default
``optim``, no schedule; ``use_cache=False``; 2 threads.

Method: one warm-up block per row, then R rounds x S steps round-robin over the rows (round 1 of every row, then
round 2, ...); a block's real tokens/s = non-pad tokens trained / its wall time, data loading included. Reported:
median (min-max) per row, ratios, padded tokens/s, pad fraction, peak-RSS growth per block, the last block's mean
loss, MFU against a float32 1024^3 ``torch.mm`` and against the model's own GEMM shapes, both measured in the run.

Run from the repository root::

    python benchmarks/peers.py                          # 8 rounds x 25 steps -> results/peers-<device>.md
    python benchmarks/peers.py --quick --out /tmp/p.md  # smoke check: 2 rounds x 3 steps, 5 rows
    python benchmarks/peers.py --rows "hf random,mhaplug packed" --rounds 4 --steps 10
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import itertools
import os
import shlex
import statistics
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import datasets
import torch
import transformers
from _report import device_slug, markdown_table, write_report  # benchmarks/_report.py
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from torch import Tensor, nn
from torch.utils.data import DataLoader
from train_throughput import matmul_gflops, peak_memory_mib, reset_peak_memory  # benchmarks/train_throughput.py
from transformers import AutoModelForCausalLM, GPT2Config, PreTrainedTokenizerFast, TrainingArguments
from transformers.data.data_collator import DataCollatorForLanguageModeling, DataCollatorWithFlattening
from transformers.trainer_pt_utils import LengthGroupedSampler

import mhaplug
from mhaplug.common import EOS_TOKEN, PAD_TOKEN
from mhaplug.data import TextDataModule
from mhaplug.data.collate import PadCollator
from mhaplug.data.sampling import RandomBatchSampler
from mhaplug.decoder import DecoderConfig, DecoderLM
from mhaplug.loss import lm_loss_sum
from mhaplug.training.config import register_configs

SEED, BATCH_SIZE, MAX_LENGTH, VOCAB, THREADS = 0, 16, 256, 4096, 2
LR, BETAS, WEIGHT_DECAY, CLIP = 3e-3, (0.9, 0.95), 0.1, 1.0
MODEL = {"d_model": 128, "num_heads": 4, "num_layers": 2, "d_ff": 512}  # configs/model/small.yaml
E, FF = MODEL["d_model"], MODEL["d_ff"]
LINEARS = [(E, 3 * E), (E, E), (E, FF), (FF, E)] * MODEL["num_layers"] + [(E, VOCAB)]  # (in, out), head last
GEMM_PARAMS = sum(k * n for k, n in LINEARS)  # 917,504: the matmul weights, tied head included
HF_OPTIM = next(f.default for f in dataclasses.fields(TrainingArguments) if f.name == "optim")
FUSED = "fused" in str(HF_OPTIM)
CPU = torch.device("cpu")
QUICK_ROWS = ("hf random", "hf flattening", "mhaplug random", "mhaplug packed", "mhaplug default")
Batch = dict[str, Any]


@dataclass
class Row:
    name: str
    family: str  # "hf" (GPT2LMHeadModel) or "mhaplug" (DecoderLM)
    batching: str  # hf: random | group_by_length | flattening; mhaplug: TextDataModule(batching=...)
    layout: str = "padded"
    strategy: str = "auto"  # mhaplug's attention strategy; "sdpa" for the HF rows
    data: dict[str, Any] = field(default_factory=dict)  # more TextDataModule arguments (the default row's)
    bf16: bool = False  # torch.autocast("cpu", dtype=torch.bfloat16) around forward and loss
    compile: bool = False  # DecoderConfig(compile=True): each block's norm + MLP compiled
    fused_loss: bool = True  # False: lm_loss_sum of the (B, L, V) logits, as before issue 9
    real_tokens_only: bool = True  # False: every position computed, pads included, as before issue 9


def default_row() -> Row:
    """``mhaplug default``: the data knobs, strategy, precision and compile flag of ``python train.py``."""
    register_configs()  # train.py does this at import: the schema under configs/train.yaml
    with initialize_config_dir(config_dir=str(Path(__file__).resolve().parents[1] / "configs"), version_base="1.3"):
        cfg = compose(config_name="train")
    knobs = ("padding_side", "batch_size", "max_tokens", "pad_to_multiple_of")
    data = {k: cfg.data[k] for k in knobs if cfg.data.get(k) is not None}
    strategy = OmegaConf.select(cfg, "attention.strategy") or OmegaConf.select(cfg, "model.strategy")
    precision = str(OmegaConf.select(cfg, "trainer.precision", default="32"))
    if precision not in ("32", "32-true", "bf16-mixed", "None"):
        raise ValueError(f"trainer.precision={precision!r}: this benchmark runs 32 and bf16-mixed only")
    return Row(
        "mhaplug default",
        "mhaplug",
        cfg.data.batching,
        cfg.data.layout,
        strategy,
        data,
        bf16=precision == "bf16-mixed",
        compile=bool(OmegaConf.select(cfg, "model.compile", default=False)),
    )


def all_rows() -> list[Row]:
    return [
        Row("hf random", "hf", "random", strategy="sdpa"),
        Row("hf group_by_length", "hf", "group_by_length", strategy="sdpa"),
        Row("hf flattening", "hf", "flattening", "packed", strategy="sdpa"),
        Row("mhaplug random", "mhaplug", "random"),
        Row("mhaplug length_grouped", "mhaplug", "length_grouped"),
        Row("mhaplug packed", "mhaplug", "random", "packed"),
        default_row(),
        # what each lever is worth, measured against its own "before" in the same run
        Row(
            "mhaplug random before (all positions + logits loss)",
            "mhaplug",
            "random",
            fused_loss=False,
            real_tokens_only=False,
        ),
        Row("mhaplug packed logits-loss", "mhaplug", "random", "packed", fused_loss=False),
        Row("mhaplug packed merged_bool", "mhaplug", "random", "packed", "merged_bool"),
        Row("mhaplug packed compiled", "mhaplug", "random", "packed", compile=True),
    ]


def shares_random_order(row: Row) -> bool:
    """Rows that train on the shared seeded permutation, 16 documents a step: their losses must agree."""
    documents = row.family == "hf" or (row.layout == "padded" and row.data.get("batch_size", BATCH_SIZE) == BATCH_SIZE)
    return row.batching in ("random", "flattening") and documents and not row.data.get("pad_to_multiple_of")


def new_decoder(strategy: str = "auto", *, compile: bool = False) -> DecoderLM:
    torch.manual_seed(SEED)  # the same initial weights for every row
    config = DecoderConfig(vocab_size=VOCAB, max_positions=MAX_LENGTH, strategy=strategy, compile=compile, **MODEL)
    return DecoderLM(config)


def gpt2_from(decoder: DecoderLM) -> nn.Module:
    """GPT-2 of exactly DecoderLM's architecture, holding a copy of ``decoder``'s weights."""
    config = GPT2Config(
        vocab_size=VOCAB,
        n_positions=MAX_LENGTH,
        n_embd=E,
        n_head=MODEL["num_heads"],
        n_layer=MODEL["num_layers"],
        n_inner=FF,
        activation_function="gelu",  # exact, as nn.GELU()
        layer_norm_epsilon=1e-5,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        tie_word_embeddings=True,
        use_cache=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=1,
    )
    gpt2 = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    ours = decoder.state_dict()
    state = {
        "transformer.wte.weight": ours["tok_emb.weight"],
        "transformer.wpe.weight": ours["pos_emb.weight"],
        "transformer.ln_f.weight": ours["ln_f.weight"],
        "transformer.ln_f.bias": ours["ln_f.bias"],
    }
    names = {
        "ln_1": "ln_1",
        "attn.c_attn": "attn.in_proj",
        "attn.c_proj": "attn.out_proj",
        "ln_2": "ln_2",
        "mlp.c_fc": "mlp.0",
        "mlp.c_proj": "mlp.2",
    }  # GPT-2 module -> DecoderLM module (torch MHA names)
    for i, (theirs, mine) in itertools.product(range(MODEL["num_layers"]), names.items()):
        for kind in ("weight", "bias"):
            src = ours[f"blocks.{i}.{mine}{'_' if mine == 'attn.in_proj' else '.'}{kind}"]
            transpose = kind == "weight" and "c_" in theirs  # Conv1D stores (in, out); nn.Linear (out, in)
            state[f"transformer.h.{i}.{theirs}.{kind}"] = src.t().contiguous() if transpose else src
    missing, unexpected = gpt2.load_state_dict(state, strict=False)
    params = dict(gpt2.named_parameters())  # the tied lm_head.weight is listed once, as transformer.wte.weight
    if unexpected or set(params) != set(state):
        sys.exit(f"GPT-2 weight copy: missing {missing}, unexpected {unexpected}, left {set(params) - set(state)}")
    if gpt2.lm_head.weight.data_ptr() != gpt2.transformer.wte.weight.data_ptr():
        sys.exit("GPT-2's lm_head is not tied to wte: the architectures differ")
    return gpt2


def check_equivalence(data: datasets.Dataset, lengths: list[int], tokenizer: PreTrainedTokenizerFast) -> str:
    """DecoderLM and its GPT-2 copy give the same loss on one batch, padded and flattened, or the run stops.

    The weights are the initial ones plus N(0, 0.1) noise: at initialisation the logits are near 0 and every loss is
    close to ln V, so a wrong mapping (q and k swapped, say) would move it by only ~1e-3. The logits of the real
    tokens are compared too."""
    decoder = new_decoder()
    noise = torch.Generator().manual_seed(SEED + 1)
    with torch.no_grad():
        for param in decoder.parameters():
            param.add_(torch.randn(param.shape, generator=noise), alpha=0.1)
    gpt2 = gpt2_from(decoder)
    counts = [sum(p.numel() for p in m.parameters()) for m in (decoder, gpt2)]
    if counts[0] != counts[1]:
        sys.exit(f"parameter counts differ: DecoderLM {counts[0]:,}, GPT-2 {counts[1]:,}")
    rows = [data[i] for i in next(iter(RandomBatchSampler(lengths, BATCH_SIZE, seed=SEED)))]
    ours, padded = PadCollator(pad_token_id=0)(rows), hf_collator("random", tokenizer)(rows)
    with torch.no_grad():
        losses = {
            "mhaplug": float(mhaplug_loss_sum(decoder, ours) / ours["num_targets"]),
            "hf padded": float(gpt2(**padded, use_cache=False).loss),
            "hf flattened": float(gpt2(**hf_collator("flattening", tokenizer)(rows), use_cache=False).loss),
        }
        real = padded["attention_mask"].bool()  # (B, L); logits of padding positions differ and do not matter
        logits = decoder(
            ours["input_ids"], key_padding_mask=ours["key_padding_mask"], position_ids=ours["position_ids"]
        )[real]  # (N, V)
        logit_diff = float((logits - gpt2(**padded, use_cache=False).logits[real]).abs().max())
    worst = max(abs(v - losses["mhaplug"]) for v in losses.values())
    if worst > 1e-5 or logit_diff > 1e-4:  # logits are the finer test: gelu_new for gelu moves them by ~1e-3
        sys.exit(
            f"GPT-2 does not compute DecoderLM's function: loss |diff| {worst:.2e} (limit 1e-5) in {losses}, "
            f"logits |diff| {logit_diff:.2e} (limit 1e-4). The architectures differ (activation, LayerNorm eps, "
            "scaling, tying) or the weight copy maps a name wrongly"
        )
    return (
        f"{counts[0]:,} parameters each; DecoderLM's weights (initial + N(0, 0.1) noise) copied into GPT-2, "
        "one batch (`DecoderLM.loss_sum`) gives loss "
        + ", ".join(f"{k} {v:.6f}" for k, v in losses.items())
        + f" (max |diff| {worst:.1e} <= 1e-5; logits of real tokens max |diff| {logit_diff:.1e} <= 1e-4)"
    )


def hf_collator(batching: str, tokenizer: PreTrainedTokenizerFast) -> Any:
    if batching == "flattening":
        return DataCollatorWithFlattening()  # labels -100 on every document's first token
    return DataCollatorForLanguageModeling(tokenizer, mlm=False)  # labels -100 where input_ids == pad (never text)


def document_lengths(batch: Batch) -> Tensor:
    """Real tokens of each document in the batch (packed rows: per document, not per row)."""
    if "cu_seqlens" in batch:
        return batch["cu_seqlens"].diff().long()
    if "lengths" in batch:
        return batch["lengths"]
    if "attention_mask" in batch:
        return batch["attention_mask"].sum(1)
    starts = torch.nonzero(batch["position_ids"][0] == 0).flatten()  # flattened: positions restart per document
    return torch.diff(starts, append=torch.tensor([batch["position_ids"].shape[1]]))


def batches(
    row: Row,
    data: datasets.Dataset,
    lengths: list[int],
    tokenizer: PreTrainedTokenizerFast,
) -> Iterator[Batch]:
    """Endless training batches of ``row``, epoch after epoch."""
    if row.family == "mhaplug":
        settings = {"batch_size": BATCH_SIZE, "max_tokens": BATCH_SIZE * MAX_LENGTH, **row.data}  # default row: its own
        dm = TextDataModule(
            batching=row.batching, layout=row.layout, max_length=MAX_LENGTH, vocab_size=VOCAB, seed=SEED, **settings
        )
        dm.setup("fit")
        for epoch in itertools.count():
            loader = dm.train_dataloader()
            loader.batch_sampler.set_epoch(epoch)
            yield from loader  # the collators add the token counts LitDecoderLM reads (num_targets)
    collate = hf_collator(row.batching, tokenizer)
    if row.batching == "group_by_length":
        sampler = LengthGroupedSampler(BATCH_SIZE, lengths=lengths, generator=torch.Generator().manual_seed(SEED))
        while True:
            yield from DataLoader(data, batch_size=BATCH_SIZE, sampler=sampler, collate_fn=collate)
    shared = RandomBatchSampler(lengths, BATCH_SIZE, seed=SEED)  # mhaplug random's permutation (see module doc)
    for epoch in itertools.count():
        shared.set_epoch(epoch)
        yield from DataLoader(data, batch_sampler=shared, collate_fn=collate)


def mhaplug_loss_sum(model: nn.Module, batch: Batch, row: Row | None = None) -> Tensor:
    """Sum of next-token losses over labels != -100: ``DecoderLM.loss_sum`` (real tokens, fused loss), or, for
    the "before" rows, ``lm_loss_sum`` of the (B, L, V) logits, with every position computed if asked."""
    if row is None or (row.fused_loss and row.real_tokens_only):
        return model.loss_sum(batch)
    input_ids = batch["input_ids"]
    every_position = None if row.real_tokens_only else torch.arange(input_ids.numel())
    logits = model(
        input_ids,
        key_padding_mask=batch["key_padding_mask"],
        position_ids=batch["position_ids"],
        document_ids=batch.get("document_ids"),
        token_index=every_position,
    )
    return lm_loss_sum(logits, batch["labels"])


class Runner:
    """One row: its batch stream, its model (from the shared initial weights) and AdamW, trained block by block."""

    def __init__(self, row: Row, shared: tuple[datasets.Dataset, list[int], PreTrainedTokenizerFast]) -> None:
        self.row, self.blocks = row, []
        self.stream = batches(row, *shared)
        self.model = (
            new_decoder(row.strategy, compile=row.compile) if row.family == "mhaplug" else gpt2_from(new_decoder())
        )
        decay = [p for p in self.model.parameters() if p.dim() >= 2]
        no_decay = [p for p in self.model.parameters() if p.dim() < 2]
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": no_decay, "weight_decay": 0.0}],
            lr=LR,
            betas=BETAS,
            fused=FUSED,
        )

    def loss(self, batch: Batch) -> Tensor:
        if self.row.family == "hf":
            return self.model(**batch, use_cache=False).loss  # mean over labels != -100 after its shift
        return mhaplug_loss_sum(self.model, batch, self.row) / max(batch["num_targets"], 1)

    def block(self, steps: int) -> dict[str, Any]:
        """Train ``steps`` steps; time them, data loading included."""
        baseline = reset_peak_memory(CPU)
        losses, real, padded, doc_sq = [], 0, 0, 0
        start = time.perf_counter()
        for _ in range(steps):
            batch = next(self.stream)
            docs = document_lengths(batch)
            real, padded = real + int(docs.sum()), padded + batch["input_ids"].numel()
            doc_sq += int((docs**2).sum())
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.row.bf16):
                loss = self.loss(batch)
            loss.backward()
            nn.utils.clip_grad_norm_(self.model.parameters(), CLIP)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            losses.append(loss.detach())
        seconds = time.perf_counter() - start
        return {
            "seconds": seconds,
            "real": real,
            "padded": padded,
            "doc_sq": doc_sq,
            "steps": steps,
            "loss": float(torch.stack(losses).float().mean()),
            "peak_mib": peak_memory_mib(CPU, baseline),
        }


def round_robin(runners: list[Runner], rounds: int, steps: int) -> None:
    for round_ in range(rounds + 1):  # round 0: the warm-up block, not recorded
        for runner in runners:
            block = runner.block(steps)
            if round_:
                runner.blocks.append(block)
        if round_:
            last = [f"{r.row.name} {r.blocks[-1]['real'] / r.blocks[-1]['seconds']:,.0f}" for r in runners]
            print(f"  round {round_}/{rounds}, real tokens/s: {', '.join(last)}", flush=True)


def gemm_gflops(tokens: int, rounds: int, repeats: int = 3) -> float:
    """Float32 GFLOP/s of one training step's linear-layer matmuls at ``tokens`` rows: forward X W^T, grad-input
    dY W and grad-weight dY^T X of every layer in LINEARS, as nn.Linear runs them; each one's best of ``rounds``."""
    seconds = 0.0
    for k, n in LINEARS:
        x, w, dy = torch.randn(tokens, k), torch.randn(n, k), torch.randn(tokens, n)
        for a, b in ((x, w.t()), (dy, w), (dy.t(), x)):  # (N, k) (k, n), (N, n) (n, k), (n, N) (N, k)
            torch.mm(a, b)  # warm-up
            best = float("inf")
            for _ in range(rounds):
                start = time.perf_counter()
                for _ in range(repeats):
                    torch.mm(a, b)
                best = min(best, (time.perf_counter() - start) / repeats)
            seconds += best
    return 6 * tokens * GEMM_PARAMS / seconds / 1e9


def summarise(runner: Runner) -> dict[str, Any]:
    blocks, steps = runner.blocks, sum(b["steps"] for b in runner.blocks)
    tps = [b["real"] / b["seconds"] for b in blocks]
    real, padded = sum(b["real"] for b in blocks), sum(b["padded"] for b in blocks)
    return {
        "row": runner.row,
        "tps": statistics.median(tps),
        "min": min(tps),
        "max": max(tps),
        "padded_tps": statistics.median(b["padded"] / b["seconds"] for b in blocks),
        "pad": 1 - real / padded,
        "real_step": real / steps,
        "padded_step": padded / steps,
        "t_eff": sum(b["doc_sq"] for b in blocks) / real,
        "peak_mib": max(b["peak_mib"] for b in blocks),
        "loss": blocks[-1]["loss"],
        "mfu_mm": None,
        "mfu_gemm": None,
    }


def best_of(results: list[dict[str, Any]], family: str) -> dict[str, Any] | None:
    """The fastest float32 row of a family (by median real tokens/s)."""
    rows = [r for r in results if r["row"].family == family and not r["row"].bf16]
    return max(rows, key=lambda r: r["tps"], default=None)


def add_mfu(results: list[dict[str, Any]], mm: float, quick: bool) -> None:
    """MFU of each float32 row against the mm ceiling and against its GEMM shapes at its real tokens per step."""
    ceilings: dict[int, float] = {}  # by tokens per step: rows with the same count share one
    for r in results:
        if not r["row"].bf16:
            tokens = round(r["real_step"])
            if tokens not in ceilings:
                ceilings[tokens] = gemm_gflops(tokens, rounds=3 if quick else 10)
            achieved = 6 * GEMM_PARAMS * r["tps"] / 1e9  # model GFLOP/s
            r["gemm"] = ceilings[tokens]
            r["mfu_mm"], r["mfu_gemm"] = achieved / mm, achieved / r["gemm"]


def report(results: list[dict[str, Any]], mm: float, args: argparse.Namespace) -> list[str]:
    by_name = {r["row"].name: r for r in results}
    best_hf, best_mh, hf_random = best_of(results, "hf"), best_of(results, "mhaplug"), by_name.get("hf random")

    def ratio(a: dict[str, Any] | None, b: dict[str, Any] | None) -> float | None:
        return a["tps"] / b["tps"] if a and b else None

    def x(value: float | None, spec: str = ".2f", unit: str = "x") -> str:
        return "n/a" if value is None else f"{value:{spec}}{unit}"

    header = [
        "row",
        "batching",
        "layout",
        "attention",
        "precision",
        "real tokens/s median (min-max)",
        "vs hf random",
        "vs best HF",
        "padded tokens/s",
        "pad fraction",
        "real / padded tokens per step",
        "peak MiB",
        "last-block loss",
        "MFU vs mm",
        "MFU vs GEMM shapes",
    ]
    table = [
        [
            r["row"].name,
            r["row"].batching,
            r["row"].layout,
            r["row"].strategy,
            "bf16" if r["row"].bf16 else "fp32",
            f"{r['tps']:,.0f} ({r['min']:,.0f}-{r['max']:,.0f})",
            x(ratio(r, hf_random)),
            x(ratio(r, best_hf)),
            f"{r['padded_tps']:,.0f}",
            f"{r['pad']:.1%}",
            f"{r['real_step']:,.0f} / {r['padded_step']:,.0f}",
            f"{r['peak_mib']:.0f}",
            f"{r['loss']:.4f}",
            x(r["mfu_mm"], ".1%", ""),
            x(r["mfu_gemm"], ".1%", ""),
        ]
        for r in results
    ]
    same = [r for r in results if shares_random_order(r["row"]) and not r["row"].bf16 and not r["row"].compile]
    spread = max(r["loss"] for r in same) - min(r["loss"] for r in same) if same else 0.0
    bf16 = [
        f"{r['row'].name}: {r['loss'] - by_name[r['row'].name.removesuffix(' bf16')]['loss']:+.4f}"
        for r in results
        if r["row"].bf16 and r["row"].name.removesuffix(" bf16") in by_name
    ]
    t_eff = best_mh["t_eff"] if best_mh else 0.0
    ceilings = ", ".join(f"{r['row'].name} {r['gemm']:.1f}" for r in results if "gemm" in r)
    notes = [
        (
            f"comparable losses: {', '.join(r['row'].name for r in same)} train on the same batches in the same order "
            f"from the same weights: their last-block losses lie within {spread:.1e}"
            if len(same) > 1
            else "comparable losses: no two rows of this run share batches and order"
        )
        + ". Not comparable: `hf group_by_length` (each megabatch of 50 batches runs longest to shortest, so its "
        "blocks alternate between long and short documents: wide min-max, and a last-block loss on whichever half "
        "came last), `mhaplug length_grouped` (batch order shuffled), `mhaplug packed` (16 rows of 256 tokens a step)",
        f"bf16 loss minus its float32 row, last block: {'; '.join(bf16) or 'no bf16 rows'}",
        (
            f"MFU = achieved model GFLOP/s / ceiling. Model FLOPs per real token = 6 x {GEMM_PARAMS:,} (the linear "
            f"layers' weights, the tied {E}x{VOCAB} output layer included) = {6 * GEMM_PARAMS / 1e6:.2f} MFLOP; not "
            f"counted: padding, and attention scores (causal: 6 x n_layer x d_model x T_eff = "
            f"{6 * MODEL['num_layers'] * E * t_eff / 1e6:.2f} MFLOP at the best mhaplug row's T_eff = sum(n^2) / "
            f"sum(n) = {t_eff:.0f})"
        ),
        (
            f"ceilings, float32, measured in this run: `torch.mm` {args.matmul}^3 {mm:.1f} GFLOP/s (best of 5, before "
            "and after the rows); the model's GEMM shapes at each row's mean real tokens per step, the useful work "
            "(forward X W^T, grad dY W and dY^T X for qkv 128x384, out 128x128, fc 128x512, proj 512x128, head "
            f"128x4096; each matmul's best of {3 if args.quick else 10} rounds, summed): {ceilings} GFLOP/s"
        ),
        (
            f"machine load (1-min average) {args.load[0]:.2f} before, {os.getloadavg()[0]:.2f} after (this run adds up "
            "to 2 to it): other processes on the 2 cores make the OpenMP threads wait for time slices, which slows "
            "small matmuls 10x or more; trust a run only when the load before it was near 0"
        ),
    ]
    best_names = f"({best_mh and best_mh['row'].name} / {best_hf and best_hf['row'].name})"
    checks = [
        (
            f"mhaplug's best float32 row / the best HF float32 row {best_names} >= 1.3x (goal 1.5x)",
            ratio(best_mh, best_hf),
            1.3,
            x,
        ),
        ("`mhaplug default` / `hf random` >= 3x", ratio(by_name.get("mhaplug default"), hf_random), 3.0, x),
        (
            "`mhaplug random` / `mhaplug length_grouped` >= 0.8x",
            ratio(by_name.get("mhaplug random"), by_name.get("mhaplug length_grouped")),
            0.8,
            x,
        ),
        (
            "MFU of mhaplug's best float32 row vs its GEMM-shape ceiling >= 65%",
            best_mh and best_mh["mfu_gemm"],
            0.65,
            lambda v: x(v, ".1%", ""),
        ),
    ]
    targets = [
        f"- {name}: {show(v)} **{'n/a' if v is None else 'PASS' if v >= goal else 'FAIL'}**"
        for name, v, goal, show in checks
    ]
    return [
        "",
        "## Results",
        "",
        markdown_table(header, table),
        "",
        *[f"- {n}" for n in notes],
        "",
        "## Targets (ratios measured in this run)",
        "",
        *targets,
    ]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=8, help="timed blocks per row, round-robin")
    parser.add_argument("--steps", type=int, default=25, help="optimizer steps per block")
    parser.add_argument("--rows", help="comma-separated row names (default: all; bf16 rows follow the best ones)")
    parser.add_argument("--out", type=Path, help="Markdown file (default benchmarks/results/peers-<device>.md)")
    parser.add_argument("--quick", action="store_true", help=f"2 rounds x 3 steps of {', '.join(QUICK_ROWS)}")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.steps, args.rows = 2, 3, args.rows or ",".join(QUICK_ROWS)
    if args.rounds < 1 or args.steps < 1:
        parser.error("--rounds and --steps must be >= 1")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    args.load = os.getloadavg()
    torch.set_num_threads(THREADS)
    datasets.disable_progress_bars()
    rows = all_rows()
    if args.rows:
        wanted = [n.strip() for n in args.rows.split(",")]
        unknown = set(wanted) - {r.name for r in rows}
        if unknown:
            sys.exit(f"--rows: unknown {sorted(unknown)}; rows are {', '.join(r.name for r in rows)}")
        rows = [r for r in rows if r.name in wanted]
    slug = device_slug(CPU)
    out = args.out or Path(__file__).resolve().parent / "results" / f"peers-{slug}{'-quick' * args.quick}.md"
    dm = TextDataModule(batch_size=BATCH_SIZE, max_length=MAX_LENGTH, vocab_size=VOCAB, seed=SEED)
    dm.setup("fit")
    lengths = dm.splits["train"]["length"]
    shared = (
        dm.splits["train"].select_columns(["input_ids"]),
        lengths,
        PreTrainedTokenizerFast(
            tokenizer_object=dm.tokenizer, pad_token=PAD_TOKEN, eos_token=EOS_TOKEN, padding_side="right"
        ),
    )
    bf16_ok = torch.ops.mkldnn._is_mkldnn_bf16_supported()
    default = next((r for r in rows if r.name == "mhaplug default"), None)
    args.matmul = 1024
    mm = [matmul_gflops(CPU, args.matmul, 2 if args.quick else 3)]
    lines = [
        "# Training throughput against transformers: mhaplug's batches and DecoderLM vs GPT-2 + HF collators",
        "",
        f"- command: `python {' '.join(shlex.quote(a) for a in sys.argv)}`",
        (
            f"- torch {torch.__version__}, transformers {transformers.__version__}, mhaplug {mhaplug.__version__}, "
            f"Python {sys.version.split()[0]}, device `{slug}`, threads {torch.get_num_threads()}, CPU bf16 "
            f"{'supported' if bf16_ok else 'not supported (no bf16 rows)'}"
        ),
        f"- date {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}",
        f"- check: {check_equivalence(*shared)}",
        f"- data: stdlib_docs train split, {len(lengths):,} documents (<= {MAX_LENGTH} tokens), vocab {VOCAB}, "
        f"batch {BATCH_SIZE} (documents, or packed rows for `mhaplug packed`); HF padding by "
        "`DataCollatorForLanguageModeling` with mhaplug's tokenizer in `PreTrainedTokenizerFast` (pad `<|pad|>` = 0, "
        "right); `hf group_by_length` = `train_sampling_strategy='group_by_length'`; `mhaplug default` = "
        "`python train.py`: "
        + (
            f"batching {default.batching}, layout {default.layout}, attention {default.strategy}, {default.data}, "
            f"{'bf16' if default.bf16 else 'fp32'}, compile {default.compile}"
            if default
            else "not run"
        ),
        (
            f"- optimizer: AdamW lr {LR} constant (no warm-up or cosine, `mhaplug default` included), betas {BETAS}, "
            f"weight decay {WEIGHT_DECAY} on >= 2-D parameters, "
            f"gradient norm clipped to {CLIP}, `fused={FUSED}` for every row (transformers' `TrainingArguments.optim` "
            f"default here: `{HF_OPTIM}`)"
        ),
        (
            f"- method: {args.rounds} rounds x {args.steps} steps round-robin after one warm-up block per row; real "
            "tokens/s per block = non-pad tokens / block wall time (data loading included); median (min-max) over "
            "blocks. bf16 rows run in a second round-robin, after the float32 rows chose them"
        ),
        (
            "- peak MiB: the largest growth of the process peak RSS (`getrusage ru_maxrss`) over one block, the mark "
            "reset before each block (`malloc_trim`, `/proc/self/clear_refs` 5): activations, gradients and transient "
            "buffers; weights and optimizer state exist before the first timed block"
        ),
    ]
    print("\n".join(lines), flush=True)
    runners = [Runner(row, shared) for row in rows]
    round_robin(runners, args.rounds, args.steps)
    results = [summarise(r) for r in runners]
    best = [b for b in (best_of(results, "mhaplug"), best_of(results, "hf")) if b]
    if bf16_ok and best:
        bf16_runners = [Runner(replace(b["row"], name=f"{b['row'].name} bf16", bf16=True), shared) for b in best]
        round_robin(bf16_runners, args.rounds, args.steps)
        results += [summarise(r) for r in bf16_runners]
    mm.append(matmul_gflops(CPU, args.matmul, 2 if args.quick else 3))
    add_mfu(results, max(mm), args.quick)
    block = report(results, max(mm), args)
    print("\n".join(block), flush=True)
    write_report(out, lines + block)


if __name__ == "__main__":
    main()
