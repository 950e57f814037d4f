"""Benchmark: ``first_fit_pack`` before and after issue 10 (a max-tree over the rows' free room, O(n log n)).

Lengths are drawn with replacement (seeded) from the document lengths of the default data, ``TextDataModule()``'s
train split: the standard library's docstrings in chunks of at most 256 tokens (1..256, skewed short: median about
28, mean about 58, about 5% exactly 256, the chunk size). They are packed into rows of 256 tokens, as
``TextDataModule(layout="packed")`` packs its split, and ``PackCollator(max_length=256)`` each batch.

1. The quadratic first-fit (``mhaplug.data.packing.first_fit_pack_reference``: ``first_fit_pack`` as it was before
   issue 10, the reference the tests compare with) against ``first_fit_pack``, on the same lengths, at 12.5k, 25k and
   50k documents, and per batch of 16 documents (what ``PackCollator`` packs on every call): median seconds over
   ``--repeats`` runs, the two timed in turn within each repeat, and the outputs checked identical.
2. ``first_fit_pack`` alone (the quadratic one would take hours) at 1M and 3M documents, and at 1M documents of
   uniform lengths 1..65536 into rows of 65536 (about 15 documents per distinct length, so the tree places
   nearly every document with a descent of its own: no shortcut for runs of equal lengths).

Run from the repository root::

    python benchmarks/packing.py                  # -> benchmarks/results/packing-<device>.md
    python benchmarks/packing.py --quick          # smoke check: fewer sizes, 1 repeat -> packing-<device>-quick.md
"""

from __future__ import annotations

import argparse
import datetime
import os
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from _report import device_slug, markdown_table, write_report  # benchmarks/_report.py

import mhaplug
from mhaplug.data import TextDataModule, collate
from mhaplug.data.collate import PackCollator
from mhaplug.data.packing import first_fit_pack, first_fit_pack_reference

CAPACITY, SEED, BATCH_DOCUMENTS = 256, 0, 16
Pack = Callable[[Sequence[int], int], list[list[int]]]


def timed(pack: Pack, lengths: list[int], capacity: int) -> tuple[float, list[list[int]]]:
    start = time.perf_counter()
    rows = pack(lengths, capacity)
    return time.perf_counter() - start, rows


def fill(rows: list[list[int]], lengths: list[int], capacity: int) -> str:
    """Real tokens over row capacity: how full the packed rows are."""
    return f"{sum(lengths) / (len(rows) * capacity):.1%}"


def spread(times: list[float], scale: float = 1.0, digits: int = 2) -> str:
    """Median (min-max), scaled."""
    median, low, high = (x * scale for x in (statistics.median(times), min(times), max(times)))
    return f"{median:.{digits}f} ({low:.{digits}f}-{high:.{digits}f})"


