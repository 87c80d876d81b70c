"""The three-stage trainer on tiny LLaVA models (CPU): trainable sets, loss terms, LoRA merge."""
from __future__ import annotations


import pytest
import torch

pytest.importorskip("peft")
pytest.importorskip("accelerate")

from compodistill.data import LlavaDataset  # noqa: E402
from compodistill.hf.llava import TAFLlavaForConditionalGeneration, load_student  # noqa: E402
from compodistill.train.config import config_from_dict, default_stage  # noqa: E402
from compodistill.train.stages import prepare_trainable  # noqa: E402
from compodistill.train.trainer import CompoDistillTrainer  # noqa: E402

from _helpers import crash_and_resume, write_tiny_pair  # noqa: E402


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("trainer")
    tok = write_tiny_pair(root, num=6, num_eval=2, student_layers=3, teacher_layers=4)
    return root, tok


def make_config(root, stages, **extra):
    return config_from_dict({
        "student": str(root / "student"), "teacher": str(root / "teacher"),
        "output_dir": str(root / extra.pop("out", "run")),
        "data": {"train_json": str(root / "data" / "train.json"),
                 "image_folder": str(root / "data"), "max_length": 128},
        "vat": {"student_layers": [1, 2], "teacher_layers": [1, 2, 3]},
        "stages": stages, **extra})


