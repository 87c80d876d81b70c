"""bench/experiment_cr.py: the variant table, argument parsing, and a tiny end-to-end smoke run.

The real experiment takes up to an hour and is not run in CI; this keeps the script from rotting.
"""
from __future__ import annotations

import csv

import pytest

pytest.importorskip("peft")
pytest.importorskip("accelerate")
pytest.importorskip("matplotlib")

from bench import experiment_cr as ex  # noqa: E402
from compodistill.train.config import config_from_dict  # noqa: E402


def test_variant_table_covers_the_paper():
    names = set(ex.VARIANTS)
    assert {"sft", "kd", "kd+vat", "kd+vat+taf"} <= names
    assert {"match=simple", "match=adaptive", "layers=early", "layers=late", "layers=all",
            "loss=kl", "loss=mse"} <= names
    assert {"recipe=llava_kd", "recipe=llavadi"} <= names  # the other seed methods
    # Ablations change one VAT option of CompoDistill (group / intermediate / cosine, TAF on).
    assert ex.vat_options("kd+vat+taf") == ex.BASE_VAT
    assert ex.vat_options("match=adaptive") == {**ex.BASE_VAT, "matching": "adaptive"}
    assert ex.vat_options("layers=early")["preset"] == "early"
    assert ex.vat_options("loss=mse")["loss"] == "mse"
    assert not ex.VARIANTS["sft"]["kd"] and not ex.VARIANTS["sft"]["vat"]


def test_arguments(tmp_path):
    full = ex.resolve(ex.build_parser().parse_args([]))
    assert full["seeds"] == [0, 1, 2] and full["variants"] == list(ex.VARIANTS)
    assert full["csv"] == ex.RESULTS_DIR / "experiment_cr.csv"
    quick = ex.resolve(ex.build_parser().parse_args(
        ["--quick", "--out", str(tmp_path), "--seeds", "3", "4", "--dft-steps", "7",
         "--variants", "sft", "loss=kl"]))
    assert quick["seeds"] == [3, 4] and quick["variants"] == ["sft", "loss=kl"]
    assert quick["dft_steps"] == 7 and quick["csv"] == tmp_path / "experiment_cr.csv"
    with pytest.raises(SystemExit):
        ex.build_parser().parse_args(["--variants", "nope"])


def test_every_variant_config_is_valid(tmp_path):
    opts = ex.resolve(ex.build_parser().parse_args(["--quick"]))
    data = {"train": "t.json", "image_folder": "img"}
    budget = opts["dpt_steps"] + opts["dft_steps"] + opts["sft_steps"]
    for name, spec in ex.VARIANTS.items():
        cfg = config_from_dict(ex.student_config(name, 0, tmp_path / "s", tmp_path / "t", data,
                                                 tmp_path / name, opts))
        assert sum(s.max_steps for s in cfg.stages) == budget  # same budget for every method
        if "recipe" in spec:
            assert cfg.recipe == spec["recipe"] and cfg.teacher
            kinds = {"llava_kd": ["dpt", "sft", "dft"], "llavadi": ["dpt", "dft"]}
            assert [s.kind for s in cfg.stages] == kinds[spec["recipe"]]
            continue
        assert [s.kind for s in cfg.stages] == ["dpt", "dft", "sft"]
        assert cfg.taf == spec["taf"] and cfg.stages[1].weights.vat == spec["vat"]
        assert cfg.stages[0].weights.kd == spec["kd"] and cfg.stages[2].weights.kd == 0
        assert bool(cfg.teacher) == bool(spec["kd"] or spec["vat"] or spec["taf"])


def test_smoke_run(tmp_path):
    args = ["--quick", "--out", str(tmp_path / "run"), "--variants", "sft", "kd+vat+taf",
            "--num-images", "8", "--num-eval", "2", "--teacher-layers", "4",
            "--teacher-steps", "3", "--warmup-steps", "2", "--dpt-steps", "1", "--dft-steps", "2",
            "--sft-steps", "1", "--batch-size", "4", "--teacher-batch", "4",
            "--attention-items", "1"]
    res = ex.run(ex.resolve(ex.build_parser().parse_args(args)), args)
    with open(tmp_path / "run" / "experiment_cr.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["variant"] for r in rows] == ["teacher", "sft", "kd+vat+taf"]
    for r in rows:
        assert 0 <= float(r["cr_ab"]) <= 1 and 0 <= float(r["cr_caption"]) <= 1
        assert r["device"] and r["git_commit"] and r["command"].startswith("python bench/")
    assert (tmp_path / "run" / "experiment_cr.png").stat().st_size > 0
    assert "| kd+vat+taf | 1 |" in res["table"]
    # A second call reuses the finished runs.
    again = ex.run(ex.resolve(ex.build_parser().parse_args(args)), args)
    assert [r["train_seconds"] for r in again["rows"]] == [r["train_seconds"] for r in res["rows"]]