def against_quadratic(doc_lengths: np.ndarray, args: argparse.Namespace) -> tuple[list[str], list[str]]:
    """Table 1 as Markdown lines, and notes."""
    rng = np.random.default_rng(SEED)
    rows = []
    for count in args.compare:
        lengths = rng.choice(doc_lengths, count).tolist()
        old_times, new_times, same = [], [], True
        for _ in range(args.repeats):
            seconds, old_rows = timed(first_fit_pack_reference, lengths, CAPACITY)
            old_times.append(seconds)
            seconds, new_rows = timed(first_fit_pack, lengths, CAPACITY)
            new_times.append(seconds)
            same &= new_rows == old_rows
        ratio = statistics.median(old_times) / statistics.median(new_times)
        rows.append(
            [
                f"{count:,}",
                spread(old_times),
                spread(new_times, digits=3),
                f"{ratio:,.0f}x",
                f"{len(new_rows):,}",
                fill(new_rows, lengths, CAPACITY),
                "yes" if same else "NO",
            ]
        )
        print(f"  {count:,} documents: {ratio:,.0f}x", flush=True)
    # One batch, as PackCollator packs it on every call: many small calls, timed together.
    batches = [rng.choice(doc_lengths, BATCH_DOCUMENTS).tolist() for _ in range(args.batches)]
    old_times, new_times = [], []
    same = all(first_fit_pack(b, CAPACITY) == first_fit_pack_reference(b, CAPACITY) for b in batches)
    for _ in range(args.repeats):
        for pack, times in ((first_fit_pack_reference, old_times), (first_fit_pack, new_times)):
            start = time.perf_counter()
            for lengths in batches:
                pack(lengths, CAPACITY)
            times.append((time.perf_counter() - start) / len(batches))
    ratio = statistics.median(old_times) / statistics.median(new_times)
    rows.append(
        [
            f"{BATCH_DOCUMENTS} (one batch; µs per call)",
            spread(old_times, 1e6, 1),
            spread(new_times, 1e6, 1),
            f"{ratio:.2f}x",
            "",
            "",
            "yes" if same else "NO",
        ]
    )
    batch_cost = (statistics.median(new_times) - statistics.median(old_times)) * 1e6
    # The same batches through PackCollator, which packs each call: with the quadratic first-fit patched in, and as is.
    documents = [[{"input_ids": [1] * n} for n in lengths] for lengths in batches]
    collator = PackCollator(max_length=CAPACITY)
    old_times, new_times = [], []
    for _ in range(args.repeats):
        for pack, times in ((first_fit_pack_reference, old_times), (first_fit_pack, new_times)):
            collate.first_fit_pack = pack  # type: ignore[assignment]
            start = time.perf_counter()
            for rows_in in documents:
                collator(rows_in)
            times.append((time.perf_counter() - start) / len(documents))
    collate.first_fit_pack = first_fit_pack
    ratio = statistics.median(old_times) / statistics.median(new_times)
    label = f"PackCollator(max_length={CAPACITY}) call, {BATCH_DOCUMENTS} documents (µs)"
    rows.append([label, spread(old_times, 1e6, 0), spread(new_times, 1e6, 0), f"{ratio:.2f}x", "", "", ""])
    header = [
        "documents",
        "quadratic s (min-max)",
        "first_fit_pack s (min-max)",
        "speed-up",
        "rows",
        "fill",
        "identical rows",
    ]
    notes = [
        (
            f"median of {args.repeats} runs, the two implementations timed in turn on the same lengths; the batch row: "
            f"{args.batches:,} different batches of {BATCH_DOCUMENTS} documents per run, µs per call"
        ),
        "fill = real tokens / (rows x 256); first-fit decreasing leaves only the tail rows part-empty",
        (
            f"one batch of {BATCH_DOCUMENTS}: the tree costs more to set up than a scan of a few rows costs in all, "
            f"{batch_cost:+.0f} µs per call; the PackCollator row shows what that is in a collator call that re-packs "
            "its batch (TextDataModule packs its split once, offline, and its collator does not re-pack)"
        ),
    ]
    return [markdown_table(header, rows)], notes


