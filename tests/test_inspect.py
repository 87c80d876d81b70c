"""``compodistill inspect`` and the per-layer VAT metrics of training (issue #18).

- The drawn cells equal the eager reference: ``attn_implementation="eager"`` with
  ``output_attentions=True``, head mean, answer rows, image columns, the teacher window mean
  (the tool itself runs the fused capture). The pair has a sample with two images and one
  without. A tiny LLaVA model has one image size, so two grid sizes in one model are
  impossible; :func:`image_grids` is tested directly on two layouts of different sizes.
- The summary CSV's loss equals :func:`visual_map_loss` on the reference maps.
- Bad paths and samples without images give one-line errors through ``main``.
- DFT metrics hold ``loss_vat_layer<l>`` for every matched layer, and the total is unchanged.
"""
from __future__ import annotations

import csv
import json
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("matplotlib")

from compodistill.cli import main  # noqa: E402
from compodistill.apps.inspect import PatchGrid, image_grids, patch_grid, run_inspect  # noqa: E402
from compodistill.visual_attention import visual_layout, visual_map_loss  # noqa: E402

from _helpers import assert_one_line_error, write_tiny_pair  # noqa: E402


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("inspect")
    write_tiny_pair(root, num=2, num_eval=1, student_layers=2, teacher_layers=4)
    records = json.loads((root / "data" / "train.json").read_text())
    with_image = [r for r in records if r.get("image")]
    a, b = with_image[0], with_image[1]
    two = {"id": "two", "image": [a["image"], b["image"]],
           "conversations": [{"from": "human", "value": "<image>\nleft\n<image>\nright: same?"},
                             {"from": "gpt", "value": a["conversations"][-1]["value"]}]}
    none = {"id": "none", "conversations": [{"from": "human", "value": "what is red?"},
                                            {"from": "gpt", "value": "red"}]}
    data = root / "data" / "inspect.json"
    data.write_text(json.dumps([two, none, a]))
    only_none = root / "data" / "none.json"
    only_none.write_text(json.dumps([none]))
    return root, data, only_none


def run(root, data, out, **kw):
    return run_inspect(str(root / "teacher"), str(root / "student"), str(data), str(out),
                       progress=False, **kw)


def test_image_grids_on_two_layouts_of_different_sizes():
    small, large = PatchGrid(2, 2), PatchGrid(3, 4, lead=1)  # the second with a CLS token
    values = torch.arange(4 + 13, dtype=torch.float32)
    grids = image_grids(values, [small, large])
    assert torch.equal(grids[0], torch.tensor([[0., 1.], [2., 3.]]))
    assert torch.equal(grids[1], torch.arange(5, 17, dtype=torch.float32).reshape(3, 4))
    grids = image_grids(values[:13 + 4], [large, small])  # order follows the sequence
    assert torch.equal(grids[0], torch.arange(1, 13, dtype=torch.float32).reshape(3, 4))
    assert torch.equal(grids[1], torch.arange(13, 17, dtype=torch.float32).reshape(2, 2))
    with pytest.raises(ValueError, match="17 in all"):
        image_grids(values[:-1], [small, large])


def test_patch_grid_comes_from_the_config():
    def config(size, patch, tokens):
        return SimpleNamespace(vision_config=SimpleNamespace(image_size=size, patch_size=patch),
                               image_seq_length=tokens)

    assert patch_grid(config(32, 8, 16)) == PatchGrid(4, 4, 0)
    assert patch_grid(config(24, 8, 10)) == PatchGrid(3, 3, 1)  # CLIP "full": CLS first
    assert patch_grid(config((16, 32), 8, 8)) == PatchGrid(2, 4, 0)
    with pytest.raises(ValueError, match="does not fit"):
        patch_grid(config(32, 8, 20))


def eager_head_means(path, ids, pixels):
    from compodistill.hf import load_student

    model = load_student(path).eval()
    model.set_attn_implementation("eager")
    with torch.no_grad():
        out = model.model(input_ids=ids, pixel_values=pixels, attention_mask=torch.ones_like(ids),
                          output_attentions=True, use_cache=False)
    return [a[0].float().mean(0) for a in out.attentions]  # per layer (N, N)


