"""bench/experiment_grounded.py: a bounded smoke run end to end, the layer choice, the claim
check, and the shuffled-maps control (its VAT target really comes from other images)."""
from __future__ import annotations

import csv
import json

import pytest
import torch

pytest.importorskip("matplotlib")

from bench import experiment_grounded as ex  # noqa: E402


def test_smoke_run_writes_csv_plot_and_claims(tmp_path):
    argv = ["--quick", "--out", str(tmp_path), "--variants", "kd", "kd+vat",
            "kd+vat-shuffled", "--sizes", "8", "--student-steps", "2"]
    result = ex.run(ex.resolve(ex.build_parser().parse_args(argv)), argv)
    rows = list(csv.DictReader(open(tmp_path / "experiment_grounded.csv")))
    assert [r["variant"] for r in rows] == ["teacher", "kd", "kd+vat", "kd+vat-shuffled"]
    for r in rows:
        assert r["git_commit"] and r["date"] and r["device"] and r["command"]
        assert 0 <= float(r["q_all"]) <= 1 and float(r["q_all_se"]) >= 0
        assert len(json.loads(r["att_answer"])) == 2  # both quick models have 2 layers
    assert (tmp_path / "experiment_grounded.png").stat().st_size > 10_000
    assert result["claims"][0]["size"] == 8 and result["claims"][0]["holds"] in (True, False)
    # A second start reuses every finished run.
    again = ex.run(ex.resolve(ex.build_parser().parse_args(argv)), argv)
    assert [r["q_all"] for r in again["rows"]] == [r["q_all"] for r in result["rows"]]
    # --replot redraws from the CSV alone: the same table as the run printed.
    (tmp_path / "experiment_grounded.png").unlink()
    assert ex.main(argv + ["--replot"]) == 0
    assert (tmp_path / "experiment_grounded.png").stat().st_size > 10_000
    assert ex.replot(tmp_path / "experiment_grounded.csv")["table"] == result["table"]


def test_gate_stops_before_students(tmp_path):
    argv = ["--quick", "--out", str(tmp_path), "--gate", "1.01"]
    assert ex.main(argv) == 3
    rows = list(csv.DictReader(open(tmp_path / "experiment_grounded.csv")))
    assert [r["variant"] for r in rows] == ["teacher"]
    assert not (tmp_path / "runs").exists()


def test_vat_layers_are_where_the_teacher_concentrates():
    row = {"att_answer": [0.1, 0.12, 0.5, 0.3], "att_uniform": 1 / 9}
    assert ex.vat_layers(row, 2, 2.0) == ([1], [2, 3])
    assert ex.vat_layers(row, 3, 4.0) == ([2], [2])
    assert ex.vat_layers({"att_answer": [0.1, 0.11], "att_uniform": 1 / 9}, 2, 2.0) == ([1], [1])


def test_welch_matches_the_t_table():
    # Student's t upper tail at the textbook points: t = 1.833, df = 9 -> 0.05; t = 2.764,
    # df = 10 -> 0.01; t = 1.645 with df large -> 0.05.
    assert abs(ex._t_sf(1.833, 9) - 0.05) < 2e-4
    assert abs(ex._t_sf(2.764, 10) - 0.01) < 1e-4
    assert abs(ex._t_sf(1.645, 1e6) - 0.05) < 2e-4
    assert abs(ex._t_sf(-1.833, 9) - 0.95) < 2e-4
    # Equal sizes and spreads: df = 2 (n - 1), t from the pooled error.
    w = ex.welch_one_sided((0.6, 0.1, 10), (0.5, 0.1, 10))
    assert abs(w["df"] - 18) < 1e-9 and abs(w["t"] - 0.1 / (0.1 * (2 / 10) ** 0.5)) < 1e-9


def test_claim_needs_a_significant_gain_of_five_points_over_kd_and_shuffled():
    def s(v, m, sd, n=10):
        return {"variant": v, "records": 250, "q_all": (m, sd), "n": n}

    base = [s("kd", 0.5, 0.035), s("kd+vat", 0.6, 0.035), s("kd+vat-shuffled", 0.5, 0.035)]
    assert ex.claim(base, 250)["holds"] is True
    assert ex.claim(base, 250)["verdict"] == "holds"
    # +5.3 points with 3 seeds at sd 4.5: not significant -> inconclusive, never "null".
    weak = [s("kd", 0.5, 0.045, 3), s("kd+vat", 0.553, 0.045, 3), s("kd+vat-shuffled", 0.5, 0.045, 3)]
    assert ex.claim(weak, 250)["holds"] is False
    assert ex.claim(weak, 250)["verdict"] == "inconclusive"
    # significant but below 5 points: not the claim
    small = [s("kd", 0.5, 0.005), s("kd+vat", 0.53, 0.005), s("kd+vat-shuffled", 0.5, 0.005)]
    assert ex.claim(small, 250)["holds"] is False
    assert ex.claim([*base[:2], s("kd+vat-shuffled", 0.6, 0.035)], 250)["holds"] is False
    assert ex.claim(base[:2], 250)["holds"] is None


def test_shuffled_control_takes_targets_from_other_images(monkeypatch):
    """train_model(shuffle_maps=True) runs the teacher's captured forward on the batch's
    images rolled by one, and only that forward: KD still sees the real images."""
    from compodistill.apps import grounded

    seen = []
    tok = grounded.make_tokenizer([{"conversations": [{"value": "red"}]}])
    student, teacher = grounded.grid_models(len(tok), teacher_hidden=16, teacher_layers=2,
                                            student_hidden=16, student_layers=2)
    teacher.model.register_forward_pre_hook(
        lambda mod, args, kw: seen.append(kw["pixel_values"].clone()), with_kwargs=True)
    side = teacher.config.vision_config.image_size
    pixels = torch.randn(3, 1, 3, side, side)
    feats = [{"input_ids": [5] * 3 + [len(tok) - 1] * 9 + [6, 7],
              "labels": [-100] * 12 + [6, 7], "pixel_values": pixels[i]} for i in range(3)]
    grounded.train_model(student, feats, steps=1, batch_size=3, lr=1e-3,
                         pad_id=tok.pad_token_id, teacher=teacher, kd=1.0, vat=1.0,
                         vat_layers=([1], [1]), shuffle_maps=True, seed=0)
    assert len(seen) == 2
    real, maps = seen
    assert torch.equal(maps, real.roll(1, 0)) and not torch.equal(maps, real)
    assert sorted(real.flatten(1).sum(1).tolist()) == sorted(pixels.flatten(1).sum(1).tolist())
