"""Benchmark: how long the commands a new user runs take, end to end, as real processes (the README's figures).

Each command runs from the repository root with its run folder under a temporary directory (nothing is written into
the repository), in turn, ``--repeats`` times; the table gives the median and the range of the wall times and the
exit code. The commands:

- ``python train.py`` with the caches built (the default cache, built first by an untimed run if missing), and
  from an empty ``data.cache_dir`` (a first run: collect the standard library, train the tokenizer, tokenise);
- ``python train.py -m experiment=mask_ablation_quick`` (the quick sweep);
- ``python train.py data=hf data.path=wikitext`` where the Hugging Face hub cannot be reached: it must fail at once,
  with one line and exit code 2 (skipped, and said so, where the hub answers);
- ``python -m pytest`` (with ``--suite``; it takes a few minutes).

The full ablation's time is in ``ablation-<device>.md`` (``python train.py -m experiment=mask_ablation``).

Run from the repository root::

    python benchmarks/wall_times.py --suite       # -> benchmarks/results/wall-times-<device>.md
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import torch
from _report import device_slug, markdown_table, write_report  # benchmarks/_report.py

ROOT = Path(__file__).resolve().parents[1]


def hub_reachable() -> bool:
    try:
        urllib.request.urlopen("https://huggingface.co", timeout=3)
    except OSError:
        return False
    return True


def run(command: list[str]) -> tuple[float, int, str]:
    """Wall seconds, exit code and the last line of stderr of ``command``, run from the repository root."""
    start = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=False)
    stderr = done.stderr.strip().splitlines()
    return time.perf_counter() - start, done.returncode, stderr[-1] if stderr else ""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=1, help="runs of each command (default 1)")
    parser.add_argument("--suite", action="store_true", help="also time python -m pytest (a few minutes)")
    parser.add_argument("--out", type=Path, help="the report (default benchmarks/results/wall-times-<device>.md)")
    args = parser.parse_args(argv)
    slug = device_slug(torch.device("cpu"))
    out = args.out or ROOT / "benchmarks" / "results" / f"wall-times-{slug}.md"
    load_before = os.getloadavg()
    py = sys.executable
    with tempfile.TemporaryDirectory(prefix="mhaplug-wall-") as tmp:
        tmp_path = Path(tmp)
        counter = iter(range(10**6))

        def folder(name: str) -> str:
            return str(tmp_path / f"{name}{next(counter)}")

        # An untimed run builds the default caches if they are missing, so "caches built" means what it says.
        run([py, "train.py", "debug=fast", f"hydra.run.dir={folder('warmup')}"])
        commands: dict[str, tuple[str, object]] = {
            "python train.py (caches built)": (
                "0",
                lambda: [py, "train.py", f"hydra.run.dir={folder('default')}"],
            ),
            "python train.py (first run: empty data.cache_dir)": (
                "0",
                lambda: [py, "train.py", f"hydra.run.dir={folder('cold')}", f"data.cache_dir={folder('cache')}"],
            ),
            "python train.py -m experiment=mask_ablation_quick": (
                "0",
                lambda: [py, "train.py", "-m", "experiment=mask_ablation_quick", f"hydra.sweep.dir={folder('quick')}"],
            ),
        }
        notes = []
        if hub_reachable():
            notes.append("data=hf with the hub unreachable: not timed, the hub answered from this machine")
        else:
            commands["python train.py data=hf data.path=wikitext (hub unreachable)"] = (
                "2",
                lambda: [py, "train.py", "data=hf", "data.path=wikitext", f"hydra.run.dir={folder('hf')}"],
            )
        if args.suite:
            commands["python -m pytest"] = ("0", lambda: [py, "-m", "pytest", "-q", "-p", "no:cacheprovider"])
        rows = []
        for name, (expected, make) in commands.items():
            walls, codes, last = [], set(), ""
            for _ in range(args.repeats):
                wall, code, last = run(make())
                walls.append(wall)
                codes.add(code)
                print(f"{name}: {wall:.1f} s, exit {code}", flush=True)
            code_text = ", ".join(map(str, sorted(codes)))
            if code_text != expected:
                notes.append(f"{name}: exit {code_text}, expected {expected}; last stderr line: {last}")
            elif expected != "0":
                notes.append(f"{name}: its one stderr line: `{last}`")
            rows.append(
                [name, f"{statistics.median(walls):.1f}", f"{min(walls):.1f}-{max(walls):.1f}", code_text, expected]
            )
    load_after = os.getloadavg()
    lines = [
        f"# Wall times of the commands a new user runs ({slug})",
        "",
        f"- command: `python {' '.join(sys.argv)}`",
        (
            f"- torch {torch.__version__}, Python {sys.version.split()[0]}, "
            f"date {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}"
        ),
        (
            f"- machine load (1-min average) {load_before[0]:.2f} before, {load_after[0]:.2f} after: the 2 cores are "
            "shared, and another process on them stretches every time here (about 4x under a load of 3-4)"
        ),
        "",
        *markdown_table(
            ["command", "median s", f"range s ({args.repeats} run(s))", "exit code", "expected"], rows
        ).splitlines(),
        "",
        *(f"- {note}" for note in notes),
    ]
    print("\n".join(lines))
    write_report(out, lines)


if __name__ == "__main__":
    main()
