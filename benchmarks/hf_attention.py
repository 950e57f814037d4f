"""Benchmark: ``attn_implementation="mhaplug"`` against transformers' own ``sdpa`` and ``eager``, training a Llama.

A small random ``LlamaForCausalLM`` (hidden 256, 4 layers, 4 heads of 64, MLP 704, vocab 4096 = mhaplug's BPE)
trains on the standard library's docstrings (``TextDataModule(max_length=L)``'s train split: whole docstrings,
chunked at L; median 27 tokens, 99th percentile about 530, longest 1,581), in two layouts:

- **packed**: ``mhaplug.PackCollator(max_length=L)`` rows (first-fit decreasing, no 2-D ``attention_mask``,
  ``position_ids`` restarting per document), 8,192 tokens a step: 8 rows of 1,024 or 2 rows of 4,096. Every
  implementation gets the same batch, ``use_cache=False`` (without it ``sdpa`` and ``eager`` attend across
  documents). transformers builds a (B, 1, L, L) document mask for ``sdpa`` and ``eager``; ``mhaplug`` gets the
  (B, L) padding mask (or none) and runs each document as a row of its own.
- **padded** (for reference): the same documents of each step, one per row, length-grouped (sorted, cut into
  batches of at most 8,192 padded tokens) with ``PadCollator``, one optimizer step per batch: what a user of
  ``group_by_length`` trains; ``sdpa`` and ``mhaplug``.

Each (implementation, layout, L) runs in a subprocess of its own, from the same initial weights, AdamW lr 1e-3, in
float32 on 2 threads: one warm-up step, then ``--steps`` timed steps on distinct batches (forward, backward,
optimizer step). Reported: real tokens/s (median step), the first timed step's loss (equal across implementations on
the same batch: the check that they compute the same thing), and peak memory: the growth of the process's peak
resident set (``VmHWM``, reset through ``/proc/self/clear_refs`` before the timed steps) over its size then. The
implementations run in turn, ``--rounds`` times; medians over rounds.

Run from the repository root (about 10 minutes on 2 cores)::

    python benchmarks/hf_attention.py                # -> benchmarks/results/hf-attention-<device>.md
    python benchmarks/hf_attention.py --quick        # 1,024 only, 2 steps, 1 round -> ...-quick.md
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _report import device_slug, markdown_table, write_report  # benchmarks/_report.py
from torch import Tensor

TOKENS_PER_STEP = 8192
MODEL = {
    "hidden_size": 256,
    "intermediate_size": 704,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
}
RUNS = [("packed", "sdpa"), ("packed", "eager"), ("packed", "mhaplug"), ("padded", "sdpa"), ("padded", "mhaplug")]


def make_batches(length: int, steps: int, seed: int) -> tuple[list[dict[str, Any]], list[list[dict[str, Any]]], dict]:
    """(packed batch per step, padded batches per step, facts): the documents of each step drawn in a seeded order
    until they fill the step's packed rows."""
    from mhaplug.data import TextDataModule
    from mhaplug.data.collate import PackCollator, PadCollator

    dm = TextDataModule(max_length=length)
    dm.setup("fit")
    split = dm.splits["train"]
    lengths = np.asarray(split["length"])
    order = np.random.default_rng(seed).permutation(len(lengths))
    rows = TOKENS_PER_STEP // length
    pack, pad = PackCollator(max_length=length), PadCollator(padding_side="right")
    packed, padded, cursor = [], [], 0
    for _ in range(steps):
        docs: list[dict[str, Any]] = []
        while cursor < len(order):  # documents in the seeded order while first-fit decreasing keeps them in `rows`
            candidate = [*docs, {"input_ids": split[int(order[cursor])]["input_ids"]}]
            if sum(len(d["input_ids"]) for d in candidate) > rows * length or len(pack(candidate)["lengths"]) > rows:
                break
            docs, cursor = candidate, cursor + 1
        batch = pack(docs)
        batch = {k: batch[k] for k in ("input_ids", "labels", "position_ids", "document_ids")}
        used = [batch["input_ids"][r, batch["document_ids"][r] == d] for r in range(rows)
                for d in range(int(batch["document_ids"][r].max()) + 1)]  # fmt: skip
        packed.append(batch)
        used.sort(key=len)
        groups, group = [], []
        for ids in used:  # length-grouped padded batches of at most TOKENS_PER_STEP padded tokens
            if group and (len(group) + 1) * len(ids) > TOKENS_PER_STEP:
                groups.append(group)
                group = []
            group.append(ids)
        groups.append(group)
        padded.append([{k: b[k] for k in ("input_ids", "labels", "attention_mask")} for b in map(pad, groups)])
    real = [int((b["document_ids"] >= 0).sum()) for b in packed]
    doc_lengths = [int(n) for step in padded for b in step for n in b["attention_mask"].sum(1)]
    facts = {
        "rows": rows,
        "real_tokens": real,
        "documents": len(doc_lengths),
        "score_fraction": sum(n * n for n in doc_lengths) / (rows * length * length * len(packed)),
        "padded_batches": [len(p) for p in padded],
        "padded_tokens": [sum(b["input_ids"].numel() for b in p) for p in padded],
        "vocab_size": dm.vocab_size,
    }
    return packed, padded, facts


