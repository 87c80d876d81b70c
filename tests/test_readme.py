"""Every Python block of README.md and docs/guide.md runs as written (the kernels block under
the Triton interpreter), the README stays a front page, and no link leaves the repository."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import re  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

README = Path(__file__).resolve().parent.parent / "README.md"
GUIDE = README.parent / "docs" / "guide.md"  # the front page's long form


def python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


def _run_blocks(path: Path) -> dict:
    namespace: dict = {"__name__": path.stem}
    for i, block in enumerate(python_blocks(path.read_text(encoding="utf-8"))):
        try:
            exec(compile(block, f"{path.name} python block {i}", "exec"), namespace)
        except Exception as e:  # name the block, so a failure points at the page
            raise AssertionError(f"{path.name} python block {i} failed: {type(e).__name__}: "
                                 f"{e}\n{block}") from e
    return namespace


def test_readme_is_a_front_page():
    text = README.read_text(encoding="utf-8")
    assert len(text.splitlines()) < 250, "README.md is a front page: keep it under 250 lines"
    joined = "\n".join(python_blocks(text))
    for name in ("visual_attention_loss", "match_layers", "linear_distillation_loss",
                 "AttentionDistiller"):
        assert name in joined, f"README has no Python block using {name}"
    for command in ("compodistill demo", "compodistill train", "compodistill teacher-cache",
                    "accelerate launch"):
        assert command in text, f"README shows no `{command}`"
    guide = "\n".join(python_blocks(GUIDE.read_text(encoding="utf-8")))
    assert "attention_with_visual_maps" in guide


@pytest.mark.parametrize("page", [README, GUIDE], ids=["README", "guide"])
def test_python_blocks_run(page, capsys):
    """Every Python block of the page runs as written, in order, in one namespace (the way a
    reader pastes them into one session)."""
    pytest.importorskip("transformers")
    pytest.importorskip("triton")
    namespace = _run_blocks(page)
    printed = capsys.readouterr().out
    assert "[(8, (13, 14, 15, 16, 17)), (9, (14, 15, 16, 17, 18))]" in printed
    assert namespace["loss"].requires_grad


def test_no_reference_leaves_the_repository():
    # The project carries its own definitions (docs/): no link may point outside the
    # repository, every relative Markdown link must resolve, and the design contract the
    # project was built from is never cited.
    import subprocess

    root = README.parent
    files = subprocess.run(["git", "ls-files"], cwd=root, capture_output=True, text=True)
    tracked = [root / f for f in files.stdout.split()] if files.returncode == 0 else \
        [p for p in root.rglob("*") if ".git" not in p.parts]
    texts = [p for p in tracked if p.suffix in (".md", ".py", ".yaml", ".sh", ".cfg", ".ini")
             and p.is_file() and p.name != "test_readme.py"]
    for path in texts:
        text = path.read_text(encoding="utf-8", errors="replace")
        assert "../shared" not in text and "SPEC.md" not in text and "SPEC §" not in text, path
        if path.suffix != ".md":
            continue
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+://", target) or target.startswith("#"):
                continue
            resolved = (path.parent / target.split("#")[0]).resolve()
            assert str(resolved).startswith(str(root.resolve())), (path, target)
            assert resolved.exists(), f"{path.name}: broken link {target}"
