"""bench/experiment_grounded.py: a bounded smoke run end to end, the layer choice, the
shuffled-maps control (its VAT target really comes from other images), and the protocol's
statistics (bench/_stats.py: Welch interval, power, Holm) and decision rule
(bench/_decision.py: every verdict branch), with --replot of the committed CSV."""
from __future__ import annotations

import csv
import json

import pytest
import torch

pytest.importorskip("matplotlib")

from bench import experiment_grounded as ex  # noqa: E402


def test_smoke_run_writes_csv_plot_and_claims(tmp_path):
    argv = ["--quick", "--out", str(tmp_path), "--variants", "kd", "kd+vat",
            "kd+vat-shuffled", "--sizes", "8", "--student-steps", "2", "--seeds", "0", "1"]
    result = ex.run(ex.resolve(ex.build_parser().parse_args(argv)), argv)
    rows = list(csv.DictReader(open(tmp_path / "experiment_grounded.csv")))
    assert [r["variant"] for r in rows] == ["teacher"] + ["kd", "kd+vat", "kd+vat-shuffled"] * 2
    assert [r["seed"] for r in rows[1:]] == ["0"] * 3 + ["1"] * 3
    for r in rows:
        assert r["git_commit"] and r["date"] and r["device"] and r["command"]
        assert 0 <= float(r["q_all"]) <= 1 and float(r["q_all_se"]) >= 0
        assert len(json.loads(r["att_answer"])) == 2  # both quick models have 2 layers
    assert (tmp_path / "experiment_grounded.png").stat().st_size > 10_000
    # The teacher trained with the auxiliary attention loss (look) on its upper half (layer 1
    # of the quick 2-layer teacher); the students' VAT rows are the response rows.
    teacher = json.loads((tmp_path / "teacher" / "row.json").read_text())
    assert teacher["look"] == {"weight": 1.0, "layers": [1]}
    assert teacher["final_losses"]["look"] > 0
    verdict = result["claims"][0]
    assert verdict["size"] == 8 and verdict["verdict"] in ("holds", "inconclusive", "null")
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["decisions"][0]["lines"][-len(verdict["to_decide"]) - 1].startswith(
        "VERDICT at 8 images")
    # A second start reuses every finished run.
    again = ex.run(ex.resolve(ex.build_parser().parse_args(argv)), argv)
    assert [r["q_all"] for r in again["rows"]] == [r["q_all"] for r in result["rows"]]
    # --replot redraws from the CSV alone: the same table as the run printed.
    (tmp_path / "experiment_grounded.png").unlink()
    assert ex.main(argv + ["--replot"]) == 0
    assert (tmp_path / "experiment_grounded.png").stat().st_size > 10_000
    assert ex.replot(tmp_path / "experiment_grounded.csv")["table"] == result["table"]


def test_teacher_look_options_are_checked(tmp_path):
    args = ex.build_parser().parse_args(["--quick", "--teacher-look-layers", "5"])
    with pytest.raises(SystemExit, match=r"--teacher-look-layers \[5\]: the teacher has layers 0..1"):
        ex.resolve(args)
    opts = ex.resolve(ex.build_parser().parse_args(["--quick", "--vat-teacher-layers", "0"]))
    assert opts["teacher_look_layers"] == [0]  # the look follows the distilled layers


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
    assert abs(st.t_sf(1.833, 9) - 0.05) < 2e-4
    assert abs(st.t_sf(2.764, 10) - 0.01) < 1e-4
    assert abs(st.t_sf(1.645, 1e6) - 0.05) < 2e-4
    assert abs(st.t_sf(-1.833, 9) - 0.95) < 2e-4


def test_every_protocol_arm_runs_by_default():
    full = ex.resolve(ex.build_parser().parse_args([]))
    assert full["seeds"] == list(range(10)) and full["variants"] == list(ex.VARIANTS)
    assert {v: ex.VARIANTS[v]["seeds"] for v in ex.VARIANTS} == {
        "kd": 10, "kd+vat": 10, "kd+vat-shuffled": 10, "kd+vat-oracle": 4, "kd+taf": 4,
        "kd+taf+vat": 4, "sft": 4}
    items = [{"category": c, "id": i} for i in range(150) for c in ("a", "b")]
    sanity = ex.cr_sanity_set(items)
    assert len(sanity) == 2 * ex.CR_PAIRS and {it["category"] for it in sanity} == {"a", "b"}


