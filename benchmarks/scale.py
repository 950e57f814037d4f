"""Benchmark: a corpus of any size, preprocessed or streamed (issue 17's targets).

Generated corpora (``.jsonl``, one ``{"text": ...}`` per line, deterministic: pseudo-words of a 20k vocabulary with
Zipf frequencies, document lengths log-normal, about 1.8 KB each) of ``--sizes`` MB (default 50, 200, 1000). For
each, from an empty cache and as separate processes (peak RSS is the process's own ``ru_maxrss``):

- **prepare**: ``TextDataModule(source="text_files", ...)``'s ``prepare_data()`` + ``setup()`` + the train loader's
  first batch (text store, tokenizer on its sample, tokenising in ``num_proc`` processes, packing): wall time,
  MB/s, peak RSS, and the offline packing efficiency (real tokens over row capacity, all rows);
- **train**: ``python train.py data=text_files data.path=<corpus> data.text_column=text trainer.max_steps=10
  trainer.val_check_interval=10`` (everything: prepare, 10 steps, one validation);
- **stream**: the same run with ``data.streaming=true``; and the time to the first batch of a streamed loader, and
  the streamed packing efficiency over its first windows (default buffer);
- **raw encode_batch**: the limit, ``Tokenizer.encode_batch`` over the first corpus's text (batches of 1,000
  documents, all cores, no Python around it), with the tokenizer the first prepare trained.

Run from the repository root on a quiet machine (the runs take a few minutes per GB)::

    python benchmarks/scale.py                 # -> benchmarks/results/scale-<device>.md
    python benchmarks/scale.py --sizes 20 80   # a quick look
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from _report import device_slug, markdown_table, write_report  # benchmarks/_report.py

ROOT = Path(__file__).resolve().parents[1]
MAX_LENGTH = 256


def write_corpus(path: Path, megabytes: int, seed: int = 0) -> int:
    """A deterministic ``.jsonl`` corpus of about ``megabytes`` MB; returns its documents."""
    rng = np.random.default_rng(seed)
    syllables = np.array(["ka", "lo", "mi", "ne", "tu", "ra", "si", "po", "de", "an", "or", "el", "is", "um", "ba"])
    words = np.array(
        ["".join(syllables[rng.integers(0, len(syllables), n)]) for n in rng.integers(1, 5, 20_000)], dtype=object
    )
    weights = 1.0 / np.arange(1, len(words) + 1) ** 1.1
    weights /= weights.sum()
    written = documents = 0
    with path.open("w", encoding="utf-8") as out:
        while written < megabytes * 1_000_000:
            count = int(np.clip(rng.lognormal(5.2, 0.9), 3, 20_000))
            line = json.dumps({"text": " ".join(words[rng.choice(len(words), count, p=weights)])}) + "\n"
            out.write(line)
            written, documents = written + len(line), documents + 1
    return documents


def measured(command: list[str], **kwargs: object) -> tuple[float, float, subprocess.CompletedProcess[str]]:
    """Run ``command`` in a fresh wrapper process: (wall s, the command's peak RSS in MB, the result)."""
    wrapper = (
        "import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
        "print('PEAK_RSS_KB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); "
        "sys.exit(r.returncode)"
    )
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-c", wrapper, *command], cwd=ROOT, capture_output=True, text=True, check=False, **kwargs
    )
    wall = time.perf_counter() - start
    if result.returncode != 0:
        raise RuntimeError(f"{command[:4]} failed:\n{result.stderr[-3000:]}")
    peak = next(int(line.split()[1]) for line in result.stderr.splitlines() if line.startswith("PEAK_RSS_KB"))
    return wall, peak / 1024, result


PREPARE = """
import itertools, json, sys, time
start = time.perf_counter()
from mhaplug.data import TextDataModule
from mhaplug.data.streaming import packing_efficiency
path, cache, streaming = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
module = TextDataModule(source="text_files", path=path, text_column="text", cache_dir=cache, streaming=streaming)
module.prepare_data()
module.setup("fit")
loader = module.train_dataloader()
batch = next(iter(loader))
first = time.perf_counter() - start
if streaming:
    stream, rows = loader.dataset, []
    for window, texts in itertools.islice(stream.windows(0, 1), 3):
        rows += [len(r["input_ids"]) for r in stream.rows(module.tokenizer, texts, 0, window)]
    efficiency = packing_efficiency(rows, module.hparams.max_length)
else:
    efficiency = packing_efficiency(module._dataset_and_lengths("train")[1], module.hparams.max_length)
print(json.dumps({"first_batch_s": first, "efficiency": efficiency, "stats": module.stats,
                  "tokenizer": str(next(iter((module.cache_dir / "tokenizers").glob("*.json")), ""))}))
"""


def prepare(corpus: Path, cache: Path, *, streaming: bool) -> dict:
    wall, rss, result = measured(["python", "-c", PREPARE, str(corpus), str(cache), "1" if streaming else "0"])
    return {"wall": wall, "rss": rss, **json.loads(result.stdout.strip().splitlines()[-1])}


