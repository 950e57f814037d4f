"""Run PyTorch's own ``test/nn/test_multihead_attention.py`` (or ``test/test_transformers.py``) against
``mhaplug.MultiheadAttention``.

The test file is run twice (and once more per extra strategy) with pytest, each run in its own subprocess:

1. **stock**: as torch ships it, against ``torch.nn.MultiheadAttention``;
2. **mhaplug <strategy>**: with ``torch.nn.MultiheadAttention`` replaced, before the test file is imported, by a
   subclass of ``mhaplug.MultiheadAttention`` whose ``strategy`` defaults to the one asked for. The replacement
   is made in every loaded module that holds torch's class under any name (``torch.nn``, ``torch.nn.modules``,
   ``torch.nn.modules.activation``, ``torch.nn.modules.transformer`` ...; mhaplug's own modules excepted), so
   the test file's ``from torch.nn import MultiheadAttention``, its ``torch.nn.MultiheadAttention(...)`` and
   ``nn.TransformerEncoderLayer``'s ``self_attn`` all build mhaplug's layer. The swap is a small pytest plugin
   written to a temporary folder and loaded with ``-p``; the same plugin, with the swap off, records the
   stock run's outcomes.
3. with ``--relax-errors``, **mhaplug <strategy>, errors relaxed**: as 2., but where a test expects torch's
   ``AssertionError`` with given words, mhaplug's ``ValueError``/``TypeError``/... pass too and are listed, which
   shows whether mhaplug rejects every input torch rejects.

The Markdown report (``benchmarks/results/torch-mha-tests-<device>.md``, or ``torch-transformers-tests-<device>.md``
for ``test_transformers.py``: :data:`REPORT_NAMES`) has the pass/fail/skip counts of each
run, a table per strategy of every test whose outcome differs from the stock run (with the first line of the
failure and a reviewed note where one applies), and a coverage table: how often each test called the layer's
``forward`` under mhaplug, and which tests call ``F.multi_head_attention_forward`` or touch
``torch._native_multi_head_attention`` themselves, so they never exercise the layer's ``forward`` at all.

Getting the test file (it is torch's code: keep it OUT of this repository, e.g. in /tmp/torch_tests/). It is
``test/nn/test_multihead_attention.py`` in the pytorch/pytorch repository on GitHub, at the tag of the installed
torch: ``v2.13.0`` for torch 2.13.0 (``v<major>.<minor>.<patch>`` for a release; for a nightly, the commit that
``python -c "import torch; print(torch.version.git_version)"`` prints), e.g. saved from the file's raw view
on GitHub at that tag. Say where it came from with ``--source``. It imports helpers from
``torch.testing._internal``, which ship with the torch wheel and need ``expecttest`` (and ``numpy``):
``pip install expecttest``, or ``pip install --target DIR expecttest`` and ``--extra-path DIR`` to leave the
environment as it is.

``test/test_transformers.py`` (the ``nn.Transformer*`` and ``nn.MultiheadAttention`` tests of class
``TestTransformers``, then the SDPA classes, which call ``F.scaled_dot_product_attention`` themselves) comes from the
same place. It imports ``remove_build_path`` and ``generate_faked_module`` from torch's
``test/test_cpp_extensions_open_device_registration.py`` (used only by ``TestSDPAPrivateUse1Only``, which builds a
C++ extension): save that file beside it, or a stub module of that name with the two functions, in a folder given
with ``--extra-path``. The whole file is long on a CPU; ``--pytest-args -k TestTransformers`` keeps the class that
builds the layer.

Run from the repository root::

    python benchmarks/torch_mha_tests.py /tmp/torch_tests/test_multihead_attention.py
    python benchmarks/torch_mha_tests.py TEST_FILE --strategy merged_bool causal_kpm reference auto
    python benchmarks/torch_mha_tests.py TEST_FILE --extra-path /tmp/torch_tests/site --out /tmp/mha.md
    python benchmarks/torch_mha_tests.py TEST_FILE --relax-errors --source "pytorch/pytorch v2.13.0"
    python benchmarks/torch_mha_tests.py /tmp/torch_tests/test_transformers.py --strategy auto torch_mha \
        --extra-path /tmp/torch_tests/site --extra-path /tmp/torch_tests/stub --pytest-args -k TestTransformers

``--strategy`` defaults to the layer's own default (read from ``mhaplug.MultiheadAttention.__init__``) and takes
any name in ``mhaplug.STRATEGIES``; several names run one after another, one subprocess at a time, and share one
stock run and one report. Exit status 0 whatever the outcomes (this is a review, not a gate); 2 when a pytest
run could not collect the file at all.
"""

