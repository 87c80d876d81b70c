"""The package installs as `compodistill` + `compodistill.kernels`, never a top-level `kernels`."""
from __future__ import annotations

import importlib.metadata
import json
import subprocess
import sys
from pathlib import Path

import compodistill


def test_kernels_subpackage_imports():
    import compodistill.kernels as kernels

    assert Path(kernels.__file__).parent.name == "kernels"
    assert kernels.__name__ == "compodistill.kernels"


def _in_an_environment(path: Path) -> bool:
    """Inside this interpreter's virtualenv or site-packages (a `.venv` in the checkout too)."""
    import site

    roots = {Path(sys.prefix), Path(sys.base_prefix), *map(Path, site.getsitepackages())}
    return any(path.is_relative_to(r.resolve()) for r in roots)


def test_no_top_level_kernels_module_is_ours(tmp_path):
    # From an empty folder, and from the repository root, which `python -m pytest` and
    # `python -c` put on sys.path: a `kernels` folder of ours there would shadow Hugging
    # Face's `kernels` package, which transformers (5.25+) imports. Hugging Face's own copy,
    # installed into a `.venv` inside the checkout, is not ours.
    code = ("import importlib.util, json; s = importlib.util.find_spec('kernels'); "
            "print(json.dumps(None if s is None else s.origin))")
    repo = Path(compodistill.__file__).resolve().parent.parent
    for cwd in (tmp_path, repo):
        out = json.loads(subprocess.run([sys.executable, "-c", code], cwd=cwd,
                                        capture_output=True, text=True, check=True).stdout)
        if out is None:
            continue
        origin = Path(out).resolve()
        ours = origin.is_relative_to(repo) and not _in_an_environment(origin)
        assert not ours, f"a top-level `kernels` of this repository resolves to {origin}"


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
    assert compodistill.CompoDistillTrainer.__name__ == "CompoDistillTrainer"


def test_trainer_name_is_not_trls():
    # TRL ships `DistillationTrainer`; ours has its own name and no alias (nothing released).
    assert not hasattr(compodistill, "DistillationTrainer")
    import compodistill.train.trainer as trainer

    assert not hasattr(trainer, "DistillationTrainer")


ALIASES = ["compodistill.losses", "compodistill.map_losses", "compodistill.layout",
           "compodistill.logit_losses", "compodistill.linear_kd", "compodistill._memory",
           "compodistill.testing.reference", "compodistill.testing.reference_logits"]


def test_every_module_imports_without_our_deprecation_warnings(tmp_path):
    # Every module of the package imports cleanly with our own deprecation warnings as errors.
    import pkgutil

    names = sorted(m.name for m in pkgutil.walk_packages(compodistill.__path__, "compodistill.")
                   if not m.name.endswith(".report"))
    code = "import importlib\n" + "".join(f"importlib.import_module({n!r})\n" for n in names)
    done = subprocess.run([sys.executable, "-W", "error:compodistill:DeprecationWarning", "-c",
                           code], cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]


def test_old_alias_modules_are_gone():
    # The library was never released under the old paths: no alias module remains.
    import importlib.util

    for old in ALIASES:
        assert importlib.util.find_spec(old) is None, f"{old} still exists"