def child(args: argparse.Namespace) -> None:
    """One (layout, implementation, L) run: prints a JSON line."""
    import transformers

    import mhaplug.hf  # noqa: F401  registers attn_implementation="mhaplug"

    torch.set_num_threads(args.threads)
    data = torch.load(args.data, weights_only=False)
    config = transformers.LlamaConfig(
        vocab_size=data["facts"]["vocab_size"], max_position_embeddings=args.length, use_cache=False,
        attn_implementation=args.impl, **MODEL,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    steps = data["packed"] if args.layout == "packed" else data["padded"]

    def train_step(batches: list[dict[str, Tensor]]) -> float:
        losses = []
        for batch in batches:
            loss = model(**batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
        return losses[0]

    as_list = (lambda s: [s]) if args.layout == "packed" else (lambda s: s)
    train_step(as_list(steps[0]))  # warm-up
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM (the peak resident set) to the current size
    rss_before = _status_kb("VmRSS")
    times, first_loss = [], None
    for step in steps[1:]:
        start = time.perf_counter()
        loss = train_step(as_list(step))
        times.append(time.perf_counter() - start)
        first_loss = loss if first_loss is None else first_loss
    peak = _status_kb("VmHWM") - rss_before
    print(json.dumps({"times": times, "loss": first_loss, "peak_mib": peak / 1024}))


def _status_kb(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{key} not in /proc/self/status")


def run_child(path: Path, layout: str, impl: str, length: int, threads: int) -> dict[str, Any]:
    command = [sys.executable, __file__, "--child", "--data", str(path), "--layout", layout, "--impl", impl,
               "--length", str(length), "--threads", str(threads)]  # fmt: skip
    out = subprocess.run(command, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{layout} {impl} L={length} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--steps", type=int, default=3, help="timed steps (after one warm-up step)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--layout", help=argparse.SUPPRESS)
    parser.add_argument("--impl", help=argparse.SUPPRESS)
    parser.add_argument("--length", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.lengths, args.steps, args.rounds = [1024], 2, 1
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child:
        child(args)
        return
    import transformers

    load_before = os.getloadavg()
    slug = device_slug(torch.device("cpu"))
    out_path = (
        args.out
        or Path(__file__).resolve().parent / "results" / f"hf-attention-{slug}{'-quick' if args.quick else ''}.md"
    )
    sections = [
        "# attn_implementation='mhaplug' against transformers' sdpa and eager: training a small Llama",
        "",
        f"- command: `python {' '.join(shlex.quote(a) for a in sys.argv)}`",
        (
            f"- torch {torch.__version__}, transformers {transformers.__version__}, Python {sys.version.split()[0]}, "
            f"device `{slug}`, {args.threads} threads, float32"
        ),
        f"- date {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}",
        (
            f"- model: LlamaForCausalLM {MODEL}, vocab 4096; AdamW lr 1e-3; rows of {TOKENS_PER_STEP:,} tokens a "
            f"step; 1 warm-up step, {args.steps} timed steps, {args.rounds} rounds (implementations in turn)"
        ),
    ]
    header = ["L", "layout", "attn_implementation", "real tokens/s", "vs sdpa (packed)", "loss (1st timed step)",
              "peak memory growth (MiB)"]  # fmt: skip
    table, notes = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for length in args.lengths:
            packed, padded, facts = make_batches(length, args.steps + 1, seed=length)
            path = Path(tmp) / f"batches-{length}.pt"
            torch.save({"packed": packed, "padded": padded, "facts": facts}, path)
            results: dict[tuple[str, str], list[dict[str, Any]]] = {run: [] for run in RUNS}
            for _ in range(args.rounds):
                for layout, impl in RUNS:
                    results[(layout, impl)].append(run_child(path, layout, impl, length, args.threads))
                    print(length, layout, impl, results[(layout, impl)][-1], flush=True)
            real = statistics.median(facts["real_tokens"][1:])
            speed = {run: real / statistics.median(t for r in rs for t in r["times"]) for run, rs in results.items()}
            for (layout, impl), rs in results.items():
                table.append([
                    f"{length:,}", layout, impl, f"{speed[(layout, impl)]:,.0f}",
                    f"{speed[(layout, impl)] / speed[('packed', 'sdpa')]:.2f}x", f"{rs[0]['loss']:.5f}",
                    f"{statistics.median(r['peak_mib'] for r in rs):,.0f}",
                ])  # fmt: skip
            losses = [results[("packed", impl)][0]["loss"] for impl in ("sdpa", "eager", "mhaplug")]
            notes.append(
                f"L={length:,}: {facts['rows']} packed rows a step holding {facts['documents'] / (args.steps + 1):.0f} "
                f"documents on average ({real:,.0f} real tokens); the documents' score entries (sum of squared "
                f"lengths) are {facts['score_fraction']:.1%} of rows x L^2; packed losses agree within "
                f"{max(losses) - min(losses):.1e}; padded: {statistics.mean(facts['padded_batches']):.1f} "
                f"length-grouped batches a step, {statistics.mean(facts['padded_tokens']):,.0f} padded tokens"
            )
    load_after = os.getloadavg()
    sections += ["", markdown_table(header, table), "", *(f"- {n}" for n in notes)]
    sections.append(
        f"- machine load (1-min average) {load_before[0]:.2f} before, {load_after[0]:.2f} after (this run adds about "
        "1-2): ratios are taken within the run, so they move less than the tokens/s"
    )
    print("\n".join(sections))
    write_report(out_path, sections)


if __name__ == "__main__":
    main()