def test_cells_and_csv_equal_the_eager_reference(pair, tmp_path, capsys):
    from compodistill.data.records import parse_record
    from compodistill.eval.cli import load_model_and_encoder

    root, data, _ = pair
    result = run(root, data, tmp_path / "out")
    assert [n.split(" has ")[0] for n in result.skipped] == ["record 1 (id 'none')"]
    assert "has no image" in capsys.readouterr().err
    student, encoder = load_model_and_encoder(str(root / "student"))
    grid = patch_grid(student.config)
    records = json.loads(data.read_text())
    checked = 0
    for sample in (0, 2):
        messages, paths = parse_record(records[sample], "r", str(root / "data"))
        enc = encoder.encode(messages)
        ids = torch.tensor([enc["input_ids"]])
        labels = torch.tensor(enc["labels"])
        pixels = encoder.load_images(paths)
        rows = (labels != -100).nonzero().flatten()
        cols = (ids[0] == student.config.image_token_id).nonzero().flatten()
        assert len(cols) == len(paths) * grid.tokens
        s_heads = eager_head_means(root / "student", ids, pixels)
        t_heads = eager_head_means(root / "teacher", ids, pixels)
        layout = visual_layout(ids == student.config.image_token_id, 1, ids.shape[1],
                               query=(labels != -100)[None])
        windows = {0: [0, 1, 2], 1: [1, 2, 3]}  # preset "all", group: 4 - 2 + 1 = 3 layers
        for layer, window in windows.items():
            s_map = s_heads[layer][rows][:, cols]
            t_map = torch.stack([t_heads[t][rows][:, cols] for t in window]).mean(0)
            cells = result.cells[(sample, layer)]
            assert len(cells["student"]) == len(paths)
            for i in range(len(paths)):
                block = slice(i * grid.tokens, (i + 1) * grid.tokens)
                for name, ref in (("student", s_map), ("teacher", t_map)):
                    want = ref[:, block].mean(0).reshape(grid.rows, grid.cols)
                    torch.testing.assert_close(cells[name][i], want, atol=1e-6, rtol=1e-4)
            row = next(r for r in result.rows
                       if r["sample"] == sample and r["student_layer"] == layer)
            assert row["teacher_layers"] == " ".join(map(str, window))
            want = visual_map_loss(s_map[None], t_map[None], layout, loss="cosine")
            assert row["loss"] == pytest.approx(float(want), rel=1e-4, abs=1e-6)
            assert row["cosine"] == pytest.approx(1 - float(want), rel=1e-4, abs=1e-6)
            checked += 1
    assert checked == 4
    with open(result.summary_csv, newline="") as f:
        table = list(csv.DictReader(f))
    assert [(int(r["sample"]), int(r["student_layer"])) for r in table] == [
        (r["sample"], r["student_layer"]) for r in result.rows]
    for got, want in zip(table, result.rows):
        assert float(got["loss"]) == pytest.approx(want["loss"], rel=1e-6)
        assert float(got["cosine"]) == pytest.approx(want["cosine"], rel=1e-6)
    assert result.summary_png.exists() and len(result.figures) == 4
    assert all(p.exists() and p.stat().st_size > 1000 for p in result.figures)


def test_kl_option_and_text_rows_reach_the_csv(pair, tmp_path):
    root, data, _ = pair
    cos = run(root, data, tmp_path / "a", samples=1, figures=False)
    kl = run(root, data, tmp_path / "b", samples=1, figures=False, loss="kl", query="text",
             layers=[1])
    assert [r["student_layer"] for r in kl.rows] == [1]
    assert kl.rows[0]["loss"] != pytest.approx(cos.rows[1]["loss"])
    assert kl.summary_png is None and not kl.figures


@pytest.mark.parametrize("flag", ["--teacher", "--student", "--data"])
def test_bad_paths_are_one_line_errors(pair, tmp_path, capsys, flag):
    root, data, _ = pair
    args = {"--teacher": str(root / "teacher"), "--student": str(root / "student"),
            "--data": str(data)}
    args[flag] = str(tmp_path / "missing")
    argv = ["inspect", "--quiet", "--out", str(tmp_path / "o")]
    for key, value in args.items():
        argv += [key, value]
    assert_one_line_error(main(argv), capsys.readouterr().err, "compodistill inspect: error:",
                          flag, "not found", "missing")


def test_sample_without_images_is_a_one_line_error(pair, tmp_path, capsys):
    root, _, only_none = pair
    code = main(["inspect", "--quiet", "--teacher", str(root / "teacher"), "--student",
                 str(root / "student"), "--data", str(only_none), "--out", str(tmp_path / "o")])
    assert_one_line_error(code, capsys.readouterr().err, "compodistill inspect: error:",
                          "has no image", "'none'")


