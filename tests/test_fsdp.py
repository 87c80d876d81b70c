"""FSDP2 on two CPU processes (gloo): the whole DPT → DFT → SFT chain under
``accelerate launch --config_file configs/accelerate/fsdp2_cpu_2proc.yaml``, killed in DFT
and resumed, against one process.

One module fixture runs three processes' worth of training (one single-process chain, one
2-process launch SIGKILLed at the third DFT step, one 2-process launch that resumes it); the
tests read what they wrote (``tests/fsdp_run.py`` reports).

Tolerance: **zero** (bitwise), derived as follows.

- The reference is one process with ``grad_accum=2``: every optimiser step it sees the same
  two micro-batches of 2 samples that the two processes see (accelerate's seeded sampler
  deals the batch of 4 to the processes in the same order), and the records have equal token
  counts (``keep_equal_length_records``), so averaging two micro-batch means is the batch mean.
- Each micro-batch runs the same kernels on the same shapes and the same weights, on one
  thread: bitwise the same losses and micro-batch gradients g0, g1 in both runs.
- What differs is where the two are combined: one process adds g0/2 + g1/2 into ``.grad``
  (accelerate scales each loss by 1/grad_accum); FSDP2 reduce-scatters (g0 + g1)/2 over gloo.
  Halving is exact in binary floating point (no subnormals here) and a sum of two terms does
  not depend on their order, so the gradients agree bitwise; AdamW is elementwise, so the
  weights do too.
- The one reduction whose order really differs is the gradient norm (per-shard sums of
  squares, then an all-reduce). It enters the update only through clipping, and every step
  here stays below ``max_grad_norm`` (asserted), where the clip factor is exactly 1. The
  logged norms themselves agree to rtol 1e-5 (a sum of ~1e4 squares: n·u ≈ 1e-3 worst case,
  1e-6 typical).
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("accelerate")
pytest.importorskip("peft")

from compodistill.hf.llava import load_student  # noqa: E402
from compodistill.train.checkpoint import is_complete  # noqa: E402
from compodistill.train.metrics import read_metrics  # noqa: E402

from _helpers import accelerate_launch, keep_equal_length_records, write_tiny_pair  # noqa: E402

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
SCRIPT = str(HERE / "fsdp_run.py")
STAGES = ("1-dpt", "2-dft", "3-sft")
KILL_AT = 3  # the DFT loss call that is killed: after checkpoint-2, before checkpoint-4


def _env() -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    env.pop("TRITON_INTERPRET", None)
    return env


def _launch(root: Path, out: str, env: dict) -> subprocess.CompletedProcess:
    command = accelerate_launch(REPO / "configs" / "accelerate" / "fsdp2_cpu_2proc.yaml", SCRIPT,
                                root, root / out)
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp")
    write_tiny_pair(root, num=12, student_layers=3, teacher_layers=4)
    assert keep_equal_length_records(root) >= 8
    env = _env()
    one = subprocess.run([sys.executable, SCRIPT, str(root), str(root / "one"), "2"], env=env,
                         capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    killed = _launch(root, "two", {**env, "FSDP_TEST_KILL": f"dft:{KILL_AT}"})
    dft = root / "two" / "2-dft"
    assert killed.returncode != 0, "the launch meant to be killed finished"
    assert not is_complete(dft / "model") and is_complete(dft / "checkpoint-2")
    resumed = _launch(root, "two", env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    def report(run: str, rank: int = 0) -> dict:
        return json.loads((root / run / f"report-rank{rank}.json").read_text())

    return {"root": root, "one": report("one"), "two": [report("two", r) for r in (0, 1)]}


def test_weights_match_single_process_bitwise(runs):
    root = runs["root"]
    for stage in STAGES:
        one = load_student(root / "one" / stage / "model").state_dict()
        two = load_student(root / "two" / stage / "model").state_dict()  # one process loads it
        assert one.keys() == two.keys()
        for name in one:
            torch.testing.assert_close(two[name], one[name], atol=0, rtol=0,
                                       msg=f"{stage} {name}")
        norms_one = [r["grad_norm"] for r in read_metrics(root / "one" / stage / "metrics.jsonl")]
        norms_two = [r["grad_norm"] for r in read_metrics(root / "two" / stage / "metrics.jsonl")]
        assert max(norms_one) < 1.0  # max_grad_norm: clipping never acts (see the derivation)
        torch.testing.assert_close(norms_two, norms_one, rtol=1e-5, atol=0)


def test_resumed_loss_sequence_is_the_uninterrupted_one(runs):
    """Process r's micro-batch at step k is the single process's micro-batch 2(k-1) + r.

    The DFT metrics of the 2-process run hold steps 1-2 from before the kill and 3-4 from the
    resumed launch; both must be the single process's (uninterrupted) losses, bitwise."""
    root, one = runs["root"], runs["one"]
    for stage in STAGES:
        name = stage.split("-")[1]
        logged = [r["loss"] for r in read_metrics(root / "two" / stage / "metrics.jsonl")]
        assert logged == one[name]["losses"][0::2], stage  # rank 0 logs its own micro-batch
        for rank, report in enumerate(runs["two"]):
            start = report[name]["start_step"]
            assert report[name]["losses"] == one[name]["losses"][2 * start + rank::2], (stage,
                                                                                        rank)
    assert runs["two"][0]["dft"]["start_step"] == KILL_AT - 1  # really resumed, from step 2
    assert (root / "two" / "2-dft" / "checkpoint-2" / "pytorch_model_fsdp_0").is_dir()