from __future__ import annotations

import argparse
import ast
import datetime
import hashlib
import inspect
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from _report import device_slug, markdown_table, write_report  # benchmarks/_report.py

import mhaplug

REPO = Path(__file__).resolve().parent.parent
PLUGIN = "_mhaplug_torch_mha_swap"
# The report's file name (before -<device>.md) per torch test file; any other file: torch-<stem>-tests
REPORT_NAMES = {"test_multihead_attention.py": "torch-mha-tests", "test_transformers.py": "torch-transformers-tests"}
OUTCOMES = ("passed", "failed", "error", "skipped", "xfailed", "xpassed")

# The pytest plugin, written to a temporary folder and loaded with `-p`. Environment: MHAPLUG_SWAP_STRATEGY
# (empty = stock run, no swap), MHAPLUG_SWAP_RESULTS (JSON file written at the end of the session).
PLUGIN_SOURCE = '''
"""pytest plugin (written by benchmarks/torch_mha_tests.py): swap torch.nn.MultiheadAttention, record outcomes."""
import json
import os
import sys

STRATEGY = os.environ.get("MHAPLUG_SWAP_STRATEGY") or None
RESULTS = os.environ["MHAPLUG_SWAP_RESULTS"]
_tests = {}
_now = {"built": 0, "forward_calls": 0, "dispatch": set(), "relaxed": []}
_replaced = []


def _swap(strategy):
    import torch
    import mhaplug

    original = torch.nn.MultiheadAttention

    class MultiheadAttention(mhaplug.MultiheadAttention):
        """mhaplug's layer, by default with the strategy asked for, standing in for torch.nn.MultiheadAttention."""

        def __init__(self, *args, **kwargs):
            kwargs.setdefault("strategy", strategy)
            super().__init__(*args, **kwargs)
            _now["built"] += 1

        def forward(self, *args, **kwargs):
            if not torch.compiler.is_compiling():  # no side effects inside a traced graph
                _now["forward_calls"] += 1
            out = super().forward(*args, **kwargs)
            if not torch.compiler.is_compiling():
                _now["dispatch"].add(str(self.last_dispatch))
            return out

    for name, module in list(sys.modules.items()):
        if module is None or name.split(".")[0] == "mhaplug" or name == __name__:
            continue
        try:
            namespace = vars(module)
        except TypeError:
            continue
        for attr, value in list(namespace.items()):
            if value is original:
                setattr(module, attr, MultiheadAttention)
                _replaced.append(f"{name}.{attr}")


if STRATEGY:
    _swap(STRATEGY)


class _AnyError:
    """assertRaisesRegex(AssertionError, regex) that also takes ValueError, TypeError, RuntimeError or
    NotImplementedError with any message, and records what was raised instead of torch's AssertionError."""

    TAKEN = (AssertionError, ValueError, TypeError, RuntimeError, NotImplementedError)

    def __init__(self, test, regex):
        self.test, self.regex = test, regex

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        import re

        if exc_type is None:
            raise self.test.failureException(f"nothing raised; torch raises AssertionError matching {self.regex!r}")
        if not issubclass(exc_type, self.TAKEN):
            return False
        text = (str(exc).strip().splitlines() or [""])[0]
        if not (exc_type is AssertionError and re.search(self.regex, str(exc))):
            _now["relaxed"].append({"expected": str(self.regex), "got": f"{exc_type.__name__}: {text}"})
        return True


if os.environ.get("MHAPLUG_SWAP_RELAX_ERRORS"):
    import unittest
    from torch.testing._internal import common_utils

    def _relaxed(original):
        def assertRaisesRegex(self, expected_exception, expected_regex, *args, **kwargs):
            if expected_exception is AssertionError and not args and not kwargs:
                return _AnyError(self, expected_regex)
            return original(self, expected_exception, expected_regex, *args, **kwargs)

        return assertRaisesRegex

    for _case in (unittest.TestCase, common_utils.TestCase):
        _case.assertRaisesRegex = _relaxed(_case.assertRaisesRegex)


def _message(report):
    if report.skipped:
        longrepr = report.longrepr
        reason = longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)
        return reason.removeprefix("Skipped: ")
    crash = getattr(report.longrepr, "reprcrash", None)
    text = crash.message if crash is not None else str(report.longrepr)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    first = lines[0] if lines else ""
    # torch's "not close" says by how much; dynamo's "Unsupported: Observed exception" says which exception
    extra = [line for line in lines[1:] if line.startswith(("Greatest absolute difference", "Developer debug context"))]
    return first + (" (" + extra[0] + ")" if extra else "")


def pytest_runtest_setup(item):
    _now["built"], _now["forward_calls"], _now["dispatch"], _now["relaxed"] = 0, 0, set(), []


def pytest_runtest_logreport(report):
    entry = _tests.setdefault(report.nodeid, {"outcome": "passed", "message": "", "when": ""})
    if report.when == "teardown":
        entry.update(built=_now["built"], forward_calls=_now["forward_calls"], dispatch=sorted(_now["dispatch"]))
        entry["relaxed"] = list(_now["relaxed"])
    if entry["outcome"] != "passed":
        return  # keep the first thing that went wrong (setup, call or teardown)
    if hasattr(report, "wasxfail"):
        outcome = "xfailed" if report.skipped else "xpassed"
    elif report.failed:
        outcome = "failed" if report.when == "call" else "error"
    elif report.skipped:
        outcome = "skipped"
    else:
        outcome = "passed"
    if outcome != "passed":
        entry.update(outcome=outcome, message=_message(report), when=report.when)


def pytest_collectreport(report):
    if report.failed:
        _tests["<collection>"] = {"outcome": "error", "message": _message(report), "when": "collect"}


def pytest_sessionfinish(session, exitstatus):
    with open(RESULTS, "w") as f:
        json.dump({"strategy": STRATEGY, "replaced": _replaced, "exitstatus": int(exitstatus), "tests": _tests}, f)
'''

