"""DDP and FSDP2 on the non-LLaVA families: two CPU processes (gloo) under `accelerate launch`
against one process with ``grad_accum: 2`` (tests/distributed_families_run.py runs the stages
with TAF, logit KD and VAT).

- Qwen2.5-VL under FSDP2, the whole chain: DPT (TAF post-connector, LM + KD) -> DFT (LoRA +
  post-connector, LM + KD + VAT) -> SFT (a fresh LoRA, LM), two steps each, every stage's
  consolidated checkpoint reloaded by every process for the next. Dynamic-resolution images
  of three token counts, so every micro-batch carries its own ``pixel_values`` patch rows,
  ``image_grid_thw`` rows and ``mm_token_type_ids``; the language model's decoder layers and
  the vision blocks are sharded, the TAF connector (frozen teacher half, trainable
  post-connector) sits in the root group; each stage's consolidated checkpoint loads in one
  process with ``load_family_model``.
- Gemma 3 under DDP (DFT): the other input layout, ``token_type_ids`` (its images attend both
  ways), with its sliding-window layers.

Tolerance: **zero** (bitwise), by the argument of tests/test_fsdp.py, which holds here too,
stage by stage:

- accelerate deals each batch of 4 as two micro-batches of 2 (whole samples: the sampler is
  sharded, then each process collates its own samples), so process r's micro-batch at step k
  is the single process's micro-batch 2(k-1) + r, with the same images, grid rows and token
  types: the same shapes, kernels and weights on one thread give bitwise the same losses and
  micro-batch gradients g0, g1. (Were images dealt apart from their samples, the losses
  would differ or the forward would fail.)
- One process accumulates g0/2 + g1/2, DDP all-reduces and FSDP2 reduce-scatters (g0 + g1)/2:
  equal in floating point (halving is exact, a two-term sum has no order).
- Each micro-batch's loss is the mean over its own tokens in both runs, so unequal token
  counts (the images differ in size here) change nothing in this comparison.
- Clipping never acts (``max_grad_norm: 100`` in the runner, asserted for every stage), so the
  gradient norm's differently ordered sum does not reach the weights; the logged norms agree
  to rtol 1e-5 as in tests/test_fsdp.py.
- Between stages: a stage's weights are bitwise equal (above), its consolidated ``model/`` is
  those weights (LoRA merged the same way on one process in both runs), and the next stage
  starts from that file in both runs: the argument starts again from equal weights. So the
  bound stays zero over the chain, with no growth per stage.
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

from compodistill.train.metrics import read_metrics  # noqa: E402

from _helpers import accelerate_launch, write_family_pair  # noqa: E402

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
SCRIPT = str(HERE / "distributed_families_run.py")


CHAIN = ("dpt", "dft", "sft")


def _run(root: Path, engine: str, steps: int, query: str = "all",
         stages: tuple = ("dft",)) -> dict:
    """One process (``grad_accum: 2``) and two (``engine``'s accelerate config): the
    reports, by run and rank."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    env.pop("TRITON_INTERPRET", None)
    kinds = ",".join(stages)
    one = subprocess.run([sys.executable, SCRIPT, str(root), str(root / "one"), "2", str(steps),
                          query, kinds], env=env, capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run(accelerate_launch(REPO / "configs" / "accelerate" / engine, SCRIPT, root,
                                           root / "two", 1, steps, query, kinds),
                         env=env, capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]

    def report(run: str, rank: int = 0) -> dict:
        return json.loads((root / run / f"report-rank{rank}.json").read_text())

    return {"one": report("one"), "two": [report("two", r) for r in (0, 1)]}


# The loss terms each stage kind logs (the recipe's defaults: docs/stages.md).
TERMS = {"dpt": {"loss_lm", "loss_kd"}, "dft": {"loss_lm", "loss_kd", "loss_vat"},
         "sft": {"loss_lm"}}


def _assert_same_run(root: Path, reports: dict, steps: int, stages: tuple = ("dft",)) -> None:
    """Two processes computed the single process's micro-batches and weights, bitwise, in
    every stage."""
    from safetensors.torch import load_file

    assert reports["one"]["processes"] == 1
    assert [r["processes"] for r in reports["two"]] == [2, 2]
    for number, kind in enumerate(stages, 1):
        one = reports["one"][kind]["losses"]
        assert len(one) == 2 * steps, kind
        for rank, report in enumerate(reports["two"]):
            # rank r: micro-batches 2(k-1) + r
            assert report[kind]["losses"] == one[rank::2], (kind, rank)
        assert TERMS[kind] <= set(reports["one"][kind]["terms"]), kind
        folder = f"{number}-{kind}"
        norms = {run: [r["grad_norm"] for r in read_metrics(root / run / folder / "metrics.jsonl")]
                 for run in ("one", "two")}
        assert max(norms["one"]) < 100.0, kind  # max_grad_norm: clipping never acts (docstring)
        torch.testing.assert_close(norms["two"], norms["one"], rtol=1e-5, atol=0, msg=kind)
        files = sorted(p.name for p in (root / "one" / folder / "model").glob("*.safetensors"))
        assert "model.safetensors" in files
        for name in files:  # the consolidated checkpoint, TAF's file included
            want = load_file(root / "one" / folder / "model" / name)
            got = load_file(root / "two" / folder / "model" / name)
            assert got.keys() == want.keys(), (folder, name)
            for key in want:
                torch.testing.assert_close(got[key], want[key], atol=0, rtol=0,
                                           msg=f"{folder} {name} {key}")


def test_qwen2_5_vl_fsdp2_chain_with_taf_matches_one_process(tmp_path):
    from transformers import AutoModelForImageTextToText

    from compodistill.hf.loading import load_family_model
    from compodistill.hf.family_taf import is_taf

    write_family_pair(tmp_path, "qwen2_5_vl")
    steps = 2
    reports = _run(tmp_path, "fsdp2_cpu_2proc.yaml", steps, stages=CHAIN)
    _assert_same_run(tmp_path, reports, steps, CHAIN)
    ranks = reports["two"]
    for report in ranks:
        for kind in CHAIN:
            # One group per decoder layer and per vision block (the model's
            # _no_split_modules); the roots hold the rest, the TAF connector included; the
            # teacher's untied lm_head is a group of its own. Each lm_head is gathered once
            # per step; SFT never gathers the teacher's (docs/distributed.md).
            layers = {"FSDPQwen2_5_VLDecoderLayer", "FSDPQwen2_5_VLVisionBlock"}
            groups = report[kind]["groups"]
            assert set(groups["student"]) == layers | {"FSDPHiddenStates"}, kind
            assert set(groups["teacher"]) == layers | {"FSDPQwen2_5_VLModel", "FSDPLinear"}, kind
            assert report[kind]["lm_head_gathers"] == {
                "student": steps, "teacher": 0 if kind == "sft" else steps}, kind
    # Every parameter of both models is sharded in every stage: each rank holds its rows of
    # dim 0.
    for stage in CHAIN:
        for kind in ("student", "teacher"):
            local = [ranks[r][stage][kind] for r in (0, 1)]
            assert set(local[0]) == set(ranks[0][stage][f"{kind}_params"]), (stage, kind)
            assert any(".visual.blocks." in name for name in local[0])  # the vision blocks
            for name, (local0, full) in local[0].items():
                half = math.ceil(full[0] / 2)
                assert (local0[0], local[1][name][0][0]) == (half, full[0] - half), name
    # Each consolidated checkpoint loads in one process, TAF connector rebuilt: its teacher
    # half is the teacher's merger, untouched under sharding; DPT trained the post-connector,
    # DFT's and SFT's LoRA trained and were merged.
    models = {kind: load_family_model(tmp_path / "two" / f"{n}-{kind}" / "model").state_dict()
              for n, kind in enumerate(CHAIN, 1)}
    model = load_family_model(tmp_path / "two" / "3-sft" / "model")
    assert is_taf(model)
    merger = model.get_submodule("model.visual.merger")
    teacher = AutoModelForImageTextToText.from_pretrained(tmp_path / "teacher")
    frozen = dict(merger.teacher.named_parameters())
    for name, p in teacher.get_submodule("model.visual.merger").named_parameters():
        assert torch.equal(frozen[name], p), name
    post = [k for k in models["dpt"] if ".merger.post." in k]
    assert post, sorted(models["dpt"])[:20]
    q_proj = "model.language_model.layers.1.self_attn.q_proj.weight"
    start = load_family_model(tmp_path / "student").state_dict()
    assert torch.equal(models["dpt"][q_proj], start[q_proj])  # DPT: no LoRA
    assert not torch.equal(models["dft"][q_proj], models["dpt"][q_proj])
    assert not torch.equal(models["sft"][q_proj], models["dft"][q_proj])
    assert torch.equal(models["sft"][post[0]], models["dft"][post[0]])  # SFT: LoRA only


def test_gemma3_ddp_matches_one_process(tmp_path):
    """Gemma 3's token_type_ids through DDP's sharded batches (VAT on text queries: its
    image tokens attend both ways)."""
    write_family_pair(tmp_path, "gemma3", sliding_window=8)
    steps = 2
    reports = _run(tmp_path, "cpu_2proc.yaml", steps, query="text")
    _assert_same_run(tmp_path, reports, steps)
    report = reports["two"][0]["dft"]
    assert report["student"] == {} and report["groups"] == {"student": [], "teacher": []}  # DDP