def test_missing_image_file_is_a_one_line_error(pair, tmp_path, capsys):
    root, data, _ = pair
    code = main(["inspect", "--quiet", "--teacher", str(root / "teacher"), "--student",
                 str(root / "student"), "--data", str(data), "--image-folder", str(tmp_path),
                 "--out", str(tmp_path / "o")])
    assert_one_line_error(code, capsys.readouterr().err, "image file not found")


def test_dft_metrics_log_every_matched_layer_and_keep_the_total(pair):
    pytest.importorskip("peft")
    pytest.importorskip("accelerate")
    from compodistill.train.config import config_from_dict
    from compodistill.train.metrics import read_metrics
    from compodistill.train.trainer import CompoDistillTrainer

    root, _, _ = pair
    stage = dict(kind="dft", max_steps=2, batch_size=2, lora_r=2, lora_alpha=4,
                 weights=dict(lm=0.0, kd=0.0, vat=0.5))  # VAT alone: the total is exact
    config = config_from_dict({
        "student": str(root / "student"), "teacher": str(root / "teacher"),
        "output_dir": str(root / "run"),
        "data": {"train_json": str(root / "data" / "train.json"),
                 "image_folder": str(root / "data"), "max_length": 128},
        "vat": {"student_layers": [0, 1], "teacher_layers": [1, 2, 3]}, "stages": [stage]})
    (result,) = CompoDistillTrainer(config, show_progress=False).run()
    records = read_metrics(result.metrics_path)
    assert len(records) == 2
    for r in records:
        layers = [r["loss_vat_layer0"], r["loss_vat_layer1"]]
        assert r["loss_vat"] == pytest.approx(sum(layers) / 2, rel=1e-5)  # layer mean
        # The total counts VAT once, at its weight: the per-layer parts are metrics only.
        assert r["loss"] == pytest.approx(0.5 * r["loss_vat"], rel=1e-6)
        assert min(layers) > 0
    header = (result.metrics_path.parent / "metrics.csv").read_text().splitlines()[0]
    assert {"loss_vat_layer0", "loss_vat_layer1"} <= set(header.split(","))
    assert result.plot_path is not None and result.plot_path.exists()


def test_loss_curves_get_a_layer_panel(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    from compodistill.train import metrics

    records = [{"step": s, "loss": 1.0 / s, "loss_vat": 0.2, "loss_vat_layer2": 0.1,
                "loss_vat_layer10": 0.3} for s in (1, 2)]
    seen = []
    original = matplotlib.figure.Figure.savefig

    def spy(fig, *args, **kw):
        seen.append([[line.get_label() for line in ax.get_lines()] for ax in fig.axes])
        return original(fig, *args, **kw)

    matplotlib.figure.Figure.savefig = spy
    try:
        assert metrics.plot_loss_curves(records, tmp_path / "c.png").exists()
    finally:
        matplotlib.figure.Figure.savefig = original
    assert seen == [[["loss", "loss_vat"], ["student layer 2", "student layer 10"]]]


def test_capture_exposes_layer_maps_then_layer_losses():
    from compodistill.hf import AttentionDistiller, tiny_llava_pair

    student, teacher = tiny_llava_pair(image_size=16, patch_size=8)
    cfg = student.config
    ids = torch.randint(0, 100, (1, cfg.image_seq_length + 6))
    ids[:, 1:1 + cfg.image_seq_length] = cfg.image_token_id
    pixels = torch.randn(1, 3, 16, 16)
    distiller = AttentionDistiller(student, teacher, preset="all", loss="mse")
    with torch.no_grad(), distiller.capture(ids) as cap:
        teacher(input_ids=ids, pixel_values=pixels)
        student(input_ids=ids, pixel_values=pixels)
    assert cap.layer_losses == {}
    maps = cap.layer_maps()
    assert [m.student_layer for m, _, _ in maps] == [0, 1]
    want = {m.student_layer: float(visual_map_loss(s, t, cap.layout, loss="mse"))
            for m, s, t in maps}
    total = cap.loss()
    got = {k: float(v) for k, v in cap.layer_losses.items()}
    assert got == pytest.approx(want, rel=1e-6)
    assert float(total) == pytest.approx(sum(want.values()) / 2, rel=1e-6)
    with pytest.raises(ValueError, match="before loss"):
        cap.layer_maps()
