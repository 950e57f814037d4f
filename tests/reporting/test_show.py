"""python -m mhaplug.show: the cells each panel plots, against literal masks for a hand-made batch (lengths 3, 5, 2
padded right and left; a packed row of documents [2, 3] and a pad), the figure plotting exactly those cells, the PNG
written atomically at the expected size, and the command line through real processes."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from matplotlib.colors import to_rgb

from mhaplug import PackCollator, PadCollator, show
from mhaplug.reporting import mask_figure, mask_panels

ROOT = Path(__file__).resolve().parents[2]
SDPA = F.scaled_dot_product_attention
NEG = float("-inf")
DOCUMENTS = [[5, 6, 7], [2, 3, 4, 5, 6], [8, 9]]  # lengths 3, 5, 2


def bools(rows: str) -> torch.Tensor:
    """'TF.. / ...' -> a bool tensor: T / 1 = True, F / . = False, rows separated by spaces."""
    return torch.tensor([[c in "T1" for c in row] for row in rows.split()])


def flags(row: str) -> torch.Tensor:
    """'TF..' -> a 1-D bool tensor."""
    return bools(row)[0]


def additive(rows: str) -> torch.Tensor:
    """'0' = 0.0, '.' = -inf, rows separated by spaces."""
    return torch.tensor([[0.0 if c == "0" else NEG for c in row] for row in rows.split()])


@pytest.fixture(scope="module")
def sections() -> dict[str, mask_figure.Section]:
    right = PadCollator(pad_token_id=0, padding_side="right")(DOCUMENTS)
    left = PadCollator(pad_token_id=0, padding_side="left")(DOCUMENTS)
    packed = PackCollator(max_length=6, pad_token_id=0)(
        [
            {"input_ids": [5, 6, 7, 8, 9], "document_lengths": [2, 3]},
            {"input_ids": [2, 3, 4, 5, 6, 7], "document_lengths": [6]},
        ]
    )
    return {
        "right": mask_panels.section(right, "right padding", row=0),
        "left": mask_panels.section(left, "left padding", row=0),
        "packed": mask_panels.section(packed, "packed rows"),
    }


# ----------------------------------------------------------------------------------------------------------
# The masks each panel plots, against literal matrices
# ----------------------------------------------------------------------------------------------------------

CAUSAL_MASKED = bools("FTTTT FFTTT FFFTT FFFFT FFFFF")  # MHA attn_mask: True above the diagonal
LEFT_ROW0_KEEP = bools("..... ..... ..T.. ..TT. ..TTT")  # row 0 left-padded by 2: causal AND not pad
RIGHT_ROW0_KEEP = bools("T.... TT... TTT.. TTT.. TTT..")  # row 0 right-padded by 2
PACKED_ROW0_KEEP = bools("T..... TT.... ..T... ..TT.. ..TTT. ......")  # documents [2, 3], then a pad


def test_key_padding_mask_panel_is_the_batch_key_true_on_pads(sections: dict[str, mask_figure.Section]) -> None:
    right, left, packed = (sections[k].grids["key_padding_mask"] for k in ("right", "left", "packed"))
    assert torch.equal(right.values, bools("FFFTT FFFFF FFTTT"))
    assert torch.equal(right.attends, bools("TTT.. TTTTT TT..."))  # colour: a real key may be attended
    assert torch.equal(left.values, bools("TTFFF FFFFF TTTFF"))
    assert torch.equal(packed.values, bools("FFFFFT FFFFFF"))
    assert sections["packed"].grids["attn_mask"].boundaries == (2, 5)  # document 1 at 2, padding at 5


def test_attn_mask_panel_is_causal_for_padded_rows_and_document_causal_for_packed(
    sections: dict[str, mask_figure.Section],
) -> None:
    for side in ("right", "left"):
        grid = sections[side].grids["attn_mask"]
        assert grid.values.dtype == torch.bool
        assert torch.equal(grid.values, CAUSAL_MASKED)
        assert torch.equal(grid.attends, ~CAUSAL_MASKED)
    assert torch.equal(sections["packed"].grids["attn_mask"].values, ~PACKED_ROW0_KEEP)


def test_torch_merges_both_into_one_float_mask_with_nan_rows(sections: dict[str, mask_figure.Section]) -> None:
    left = sections["left"].grids["torch_mha"]
    assert torch.equal(left.values, additive("..... ..... ..0.. ..00. ..000"))
    assert torch.equal(left.marked_rows, flags("TTFFF")) and left.mark == mask_figure.NAN
    right = sections["right"].grids["torch_mha"]
    assert torch.equal(right.values, additive("0.... 00... 000.. 000.. 000.."))
    assert not right.marked_rows.any()
    packed = sections["packed"].grids["torch_mha"]
    assert torch.equal(packed.attends, PACKED_ROW0_KEEP)
    assert torch.equal(packed.marked_rows, flags("FFFFFT"))
    assert sections["left"].grids["torch_mha"].caption == "row b=0, head 0 of (3, 2, 5, 5) (B, H, L, S)"


def test_merged_bool_hands_a_keep_mask_with_empty_rows_opened_and_zeroed(
    sections: dict[str, mask_figure.Section],
) -> None:
    left = sections["left"].grids["merged_bool"]
    assert left.values.dtype == torch.bool
    assert torch.equal(left.values, bools("TTTTT TTTTT ..T.. ..TT. ..TTT"))  # rows 0-1 opened for the kernel
    assert torch.equal(left.marked_rows, flags("TTFFF")) and left.mark == mask_figure.ZEROED
    assert torch.equal(left.opened, bools("TTTTT TTTTT ..... ..... ....."))
    right = sections["right"].grids["merged_bool"]
    assert torch.equal(right.values, RIGHT_ROW0_KEEP) and not right.marked_rows.any()
    packed = sections["packed"].grids["merged_bool"]
    assert torch.equal(packed.values, PACKED_ROW0_KEEP | bools("...... ...... ...... ...... ...... TTTTTT"))
    assert sections["packed"].auto_dispatch == "merged_bool"
    assert packed.caption == "row b=0; auto here (DecoderLM on CPU: a row per document)"


def test_merged_additive_hands_zero_and_minus_inf(sections: dict[str, mask_figure.Section]) -> None:
    left = sections["left"].grids["merged_additive"]
    assert left.values.dtype == torch.float32
    assert torch.equal(left.values, additive("00000 00000 ..0.. ..00. ..000"))
    assert torch.equal(left.marked_rows, flags("TTFFF"))
    packed = sections["packed"].grids["merged_additive"]
    assert torch.equal(packed.values, additive("0..... 00.... ..0... ..00.. ..000. 000000"))


def test_causal_kpm_hands_the_causal_flag_and_a_padding_vector(sections: dict[str, mask_figure.Section]) -> None:
    left = sections["left"].grids["causal_kpm"]
    assert left.values is None  # no (L, S) tensor reaches the kernel
    assert torch.equal(left.vector, flags("FFTTT"))
    assert torch.equal(left.flag_masked, CAUSAL_MASKED)
    assert torch.equal(left.attends, LEFT_ROW0_KEEP)
    assert torch.equal(left.marked_rows, flags("TTFFF"))
    assert left.opened is not None and not left.opened.any()  # masked in the kernel, zeroed after: nothing opened
    right = sections["right"].grids["causal_kpm"]
    assert torch.equal(right.vector, flags("TTTFF"))
    assert torch.equal(right.attends, RIGHT_ROW0_KEEP)
    assert sections["right"].auto_dispatch == "causal_kpm"
    assert right.caption == "row b=0; auto takes this path here"
    assert "refused for packed rows" in sections["packed"].grids["causal_kpm"].refused


def test_causal_only_hands_the_flag_alone_and_refuses_left_padding(sections: dict[str, mask_figure.Section]) -> None:
    right = sections["right"].grids["causal_only"]
    assert right.values is None and right.vector is None
    assert torch.equal(right.attends, ~CAUSAL_MASKED)  # pad keys 3, 4 are seen by pad queries 3, 4 only
    assert right.caption == "row b=0; 2 pad queries attend pad keys: they take no loss"
    assert sections["left"].grids["causal_only"].attends is None
    assert "left padding" in sections["left"].grids["causal_only"].refused
    assert "refused for packed rows" in sections["packed"].grids["causal_only"].refused


def test_flex_mask_mod_gives_document_causal_blocks(sections: dict[str, mask_figure.Section]) -> None:
    packed = sections["packed"].grids["flex"]
    assert torch.equal(packed.values, PACKED_ROW0_KEEP)  # the pad query is masked (not opened) and zeroed after
    assert torch.equal(packed.marked_rows, flags("FFFFFT"))
    left = sections["left"].grids["flex"]
    assert torch.equal(left.values, LEFT_ROW0_KEEP)
    assert torch.equal(left.marked_rows, flags("TTFFF"))


def test_kernel_input_runs_no_flex_kernel_and_restores_the_spied_functions() -> None:
    batch = PadCollator(pad_token_id=0)(DOCUMENTS)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        kernel = mask_panels.kernel_input(batch, "flex")
    assert [str(w.message) for w in caught] == []  # the unfused CPU flex kernel would warn
    assert kernel.dispatch == "flex" and kernel.mask.shape == (3, 1, 5, 5)
    assert F.scaled_dot_product_attention is SDPA
    assert mask_panels.kernel_input(batch, "merged_bool").mask.shape == (3, 1, 5, 5)


def test_pick_row_and_token_text() -> None:
    right = PadCollator(pad_token_id=0)(DOCUMENTS)
    assert mask_panels.pick_row(right) == 0  # lengths 3, 5, 2 in L=5: 3 and 2 are as near half; the first wins
    packed = PackCollator(max_length=6)(
        [
            {"input_ids": [2, 3, 4, 5, 6, 7], "document_lengths": [6]},
            {"input_ids": [5, 6, 7, 8, 9], "document_lengths": [2, 3]},
        ]
    )
    assert mask_panels.pick_row(packed) == 1  # the row with two documents
    assert mask_panels.token_text(torch.tensor([[7, 1, 0]])) == [["7", "<eos>", "<pad>"]]
    with pytest.raises(ValueError, match=r"row must be in \[0, 3\)"):
        mask_panels.section(right, "right padding", row=3)


# ----------------------------------------------------------------------------------------------------------
# Choosing real documents
# ----------------------------------------------------------------------------------------------------------

LENGTHS = [9, 3, 12, 5, 2, 20, 4, 7, 3, 6, 4, 4]
BATCHES = [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]


def test_choose_documents_reads_the_batches_in_order() -> None:
    padded, packed = mask_panels.choose_documents(LENGTHS, BATCHES, rows=2, columns=8)
    assert padded == [3, 1]  # batch 0's documents of 2..8 tokens, longest first
    assert packed == [1, 4, 6, 8, 10]  # documents of 2..4 tokens until first-fit would need a third row
    with pytest.raises(ValueError, match=r"--rows 3 --columns 8: the data has no batch with 3 documents"):
        mask_panels.choose_documents(LENGTHS, BATCHES[:1], rows=3, columns=8)


def test_make_batches_collates_the_chosen_documents() -> None:
    documents = [[2 + i] * n for i, n in enumerate(LENGTHS)]
    batches = mask_panels.make_batches(documents, LENGTHS, iter(BATCHES), rows=2, columns=8)
    assert torch.equal(batches["right"]["key_padding_mask"], bools("FFFFF FFFTT"))
    assert torch.equal(batches["left"]["key_padding_mask"], bools("FFFFF TTFFF"))
    assert batches["left"]["input_ids"].tolist() == [[5] * 5, [0, 0, 3, 3, 3]]
    # first-fit decreasing (lengths 3, 2, 4, 3, 4): rows [4, 4] and [3, 3, 2]
    assert batches["packed"]["document_ids"].tolist() == [[0, 0, 0, 0, 1, 1, 1, 1], [0, 0, 0, 1, 1, 1, 2, 2]]


# ----------------------------------------------------------------------------------------------------------
# The figure and the PNG
# ----------------------------------------------------------------------------------------------------------


def test_the_figure_plots_exactly_the_grids(sections: dict[str, mask_figure.Section]) -> None:
    ordered = [sections[k] for k in ("left", "right", "packed")]
    figure = mask_figure.draw(ordered, title="test")
    assert tuple(figure.get_size_inches()) == (11.0, 13.4)  # B=3, L=6: see row_heights
    for r, panel in enumerate(mask_figure.PANELS):
        for ax, sec in zip(figure.subfigs[r + 1].axes, ordered):
            grid = sec.grids[panel]
            if grid.refused is not None:
                assert not ax.images and grid.refused.split()[0] in ax.texts[0].get_text()
                continue
            plotted = torch.from_numpy(ax.images[0].get_array().data).float()  # (R, C, 3)
            if grid.vector is not None:  # the keep vector, a blank row, then the grid
                vector = mask_figure.cell_colours(mask_figure.Grid("", grid.vector[None], grid.vector[None]))
                assert torch.allclose(plotted[:1], vector) and torch.equal(plotted[1], torch.ones_like(plotted[1]))
                plotted = plotted[2:]
            assert torch.allclose(plotted, mask_figure.cell_colours(grid)), (panel, sec.name)
    blue, grey, orange = (torch.tensor(to_rgb(c)) for c in ("#2c7fb8", "#d4d4d4", "#fdae6b"))
    left = mask_figure.cell_colours(sections["left"].grids["merged_bool"])
    assert torch.allclose(left[0, 0], orange) and torch.allclose(left[2, 2], blue) and torch.allclose(left[2, 0], grey)
    kpm_texts = [t.get_text() for t in figure.subfigs[1].axes[0].texts[:15]]
    assert kpm_texts == list("TTFFFFFFFFTTTFF")  # the left-padded key_padding_mask, cell by cell
    additive_texts = {
        t.get_text() for t in figure.subfigs[1 + mask_figure.PANELS.index("merged_additive")].axes[0].texts
    }
    assert additive_texts == {"0", "\u2212\u221e", mask_figure.ZEROED}


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_write_png_writes_a_png_of_the_figure_size_atomically(
    tmp_path: Path, sections: dict[str, mask_figure.Section]
) -> None:
    figure = mask_figure.draw([sections["left"], sections["right"], sections["packed"]])
    out = mask_figure.write_png(figure, tmp_path / "masks.png")
    assert out == tmp_path / "masks.png"
    assert png_size(out) == (1100, 1340)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["masks.png"]  # no temporary file left
    with pytest.raises(ValueError, match="does not exist"):
        mask_figure.write_png(figure, tmp_path / "missing" / "masks.png")


# ----------------------------------------------------------------------------------------------------------
# The command line
# ----------------------------------------------------------------------------------------------------------


def run_show(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "MHAPLUG_CACHE": str(tmp_path / "cache"), "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "mhaplug.show", *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )


@pytest.mark.slow
def test_cli_writes_the_picture_of_a_real_batch(tmp_path: Path) -> None:
    out = tmp_path / "pictures" / "masks.png"
    out.parent.mkdir()
    result = run_show(tmp_path, "data=synthetic", "model=tiny", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"{out}\n"  # the path, nothing else
    assert "%|" not in result.stderr  # no progress bars
    sizes = {(1100, round(mask_figure.figure_size(3, length)[1] * 100)) for length in range(2, 17)}
    assert png_size(out) in sizes
    assert sorted(p.name for p in out.parent.iterdir()) == ["masks.png"]


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["data=synthetic", "data.batchsize=4"], "data.batchsize"),
        (["data=synthetic", "--rows", "9"], "--rows 9 is more than data.batch_size=8"),
        # train.py's overrides: logger=null (no logger) composes, and a group's unknown option lists the options
        (["data=synthetic", "logger=null", "--rows", "9"], "--rows 9 is more than data.batch_size=8"),
        (
            ["attention=fast"],
            (
                "attention=fast is not an option of attention; allowed: auto, causal_kpm, causal_only, flex, "
                "merged_additive, merged_bool, reference, torch_mha (the files in configs/attention/)"
            ),
        ),
        # 160 took 71 s (a text per cell, 7 panels x 3 layouts x L x L) for cells of 1.5 px: refused at once
        (["--columns", "160"], "--columns must be an int from 4 to 32 (wider cells are too small to read), got 160"),
        (["--columns", "3"], "--columns must be an int from 4 to 32 (wider cells are too small to read), got 3"),
    ],
)
def test_cli_bad_input_exits_2_with_one_line_naming_it(tmp_path: Path, args: list[str], named: str) -> None:
    result = run_show(tmp_path, *args)
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("python -m mhaplug.show: error:") and named in lines[0], lines
    assert not (tmp_path / "masks.png").exists()


def test_compose_takes_the_overrides_train_py_takes() -> None:
    """``logger=null`` (train.py: no logger) is Hydra's ``~logger``; Hydra's compose alone refuses a null group."""
    assert show.compose(["logger=null", "model=tiny"]).logger is None
    assert show.compose(["model=tiny"]).logger.csv.name == "csv"