# Why a test's outcome differs, from reading the test (torch 2.13's files) and mhaplug's DESIGN.md: (a) a difference
# mhaplug makes on purpose, (b) the test inspects torch's internals, (c) a bug in mhaplug. A row of the report
# gets the first note whose test name (None: any) and failure-message pattern both match; a row none matches is
# new and needs reading. Recheck these when the test file or mhaplug changes.
REVIEWED: list[tuple[str | None, str, str]] = [
    (
        None,
        r"needs is_causal=True",
        (
            "(a) DESIGN section 4: causal_kpm / causal_only serve causal self-attention only and raise for a call "
            "without is_causal=True (under torch.compile the ValueError surfaces as dynamo's 'Observed exception'); "
            "`auto` serves such calls"
        ),
    ),
    (
        "test_multihead_attn_invalid_shape",
        r"^(ValueError|TypeError)",
        (
            "(b) asserts torch's AssertionError texts; mhaplug rejects every one of these inputs, with a ValueError "
            "that names the argument and the shapes it takes (see the errors-relaxed run)"
        ),
    ),
    (
        "test_multihead_attn_fast_path_invalid_shape",
        r"^(ValueError|TypeError)",
        (
            "(b) as test_multihead_attn_invalid_shape: torch's AssertionError texts; mhaplug raises a ValueError "
            "for each input"
        ),
    ),
    (
        "test_multihead_self_attn_two_masks_fast_path_mock",
        r"False is not true",
        (
            "(b) mocks torch._native_multi_head_attention and asserts torch's eval fast path was taken; mhaplug has "
            "no separate inference kernel: eval and training take the same path, so they cannot disagree "
            "(DESIGN section 8)"
        ),
    ),
    (
        "test_multihead_attn_fast_path_query_and_bias_have_different_dtypes",
        r"must have the same dtype",
        (
            "(b) checks torch's fast-path gate with a float16 in_proj_bias on float64 weights; torch's slow path "
            "survives only because batch_first=True hands F.linear a transposed input (torch raises this same "
            "error with batch_first=False); mhaplug's projection raises it"
        ),
    ),
    # test_transformers.py
    (
        "test_mask_check_fastpath",
        r"False is not true",
        (
            "(b) mocks torch._transformer_encoder_layer_fwd and asserts nn.TransformerEncoderLayer's fast-path "
            "kernel ran, on nested and on padded input; mhaplug's no-op pre-hook keeps every layer on mhaplug's "
            "forward on purpose (eval computes what training does, no NaN rows). The nested tensors the encoder "
            "makes are served: the enable_nested_tensor_True tests with a padding mask pass"
        ),
    ),
    (
        "test_disable_fastpath",
        r"False is not true",
        (
            "(b) mocks torch._transformer_encoder_layer_fwd and torch._native_multi_head_attention and asserts "
            "they are called while the fast path is enabled; mhaplug's layer never hands the call to them"
        ),
    ),
    (
        None,
        r"does not support torch.jit.script",
        (
            "(a) mhaplug.MultiheadAttention refuses torch.jit.script at once, by name (its strategies dispatch in "
            "Python; the class docstring); torch.compile and torch.export work"
        ),
    ),
    (
        "test_train_with_is_causal",
        r"RuntimeError not raised",
        (
            "(a) DESIGN section 3: is_causal=True without an attn_mask means 'apply a causal mask' in mhaplug; the "
            "test asserts torch's RuntimeError for that call"
        ),
    ),
    (
        "test_multiheadattention_fastpath_attn_mask",
        r"difference: nan",
        (
            "(a) fails in torch itself: random bool masks leave some query rows nothing to attend, torch's eval "
            "fast path gives NaN there and its training path does not; mhaplug gives both the same 0 rows "
            "(DESIGN section 3). torch_mha keeps torch's behaviour, so it fails as stock does"
        ),
    ),
]