def alone(doc_lengths: np.ndarray, args: argparse.Namespace) -> tuple[list[str], list[str]]:
    """Table 2 as Markdown lines, and notes."""
    rng = np.random.default_rng(SEED + 1)
    cases = [
        (f"{count:,}", "stdlib docstring chunks, 1..256", rng.choice(doc_lengths, count).tolist(), CAPACITY)
        for count in args.alone
    ]
    uniform = args.alone[0]
    cases.append((f"{uniform:,}", "uniform 1..65536", rng.integers(1, 65537, uniform).tolist(), 65536))
    rows = []
    for count, drawn, lengths, capacity in cases:
        times = []
        for _ in range(args.repeats):
            seconds, packed = timed(first_fit_pack, lengths, capacity)
            times.append(seconds)
        documents_per_s = len(lengths) / statistics.median(times)
        rows.append(
            [
                count,
                drawn,
                f"{capacity:,}",
                spread(times),
                f"{documents_per_s:,.0f}",
                f"{len(packed):,}",
                fill(packed, lengths, capacity),
            ]
        )
        print(f"  {count} documents, {drawn}: {statistics.median(times):.2f} s", flush=True)
    header = ["documents", "lengths", "capacity", "first_fit_pack s (min-max)", "documents/s", "rows", "fill"]
    notes = [
        (
            f"median of {args.repeats} runs; lengths as Python lists of ints (what TextDataModule passes), "
            "prepared before timing; Python's garbage collector left on, as in use"
        )
    ]
    return [markdown_table(header, rows)], notes


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--compare",
        type=int,
        nargs="+",
        default=[12_500, 25_000, 50_000],
        help="document counts for the quadratic reference against first_fit_pack",
    )
    parser.add_argument(
        "--alone",
        type=int,
        nargs="+",
        default=[1_000_000, 3_000_000],
        help="document counts for first_fit_pack alone (the first also with uniform lengths)",
    )
    parser.add_argument("--batches", type=int, default=2000, help=f"batches of {BATCH_DOCUMENTS} documents per run")
    parser.add_argument("--repeats", type=int, default=3, help="runs per measurement (median reported)")
    parser.add_argument("--out", type=Path, help="Markdown file (default benchmarks/results/packing-<device>.md)")
    parser.add_argument("--quick", action="store_true", help="smoke check: 12.5k and 100k documents, 1 repeat")
    args = parser.parse_args(argv)
    if args.quick:
        args.compare, args.alone, args.batches, args.repeats = [12_500], [100_000], 200, 1
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    load_before = os.getloadavg()
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    import datasets

    datasets.disable_progress_bars()
    slug = device_slug(torch.device("cpu"))
    name = f"packing-{slug}{'-quick' if args.quick else ''}.md"
    out_path = args.out or Path(__file__).resolve().parent / "results" / name
    dm = TextDataModule()
    dm.setup("fit")
    doc_lengths = np.asarray(dm.splits["train"]["length"])
    q = np.percentile(doc_lengths, [10, 50, 90])
    sections = [
        "# Packing benchmark: first_fit_pack, quadratic scan against the max-tree (issue 10)",
        "",
        f"- command: `python {' '.join(shlex.quote(a) for a in sys.argv)}`",
        (
            f"- torch {torch.__version__}, mhaplug {mhaplug.__version__}, numpy {np.__version__}, "
            f"Python {sys.version.split()[0]}, device `{slug}` (first_fit_pack is pure Python: one core)"
        ),
        f"- date {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}",
        (
            f"- lengths drawn with replacement (seed {SEED}) from the {len(doc_lengths):,} document lengths of "
            f"`TextDataModule()`'s train split (stdlib docstrings in chunks of <= 256 tokens): {doc_lengths.min()}.."
            f"{doc_lengths.max()}, mean {doc_lengths.mean():.0f}, 10/50/90th percentiles "
            f"{q[0]:.0f}/{q[1]:.0f}/{q[2]:.0f}, {(doc_lengths == doc_lengths.max()).mean():.0%} exactly "
            f"{doc_lengths.max()}; rows of {CAPACITY} tokens"
        ),
    ]
    print("\n".join(sections), flush=True)
    builds = {
        "## 1. Against the quadratic first-fit it replaces (same lengths, same output)": (
            lambda: against_quadratic(doc_lengths, args)
        ),
        "## 2. first_fit_pack alone, millions of documents": lambda: alone(doc_lengths, args),
    }
    for title, build in builds.items():
        table, notes = build()
        block = ["", title, "", *table, "", *(f"- {n}" for n in notes)]
        print("\n".join(block), flush=True)
        sections += block
    load_after = os.getloadavg()
    sections += [
        "",
        (
            f"- machine load (1-min average) {load_before[0]:.2f} before, {load_after[0]:.2f} after (this run adds 1 "
            "to it): the 2 cores are shared, and another process on them slows every timing here; ratios are taken "
            "within the same run, so they move less than the seconds"
        ),
    ]
    print(sections[-1])
    write_report(out_path, sections)


if __name__ == "__main__":
    main()
