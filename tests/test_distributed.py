"""Two CPU processes under `accelerate launch` (DDP over gloo) train the same model as one
process.

The reference accumulates two micro-batches of 2 (``grad_accum=2``), the micro-batches the two
processes get; the records have equal token counts. The micro-batch gradients are then bitwise
equal, and g0/2 + g1/2 (accumulation) equals (g0 + g1)/2 (the all-reduce mean) exactly:
halving is exact and a two-term sum does not depend on order. Hence tolerance zero (the same
derivation in more detail: tests/test_fsdp.py)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("accelerate")
pytest.importorskip("peft")

from compodistill.hf.llava import load_student  # noqa: E402

from _helpers import accelerate_launch, keep_equal_length_records, write_tiny_pair  # noqa: E402

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


def test_two_process_run_matches_single_process(tmp_path):
    write_tiny_pair(tmp_path, num=12, student_layers=3, teacher_layers=4)
    assert keep_equal_length_records(tmp_path) >= 8
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    env.pop("TRITON_INTERPRET", None)
    script = str(HERE / "distributed_run.py")
    subprocess.run([sys.executable, script, str(tmp_path), str(tmp_path / "one"), "2"],
                   env=env, check=True, capture_output=True, timeout=600)
    launch = accelerate_launch(REPO / "configs" / "accelerate" / "cpu_2proc.yaml", script, tmp_path,
                               tmp_path / "two")
    done = subprocess.run(launch, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    one = load_student(tmp_path / "one" / "1-dpt" / "model").state_dict()
    two = load_student(tmp_path / "two" / "1-dpt" / "model").state_dict()
    steps = [json.loads(line)["step"]
             for line in (tmp_path / "two" / "1-dpt" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]
    # Two processes really ran (on CPU, accelerate alone would start one; see
    # compodistill/train/distributed.py make_accelerator).
    assert "world size 2" in done.stdout, done.stdout[-2000:]
    for name in one:
        torch.testing.assert_close(two[name], one[name], atol=0, rtol=0, msg=name)