def _look_features(tok, model, cells):
    """One feature per cell: 3 prompt words, the 9 image tokens, a question word, the answer;
    its answer row (12) looks at ``cell``."""
    side = model.config.vision_config.image_size
    gen = torch.Generator().manual_seed(0)
    img = model.config.image_token_id
    return [{"input_ids": [5] * 3 + [img] * 9 + [6, 7], "labels": [-100] * 13 + [7],
             "pixel_values": torch.randn(1, 3, side, side, generator=gen),
             "look": [(12, c)]} for c in cells]


def _target_share(model, feats, layer):
    ids = torch.tensor([f["input_ids"] for f in feats])
    impl = model.config.text_config._attn_implementation
    model.set_attn_implementation({"text_config": "eager"})
    with torch.no_grad():
        out = model.model(input_ids=ids, pixel_values=torch.cat([f["pixel_values"] for f in feats]),
                          output_attentions=True, use_cache=False)
    model.set_attn_implementation({"text_config": impl})
    shares = []
    for b, f in enumerate(feats):
        (row, cell), = f["look"]
        img = out.attentions[layer][b].mean(0)[row, 3:12]
        shares.append(float(img[cell] / img.sum()))
    return sum(shares) / len(shares)


def test_oracle_arm_pulls_the_answer_row_onto_its_target_cell():
    """vat_target="oracle": VAT's target is one-hot on each answer row's target cell, so the
    student's answer rows learn to look there (a teacher that looks nowhere in particular
    does not teach that); the rows are only the look rows (look_rows)."""
    from compodistill.apps import grounded

    tok = grounded.make_tokenizer([{"conversations": [{"value": "red"}]}])
    student, teacher = grounded.grid_models(len(tok), teacher_hidden=16, teacher_layers=2,
                                            student_hidden=16, student_layers=2)
    feats = _look_features(tok, student, [2, 6, 2, 6])
    rows = grounded.look_rows([f["look"] for f in feats], (4, 14))
    assert rows.nonzero().tolist() == [[b, 12] for b in range(4)]
    before = _target_share(student, feats, 1)
    common = dict(steps=40, batch_size=4, lr=1e-2, pad_id=tok.pad_token_id, teacher=teacher,
                  kd=0.0, vat=5.0, vat_layers=([1], [1]), vat_query="answer", seed=0)
    taught = grounded.train_model(student, feats, vat_target="oracle", **common)
    after = _target_share(student, feats, 1)
    assert before < 0.2 and after > 0.6, (before, after)
    assert taught["final_losses"]["vat"] < 0.4
    with pytest.raises(ValueError, match="vat_target='oracle' needs vat_query='answer'"):
        grounded.train_model(student, feats, vat_target="oracle", **{**common, "vat_query": "response"})


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


# ----------------------------------------------------------------------------- protocol stats

from bench import _decision as dec  # noqa: E402
from bench import _stats as st  # noqa: E402


