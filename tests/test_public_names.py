"""The public names: each is one object, whatever has been imported before or after it, and no face shares a name
with a submodule (where ``mhaplug.audit`` was the function on first access and the module afterwards)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FACES = ("mhaplug", "mhaplug.attention", "mhaplug.data", "mhaplug.training", "mhaplug.reporting")

# In a fresh interpreter: every face's public names as first met (after importing only the face), then again after
# importing every module of the package, in the order pkgutil walks them.
PROBE = f"""
import importlib, json, pkgutil

def names():
    found = {{}}
    for face in {FACES!r}:
        module = importlib.import_module(face)
        for name in getattr(module, "__all__", ()):
            value = getattr(module, name)
            found[f"{{face}}.{{name}}"] = [id(value), type(value).__name__, getattr(value, "__module__", None)]
    return found

before = names()
import mhaplug
modules = [info.name for info in pkgutil.walk_packages(mhaplug.__path__, "mhaplug.")]
for name in modules:
    importlib.import_module(name)
after = names()
print(json.dumps({{"before": before, "after": after, "modules": modules}}))
"""


@pytest.fixture(scope="module")
def probe() -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.splitlines()[-1])


def test_every_public_name_is_the_same_object_before_and_after_importing_every_submodule(probe: dict) -> None:
    assert probe["after"] == probe["before"]
    # What users and tests rely on (../shared/DESIGN.md, section 5), by kind: a class, a function, a table.
    kinds = {
        name.removeprefix("mhaplug."): kind for name, (_, kind, _) in probe["after"].items() if name.count(".") == 1
    }
    assert kinds == {
        "STRATEGIES": "tuple",
        "DecoderLM": "type",
        "LitDecoderLM": "type",
        "MultiheadAttention": "type",
        "PackCollator": "type",
        "PadCollator": "type",
        "TextDataModule": "type",
        "audit": "function",
        "swap_attention": "function",
    }


def test_a_face_s_names_are_defined_in_its_own_wing_and_none_is_a_submodule_s_name(probe: dict) -> None:
    for name, (_, kind, module) in probe["after"].items():
        face, public = name.rsplit(".", 1)
        assert f"{face}.{public}" not in probe["modules"], f"{name} is also a submodule"
        if kind in ("type", "function"):
            wing = face if face != "mhaplug" else "mhaplug."
            assert module.startswith(wing), f"{name} is defined in {module}, outside {face}"


def test_the_readme_s_headline_call_works_after_a_training_run_has_imported_everything() -> None:
    code = (
        "import mhaplug.training.callbacks, mhaplug.training.audit, mhaplug; "
        "print(type(mhaplug.audit).__name__, mhaplug.audit.__module__)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["function", "mhaplug.training.audit"]
