"""Imports flow one way (docs/ARCHITECTURE.md): a module imports only its own layer or lower
ones, and no set of modules imports itself in a circle.

Every ``import`` counts, at module level or inside a function (a lazy import is still a
dependency); only ``if TYPE_CHECKING:`` blocks are left out, since they never run.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "compodistill"

# Lowest first. A module belongs to the layer of the longest prefix that names it.
LAYERS = (
    ("kernels", ("compodistill._backend", "compodistill.kernels")),
    ("losses", ("compodistill.visual_attention", "compodistill.logit_kd",
                "compodistill.matching", "compodistill.testing")),
    ("hf", ("compodistill.hf",)),
    ("data", ("compodistill.data", "compodistill.teacher_cache", "compodistill.integrations")),
    ("eval", ("compodistill.eval",)),
    ("train", ("compodistill.train",)),
    ("runs", ("compodistill.teacher_cache.writer", "compodistill.teacher_cache.cli")),
    ("apps", ("compodistill.apps",)),
    ("cli", ("compodistill", "compodistill.cli", "compodistill.__main__")),
)


def layer_of(module: str) -> int:
    best, rank = -1, None
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > best:
                best, rank = len(p), i
    if rank is None:
        raise AssertionError(f"{module} is in no layer: add it to LAYERS and the drawing")
    return rank


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def imports_of(path: Path, module: str, modules: set[str]) -> dict[str, int]:
    """``{imported compodistill module: line}`` for one file."""
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    found: dict[str, int] = {}

    def resolve(name: str) -> str:
        while name not in modules and "." in name:
            name = name.rsplit(".", 1)[0]
        return name

    def visit(node):
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = (".".join(package[:len(package) - node.level + 1]) if node.level else "")
            target = ".".join(p for p in (base, node.module or "") if p)
            # `from pkg import sub` imports the submodule when there is one.
            targets = [f"{target}.{a.name}" if f"{target}.{a.name}" in modules else target
                       for a in node.names]
        else:
            targets = []
        for t in targets:
            if t == "compodistill" or t.startswith("compodistill."):
                r = resolve(t)
                if r != module:
                    found.setdefault(r, node.lineno)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(), str(path)))
    return found


def import_graph(root: Path = PACKAGE) -> dict[str, dict[str, int]]:
    files = {module_name(p, root): p for p in sorted(root.rglob("*.py"))}
    return {m: imports_of(p, m, set(files)) for m, p in files.items()}


def upward_imports(graph) -> list[str]:
    return [f"{m} (layer {LAYERS[layer_of(m)][0]}, line {line}) imports {t} "
            f"(layer {LAYERS[layer_of(t)][0]})"
            for m, targets in graph.items() for t, line in targets.items()
            if layer_of(t) > layer_of(m)]


def cycles(graph) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]
    for start in graph:
        if start in index:
            continue
        work = [(start, iter(graph[start]))]
        index[start] = low[start] = counter[0]
        counter[0] += 1
        stack.append(start)
        on.add(start)
        while work:
            v, it = work[-1]
            for w in it:
                if w not in index:
                    index[w] = low[w] = counter[0]
                    counter[0] += 1
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(graph.get(w, ()))))
                    break
                if w in on:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    scc = []
                    while True:
                        w = stack.pop()
                        on.discard(w)
                        scc.append(w)
                        if w == v:
                            break
                    if len(scc) > 1:
                        out.append(sorted(scc))
    return out


def test_every_module_has_a_layer():
    for m in import_graph():
        layer_of(m)


def test_no_import_goes_up_a_layer():
    bad = upward_imports(import_graph())
    assert not bad, "imports against the layer order:\n" + "\n".join(bad)


def test_no_import_cycle():
    found = cycles(import_graph())
    assert not found, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in found)


@pytest.fixture
def planted(tmp_path):
    """A copy of the package with one planted import: data imports the trainer."""
    import shutil

    copy = tmp_path / "compodistill"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    return copy


def test_a_planted_upward_import_is_caught(planted):
    target = planted / "data" / "records.py"
    target.write_text(target.read_text() + "\n\ndef _planted():\n"
                      "    from ..train.trainer import CompoDistillTrainer  # noqa: F401\n")
    bad = upward_imports(import_graph(planted))
    assert any(b.startswith("compodistill.data.records ") and "compodistill.train.trainer" in b
               for b in bad), bad


def test_a_planted_cycle_is_caught(planted):
    # Two modules of one layer importing each other: no layer rule breaks, the cycle check does.
    a, b = planted / "data" / "records.py", planted / "data" / "images.py"
    a.write_text(a.read_text() + "\nfrom . import images  # noqa: E402,F401\n")
    b.write_text(b.read_text() + "\nfrom . import records  # noqa: E402,F401\n")
    graph = import_graph(planted)
    assert not [x for x in upward_imports(graph) if "data.records" in x or "data.images" in x]
    assert ["compodistill.data.images", "compodistill.data.records"] in cycles(graph)


def test_type_checking_imports_do_not_count(planted):
    target = planted / "data" / "records.py"
    target.write_text(target.read_text() + "\nfrom typing import TYPE_CHECKING  # noqa: E402\n"
                      "if TYPE_CHECKING:\n    from ..train.trainer import X  # noqa: F401\n")
    assert not [b for b in upward_imports(import_graph(planted))
                if b.startswith("compodistill.data.records ")]
