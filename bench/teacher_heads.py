"""Per-head answer-row attention on the target cell of a grid-task model (docs/experiment.md).

The head mean that :func:`compodistill.eval.grid.target_attention` reports can hide one sharp
head; this prints, per layer and head, the answer row's share of its image attention that
falls on the question's target cell (uniform 1/9; attention spread over the three objects
1/3), over held-out questions.

    python bench/teacher_heads.py runs/experiment_grounded/teacher runs/experiment_grounded/data
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def head_shares(model, encoder, items, image_folder: str) -> list[list[float]]:
    """``[layer][head]`` mean answer-row share on the target cell (eager attention)."""
    from compodistill.eval.grid import target_attention

    return target_attention(model, encoder, items, image_folder)["answer_per_head"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("model")
    p.add_argument("data", help="grid-task folder (questions.json, images/)")
    p.add_argument("--items", type=int, default=300)
    args = p.parse_args(argv)
    from transformers import AutoTokenizer

    from compodistill.apps.grounded import grid_encoder
    from compodistill.hf.llava import load_student

    torch.set_num_threads(1)
    model = load_student(args.model).eval()
    tok = AutoTokenizer.from_pretrained(args.model)
    items = json.loads((Path(args.data) / "questions.json").read_text())[:args.items]
    shares = head_shares(model, grid_encoder(model, tok), items, args.data)
    for layer, heads in enumerate(shares):
        print(f"layer {layer}: heads " + ", ".join(f"{h:.3f}" for h in heads)
              + f"; head mean of shares {sum(heads) / len(heads):.3f}")
    print(f"{len(items)} held-out questions; uniform 0.111, three objects 0.333")
    return 0


if __name__ == "__main__":
    sys.exit(main())
