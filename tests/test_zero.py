"""DeepSpeed ZeRO-2 and ZeRO-3 on two CPU processes (gloo, ``DS_BUILD_OPS=0``): the whole
DPT → DFT → SFT chain under ``accelerate launch`` with the shipped
``configs/accelerate/deepspeed_zero{2,3}.yaml`` (``--num_processes 2 --mixed_precision no``
on the command line: the files say 8 GPUs and bf16), SIGKILLed in DFT and resumed, against
one process. ``tests/fsdp_run.py`` runs the chain and reports, as for FSDP2.

Tolerance.

- **ZeRO-2: zero (bitwise)**, for the reasons tests/test_fsdp.py gives for FSDP2: the same
  micro-batches and kernels on each side, a two-term gradient sum (order-free) halved
  (exact), a clip factor of exactly 1 (every norm below ``max_grad_norm``, asserted), and
  AdamW elementwise on the flat fp32 partitions.
- **ZeRO-3: atol 2e-6 on the weights**, rtol 1e-5 on the losses. Measured: after DPT (two
  steps, only the post-connector trains) 479 of its 2,048 weights differ from one process by
  at most 5.6e-8, 1 to 4 ulps of values near 0.13; every loss of the chain before the
  difference shows is equal. So a few weight-gradient elements are summed in another order under
  ZeRO-3 (not DeepSpeed's ``memory_efficient_linear``: switching it off changed nothing).
  The bound: a gradient summed over n ≤ 2·128 terms in another order differs by at most
  n·u ≈ 1.5e-5 relative (u = 6e-8); AdamW's step is at most lr = 1e-2 per weight and moves
  by at most that relative error of it, 1.5e-7 per step; the chain makes 8 steps: 1.2e-6,
  rounded up to 2e-6.
"""
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
pytest.importorskip("deepspeed")

from compodistill.hf.llava import load_student  # noqa: E402
from compodistill.train.checkpoint import is_complete  # noqa: E402
from compodistill.train.metrics import read_metrics  # noqa: E402

from _helpers import accelerate_launch, keep_equal_length_records, write_tiny_pair  # noqa: E402

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
SCRIPT = str(HERE / "fsdp_run.py")
STAGES = ("1-dpt", "2-dft", "3-sft")
KILL_AT = 3  # the DFT loss call that is killed: after checkpoint-2, before checkpoint-4
TOLERANCE = {2: 0.0, 3: 2e-6}
MAX_GRAD_NORM = 3.0  # not the configs' gradient_clipping (1.0): the stage's must win


def _env() -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "DS_BUILD_OPS": "0",
           "FSDP_TEST_MAX_GRAD_NORM": str(MAX_GRAD_NORM)}
    env.pop("TRITON_INTERPRET", None)
    return env


