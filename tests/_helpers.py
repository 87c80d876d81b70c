"""Helpers shared by several test files (test files never import one another)."""
from __future__ import annotations

import torch
from torch.utils.data import DataLoader

from compodistill.train.config import default_stage
from compodistill.train.engine import StageLoop
from compodistill.train.metrics import read_metrics


def run_loop(tmp, max_steps, *, save_every=0, nan_calls=(), crash_call=None, max_bad=5,
             grad_accum=1):
    """A toy linear-regression stage through the real StageLoop: ``(result, weights)``.

    ``nan_calls``: loss calls that return NaN; ``crash_call``: the call that raises
    KeyboardInterrupt (stands in for a killed process).
    """
    import accelerate

    torch.manual_seed(0)
    acc = accelerate.Accelerator(cpu=True, gradient_accumulation_steps=grad_accum)
    model = torch.nn.Linear(4, 1)
    x = torch.randn(64, 4, generator=torch.Generator().manual_seed(1))
    data = [{"x": x[i], "y": x[i].sum(0, keepdim=True), "attention_mask": torch.ones(3)}
            for i in range(64)]
    loader = DataLoader(data, batch_size=8, shuffle=True,
                        generator=torch.Generator().manual_seed(0))
    stage = default_stage("sft", max_steps=max_steps, batch_size=8, lr=0.1,
                          grad_accum=grad_accum)
    calls = {"n": 0}

    def loss_terms(prepared, batch):
        calls["n"] += 1
        if calls["n"] == crash_call:
            raise KeyboardInterrupt  # stands in for a killed process
        loss = torch.nn.functional.mse_loss(prepared(batch["x"]), batch["y"])
        return {"lm": loss * float("nan") if calls["n"] in nan_calls else loss}

    loop = StageLoop(acc, model, list(model.parameters()), loader, stage, loss_terms, tmp,
                     save_every=save_every, max_bad_steps=max_bad, show_progress=False)
    return loop.run(), model.weight.detach().clone()


def losses(folder):
    """The ``loss`` column of a stage folder's metrics."""
    return [r["loss"] for r in read_metrics(folder / "metrics.jsonl")]


def write_tiny_pair(root, *, num: int, student_layers: int = 2, teacher_layers: int = 4,
                    num_eval: int = 1, teacher: bool = True):
    """Synthetic data in ``root/data`` and a tiny student (with its tokenizer) and teacher saved
    to ``root/student`` and ``root/teacher``, as a user's checkpoints would be. Returns the
    tokenizer."""
    import json

    from compodistill.data import build_tiny_tokenizer, generate_synthetic
    from compodistill.hf import tiny_llava_pair

    generate_synthetic(str(root / "data"), num=num, num_eval=num_eval, image_size=16,
                       progress=False)
    records = json.loads((root / "data" / "train.json").read_text())
    tok = build_tiny_tokenizer(texts=[t["value"] for r in records for t in r["conversations"]])
    student, teacher_model = tiny_llava_pair(vocab_size=len(tok), image_size=16, patch_size=8,
                                             student_layers=student_layers,
                                             teacher_layers=teacher_layers)
    student.save_pretrained(root / "student")
    tok.save_pretrained(root / "student")
    if teacher:
        teacher_model.save_pretrained(root / "teacher")
    return tok