def _seeds(mean, n, sd=0.035):
    # a fixed spread: mean ± sd·(a symmetric pattern), seed std exactly known
    pattern = [(-1) ** i * (1 + (i // 2) % 2) for i in range(n)]
    scale = sd / st.statistics.stdev(pattern)
    return [mean + scale * x - scale * st.statistics.mean(pattern) for x in pattern]


def test_welch_interval_uses_the_t_quantile():
    # t_{0.95, 18} = 1.7341 (tables); equal arms of 10 at sd 0.1 have df 18 and se 0.1*sqrt(0.2)
    assert abs(st.t_ppf(0.95, 18) - 1.7341) < 2e-4
    a, b = _seeds(0.6, 10, 0.1), _seeds(0.5, 10, 0.1)
    w = st.welch(a, b)
    se = 0.1 * (2 / 10) ** 0.5
    assert abs(w["df"] - 18) < 1e-9 and abs(w["se"] - se) < 1e-12
    assert abs(w["ci"][1] - (0.1 + 1.7341 * se)) < 1e-4
    assert abs(w["ci"][0] - (0.1 - 1.7341 * se)) < 1e-4


def test_power_matches_the_real_test_and_a_normal_bound():
    # Against the Monte Carlo power of the real test (4,000 draws: se of a proportion near
    # 0.9 is 0.005) and below the known-sigma z-test power Phi(lambda - z_0.95).
    analytic = st.welch_power(0.05, 0.035, 10)
    simulated = st.simulated_power(0.05, 0.035, 10, draws=4000, seed=3)
    z_power = st.norm_cdf(0.05 / (0.035 * (2 / 10) ** 0.5) - 1.6449)
    assert abs(analytic - simulated) < 0.02
    assert 0.88 < analytic < z_power
    assert abs(st.simulated_power(0.05, 0.035, 3, draws=4000, seed=3) - 0.37) < 0.03
    assert st.seeds_for_power(0.05, 0.035) == 10


def test_holm_steps_down():
    out = st.holm({"a": 0.01, "b": 0.04, "c": 0.03, "d": 0.2})
    # sorted 0.01, 0.03, 0.04, 0.2: thresholds 0.05/4, 0.05/3 -> only a is rejected
    assert [out[k]["reject"] for k in "abcd"] == [True, False, False, False]
    assert abs(out["a"]["p_holm"] - 0.04) < 1e-12 and abs(out["c"]["p_holm"] - 0.09) < 1e-12
    assert abs(out["b"]["p_holm"] - 0.09) < 1e-12  # monotone: max(0.09, 2 * 0.04 = 0.08)
    assert out["d"]["p_holm"] == 0.2
    two = st.holm({"a": 0.02, "b": 0.024})
    assert two["a"]["reject"] and two["b"]["reject"]


def _arms(vat=0.5, shuf=0.5, oracle=0.7, n=10):
    return {"kd": _seeds(0.5, n), "kd+vat": _seeds(vat, n), "kd+vat-shuffled": _seeds(shuf, n),
            "kd+vat-oracle": _seeds(oracle, 4)}


MOVED = {"kd": [0.2] * 10, "kd+vat": [0.5] * 10}


def test_decision_holds_null_and_inconclusive():
    ok = dict(teacher_accuracy_ok=True, teacher_attention_ok=True)
    assert dec.decide(_arms(vat=0.6), MOVED, **ok)["verdict"] == "holds"
    # +6 over KD but not over the shuffled control: not the claim
    assert dec.decide(_arms(vat=0.56, shuf=0.55), MOVED, **ok)["verdict"] != "holds"
    # significant but below 5 points
    d = dec.decide(_arms(vat=0.54), MOVED, **ok)
    assert d["verdict"] == "inconclusive" and d["vs_kd"]["p"] < 0.05
    # a clean null: every condition met
    null = dec.decide(_arms(), MOVED, **ok)
    assert null["verdict"] == "null" and all(null["conditions"].values())
    # ... and each condition alone turns it inconclusive, naming what would decide it
    for broken, kwargs in (
            ("teacher_attention_gate", dict(primary=_arms(), share=MOVED, **{
                **ok, "teacher_attention_ok": False})),
            ("teacher_accuracy_gate", dict(primary=_arms(), share=MOVED, **{
                **ok, "teacher_accuracy_ok": False})),
            ("oracle_beats_kd", dict(primary=_arms(oracle=0.58), share=MOVED, **ok)),
            ("manipulation", dict(primary=_arms(), share={"kd": [0.2] * 10,
                                                          "kd+vat": [0.34] * 10}, **ok)),
            ("interval_below_min_gain", dict(primary=_arms(vat=0.53), share=MOVED, **ok))):
        d = dec.decide(**kwargs)
        assert d["verdict"] == "inconclusive", broken
        assert [k for k, v in d["conditions"].items() if not v] == [broken]
        assert d["to_decide"]
    # the oracle arm missing: never a null
    no_oracle = {k: v for k, v in _arms().items() if k != "kd+vat-oracle"}
    assert dec.decide(no_oracle, MOVED, **ok)["verdict"] == "inconclusive"
    # the committed run's shape: 3 seeds, +5.3 at sd 4.7 -> inconclusive, never a null
    weak = {"kd": _seeds(0.342, 3, 0.024), "kd+vat": _seeds(0.395, 3, 0.047),
            "kd+vat-shuffled": _seeds(0.34, 3, 0.011)}
    assert dec.decide(weak, {}, **ok)["verdict"] == "inconclusive"
    assert dec.decide({"kd": [0.5]}, {}, **ok)["verdict"] == "not decidable"


def test_secondary_contrasts_are_holm_corrected():
    values = {"q_left": {"kd+vat": _seeds(0.6, 10), "kd": _seeds(0.5, 10)},
              "q_all": {"kd+taf": _seeds(0.52, 4), "kd": _seeds(0.5, 10)}}
    out = dec.secondary_contrasts(values)
    assert set(out["contrasts"]) == {"vat_left", "taf"}
    assert set(out["skipped"]) == {"vat_color", "vat_shape", "vat_given_taf"}
    c = out["contrasts"]
    # two in the family: the smaller p doubled, the larger kept (and never below the first)
    assert c["vat_left"]["p"] < c["taf"]["p"]
    assert abs(c["vat_left"]["p_holm"] - 2 * c["vat_left"]["p"]) < 1e-12
    assert c["taf"]["p_holm"] == max(c["taf"]["p"], c["vat_left"]["p_holm"])
    assert c["vat_left"]["reject"] and not c["taf"]["reject"]


def test_replot_of_the_committed_csv_gives_the_decision(tmp_path):
    import shutil

    src = ex.RESULTS_DIR / "experiment_grounded_pilot.csv"
    shutil.copy(src, tmp_path / "e.csv")
    out = ex.replot(tmp_path / "e.csv")
    assert (tmp_path / "e.png").stat().st_size > 10_000
    assert [c["verdict"] for c in out["claims"]] == ["inconclusive", "inconclusive"]
    # kd+vat+taf (the committed name) is read as kd+taf+vat
    assert any(s["variant"] == "kd+taf+vat" for s in out["summary"])
    first = out["claims"][0]
    assert abs(first["vs_kd"]["diff"] - 0.053) < 0.001
    assert first["vs_kd"]["ci"][0] < 0 < 0.05 < first["vs_kd"]["ci"][1]


def test_turn_target_cells_and_answer_rows(tmp_path):
    """Target cells read from the pixels agree with the generator's own (held-out questions),
    and every dense record gets one cell per question turn; answer rows are the last prompt
    row of each supervised span; the oracle map is one-hot on them."""
    from compodistill.apps import grounded_rows as gr
    from compodistill.data.grid_task import generate_grid_task
    from compodistill.visual_attention.layout import visual_layout

    generate_grid_task(str(tmp_path), num_train=4, num_eval=20, seed=0)
    items = json.loads((tmp_path / "questions.json").read_text())
    for it in items:
        rec = {"image": it["image"], "conversations": [
            {"from": "human", "value": it["question"]}, {"from": "gpt", "value": it["answer"]}]}
        assert gr.turn_target_cells(rec, str(tmp_path)) == [it["target_cell"]], it["id"]
    train = json.loads((tmp_path / "train.json").read_text())
    dense = gr.turn_target_cells(train[0], str(tmp_path))
    assert len(dense) == 4 and None not in dense
    for rec in train[0::2]:  # the generator's own target_cells, read back from the pixels
        assert gr.turn_target_cells(rec, str(tmp_path)) == rec["target_cells"], rec["id"]
    assert gr.turn_target_cells(train[1], str(tmp_path)) == [None]  # the caption
    labels = torch.tensor([[-100, -100, 7, 8, -100, -100, 9, -100],
                           [-100, 5, -100, -100, -100, -100, -100, -100]])
    rows = gr.answer_rows(labels)
    assert rows.nonzero().tolist() == [[0, 1], [0, 5], [1, 0]]
    vis = torch.zeros(2, 8, dtype=torch.bool)
    vis[:, 0] = True
    layout = visual_layout(vis, 2, 8, query=rows)
    oracle = gr.onehot_targets(layout, [[0, None], [0]])
    assert oracle.shape == (2, 2, 1) and oracle.sum() == 2 and oracle[0, 1].sum() == 0
    with pytest.raises(ValueError, match="sample 1 has 2 target cells for 1"):
        gr.onehot_targets(layout, [[0, 0], [0, 0]])
