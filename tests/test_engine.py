"""The stage loop: resume equals an uninterrupted run, non-finite steps are skipped."""
from __future__ import annotations

import math
import warnings

import pytest
import torch
from compodistill.train.config import config_from_dict
from compodistill.train.engine import TooManyBadSteps
from compodistill.train.metrics import read_metrics

from _helpers import losses, run_loop

accelerate = pytest.importorskip("accelerate")


def test_resume_after_crash_matches_uninterrupted_run(tmp_path):
    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    _, w_straight = run_loop(straight, 12)
    with pytest.raises(KeyboardInterrupt):
        run_loop(crashed, 12, save_every=5, crash_call=8)
    assert (crashed / "checkpoint-5").is_dir() and not (crashed / "checkpoint-10").exists()
    result, w_resumed = run_loop(crashed, 12, save_every=5)
    assert result.steps == 12
    assert losses(crashed) == pytest.approx(losses(straight), rel=1e-6)
    assert torch.allclose(w_straight, w_resumed)
    assert (crashed / "loss_curves.png").stat().st_size > 0
    assert not list(crashed.glob("*.tmp"))


def test_non_finite_steps_are_skipped_and_counted(tmp_path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result, weight = run_loop(tmp_path, 6, nan_calls=(2, 3))
    assert result.skipped_steps == 2 and result.steps == 6
    assert sum("non-finite" in str(w.message) for w in caught) == 2
    assert torch.isfinite(weight).all()
    assert read_metrics(tmp_path / "metrics.jsonl")[-1]["skipped_steps"] == 2


def test_too_many_bad_steps_in_a_row_stops(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(TooManyBadSteps, match="3 non-finite steps in a row"):
            run_loop(tmp_path, 10, nan_calls=(1, 2, 3), max_bad=3)


def test_gradient_accumulation_counts_optimizer_steps(tmp_path):
    result, _ = run_loop(tmp_path, 3, grad_accum=2)
    assert result.steps == 3
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3]
    assert all(math.isfinite(r["grad_norm"]) for r in records)


def test_config_rejects_typos_and_applies_spec_defaults():
    config = config_from_dict({"stages": [{"kind": "dpt"}, {"kind": "dft", "lr": 1e-4}]})
    dpt, dft = config.stages
    assert (dpt.trainable, dpt.weights.kd, dpt.weights.vat, dpt.batch_size) == (
        "post_connector", 1.0, 0.0, 256)
    assert (dft.trainable, dft.weights.vat, dft.lr, dft.lora_r, dft.lora_alpha) == (
        "lora+post_connector", 1.0, 1e-4, 128, 256)
    with pytest.raises(ValueError, match=r"unknown keys \['lerning_rate'\]"):
        config_from_dict({"stages": [{"kind": "dpt", "lerning_rate": 1.0}]})
    with pytest.raises(ValueError, match="stage kind must be one of"):
        config_from_dict({"stages": [{"kind": "rl"}]})