def train_run(corpus: Path, cache: Path, run_dir: Path, *, streaming: bool) -> dict:
    command = [
        "python",
        "train.py",
        "data=text_files",
        f"data.path={corpus}",
        "data.text_column=text",
        "trainer.max_steps=10",
        "trainer.val_check_interval=10",
        "trainer.enable_progress_bar=false",
        f"data.cache_dir={cache}",
        f"hydra.run.dir={run_dir}",
        *(["data.streaming=true"] if streaming else []),
    ]
    wall, rss, _ = measured(command)
    summary = json.loads((run_dir / "summary.json").read_text())
    return {
        "wall": wall,
        "rss": rss,
        "val_loss": summary["final_val_loss"],
        "val_tokens": summary["data"]["val_tokens"],
    }


def raw_encode(corpus: Path, tokenizer: str) -> float:
    """MB/s of ``Tokenizer.encode_batch`` alone over the corpus (all cores)."""
    from tokenizers import Tokenizer

    encoder = Tokenizer.from_file(tokenizer)
    with corpus.open(encoding="utf-8") as lines:
        texts = [json.loads(line)["text"] for line in lines]
    size = sum(len(t.encode()) for t in texts) / 1e6
    start = time.perf_counter()
    for i in range(0, len(texts), 1000):
        encoder.encode_batch(texts[i : i + 1000])
    return size / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[50, 200, 1000], help="corpus sizes in MB")
    parser.add_argument("--work-dir", type=Path, default=None, help="where corpora and caches go (default: a temp dir)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    out = args.out or ROOT / "benchmarks" / "results" / f"scale-{device_slug(torch.device('cpu'))}.md"
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="mhaplug-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()[0]
    results, raw = {}, None
    for size in args.sizes:
        corpus = work / f"corpus-{size}mb.jsonl"
        if not corpus.exists():
            documents = write_corpus(corpus, size)
        else:
            documents = sum(1 for _ in corpus.open())
        row = {"documents": documents, "mb": corpus.stat().st_size / 1e6}
        row["prepare"] = prepare(corpus, work / f"cache-prep-{size}", streaming=False)
        if raw is None:
            raw = raw_encode(corpus, row["prepare"]["tokenizer"])
        row["train"] = train_run(corpus, work / f"cache-train-{size}", work / f"run-{size}", streaming=False)
        row["stream_first"] = prepare(corpus, work / f"cache-stream-{size}", streaming=True)
        row["stream"] = train_run(corpus, work / f"cache-streamrun-{size}", work / f"srun-{size}", streaming=True)
        results[size] = row
        print(json.dumps({size: row}), flush=True)
    load_after = os.getloadavg()[0]

    header = ["corpus", "documents", "prepare", "MB/s", "peak RSS", "packing", "10-step run", "RSS"]
    header += ["streamed run", "RSS", "first batch", "packing"]
    table = []
    for size, r in results.items():
        p, t, s, f = r["prepare"], r["train"], r["stream"], r["stream_first"]
        table.append(
            [
                f"{r['mb']:,.0f} MB",
                f"{r['documents']:,}",
                f"{p['wall']:.1f} s",
                f"{r['mb'] / p['wall']:.1f}",
                f"{p['rss']:,.0f} MB",
                f"{p['efficiency']:.2%}",
                f"{t['wall']:.1f} s",
                f"{t['rss']:,.0f} MB",
                f"{s['wall']:.1f} s",
                f"{s['rss']:,.0f} MB",
                f"{f['first_batch_s']:.1f} s",
                f"{f['efficiency']:.2%}",
            ]
        )
    sizes = list(results)
    lines = [
        f"# Scale: preprocessed and streamed corpora ({datetime.date.today()}, {device_slug(torch.device('cpu'))})",
        "",
        (
            f"`python benchmarks/scale.py --sizes {' '.join(map(str, sizes))}`; load average {load_before:.2f} before, "
            f"{load_after:.2f} after. torch {torch.__version__}. Each figure: a separate process, an empty cache."
        ),
        "",
        markdown_table(header, table),
        "",
        f"Raw `Tokenizer.encode_batch` on the {sizes[0]} MB corpus, all cores: **{raw:.1f} MB/s** (the limit).",
        "",
    ]
    for small, large in itertools.pairwise(sizes):
        a, b = results[small], results[large]
        ratio = b["mb"] / a["mb"]
        times = {n: b[n]["wall"] / a[n]["wall"] for n in ("train", "prepare", "stream")}
        memory = {n: b[n]["rss"] / a[n]["rss"] for n in ("train", "prepare", "stream")}
        lines.append(
            f"- {large} MB against {small} MB ({ratio:.1f}x the corpus): preprocessed run {times['train']:.2f}x the "
            f"time, {memory['train']:.2f}x the peak RSS; preparation {times['prepare']:.2f}x the time, "
            f"{memory['prepare']:.2f}x the RSS; streamed run {times['stream']:.2f}x the time, "
            f"{memory['stream']:.2f}x the RSS."
        )
    shares = ", ".join(f"{s} MB {results[s]['mb'] / results[s]['prepare']['wall'] / raw:.0%}" for s in sizes)
    lines += [
        f"- Preparation throughput against raw encode_batch: {shares}.",
        "",
        (
            "Packing: offline = first-fit decreasing over the whole train split; streamed = best-fit decreasing per "
            "window of `data.stream_buffer` (4,096) documents, over the first 3 windows. Both as real tokens over "
            f"rows x max_length ({MAX_LENGTH})."
        ),
        "",
        "Raw results:",
        "",
        "```json",
        json.dumps(results, indent=1),
        "```",
    ]
    print("\n".join(lines))
    write_report(out, lines)


if __name__ == "__main__":
    main()