def _launch(stage: int, root: Path, out: str, env: dict) -> subprocess.CompletedProcess:
    config = REPO / "configs" / "accelerate" / f"deepspeed_zero{stage}.yaml"
    command = accelerate_launch(config, "--num_processes", "2", "--mixed_precision", "no",
                                SCRIPT, root, root / out)
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("zero")
    write_tiny_pair(root, num=12, student_layers=3, teacher_layers=4)
    assert keep_equal_length_records(root) >= 8
    env = _env()
    one = subprocess.run([sys.executable, SCRIPT, str(root), str(root / "one"), "2"], env=env,
                         capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    reports = {}
    for stage in (2, 3):
        out = f"zero{stage}"
        killed = _launch(stage, root, out, {**env, "FSDP_TEST_KILL": f"dft:{KILL_AT}"})
        dft = root / out / "2-dft"
        assert killed.returncode != 0, "the launch meant to be killed finished"
        assert not is_complete(dft / "model") and is_complete(dft / "checkpoint-2")
        resumed = _launch(stage, root, out, env)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        reports[stage] = [json.loads((root / out / f"report-rank{r}.json").read_text())
                          for r in (0, 1)]
    return {"root": root, "one": json.loads((root / "one" / "report-rank0.json").read_text()),
            **reports}


@pytest.mark.parametrize("stage", [2, 3])
def test_weights_match_single_process(runs, stage):
    root, atol = runs["root"], TOLERANCE[stage]
    for name in STAGES:
        one = load_student(root / "one" / name / "model").state_dict()
        two = load_student(root / f"zero{stage}" / name / "model").state_dict()  # one process
        assert one.keys() == two.keys()
        for key in one:
            torch.testing.assert_close(two[key], one[key], atol=atol, rtol=0,
                                       msg=f"ZeRO-{stage} {name} {key}")
        norms_one = [r["grad_norm"] for r in read_metrics(root / "one" / name / "metrics.jsonl")]
        norms_two = [r["grad_norm"]
                     for r in read_metrics(root / f"zero{stage}" / name / "metrics.jsonl")]
        assert max(norms_one) < 1.0  # below any max_grad_norm here: clipping never acts
        torch.testing.assert_close(norms_two, norms_one, rtol=1e-5, atol=0)


@pytest.mark.parametrize("stage", [2, 3])
def test_resumed_loss_sequence_is_the_uninterrupted_one(runs, stage):
    """Process r's micro-batch at step k is the single process's micro-batch 2(k-1) + r,
    before the kill and after the resume."""
    one, rtol = runs["one"], (0 if stage == 2 else 1e-5)
    for rank, report in enumerate(runs[stage]):
        for name in STAGES:
            kind = name.split("-")[1]
            start = report[kind]["start_step"]
            torch.testing.assert_close(report[kind]["losses"],
                                       one[kind]["losses"][2 * start + rank::2],
                                       rtol=rtol, atol=0, msg=f"{name} rank {rank}")
    assert runs[stage][0]["dft"]["start_step"] == KILL_AT - 1  # really resumed, from step 2
    ckpt = runs["root"] / f"zero{stage}" / "2-dft" / "checkpoint-2" / "pytorch_model"
    # every rank wrote its partition of the optimizer states
    assert sorted(p.name for p in ckpt.glob("zero_pp_rank_*_optim_states.pt")) == [
        "zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]


@pytest.mark.parametrize("stage", [2, 3])
def test_engine_takes_the_stage_clipping_and_accumulation(runs, stage):
    for report in runs[stage]:
        for kind in ("dpt", "dft", "sft"):
            assert report[kind]["engine_clip_accum"] == [MAX_GRAD_NORM, 1], kind


def test_configure_deepspeed_writes_the_stage_values():
    from types import SimpleNamespace

    from compodistill.train.config import StageConfig
    from compodistill.train.distributed import configure_deepspeed

    config = {"gradient_accumulation_steps": 1, "gradient_clipping": 1.0,
              "zero_optimization": {"stage": 3}}
    plugin = SimpleNamespace(deepspeed_config=config)
    from accelerate.utils import DistributedType

    acc = SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=plugin), num_processes=2,
                          distributed_type=DistributedType.DEEPSPEED)
    stage = StageConfig(name="dft", kind="dft", grad_accum=4, max_grad_norm=0.5)
    configure_deepspeed(acc, stage, micro_batch=3)
    assert config["gradient_accumulation_steps"] == 4 and config["gradient_clipping"] == 0.5
    assert (config["train_micro_batch_size_per_gpu"], config["train_batch_size"]) == (3, 24)
    assert config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True


def test_zero3_partitions_every_student_parameter(runs):
    for report in runs[3]:
        for kind in ("dpt", "dft", "sft"):
            parts = report[kind]["zero_partitions"]
            assert set(parts) == set(report[kind]["student_params"]), kind
            for name, (local, full) in parts.items():
                assert local == -(-full // 2), (kind, name)  # ceil(n / 2) per rank, padded
    for report in runs[2]:  # ZeRO-2 leaves the parameters whole
        assert report["dft"]["zero_partitions"] == {}


def test_zero3_lm_head_is_gathered_once_per_step(runs):
    for report in runs[3]:
        for kind in ("dpt", "dft", "sft"):
            steps = len(report[kind]["losses"])  # grad_accum 1: one micro-batch per step
            assert report[kind]["lm_head_gathers"] == {"student": steps, "teacher": 0}, kind
    for report in runs[2]:
        assert report["dft"]["lm_head_gathers"]["student"] == 0


def test_zero3_init_flag_true_is_refused(tmp_path):
    """Partitioned loading is refused in one line naming the key."""
    script = tmp_path / "init.py"
    script.write_text("from compodistill.train.distributed import make_accelerator\n"
                      "make_accelerator()\n")
    config = REPO / "configs" / "accelerate" / "deepspeed_zero3.yaml"
    command = accelerate_launch(config, "--num_processes", "2", "--mixed_precision", "no",
                                "--zero3_init_flag", "true", script)
    done = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert ("ValueError: deepspeed_config.zero3_init_flag: true is not supported"
            in done.stderr), done.stderr[-2000:]


def test_trainable_lm_head_is_refused_under_zero3():
    from torch import nn

    from compodistill.train.distributed import zero3_head_step

    owner = nn.Module()
    owner.lm_head = nn.Linear(4, 8)  # requires_grad: what trainable: all leaves
    with pytest.raises(ValueError, match=r"^stage sft: trainable: a trainable lm_head is not "
                                         r"supported under ZeRO-3"):
        zero3_head_step(lambda prepared, batch: {}, owner, "sft")
    owner.lm_head.requires_grad_(False)
    zero3_head_step(lambda prepared, batch: {}, owner, "sft")  # a frozen one is fine