# What a test's source (with the helpers it calls through self.) says about what it exercises.
SOURCE_FLAGS = {
    "calls F.multi_head_attention_forward": "multi_head_attention_forward(",
    "patches/needs torch._native_multi_head_attention (fast path)": "_native_multi_head_attention",
    "patches torch._transformer_encoder_layer_fwd (encoder layer fast path)": "_transformer_encoder_layer_fwd",
    "nested tensors": "torch.nested",
    "torch.compile": "torch.compile(",
    "torch.jit": "torch.jit.",
    "nn.Transformer* layer": "nn.Transformer",
    "checks warnings": "assertWarns",
    "asserts error messages": "assertRaisesRegex(",
}


def reviewed_note(test: str, message: str) -> str:
    for name, pattern, note in REVIEWED:
        if name in (None, test) and re.search(pattern, message):
            return note
    return "not reviewed: read the test"


def default_strategy() -> str:
    """The layer's own default ``strategy``, read from its signature (it may change between versions)."""
    return str(inspect.signature(mhaplug.MultiheadAttention.__init__).parameters["strategy"].default)


def source_flags(test_file: Path) -> dict[str, list[str]]:
    """For each test function of the file: which of SOURCE_FLAGS its source (and self._helpers it calls) has."""
    tree = ast.parse(test_file.read_text())
    flags: dict[str, list[str]] = {}
    for cls in (node for node in tree.body if isinstance(node, ast.ClassDef)):
        methods = {f.name: f for f in cls.body if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))}
        for name, func in methods.items():
            if not name.startswith("test"):
                continue
            seen, todo, text = {name}, [func], []
            while todo:
                node = todo.pop()
                text.append(ast.unparse(node))
                for sub in ast.walk(node):
                    helper = sub.attr if isinstance(sub, ast.Attribute) and isinstance(sub.value, ast.Name) else None
                    is_self = helper is not None and sub.value.id == "self"  # type: ignore[attr-defined]
                    if is_self and helper in methods and helper not in seen:
                        seen.add(helper)
                        todo.append(methods[helper])
            source = "\n".join(text)
            flags[name] = [flag for flag, needle in SOURCE_FLAGS.items() if needle in source]
    return flags


def source_name(test_id: str, names: list[str]) -> str:
    """The test function a pytest id comes from (ids carry parametrisation, device and dtype suffixes)."""
    func = test_id.split("::")[-1]
    matches = [name for name in names if func == name or func.startswith(name + "_")]
    return max(matches, key=len) if matches else func


def short_id(nodeid: str) -> str:
    """``Class::test`` without the file path."""
    return "::".join(nodeid.split("::")[1:]) or nodeid


