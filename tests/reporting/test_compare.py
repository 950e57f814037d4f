"""mhaplug.compare on run directories written here: table, equivalence check, exit codes, plot, errors."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from mhaplug import compare
from mhaplug.reporting.runs import check_equivalence, choose_baseline, load_runs, read_curve
from mhaplug.reporting.tables import TABLE_WIDTH, format_legend, format_table, note_lines

ROOT = Path(__file__).resolve().parents[2]


def test_table_has_every_run_and_value(equivalent: Path) -> None:
    runs = load_runs(equivalent)
    findings = check_equivalence(runs)
    table = format_table(runs, findings, baseline=choose_baseline(runs))
    assert table.splitlines() == [
        "run  strategy     layout  padding  batching  final val  real tok/s  speed-up    pad  audit  check",
        "---  -----------  ------  -------  --------  ---------  ----------  --------  -----  -----  -----------------",
        "  1  causal_kpm   padded  left     random       5.0008       2,500     2.50x  37.5%  pass   ok (3 equivalent)",
        "  2  merged_bool  padded  right    random       5.0004       1,500     1.50x  37.5%  pass   ok (3 equivalent)",
        "  3  torch_mha    padded  right    random       5.0000       1,000     1.00x  37.5%  pass   ok (3 equivalent)",
    ]
    # Below it, the legend: each number's run name, with the numbers the table left out.
    assert format_legend(runs).splitlines() == [
        "run  best val  peak MB  wall s  run name",
        "---  --------  -------  ------  ---------------------------------------------",
        "  1    4.9908    512.3    61.2  attention=causal_kpm,data.padding_side=left",
        "  2    4.9904    512.3    61.2  attention=merged_bool,data.padding_side=right",
        "  3    4.9900    512.3    61.2  attention=torch_mha,data.padding_side=right",
    ]
    assert note_lines(runs, findings) == []  # nothing shortened


def test_the_ablation_table_fits_120_columns_and_the_legend_names_every_run(
    make_ablation: Callable[[Path], Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The 19 runs of the committed ablation, with their real run names (a sweep job's overrides): the table was
    over 200 columns wide with them."""
    runs = load_runs(make_ablation(tmp_path))
    findings = check_equivalence(runs)
    table = format_table(runs, findings, baseline=choose_baseline(runs)).splitlines()
    assert len(table) == 2 + 19
    assert max(map(len, table)) == 119 <= TABLE_WIDTH == 120
    assert table[:2] + table[7:8] + table[18:20] == [
        "run  strategy         layout  padding  batching  final val  real tok/s  speed-up    pad  audit      check",
        (
            "---  ---------------  ------  -------  --------  ---------  ----------  --------  -----  ---------"
            "  -------------------"
        ),
        (
            "  6  causal_only      padded  left     random       6.5227      17,475     1.35x  73.6%  exp. FAIL"
            "  expected divergence"
        ),
        (
            " 17  torch_mha        packed  -        random       6.3225      16,259     1.25x   0.1%  exp. FAIL"
            "  invalid but equal"
        ),
        (
            " 18  torch_mha        padded  left     random       6.5312      13,115     1.01x  73.6%  exp. FAIL"
            "  invalid but equal"
        ),
    ]
    legend = format_legend(runs).splitlines()
    assert max(map(len, legend)) <= 120
    assert legend == [
        "run  best val  peak MB  wall s  run name",
        "---  --------  -------  ------  --------------------------------------------------------------------",
        "  1    6.3125    512.3    61.2  attention=auto,data.layout=packed,data.padding_side=right",
        "  2    6.5212    512.3    61.2  attention=auto,data.layout=padded,data.padding_side=left",
        "  3    6.5212    512.3    61.2  attention=auto,data.layout=padded,data.padding_side=right",
        "  4    6.5212    512.3    61.2  attention=causal_kpm,data.layout=padded,data.padding_side=left",
        "  5    6.5212    512.3    61.2  attention=causal_kpm,data.layout=padded,data.padding_side=right",
        "  6    6.5127    512.3    61.2  attention=causal_only,data.layout=padded,data.padding_side=left",
        "  7    6.5212    512.3    61.2  attention=causal_only,data.layout=padded,data.padding_side=right",
        "  8    6.3125    512.3    61.2  attention=merged_additive,data.layout=packed,data.padding_side=right",
        "  9    6.5212    512.3    61.2  attention=merged_additive,data.layout=padded,data.padding_side=left",
        " 10    6.5212    512.3    61.2  attention=merged_additive,data.layout=padded,data.padding_side=right",
        " 11    6.3125    512.3    61.2  attention=merged_bool,data.layout=packed,data.padding_side=right",
        " 12    6.5212    512.3    61.2  attention=merged_bool,data.layout=padded,data.padding_side=left",
        " 13    6.5212    512.3    61.2  attention=merged_bool,data.layout=padded,data.padding_side=right",
        " 14    6.3125    512.3    61.2  attention=reference,data.layout=packed,data.padding_side=right",
        " 15    6.5212    512.3    61.2  attention=reference,data.layout=padded,data.padding_side=left",
        " 16    6.5212    512.3    61.2  attention=reference,data.layout=padded,data.padding_side=right",
        " 17    6.3125    512.3    61.2  attention=torch_mha,data.layout=packed,data.padding_side=right",
        " 18    6.5212    512.3    61.2  attention=torch_mha,data.layout=padded,data.padding_side=left",
        " 19    6.5212    512.3    61.2  attention=torch_mha,data.layout=padded,data.padding_side=right",
    ]
    # What the short cells leave out, by run number; then the check's verdict, the runs named by number.
    assert compare.main([str(tmp_path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[len(table) + 1 + len(legend) + 1 :] == [
        "6: audit expected FAIL: padding, loss; expected divergence: -0.008 vs 15",
        "17: audit expected FAIL: finite, padding, loss, causality, documents",
        "18: audit expected FAIL: finite, padding, loss, causality",
        "",
        "speed-up: real tokens/s relative to run 19 (12,965)",
        "equivalence: 2 group(s), 16 valid runs, all within 0.001",
        "mask audit: 16 valid run(s) passed, 3 invalid run(s) failed as expected",
        "3 invalid run(s) kept for teaching (valid=false), never a failure: 6, 17, 18",
        "1 combination(s) skipped as invalid (see skipped.txt in their folders)",
    ]
    # Numbers follow the run names whatever the sort: the fastest run is still 8.
    by_tokens = format_table(runs, findings, sort="tokens").splitlines()
    assert [line.split()[:2] for line in by_tokens[2:4]] == [["8", "merged_additive"], ["6", "causal_only"]]


def test_equivalent_runs_within_tolerance_pass(equivalent: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert compare.main([str(equivalent)]) == 0
    out = capsys.readouterr().out
    assert out.count("ok (3 equivalent)") == 3
    assert out.splitlines()[-3:] == [
        "speed-up: real tokens/s relative to run 3 (1,000)",
        "equivalence: 1 group(s), 3 valid runs, all within 0.001",
        "mask audit: 3 valid run(s) passed",
    ]
    # The same runs fail a tighter tolerance: 0.0008 apart at the extremes.
    assert compare.main([str(equivalent), "--tolerance", "5e-4"]) == 1


def test_a_pair_differing_by_0_01_is_a_mask_bug(
    make_run: Callable[..., Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    make_run(tmp_path, "a", strategy="reference", final=5.0)
    make_run(tmp_path, "b", strategy="flex", final=5.01)
    make_run(tmp_path, "c", strategy="merged_bool", final=5.5, key="other")  # alone in its group
    findings = check_equivalence(load_runs(tmp_path))
    ref, flex = "attention=reference,data.padding_side=right", "attention=flex,data.padding_side=right"
    assert [(f.run, f.status, f.message, f.others) for f in findings] == [
        (ref, "mismatch", f"MISMATCH vs {flex} (-0.010)", (flex,)),
        (flex, "mismatch", f"MISMATCH vs {ref} (+0.010)", (ref,)),
        ("attention=merged_bool,data.padding_side=right", "alone", "-", ()),
    ]
    assert findings[1].deltas == (pytest.approx(0.01),)
    assert compare.main([str(tmp_path), "--sort", "val_loss"]) == 1
    out = capsys.readouterr().out
    assert (  # runs by number: flex 1, merged_bool 2, reference 3
        "MISMATCH: 1 pair(s) of equivalent valid runs differ in final val loss by more than 0.001: "
        "1 vs 3 (0.010). Same equivalence_key = same computation: a mask bug."
    ) in out
    lines = out.splitlines()
    assert [line.split()[0] for line in lines[2:5]] == ["3", "1", "2"]  # sorted by final val loss
    assert [line[-13:] for line in lines[2:4]] == ["MISMATCH vs 1", "MISMATCH vs 3"]
    assert "1: MISMATCH vs 3 (+0.010)" in lines and "3: MISMATCH vs 1 (-0.010)" in lines


def test_a_nan_loss_is_a_divergence_and_a_missing_one_never_matches(
    make_run: Callable[..., Path], tmp_path: Path
) -> None:
    """A valid run with a NaN final val loss failed (it is not compared: the others are not to blame); one without a
    final val loss (null) cannot show that it equals the others."""
    make_run(tmp_path, "a", strategy="torch_mha", final=5.0)
    make_run(tmp_path, "b", strategy="merged_bool", final=5.0, final_val_loss=float("nan"))
    assert [f.status for f in check_equivalence(load_runs(tmp_path))] == ["alone", "diverged"]
    make_run(tmp_path, "c", strategy="reference", final=5.0, final_val_loss=None)
    assert [f.status for f in check_equivalence(load_runs(tmp_path))] == ["mismatch", "diverged", "mismatch"]


def test_invalid_run_diverges_without_failing(
    make_run: Callable[..., Path], equivalent: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    make_run(equivalent, "3", strategy="causal_only", final=5.25, valid=False, padding_side="left")
    make_run(equivalent, "4", strategy="reference", final=5.0)  # preferred after the padding side
    make_run(equivalent, "5", strategy="reference", final=5.0, padding_side="left")
    assert compare.main([str(equivalent)]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert "  2    5.2400    512.3    61.2  attention=causal_only,data.padding_side=left" in lines  # the legend
    assert lines[3].startswith("  2  causal_only") and lines[3].endswith("pass   expected divergence")
    assert "2: expected divergence: +0.250 vs 4" in lines  # 4: reference, left
    assert "1 invalid run(s) kept for teaching (valid=false), never a failure: 2" in lines
    assert out.count("ok (5 equivalent)") == 5


def test_invalid_run_that_does_not_diverge_says_so(make_run: Callable[..., Path], tmp_path: Path) -> None:
    make_run(tmp_path, "a", strategy="causal_kpm", final=5.0)
    make_run(tmp_path, "b", strategy="causal_only", final=5.0002, valid=False)
    make_run(tmp_path, "c", strategy="causal_only", final=7.0, valid=False, key="lonely")
    findings = check_equivalence(load_runs(tmp_path))
    assert [(f.status, f.message) for f in findings] == [
        ("alone", "-"),
        ("invalid_equal", "invalid but equal (the wrong mask changed nothing here)"),
        ("invalid_alone", "invalid (no valid run with its equivalence_key)"),
    ]


def test_incomplete_runs_are_listed(
    make_run: Callable[..., Path], equivalent: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    make_run(equivalent, "3", summary=False, hydra_overrides=["attention=flex", "data.layout=packed"])
    make_run(equivalent, "4", summary=False)  # no .hydra either: found through its metrics.csv
    runs = load_runs(equivalent)
    assert [(r.name, r.complete, r.steps) for r in runs[3:]] == [
        ("attention=flex,data.layout=packed", False, 99),
        ("4", False, 99),
    ]
    assert compare.main([str(equivalent)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[4].split() == ["3", "-", "-", "-", "-", "-", "-", "-", "-", "-", "incomplete"]
    assert "  3         -        -       -  attention=flex,data.layout=packed" in lines  # the legend
    assert "3: incomplete: no summary.json, last logged step 99" in lines
    assert "2 incomplete run(s) without summary.json: 1, 3" in lines  # 1: the folder "4"


def test_duplicate_run_names_get_their_path(make_run: Callable[..., Path], tmp_path: Path) -> None:
    make_run(tmp_path, "sweep1/0", final=5.0)
    make_run(tmp_path, "sweep2/0", final=5.0)
    names = [r.name for r in load_runs(tmp_path)]
    assert names == [
        "attention=merged_bool,data.padding_side=right (sweep1/0)",
        "attention=merged_bool,data.padding_side=right (sweep2/0)",
    ]


def test_baseline_choice(equivalent: Path) -> None:
    runs = load_runs(equivalent)
    assert choose_baseline(runs).strategy == "torch_mha"
    assert choose_baseline([r for r in runs if r.strategy != "torch_mha"]).strategy == "merged_bool"
    named = choose_baseline(runs, "attention=causal_kpm,data.padding_side=left")
    assert named.real_tokens_per_sec == 2500.0
    with pytest.raises(ValueError, match=r"--baseline 'nope' is not a finished run .* choose one of \['attention="):
        choose_baseline(runs, "nope")


def test_markdown_and_sort_by_tokens(equivalent: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        compare.main(
            [
                str(equivalent),
                "--markdown",
                "--sort",
                "tokens",
                "--baseline",
                "attention=causal_kpm,data.padding_side=left",
            ]
        )
        == 0
    )
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == (
        "| run | strategy    | layout | padding | batching | final val | real tok/s | speed-up |   pad | audit "
        "| check             |"
    )
    assert lines[1] == (  # "---:" right-aligns the numbers
        "|----:|-------------|--------|---------|----------|----------:|-----------:|---------:|------:|-------"
        "|-------------------|"
    )
    assert [line.split(" | ")[0] for line in lines[2:5]] == ["|   1", "|   2", "|   3"]
    assert [line.split(" | ")[7] for line in lines[2:5]] == ["   1.00x", "   0.60x", "   0.40x"]
    assert lines[6:9] == [
        "| run | best val | peak MB | wall s | run name                                      |",
        "|----:|---------:|--------:|-------:|-----------------------------------------------|",
        "|   1 |   4.9908 |   512.3 |   61.2 | attention=causal_kpm,data.padding_side=left   |",
    ]
    assert compare.main([str(equivalent), "--markdown", "--baseline", "2"]) == 0  # a run number works too
    assert "- speed-up: real tokens/s relative to run 2 (1,500)" in capsys.readouterr().out
    assert lines[-2:] == [
        "- equivalence: 1 group(s), 3 valid runs, all within 0.001",
        "- mask audit: 3 valid run(s) passed",
    ]


def test_read_curve_skips_train_rows(equivalent: Path) -> None:
    assert read_curve(equivalent / "1" / "csv" / "version_0" / "metrics.csv") == [(49, 5.5), (99, 5.0004)]


def test_missing_runs_dir(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "multirun" / "nope"
    with pytest.raises(FileNotFoundError, match=r"runs directory '.*multirun/nope' does not exist"):
        load_runs(missing)
    assert compare.main([str(missing)]) == 2
    err = capsys.readouterr().err
    assert err == f"mhaplug.compare: error: runs directory '{missing}' does not exist or is not a directory\n"


def test_no_runs_found_says_what_it_looked_for(tmp_path: Path) -> None:
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    expected = r"no runs found under .*: looked in every subdirectory for summary.json \(finished runs\) and for "
    with pytest.raises(FileNotFoundError, match=expected + r"\.hydra/ or metrics\.csv without summary\.json"):
        load_runs(tmp_path / "empty")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"run_name": "x"}', r"summary.json: missing key 'strategy', 'layout', .*, 'final_val_loss' \(required:"),
        ("{not json", r"summary.json: not valid JSON"),
        ("[1, 2]", r"summary.json: expected a JSON object, got list"),
    ],
)
def test_malformed_summary_names_file_and_key(
    make_run: Callable[..., Path], tmp_path: Path, text: str, message: str
) -> None:
    run_dir = make_run(tmp_path, "0")
    (run_dir / "summary.json").write_text(text)
    with pytest.raises(ValueError, match=rf"{tmp_path}/0/{message}"):
        load_runs(tmp_path)


def test_wrongly_typed_summary_values(
    make_run: Callable[..., Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    make_run(tmp_path, "0", real_tokens_per_sec="fast")
    assert compare.main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err == (
        f"mhaplug.compare: error: {tmp_path}/0/summary.json: "
        "key 'real_tokens_per_sec' must be a number or null, got 'fast'\n"
    )
    make_run(tmp_path, "1", valid="yes")
    with pytest.raises(ValueError, match="key 'valid' must be true or false, got 'yes'"):
        load_runs(tmp_path / "1")


def test_negative_tolerance_is_refused(equivalent: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert compare.main([str(equivalent), "--tolerance", "-1"]) == 2
    assert "tolerance must be a number >= 0, got -1.0" in capsys.readouterr().err


def test_module_runs_as_a_command(
    make_run: Callable[..., Path], run_compare: Callable[..., subprocess.CompletedProcess[str]], tmp_path: Path
) -> None:
    make_run(tmp_path, "0", strategy="torch_mha", final=5.0)
    make_run(tmp_path, "1", strategy="merged_bool", final=5.01)
    result = run_compare(tmp_path)
    assert result.returncode == 1, result.stderr
    assert result.stderr == ""
    lines = result.stdout.splitlines()
    assert lines[0].split() == [
        "run",
        "strategy",
        "layout",
        "padding",
        "batching",
        "final",
        "val",
        "real",
        "tok/s",
        "speed-up",
        "pad",
        "audit",
        "check",
    ]
    assert lines[2].endswith("MISMATCH vs 2")  # 1: merged_bool, 2: torch_mha
    assert "1: MISMATCH vs 2 (+0.010)" in lines
    assert lines[-2].startswith("MISMATCH: 1 pair(s) of equivalent valid runs differ")
    assert lines[-1] == "mask audit: 2 valid run(s) passed"


def test_audit_column_shows_pass_expected_failures_and_runs_without_an_audit(
    make_run: Callable[..., Path], equivalent: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    make_run(
        equivalent,
        "3",
        strategy="causal_only",
        final=5.25,
        valid=False,
        padding_side="left",
        audit_failed=["padding", "loss"],
    )
    make_run(equivalent, "4", strategy="torch_mha", final=5.25, valid=False, audit=None)  # an older summary
    make_run(equivalent, "5", strategy="causal_only", final=5.0, valid=False)  # wrong mask, changed nothing here
    assert compare.main([str(equivalent), "--markdown"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    rows = [[cell.strip() for cell in line.strip("| ").split(" | ")] for line in lines[2:8]]
    legend = [[cell.strip() for cell in line.strip("| ").split(" | ")] for line in lines[11:17]]
    assert {name: audit for (_, *_, audit, _), (*_, name) in zip(rows, legend)} == {
        "attention=causal_kpm,data.padding_side=left": "pass",
        "attention=causal_only,data.padding_side=left": "exp. FAIL",
        "attention=causal_only,data.padding_side=right": "pass",
        "attention=merged_bool,data.padding_side=right": "pass",
        "attention=torch_mha,data.padding_side=right (0)": "pass",
        "attention=torch_mha,data.padding_side=right (4)": "-",
    }
    assert "- 2: audit expected FAIL: padding, loss; expected divergence: +0.249 vs 1" in lines
    assert "mask audit: 3 valid run(s) passed, 1 invalid run(s) failed as expected" in out


def test_a_valid_run_that_failed_the_audit_is_a_mask_bug(
    make_run: Callable[..., Path], equivalent: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    make_run(equivalent, "3", strategy="flex", final=5.0, audit_failed=["documents"])  # only the audit sees it
    assert compare.main([str(equivalent)]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[3].startswith("  2  flex") and lines[3].endswith("FAIL   ok (4 equivalent)")  # 1: causal_kpm
    assert "2: audit FAIL: documents" in lines
    assert lines[-1] == (
        "AUDIT FAILED: 1 valid run(s) failed the step-0 mask audit: 2 (documents). Pads, later tokens or other "
        "documents reach real positions: a mask bug."
    )


def test_malformed_audit_entry_names_file_and_key(make_run: Callable[..., Path], tmp_path: Path) -> None:
    make_run(tmp_path, "0", audit="passed")
    with pytest.raises(ValueError, match=r"0/summary.json: key 'audit' must be null or an object with 'passed'"):
        load_runs(tmp_path)


# ----------------------------------------------------------------------------------------------------------
# Resumed runs (one folder, a logger version per attempt), interrupted and diverged runs
# ----------------------------------------------------------------------------------------------------------

RESUMED_HEADER = "epoch,resumed_at_step,step,train/loss,val/loss\n"


def write_attempt(
    run_dir: Path, version: int, steps: range, *, resumed_at: int | None = None, offset: float = 0.0
) -> Path:
    """``csv/version_<version>/metrics.csv`` as CSVLogger writes one attempt: ResumeMarker's row first on a resume,
    train/loss 10 + offset - step/10 every step, val/loss every 10th step."""
    path = run_dir / "csv" / f"version_{version}" / "metrics.csv"
    path.parent.mkdir(parents=True)
    rows = [f",{resumed_at},{resumed_at},,\n"] if resumed_at is not None else []
    for step in steps:
        rows.append(f"0,,{step},{10 + offset - step / 10},\n")
        if step % 10 == 9:
            rows.append(f"0,,{step},,{5 + offset - step / 100}\n")
    path.write_text(RESUMED_HEADER + "".join(rows))
    return path


def test_a_resumed_run_is_one_run_with_every_step(
    make_run: Callable[..., Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Killed at step 27 after a checkpoint at 20, resumed there: version_0 holds steps 0-27 (20-27 trained again
    after the resume), version_1 steps 20-39. One run; its curve takes steps 0-19 from version_0, the rest from
    version_1 (offset 100 tells them apart)."""
    run_dir = make_run(tmp_path, "run", steps=40, metrics_csv="csv/version_11/metrics.csv")
    (run_dir / "csv" / "version_0" / "metrics.csv").unlink()
    (run_dir / "csv" / "version_0").rmdir()
    first = write_attempt(run_dir, 0, range(28))
    second = write_attempt(run_dir, 11, range(20, 40), resumed_at=20, offset=100)  # 11: versions sort as numbers
    write_attempt(run_dir, 2, range(20, 23), resumed_at=20, offset=50)  # an attempt killed before its checkpoint
    runs = load_runs(tmp_path)
    assert len(runs) == 1 and runs[0].metrics_csvs == (first, run_dir / "csv" / "version_2" / "metrics.csv", second)
    expected = [(s, 10 - s / 10) for s in range(20)] + [(s, 110 - s / 10) for s in range(20, 40)]
    assert read_curve(runs[0].metrics_csvs, "train/loss") == expected
    assert read_curve(runs[0].metrics_csvs) == [
        (9, 5 - 9 / 100),
        (19, 5 - 19 / 100),
        (29, 105 - 29 / 100),
        (39, 105 - 39 / 100),
    ]
    assert read_curve(first, "train/loss") == [(s, 10 - s / 10) for s in range(28)]  # one file alone
    html_path = tmp_path / "report.html"
    assert compare.main([str(tmp_path), "--plot", str(tmp_path / "p.png"), "--html", str(html_path)]) == 0
    text = html_path.read_text()
    assert f"<title>mhaplug runs: {tmp_path.name}</title>" in text  # titled by the sweep's folder name
    assert str(tmp_path.parent) not in text  # never a machine path
    lines = capsys.readouterr().out.splitlines()
    assert lines[2].startswith("  1  merged_bool") and lines[3] == ""  # one run in the table
    assert lines[6] == "  1    4.9900    512.3    61.2  attention=merged_bool,data.padding_side=right"

    (run_dir / "summary.json").unlink()  # the same run while its last attempt still trains: incomplete, every step
    assert [(r.complete, r.steps) for r in load_runs(tmp_path)] == [(False, 39)]


def test_interrupted_and_diverged_runs_are_reported_not_compared(
    make_run: Callable[..., Path], equivalent: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ckpt = "/runs/a/checkpoints/last.ckpt"
    make_run(
        equivalent,
        "3",
        strategy="reference",
        final=6.0,
        status="interrupted",
        interrupted=True,
        steps=26,
        resume_ckpt_path=ckpt,
    )
    make_run(
        equivalent,
        "4",
        strategy="merged_additive",
        final=5.0,
        status="diverged",
        diverged=True,
        diverged_at_step=3,
        final_train_loss=float("nan"),
    )
    findings = {f.run: f for f in check_equivalence(load_runs(equivalent))}
    interrupted = findings["attention=reference,data.padding_side=right"]
    diverged = findings["attention=merged_additive,data.padding_side=right"]
    assert (interrupted.status, interrupted.message) == (
        "interrupted",
        f"interrupted at step 26 (SIGTERM): resume with ckpt_path={ckpt}",
    )
    assert (diverged.status, diverged.message) == ("diverged", "DIVERGED: train/loss NaN or inf at step 3")
    assert all(f.message == "ok (3 equivalent runs)" for f in findings.values() if f.status == "ok")  # not in the group
    assert compare.main([str(equivalent)]) == 1  # a valid run that diverged
    out = capsys.readouterr().out
    lines = out.splitlines()  # runs by number: causal_kpm 1, merged_additive 2, merged_bool 3, reference 4
    assert [line.split("  ")[-1].strip() for line in lines[3:4] + lines[5:6]] == [
        "DIVERGED, step 3",
        "interrupted, step 26",
    ]
    assert "2: DIVERGED: train/loss NaN or inf at step 3" in lines
    assert f"4: interrupted at step 26 (SIGTERM): resume with ckpt_path={ckpt}" in lines
    assert "DIVERGED: 1 valid run(s) stopped at a NaN or inf train/loss: 2 (step 3)" in lines
    assert "1 interrupted run(s) (SIGTERM), not compared until resumed: 4" in lines


def test_a_diverged_invalid_run_is_no_failure(make_run: Callable[..., Path], equivalent: Path) -> None:
    make_run(
        equivalent,
        "3",
        strategy="torch_mha",
        final=5.0,
        valid=False,
        status="diverged",
        diverged=True,
        diverged_at_step=7,
    )
    assert compare.main([str(equivalent)]) == 0


def test_an_unknown_status_names_file_and_key(make_run: Callable[..., Path], tmp_path: Path) -> None:
    run_dir = make_run(tmp_path, "a", status="paused")
    with pytest.raises(
        ValueError,
        match=rf"{run_dir / 'summary.json'}: key 'status' must be one of finished, "
        "interrupted, diverged; got 'paused'",
    ):
        load_runs(tmp_path)


# ----------------------------------------------------------------------------------------------------------
# Damaged run folders: one line naming the file, the key and the value, exit 2 (bad input)
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("written", "message"),
    [
        ('"steps": 1e999', "key 'steps' must be a whole number or null, got inf"),  # json reads 1e999 as inf
        ('"steps": NaN', "key 'steps' must be a whole number or null, got nan"),
        ('"steps": 2.5', "key 'steps' must be a whole number or null, got 2.5"),
        ('"diverged_at_step": Infinity', "key 'diverged_at_step' must be a whole number or null, got inf"),
    ],
)
def test_a_step_count_that_is_no_whole_number_names_file_key_and_value(
    make_run: Callable[..., Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], written: str, message: str
) -> None:
    run_dir = make_run(tmp_path, "0", status="diverged", diverged_at_step=3)
    summary = run_dir / "summary.json"
    as_written = {'"steps"': '"steps": 100', '"diverged_at_step"': '"diverged_at_step": 3'}[written.split(":")[0]]
    summary.write_text(summary.read_text().replace(as_written, written))
    assert written in summary.read_text()
    assert compare.main([str(tmp_path)]) == 2
    assert capsys.readouterr().err == f"mhaplug.compare: error: {summary}: {message}\n"


@pytest.mark.parametrize("step", ["inf", "1e400", "nan", "9.5"])
@pytest.mark.parametrize("finished", [True, False])
def test_a_metrics_step_that_is_no_whole_number_names_file_line_and_value(
    make_run: Callable[..., Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], step: str, finished: bool
) -> None:
    """A finished run's curves are read for the plot; an unfinished run's metrics.csv gives its last step."""
    run_dir = make_run(tmp_path, "0", summary=finished)
    metrics = run_dir / "csv" / "version_0" / "metrics.csv"
    metrics.write_text(metrics.read_text().replace("0,99,5.2,", f"0,{step},5.2,"))
    options = ["--plot", str(tmp_path / "p.png")] if finished else []
    assert compare.main([str(tmp_path), *options]) == 2
    assert capsys.readouterr().err == (
        f"mhaplug.compare: error: {metrics}, line 4: step must be a whole number, got {step!r}\n"
    )
    assert not (tmp_path / "p.png").exists()


def test_a_metrics_value_that_is_no_number_names_file_line_and_column(
    make_run: Callable[..., Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = make_run(tmp_path, "0")
    metrics = run_dir / "csv" / "version_0" / "metrics.csv"
    metrics.write_text(metrics.read_text().replace(",5.5,244.7", ",low,244.7"))
    assert compare.main([str(tmp_path), "--plot", str(tmp_path / "p.png")]) == 2
    assert capsys.readouterr().err == (
        f"mhaplug.compare: error: {metrics}, line 3: val/loss must be a number, got 'low'\n"
    )


def test_a_lone_valid_run_with_a_nan_final_val_loss_diverged(
    make_run: Callable[..., Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """train/loss stayed finite (no "diverged" status), but validation gave NaN: the run failed, as one whose
    train/loss went NaN, and compare says so and exits 1."""
    make_run(tmp_path, "0", final_val_loss=float("nan"))
    findings = check_equivalence(load_runs(tmp_path))
    assert [(f.status, f.message) for f in findings] == [("diverged", "DIVERGED: final val/loss nan")]
    assert compare.main([str(tmp_path)]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[2] == (
        "  1  merged_bool  padded  right    random          nan       1,000     1.00x  37.5%  pass   DIVERGED, val nan"
    )
    assert lines[-3:] == [
        "equivalence: no two valid runs share an equivalence_key; nothing to compare",
        "mask audit: 1 valid run(s) passed",
        "DIVERGED: 1 valid run(s) finished with a NaN or inf final val/loss: 1 (nan)",
    ]


def test_an_invalid_run_with_a_nan_final_val_loss_is_no_failure(make_run: Callable[..., Path], tmp_path: Path) -> None:
    make_run(tmp_path, "0", strategy="reference", final=5.0)
    make_run(tmp_path, "1", strategy="torch_mha", valid=False, final_val_loss=float("nan"))
    findings = check_equivalence(load_runs(tmp_path))
    assert [f.status for f in findings] == ["alone", "divergence"]
    assert compare.main([str(tmp_path)]) == 0


def test_runs_with_a_null_equivalence_key_are_not_compared(
    make_run: Callable[..., Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A null key says "not comparable": two such runs are no group, whatever their losses."""
    make_run(tmp_path, "0", strategy="reference", final=5.0, equivalence_key=None)
    make_run(tmp_path, "1", strategy="merged_bool", final=6.0, equivalence_key=None)
    make_run(tmp_path, "2", strategy="causal_only", final=7.0, valid=False, equivalence_key=None)
    runs = load_runs(tmp_path)
    assert [r.equivalence_key for r in runs] == [None, None, None]
    assert [(f.status, f.message) for f in check_equivalence(runs)] == [
        ("no_key", "not compared: equivalence_key is null"),
        ("no_key", "not compared: equivalence_key is null"),
        ("invalid_alone", "invalid (no valid run with its equivalence_key)"),
    ]
    assert compare.main([str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("  ")[-1].strip() for line in lines[2:5]] == ["invalid, alone", "not compared", "not compared"]
    assert lines[-4:] == [
        "equivalence: no two valid runs share an equivalence_key; nothing to compare",
        "2 valid run(s) with a null equivalence_key, not compared: 2, 3",
        "mask audit: 2 valid run(s) passed",
        "1 invalid run(s) kept for teaching (valid=false), never a failure: 1",
    ]
