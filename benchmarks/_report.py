"""What every benchmark script shares: the device name in result file names, Markdown tables, writing a report."""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch


def device_slug(device: torch.device) -> str:
    """``cpu-2cores`` or a slug of the CUDA device name (``nvidia-h100-80gb-hbm3``), for result file names."""
    if device.type == "cuda":
        return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower()).strip("-")
    return f"cpu-{os.cpu_count()}cores"


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def write_report(path: Path, lines: list[str]) -> None:
    """Write the Markdown report (the same lines the script printed) and say where."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    print(f"\nwritten: {path}")