def run_pytest(
    test_file: Path, strategy: str | None, relax: bool, args: argparse.Namespace, workdir: Path
) -> dict[str, Any]:
    """One pytest subprocess over the test file; returns the plugin's JSON (outcomes, swapped names)."""
    label = (strategy or "stock") + ("-relaxed" if relax else "")
    results = workdir / f"results-{label}.json"
    log = workdir / f"pytest-{label}.log"
    env = dict(os.environ)
    paths = [str(workdir), str(REPO), *args.extra_path, env.get("PYTHONPATH", "")]
    env.update(
        PYTHONPATH=os.pathsep.join(p for p in paths if p),
        MHAPLUG_SWAP_STRATEGY=strategy or "",
        MHAPLUG_SWAP_RESULTS=str(results),
        MHAPLUG_SWAP_RELAX_ERRORS="1" if relax else "",
        PYTORCH_PRINT_REPRO_ON_FAILURE="0",
        OMP_NUM_THREADS=str(args.threads),
        MKL_NUM_THREADS=str(args.threads),
        TORCHINDUCTOR_COMPILE_THREADS="1",
    )
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        str(test_file),
        "-p",
        PLUGIN,
        "-p",
        "no:cacheprovider",
        "-q",
        "-c",
        str(workdir / "pytest.ini"),
        "--rootdir",
        str(test_file.parent),
        *args.pytest_args,
    ]
    print(f"[{label}] {shlex.join(cmd)}", flush=True)
    start = time.perf_counter()
    with log.open("w") as out:
        proc = subprocess.run(
            cmd, cwd=workdir, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=args.timeout, check=False
        )
    seconds = time.perf_counter() - start
    tail = log.read_text().strip().splitlines()[-1:] or ["(no output)"]
    print(f"[{label}] exit {proc.returncode} in {seconds:.0f} s: {tail[0]}", flush=True)
    if not results.exists():
        sys.exit(f"pytest wrote no results for {label}; its output is in {log}:\n{log.read_text()[-3000:]}")
    data = json.loads(results.read_text())
    data.update(seconds=seconds, returncode=proc.returncode, log=str(log), relaxed=relax)
    return data


def counts(run: dict[str, Any]) -> dict[str, int]:
    found = {outcome: 0 for outcome in OUTCOMES}
    for entry in run["tests"].values():
        found[entry["outcome"]] += 1
    return found


def escape(text: str, limit: int = 220) -> str:
    text = " ".join(text.split()).replace("|", "\\|")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def outcome_text(entry: dict[str, Any] | None) -> str:
    if entry is None:
        return "not run"
    return entry["outcome"] + (f" ({entry['when']})" if entry["outcome"] == "error" else "")


def differing(stock: dict[str, Any], run: dict[str, Any], names: list[str], title: str) -> list[str]:
    """A table of the tests whose outcome in ``run`` is not the stock run's."""
    rows = differing_rows(stock, run, names)
    if not rows:
        return ["No test's outcome differs from the stock run."]
    return [markdown_table(["test", "stock", title, "first line of the failure", "reviewed note"], rows)]


def differing_rows(stock: dict[str, Any], run: dict[str, Any], names: list[str]) -> list[list[str]]:
    rows = []
    for nodeid in sorted(set(stock["tests"]) | set(run["tests"])):
        before, after = stock["tests"].get(nodeid), run["tests"].get(nodeid)
        if before is not None and after is not None and before["outcome"] == after["outcome"]:
            continue
        message = (after or {}).get("message") or (before or {}).get("message", "")
        note = reviewed_note(source_name(nodeid, names), message)
        rows.append([f"`{short_id(nodeid)}`", outcome_text(before), outcome_text(after), escape(message), note])
    return rows


