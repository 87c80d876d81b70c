"""The package installs as `compodistill` + `compodistill.kernels`, never a top-level `kernels`."""
from __future__ import annotations

import importlib.metadata
import subprocess
import sys
from pathlib import Path

import compodistill


def test_kernels_subpackage_imports():
    import compodistill.kernels as kernels

    assert Path(kernels.__file__).parent.name == "kernels"
    assert kernels.__name__ == "compodistill.kernels"


def test_no_top_level_kernels_module_is_ours(tmp_path):
    # Run from an empty folder so the repository root is not on sys.path.
    code = ("import importlib.util, json; s = importlib.util.find_spec('kernels'); "
            "print(json.dumps(None if s is None else s.origin))")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                         text=True, check=True).stdout.strip()
    repo = str(Path(compodistill.__file__).resolve().parent.parent)
    assert out == "null" or repo not in out, f"a top-level `kernels` resolves to {out}"


def test_distribution_declares_only_compodistill():
    dist = importlib.metadata.distribution("compodistill")
    text = dist.read_text("top_level.txt")
    assert text is not None, "the installed distribution has no top_level.txt"
    assert text.split() == ["compodistill"], f"top-level names: {text.split()}"


def test_public_api_is_small_and_documented():
    for name in compodistill.__all__:
        obj = getattr(compodistill, name)
        assert obj.__doc__, f"compodistill.{name} has no docstring"


def test_core_import_needs_only_torch(tmp_path):
    # The trainer and HF layer are lazy: `import compodistill` must not pull transformers.
    code = "import sys, compodistill; print('transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                         text=True, check=True).stdout.strip()
    assert out == "False"
    assert compodistill.DistillationTrainer.__name__ == "DistillationTrainer"