def trainable_names(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_trainable_sets_per_stage(setup):
    root, _ = setup
    student, teacher = load_student(root / "student"), load_student(root / "teacher")
    from compodistill.hf.llava import apply_taf

    student = apply_taf(student, teacher)
    _, params = prepare_trainable(student, default_stage("dpt"))
    names = trainable_names(student)
    assert names == {"model.multi_modal_projector.post.weight",
                     "model.multi_modal_projector.post.bias"}
    assert len(params) == 2
    peft_model, _ = prepare_trainable(student, default_stage("dft", lora_r=4, lora_alpha=8))
    names = trainable_names(peft_model)
    assert any("lora_A" in n for n in names) and any("post" in n for n in names)
    assert all("vision_tower" not in n and "linear_1" not in n for n in names)
    assert all("lora" in n or "post" in n for n in names)


def test_chain_trains_each_stage_with_its_losses_and_merges_lora(setup):
    root, tok = setup
    stages = [dict(kind="dpt", max_steps=2, batch_size=2, lr=1e-3),
              dict(kind="dft", max_steps=2, batch_size=2, lora_r=4, lora_alpha=8),
              dict(kind="sft", max_steps=2, batch_size=2, lora_r=4, lora_alpha=8)]
    trainer = CompoDistillTrainer(make_config(root, stages), show_progress=False)
    before = {k: v.clone() for k, v in trainer.student.state_dict().items()}
    results = trainer.run()
    assert [r.name for r in results] == ["dpt", "dft", "sft"]
    terms = [set(r.final_losses) for r in results]
    layers = {"loss_vat_layer1", "loss_vat_layer2"}  # per matched student layer (#18)
    assert terms == [{"loss", "loss_lm", "loss_kd"},
                     {"loss", "loss_lm", "loss_kd", "loss_vat"} | layers, {"loss", "loss_lm"}]
    for r in results:
        assert all(torch.isfinite(torch.tensor(v)) for v in r.final_losses.values())
        assert r.plot_path is not None and r.plot_path.exists()
    final = load_student(root / "run" / "3-sft" / "model")
    assert isinstance(final, TAFLlavaForConditionalGeneration)
    state = final.state_dict()
    assert not any("lora" in k for k in state)  # merged, plain weights
    q_proj = "model.language_model.layers.1.self_attn.q_proj.weight"
    assert not torch.equal(state[q_proj], before[q_proj])  # LoRA updates were merged in
    vision = "model.vision_tower.embeddings.patch_embedding.weight"
    assert torch.equal(state[vision], before[vision])  # never trained
    # Running again skips finished stages and loads the last output.
    again = CompoDistillTrainer(make_config(root, stages), show_progress=False)
    assert again.run() == []


def test_single_stage_starts_from_previous_output(setup):
    root, _ = setup
    stages = [dict(kind="dpt", max_steps=1, batch_size=2), dict(kind="sft", max_steps=1,
                                                                 batch_size=2, lora_r=2)]
    CompoDistillTrainer(make_config(root, stages, out="single"), show_progress=False).run(["dpt"])
    trainer = CompoDistillTrainer(make_config(root, stages, out="single"), show_progress=False)
    results = trainer.run(["sft"])
    assert [r.name for r in results] == ["sft"]
    assert isinstance(trainer.student, TAFLlavaForConditionalGeneration)  # from dpt's output


def test_dataset_and_batch_errors(setup):
    root, tok = setup
    stages = [dict(kind="dpt", max_steps=1, batch_size=3, grad_accum=2)]
    trainer = CompoDistillTrainer(make_config(root, stages, out="bad"), show_progress=False)
    with pytest.raises(ValueError, match="batch_size 3 must be a multiple"):
        trainer.run()
    with pytest.raises(ValueError, match="unknown stages"):
        trainer.run(["dtp"])
    assert isinstance(trainer.dataset, LlavaDataset)


def test_interrupted_stage_resumes_with_the_same_losses(setup, monkeypatch):
    from compodistill.train.metrics import read_metrics

    root, _ = setup
    stage = [dict(kind="dft", max_steps=4, batch_size=2, lora_r=2, lora_alpha=4)]
    CompoDistillTrainer(make_config(root, stage, out="straight", save_every=2),
                        show_progress=False).run()
    crash_and_resume(monkeypatch, lambda: CompoDistillTrainer(
        make_config(root, stage, out="crashed", save_every=2), show_progress=False))
    straight = [r["loss"] for r in read_metrics(root / "straight" / "1-dft" / "metrics.jsonl")]
    resumed = [r["loss"] for r in read_metrics(root / "crashed" / "1-dft" / "metrics.jsonl")]
    assert len(straight) == 4
    assert resumed == pytest.approx(straight, rel=1e-5)


def test_group_by_length_batches_similar_lengths(setup):
    from compodistill.data import LengthGroupedSampler

    root, _ = setup
    stage = {"kind": "sft", "max_steps": 2, "batch_size": 2}
    grouped = CompoDistillTrainer(make_config(root, [stage], out="grouped",
                                              data={"train_json": str(root / "data" / "train.json"),
                                                    "image_folder": str(root / "data"),
                                                    "max_length": 128, "group_by_length": True}),
                                  show_progress=False)
    loader = grouped.data_loader(grouped.config.stages[0])
    assert isinstance(loader.sampler, LengthGroupedSampler)
    order = list(loader.sampler)
    assert sorted(order) == list(range(len(grouped.dataset)))
    plain = CompoDistillTrainer(make_config(root, [stage], out="plain"), show_progress=False)
    assert not isinstance(plain.data_loader(plain.config.stages[0]).sampler,
                          LengthGroupedSampler)
    assert [r.steps for r in grouped.run()] == [2]


def test_lm_and_kd_share_one_lm_head_pass(setup, monkeypatch):
    import compodistill.train.stages as stages

    calls = []
    real = stages.linear_distillation_loss

    def counting(*args, **kwargs):
        calls.append((kwargs.get("ce_weight"), kwargs.get("kd_weight")))
        return real(*args, **kwargs)

    monkeypatch.setattr(stages, "linear_distillation_loss", counting)
    root, _ = setup
    config = make_config(root, [{"kind": "dpt", "max_steps": 2, "batch_size": 2,
                                 "weights": {"lm": 1.0, "kd": 0.5}}], out="one-pass")
    (result,) = CompoDistillTrainer(config, show_progress=False).run()
    assert calls == [(1.0, 0.5), (1.0, 0.5)]  # one fused call per step, both weights
    final = result.final_losses
    assert {"loss_lm", "loss_kd", "loss"} <= set(final)
    assert final["loss"] == pytest.approx(final["loss_lm"] + 0.5 * final["loss_kd"], rel=1e-5)


def test_vat_query_response_distils_the_rows_that_predict_the_answers(setup, monkeypatch):
    """``vat.query: response``: each batch's capture gets the rows whose next token is
    supervised, from that batch's labels; the cache cannot serve it (one-line error)."""
    from compodistill.hf.distiller import AttentionDistiller
    from compodistill.train.config_fields import ConfigError
    from compodistill.visual_attention import response_rows

    seen = []
    real = AttentionDistiller.capture

    def recording(self, input_ids=None, **kwargs):
        seen.append(kwargs.get("query"))
        return real(self, input_ids, **kwargs)

    monkeypatch.setattr(AttentionDistiller, "capture", recording)
    import compodistill.train.stages as stages

    labels_seen = []
    real_rows = stages.response_rows
    monkeypatch.setattr(stages, "response_rows",
                        lambda labels: labels_seen.append(labels.clone()) or real_rows(labels))
    root, _ = setup
    config = make_config(root, [{"kind": "dft", "max_steps": 2, "batch_size": 2,
                                 "lora_r": 4, "lora_alpha": 8,
                                 "weights": {"lm": 1.0, "vat": 1.0}}], out="response")
    config.vat.query = "response"
    (result,) = CompoDistillTrainer(config, show_progress=False).run()
    assert len(seen) == 2 and len(labels_seen) == 2
    for rows, labels in zip(seen, labels_seen):
        assert rows.dtype == torch.bool and rows.shape == labels.shape
        assert torch.equal(rows[:, :-1], labels[:, 1:] != -100) and not rows[:, -1].any()
        assert 0 < rows.sum() < (labels != -100).numel()
    assert result.final_losses["loss_vat"] > 0

    rows = response_rows(torch.tensor([[-100, -100, 5, 6, -100, 7]]))
    assert rows.tolist() == [[False, True, True, False, True, False]]
    with pytest.raises(ValueError, match=r"labels must be a \(B, N\) tensor"):
        response_rows(torch.zeros(3, dtype=torch.long))
    with pytest.raises(ConfigError, match="vat.query.*'response'.*cache"):
        make_config(root, [{"kind": "dft", "max_steps": 1, "weights": {"lm": 1.0, "vat": 1.0}}],
                    teacher={"cache": str(root / "no-cache")}, vat={"query": "response"})
