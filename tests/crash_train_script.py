"""A tiny StageLoop run for tests/test_crash_safety.py (not a test module).

``python crash_train_script.py OUT_DIR STEPS [KEEP_LAST]`` trains ``Linear(4, 1)`` for STEPS
optimiser steps with a checkpoint after every step, resuming from OUT_DIR's latest
checkpoint, and writes the final weights to OUT_DIR/final.pt. It prints ``EVENT step`` lines
(``step``, ``ckpt-begin``, ``ckpt-write``, ``ckpt-end``) so the test can SIGKILL it at chosen
points; ``CRASH_TEST_SLOW`` (seconds) stretches each checkpoint write (inside the write and
around each rename), so a kill can land in the middle of one.
"""
import os
import sys
import time

import accelerate
from accelerate.utils import DataLoaderConfiguration
import torch
from torch.utils.data import DataLoader

from compodistill.train import checkpoint as checkpoint_module
from compodistill.train import engine
from compodistill.train.config import default_stage

SLOW = float(os.environ.get("CRASH_TEST_SLOW", "0"))
if __name__ == "__main__":
    sys.modules["torch.utils.tensorboard"] = None  # optional and slow to import: skip it


def event(name: str, step) -> None:
    print(f"{name} {step}", flush=True)


def slow_checkpoints() -> None:
    """Stretch the checkpoint writes (a test hook; the library is unchanged)."""
    write_json = engine.write_json
    replace = os.replace

    def slow_write_json(path, data):
        event("ckpt-write", data.get("step"))
        time.sleep(SLOW)
        write_json(path, data)
        time.sleep(SLOW)

    def slow_replace(src, dst):
        replace(src, dst)
        if "checkpoint-" in str(dst):
            time.sleep(SLOW)

    engine.write_json = slow_write_json
    checkpoint_module.os.replace = slow_replace


def main(out_dir: str, steps: int, keep_last: int) -> None:
    if SLOW:
        slow_checkpoints()
    torch.manual_seed(0)
    # As CompoDistillTrainer builds it: a seedable sampler makes the shuffle order of every
    # epoch a function of (seed, epoch), so a resume inside a later epoch replays it.
    acc = accelerate.Accelerator(cpu=True, dataloader_config=DataLoaderConfiguration(
        use_seedable_sampler=True))
    model = torch.nn.Linear(4, 1)
    x = torch.randn(64, 4, generator=torch.Generator().manual_seed(1))
    data = [{"x": x[i], "y": x[i].sum(0, keepdim=True)} for i in range(64)]
    loader = DataLoader(data, batch_size=8, shuffle=True,
                        generator=torch.Generator().manual_seed(0))
    stage = default_stage("sft", max_steps=steps, batch_size=8, lr=0.05)
    calls = {"n": 0}

    def loss_terms(prepared, batch):
        calls["n"] += 1
        event("step", calls["n"])
        time.sleep(SLOW / 4)
        return {"lm": torch.nn.functional.mse_loss(prepared(batch["x"]), batch["y"])}

    loop = engine.StageLoop(acc, model, list(model.parameters()), loader, stage, loss_terms,
                            out_dir, save_every=1, show_progress=False, keep_last=keep_last)
    save = loop._save

    def traced_save(step, skipped):
        event("ckpt-begin", step)
        save(step, skipped)
        event("ckpt-end", step)

    loop._save = traced_save
    result = loop.run()
    tmp = os.path.join(out_dir, "final.pt.tmp")
    torch.save({"weight": model.weight.detach(), "bias": model.bias.detach(),
                "steps": result.steps}, tmp)
    os.replace(tmp, os.path.join(out_dir, "final.pt"))
    event("done", result.steps)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]) if len(sys.argv) > 3 else 0)