def build_report(
    test_file: Path,
    stock: dict[str, Any],
    runs: dict[str, dict[str, Any]],
    relaxed: dict[str, dict[str, Any]],
    args: argparse.Namespace,
) -> list[str]:
    flags = source_flags(test_file)
    names = list(flags)
    digest = hashlib.sha256(test_file.read_bytes()).hexdigest()[:12]
    slug = device_slug(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    swapped = sorted({name for run in runs.values() for name in run["replaced"]})
    lines = [
        f"# torch's {test_file.name} against mhaplug.MultiheadAttention",
        "",
        f"- command: `python {shlex.join(sys.argv)}`",
        (
            f"- torch {torch.__version__} (git {torch.version.git_version[:12]}), mhaplug {mhaplug.__version__}, "
            f"device `{slug}`, {args.threads} thread(s) per run; "
            f"date {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}"
        ),
        f"- test file: `{test_file.name}` ({test_file.stat().st_size:,} bytes, sha256 {digest}...)"
        + (f", from {args.source}" if args.source else "")
        + "; torch's own code, not in this repository (the script's docstring says where to get it)",
        f"- layer default strategy: `{default_strategy()}`; strategies run: " + ", ".join(f"`{s}`" for s in runs),
        "- each run is one `pytest` subprocess over the whole file. mhaplug runs: torch's class replaced, before the "
        "test file is imported, by a subclass of `mhaplug.MultiheadAttention` with that default strategy, under "
        "these names: " + ", ".join(f"`{n}`" for n in swapped),
    ]
    lines += [f"- note: {note}" for note in args.note]
    if relaxed:
        lines += [
            (
                "- *errors relaxed* runs: the same, but where a test expects torch's `AssertionError` with a given "
                "message, any `ValueError`, `TypeError`, `RuntimeError` or `NotImplementedError` also passes (and is "
                "listed below): does mhaplug reject every input torch rejects, whatever its words?"
            ),
        ]
    lines += ["", "## Counts", ""]
    labelled = {"stock torch.nn.MultiheadAttention": stock}
    for strategy, run in runs.items():
        labelled[f"mhaplug `{strategy}`"] = run
        if strategy in relaxed:
            labelled[f"mhaplug `{strategy}`, errors relaxed"] = relaxed[strategy]
    rows = []
    for label, run in labelled.items():
        found = counts(run)
        cells = [str(found[o]) for o in ("passed", "failed", "error", "skipped")]
        kinds = [
            note[:3] if note[:3] in ("(a)", "(b)", "(c)") else "new" for *_, note in differing_rows(stock, run, names)
        ]
        summary = ", ".join(f"{kinds.count(k)} {k}" for k in ("(a)", "(b)", "(c)", "new") if kinds.count(k)) or "-"
        rows.append(
            [label, *cells, str(len(run["tests"])), summary if run is not stock else "", f"{run['seconds']:.0f}"]
        )
    header = ["run", "passed", "failed", "errors", "skipped", "tests", "outcomes differing from stock", "seconds"]
    lines += [markdown_table(header, rows)]
    lines += [
        "",
        (
            "Skips are torch's own (CUDA-only tests on a CPU machine); tests failing in the stock run too are listed "
            "in the coverage table, not below."
        ),
    ]
    for strategy, run in runs.items():
        lines += ["", f"## Outcomes that differ from stock: mhaplug `{strategy}`", ""]
        lines += differing(stock, run, names, f"mhaplug {strategy}")
        if strategy in relaxed:
            lines += ["", f"With error checks relaxed (`{strategy}`):", ""]
            lines += differing(stock, relaxed[strategy], names, f"mhaplug {strategy}, relaxed")
    if relaxed:
        lines += ["", "## Inputs torch rejects with an AssertionError, and what mhaplug raises", ""]
        seen: dict[tuple[str, str, str], list[str]] = {}
        for strategy, run in relaxed.items():
            for nodeid, entry in sorted(run["tests"].items()):
                for item in entry.get("relaxed", []):
                    found = seen.setdefault((short_id(nodeid), item["expected"], item["got"]), [])
                    found += [] if strategy in found else [strategy]
        rows = [
            [f"`{test}`", escape(expected, 120), escape(got, 200), ", ".join(strategies)]
            for (test, expected, got), strategies in seen.items()
        ]
        lines += [
            markdown_table(["test", "torch: AssertionError matching", "mhaplug raises", "strategies"], rows)
            if rows
            else "None: every expected AssertionError came from torch itself."
        ]
    lines += [
        "",
        "## Coverage: what each test exercises",
        "",
        (
            "Layers built / forward calls: mhaplug layers constructed and calls of their `forward` in that test "
            "(eager calls; calls traced by `torch.compile` are not counted), with what served the calls "
            "(`last_dispatch`). A test with 0 calls never ran the layer's forward: it builds the module and calls "
            "`F.multi_head_attention_forward` on its weights, checks construction only, or failed before its first "
            "call. From the test's source: what it calls or checks itself."
        ),
        "",
    ]
    header = ["test", "stock", *(f"`{s}`: layers built / forward calls (dispatch)" for s in runs), "from the source"]
    rows = []
    for nodeid in sorted(stock["tests"]):
        calls = []
        for run in runs.values():
            entry = run["tests"].get(nodeid, {})
            dispatch = ", ".join(entry.get("dispatch", []))
            calls.append(
                f"{entry.get('built', 0)} / {entry.get('forward_calls', 0)}" + (f" ({dispatch})" if dispatch else "")
            )
        stock_entry = stock["tests"][nodeid]
        stock_text = outcome_text(stock_entry)
        if stock_entry["outcome"] == "failed":
            stock_text += ": " + escape(stock_entry["message"], 120)
        rows.append([f"`{short_id(nodeid)}`", stock_text, *calls, ", ".join(flags.get(source_name(nodeid, names), []))])
    lines += [markdown_table(header, rows)]
    return lines


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "test_file",
        type=Path,
        help="torch's test/nn/test_multihead_attention.py or test/test_transformers.py (see the docstring)",
    )
    parser.add_argument(
        "--strategy",
        nargs="+",
        choices=mhaplug.STRATEGIES,
        default=None,
        metavar="NAME",
        help=f"mhaplug strategies to run, one after another (default: the layer's default, {default_strategy()!r}); "
        f"any of {', '.join(mhaplug.STRATEGIES)}",
    )
    parser.add_argument(
        "--relax-errors",
        action="store_true",
        help="one more run per strategy where torch's expected AssertionError may be any ValueError, "
        "TypeError, RuntimeError or NotImplementedError (lists what mhaplug raised instead)",
    )
    parser.add_argument(
        "--source", default="", help="where the test file came from (repository, tag or commit), for the report"
    )
    parser.add_argument(
        "--note", action="append", default=[], metavar="TEXT", help="a line for the report's header (repeatable)"
    )
    parser.add_argument(
        "--out", type=Path, help="Markdown file (default benchmarks/results/<REPORT_NAMES>-<device>.md)"
    )
    parser.add_argument(
        "--extra-path",
        action="append",
        default=[],
        metavar="DIR",
        help="prepend DIR to the subprocesses' PYTHONPATH (e.g. where expecttest was installed)",
    )
    parser.add_argument("--threads", type=int, default=1, help="OMP/MKL threads per pytest run (default 1)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per pytest run (default 1800)")
    parser.add_argument("--keep", type=Path, metavar="DIR", help="keep the plugin, JSON results and pytest logs in DIR")
    parser.add_argument("--pytest-args", nargs=argparse.REMAINDER, default=[], help="passed on to pytest (last)")
    args = parser.parse_args(argv)
    args.strategy = list(dict.fromkeys(args.strategy or [default_strategy()]))
    args.test_file = args.test_file.resolve()
    if not args.test_file.is_file():
        parser.error(f"{args.test_file} is not a file; see the docstring for where to get torch's test file")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    slug = device_slug(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    name = REPORT_NAMES.get(args.test_file.name, f"torch-{args.test_file.stem.removeprefix('test_')}-tests")
    out_path = args.out or Path(__file__).resolve().parent / "results" / f"{name}-{slug}.md"
    with tempfile.TemporaryDirectory(prefix="mhaplug-torch-tests-") as tmp:
        workdir = args.keep.resolve() if args.keep else Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / f"{PLUGIN}.py").write_text(PLUGIN_SOURCE.lstrip())
        (workdir / "pytest.ini").write_text("[pytest]\n")  # none of this repository's pytest settings
        stock = run_pytest(args.test_file, None, False, args, workdir)
        runs, relaxed = {}, {}
        for strategy in args.strategy:  # one subprocess at a time
            runs[strategy] = run_pytest(args.test_file, strategy, False, args, workdir)
            if args.relax_errors:
                relaxed[strategy] = run_pytest(args.test_file, strategy, True, args, workdir)
        lines = build_report(args.test_file, stock, runs, relaxed, args)
    print("\n".join(lines))
    write_report(out_path, lines)
    if any("<collection>" in run["tests"] for run in (stock, *runs.values(), *relaxed.values())):
        sys.exit(2)


if __name__ == "__main__":
    main()
