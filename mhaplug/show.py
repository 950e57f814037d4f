"""A picture of the masks of a real batch: ``key_padding_mask``, ``attn_mask``, torch's merge, and what each strategy
hands its kernel, for left padding, right padding and packed rows.

Usage::

    python -m mhaplug.show [hydra overrides ...] [--out masks.png] [--rows 3] [--columns 16]
    python -m mhaplug.show data=synthetic data.seed=1 --out /tmp/masks.png

The overrides are ``train.py``'s (checked by :func:`mhaplug.training.overrides.check_overrides`: ``logger=null``
works, an unknown option is refused in one line) and compose ``configs/train.yaml`` as it does; the data module is
built from ``cfg.data`` (its cache, tokenizer and sampler). The documents are real: the train sampler's batches are
read in order, and the first batch holding ``--rows`` documents of 2 to ``--columns`` tokens gives the padded rows
(the same documents, padded left and right by :class:`~mhaplug.data.PadCollator`); :class:`~mhaplug.data.PackCollator`
packs the first short documents (at most ``--columns // 2`` tokens) into ``--rows`` rows of ``--columns`` tokens (4 to
:data:`~mhaplug.reporting.mask_figure.MAX_LENGTH`, 32: wider cells are too small to read).

The panels are :mod:`mhaplug.reporting.mask_panels`' (what each strategy really hands its kernel), drawn by
:mod:`mhaplug.reporting.mask_figure`.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mhaplug.attention.strategies import CAPABILITIES
from mhaplug.common import plain_text
from mhaplug.reporting.mask_figure import MAX_LENGTH, check_out, draw, write_png
from mhaplug.reporting.mask_panels import LAYOUT_NAMES, make_batches, section, token_text

__all__ = ["compose", "main", "render"]

# ----------------------------------------------------------------------------------------------------------
# What reaches the kernel: one layer call per strategy, spied on
# ----------------------------------------------------------------------------------------------------------


# ----------------------------------------------------------------------------------------------------------
# The cells each panel plots
# ----------------------------------------------------------------------------------------------------------


# ----------------------------------------------------------------------------------------------------------
# Real batches from the configured data
# ----------------------------------------------------------------------------------------------------------


def compose(overrides: Sequence[str]) -> Any:
    """``configs/train.yaml`` composed with ``overrides``, as ``train.py`` sees it: the overrides checked and
    rewritten as train.py's are (a :class:`~mhaplug.common.ConfigError` for an unknown option)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from mhaplug.training.config import register_configs
    from mhaplug.training.overrides import CONFIGS, check_overrides

    checked = check_overrides(overrides)
    register_configs()
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return hydra_compose(config_name="train", overrides=checked)


def render(cfg: Any, out: str | os.PathLike[str], *, rows: int = 3, columns: int = 16) -> Path:
    """Build ``cfg.data``'s data module as ``train.py`` does, pick documents of a real batch, and write the picture of
    their masks to ``out`` (PNG); return its path."""
    from hydra.utils import instantiate

    if isinstance(rows, bool) or not isinstance(rows, int) or rows < 1:
        raise ValueError(f"--rows must be a positive int, got {rows!r}")
    if isinstance(columns, bool) or not isinstance(columns, int) or not 4 <= columns <= MAX_LENGTH:
        raise ValueError(
            f"--columns must be an int from 4 to {MAX_LENGTH} (wider cells are too small to read), got {columns!r}"
        )
    if rows > cfg.data.batch_size:
        raise ValueError(
            f"--rows {rows} is more than data.batch_size={cfg.data.batch_size}: the rows come from one batch"
        )
    check_out(out)  # before the data is read: a bad path fails at once
    strategy = cfg.attention.strategy
    if strategy not in CAPABILITIES:
        raise ValueError(f"attention.strategy={strategy!r} is not a strategy; allowed: {', '.join(CAPABILITIES)}")
    datamodule = instantiate(cfg.data, _convert_="all")
    datamodule.prepare_data()
    datamodule.setup("fit")
    tokenizer, train, pad = datamodule.tokenizer, datamodule.splits["train"], datamodule.pad_token_id
    lengths = list(train["length"])
    sampler = datamodule.batch_sampler("train", lengths, shuffle=True)
    batches = make_batches(
        _Documents(train), lengths, iter(sampler), rows=rows, columns=columns,
        pad_token_id=datamodule.pad_token_id, pad_to_multiple_of=cfg.data.pad_to_multiple_of,
    )  # fmt: skip
    layer = {"embed_dim": cfg.model.d_model, "num_heads": cfg.model.num_heads}
    sections = [
        section(
            batch,
            LAYOUT_NAMES[name],
            tokens=token_text(batch["input_ids"], tokenizer=tokenizer, pad_token_id=pad),
            **layer,
        )
        for name, batch in batches.items()
    ]
    configured = "packed" if cfg.data.layout == "packed" else cfg.data.padding_side
    title = (
        f"data={cfg.data.source}, train split: {rows} rows of at most {columns} tokens; the layer: "
        f"d_model={cfg.model.d_model}, num_heads={cfg.model.num_heads} (configured: data.layout={cfg.data.layout}"
        + (f", padding_side={cfg.data.padding_side}" if cfg.data.layout == "padded" else "")
        + f", attention={strategy})"
    )
    figure = draw(sections, title=title, highlight={"column": LAYOUT_NAMES[configured], "strategy": strategy})
    return write_png(figure, out)


class _Documents:
    """Token ids of a tokenised split by index, read one document at a time (no copy of the whole column)."""

    def __init__(self, split: Any) -> None:
        self.split = split

    def __getitem__(self, index: int) -> list[int]:
        return self.split[int(index)]["input_ids"]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mhaplug.show", description=plain_text(__doc__.split("\n\n")[0]))
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of configs/train.yaml, e.g. data=synthetic")
    parser.add_argument("--out", default="masks.png", help="PNG to write (default: masks.png)")
    parser.add_argument("--rows", type=int, default=3, help="documents (padded) and rows (packed) to show")
    parser.add_argument("--columns", type=int, default=16, help=f"longest row, in tokens (L and S): 4 to {MAX_LENGTH}")
    args = parser.parse_intermixed_args(argv)  # overrides before and after the options
    import datasets
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    datasets.disable_progress_bars()  # stdout and stderr stay for the path and for errors
    try:
        cfg = compose(args.overrides)
        path = render(cfg, args.out, rows=args.rows, columns=args.columns)
    except (HydraException, OmegaConfBaseException) as error:
        message = str(error).split("Config search path:")[0]  # Hydra appends its search path: not the user's concern
        if error.__cause__ is not None:  # e.g. "Key 'batchsize' not in 'DataSchema'", under "Could not override"
            message += f" ({str(error.__cause__).splitlines()[0]})"
        print(
            f"{parser.prog}: error: overrides {' '.join(args.overrides)!r}: {' '.join(message.split())}",
            file=sys.stderr,
        )
        return 2
    except (ValueError, TypeError, OSError) as error:
        print(f"{parser.prog}: error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