def test_each_rank_holds_half_of_every_parameter(runs):
    for stage, kinds in (("dpt", ("student", "teacher")), ("dft", ("student", "teacher")),
                         ("sft", ("student",))):
        for kind in kinds:
            ranks = [report[stage][kind] for report in runs["two"]]
            assert set(ranks[0]) == set(runs["two"][0][stage][f"{kind}_params"]), \
                f"{stage} {kind}: a parameter is not sharded"
            for name, (local0, full) in ranks[0].items():
                local1, _ = ranks[1][name]
                half = math.ceil(full[0] / 2)  # FSDP2 shards dim 0 in chunks of ceil(n / 2)
                assert (local0[0], local1[0]) == (half, full[0] - half), (stage, kind, name)
                assert local0[1:] == local1[1:] == full[1:], (stage, kind, name)


def test_lm_head_is_gathered_once_per_step(runs):
    for report in runs["two"]:
        for stage, teacher_used in (("dpt", True), ("dft", True), ("sft", False)):
            steps = len(report[stage]["losses"])  # grad_accum 1: one micro-batch per step
            gathers = report[stage]["lm_head_gathers"]
            assert gathers["student"] == steps, (stage, gathers)
            assert gathers["teacher"] == (steps if teacher_used else 0), (stage, gathers)


def test_tied_teacher_lm_head_is_sharded_and_gathered_once(tmp_path):
    """A teacher whose lm_head is its embedding (e.g. Qwen2.5-VL-3B): the weight is sharded
    with the root group and gathered once per step; DPT equals one process bitwise."""
    from transformers import LlavaForConditionalGeneration

    write_tiny_pair(tmp_path, num=12, student_layers=2, teacher_layers=2)
    assert keep_equal_length_records(tmp_path) >= 8
    teacher = LlavaForConditionalGeneration.from_pretrained(tmp_path / "teacher")
    teacher.config.tie_word_embeddings = teacher.config.text_config.tie_word_embeddings = True
    teacher.lm_head.weight = teacher.get_input_embeddings().weight
    teacher.save_pretrained(tmp_path / "teacher")
    env = {**_env(), "FSDP_TEST_STAGES": "dpt"}
    one = subprocess.run([sys.executable, SCRIPT, str(tmp_path), str(tmp_path / "one"), "2"],
                         env=env, capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    two = _launch(tmp_path, "two", env)
    assert two.returncode == 0, two.stderr[-3000:]
    for rank in (0, 1):
        dpt = json.loads((tmp_path / "two" / f"report-rank{rank}.json").read_text())["dpt"]
        assert set(dpt["teacher"]) == set(dpt["teacher_params"])  # lm_head left no full copy
        assert dpt["lm_head_gathers"] == {"student": 2, "teacher": 2}
    one_sd = load_student(tmp_path / "one" / "1-dpt" / "model").state_dict()
    two_sd = load_student(tmp_path / "two" / "1-dpt" / "model").state_dict()
    for name in one_sd:
        torch.testing.assert_close(two_sd[name], one_sd[name], atol=0, rtol=0, msg=name)
