"""docs/integrations.md: each Python block runs as written (in a fresh namespace, from a
temporary folder), and the memory benchmark it quotes still orders the providers as the
page says, at a small shape."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("trl")

DOC = Path(__file__).resolve().parent.parent / "docs" / "integrations.md"


def python_blocks() -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", DOC.read_text(encoding="utf-8"),
                      flags=re.S | re.M)


def test_the_page_has_its_three_snippets_and_the_table():
    blocks = python_blocks()
    assert len(blocks) == 3
    for block, name in zip(blocks, ("FusedLinearKDLoss(", "FusedDistillTrainer(",
                                    "TRLFusedDistillationTrainer(")):
        assert name in block
    text = DOC.read_text(encoding="utf-8")
    assert "| meaning | Liger `LigerFusedLinearJSDLoss` | TRL `generalized_jsd_loss`" in text
    assert "MEMORY_TABLE" not in text


@pytest.mark.parametrize("index", [0, 1, 2], ids=["modules", "hf_trainer", "trl"])
def test_snippet_runs(index, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    block = python_blocks()[index]
    namespace: dict = {"__name__": "integrations_doc"}
    exec(compile(block, f"docs/integrations.md python block {index}", "exec"), namespace)
    if index == 0:
        assert namespace["loss"].requires_grad and namespace["vat_loss"].requires_grad
    else:
        printed = capsys.readouterr().out.split()
        assert len(printed) >= 2 and all(float(x) == float(x) for x in printed[-2:])


def test_memory_benchmark_orders_the_providers():
    import sys

    sys.path.insert(0, str(DOC.parent.parent))
    from bench.integrations_memory import run

    rows = {r["provider"]: float(r["value"]) for r in run(1, 512, 8000, None)}
    assert rows["fused_kd"] < rows["naive_logits"] / 2
    assert rows["capture_vat"] < rows["eager_attentions_vat"]
