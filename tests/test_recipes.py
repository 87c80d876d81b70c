"""The seed-method recipes (LLaVA-KD, LLAVADI, CoMD) on tiny LLaVA models (CPU)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("peft")
pytest.importorskip("accelerate")

from compodistill.data import LlavaCollator  # noqa: E402
from compodistill.hf.llava import TAFLlavaForConditionalGeneration, load_student  # noqa: E402
from compodistill.logit_kd.from_logits import rdist_loss, shift_labels  # noqa: E402
from compodistill.testing.logit_kd import (ref_llavadi_feature_mse,  # noqa: E402
                                                   ref_logit_kd, ref_rdist)
from compodistill.train.config import config_from_dict, load_config  # noqa: E402
from compodistill.train.recipes import get_recipe, recipe_names  # noqa: E402
from compodistill.train.recipes.comd import CoMDRecipe  # noqa: E402
from compodistill.train.recipes.comd_judges import (JudgeParseError, JudgeRequest,  # noqa: E402
                                                    ModelJudge, ReferenceOverlapJudge,
                                                    parse_judge_scores, token_f1)
from compodistill.train.recipes.llava_kd import LlavaKDLosses, linear_rdist_loss  # noqa: E402
from compodistill.train.recipes.llavadi import (PROJECTOR_FILE, FeatureProjector,  # noqa: E402
                                                LlavaDILosses, ProjectedHiddenStates)
from compodistill.train.stages import HiddenStates  # noqa: E402
from compodistill.train.trainer import CompoDistillTrainer  # noqa: E402

from _helpers import write_tiny_pair  # noqa: E402

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("recipes")
    tok = write_tiny_pair(root, num=2, student_layers=2, teacher_layers=2)
    return root, tok


def make_config(root, recipe, stages=None, **extra):
    raw = {"recipe": recipe, "student": str(root / "student"), "teacher": str(root / "teacher"),
           "output_dir": str(root / extra.pop("out", recipe)),
           "data": {"train_json": str(root / "data" / "train.json"),
                    "image_folder": str(root / "data"), "max_length": 128}, **extra}
    if stages is not None:
        raw["stages"] = stages
    return config_from_dict(raw)


def tiny_batch(root, tok, n=3):
    """A collated batch of the first ``n`` records, plus the student and teacher."""
    trainer = CompoDistillTrainer(make_config(root, "llava_kd", out="batch"), show_progress=False)
    batch = LlavaCollator(tok.pad_token_id)([trainer.dataset[i] for i in range(n)])
    return trainer, batch


def full_logits(model, batch):
    with torch.no_grad():
        h = HiddenStates(model)(batch["input_ids"], batch["attention_mask"],
                                batch["pixel_values"])
    return h, model.lm_head(h)


# ---------------------------------------------------------------------------- config
def test_recipe_configs_defaults_and_validation(setup):
    root, _ = setup
    assert recipe_names() == ["comd", "compodistill", "llava_kd", "llavadi"]
    kd = make_config(root, "llava_kd")
    assert kd.taf is False
    assert [(s.name, s.trainable, s.lr) for s in kd.stages] == [
        ("dpt", "connector", 1e-3), ("sft", "lora+connector", 2e-4),
        ("dft", "lora+connector", 2e-4)]
    assert (kd.stages[0].weights.kd_vis, kd.stages[0].weights.rdist) == (1.0, 1.0)
    assert kd.stages[1].weights.kd == 0 and kd.stages[2].weights.rdist == 1.0
    assert make_config(root, "compodistill").taf is True  # unchanged default
    assert [s.name for s in make_config(root, "llavadi").stages] == ["dpt", "dft"]
    with pytest.raises(ValueError, match="unknown keys \\['proj_hiden'\\]"):
        make_config(root, "llavadi", llavadi={"proj_hiden": 3})
    with pytest.raises(ValueError, match="no loss terms \\['rdist'\\]"):
        make_config(root, "compodistill", stages=[{"kind": "dft", "weights": {"rdist": 1}}])
    with pytest.raises(ValueError, match="recipe must be one of"):
        make_config(root, "llava-kd")
    for name in ("llava_kd", "llavadi", "comd"):  # the shipped configs load and validate
        assert load_config(CONFIGS / f"{name}.yaml").recipe == name
        assert get_recipe(name).name == name


# ---------------------------------------------------------------------------- LLaVA-KD
def test_rdist_from_hidden_states_equals_reference():
    torch.manual_seed(0)
    B, N, ds, dt, vs, vt = 3, 9, 6, 8, 13, 17
    h_s = torch.randn(B, N, ds, requires_grad=True)
    w_s = torch.randn(vs, ds, requires_grad=True)
    b_s = torch.randn(vs, requires_grad=True)
    h_t, w_t, b_t = torch.randn(B, N, dt), torch.randn(vt, dt), torch.randn(vt)
    vm = torch.zeros(B, N, dtype=torch.bool)
    vm[0, 2:6] = True
    vm[2, [1, 7]] = True  # sample 1 has no visual token
    ours = linear_rdist_loss(h_s, w_s, h_t, w_t, vm, b_s=b_s, b_t=b_t, vocab_chunk=4)
    z_s, z_t = h_s @ w_s.T + b_s, h_t @ w_t.T + b_t
    ref = ref_rdist(z_s, z_t, vm)
    assert ours.item() == pytest.approx(ref.item(), abs=1e-6)
    assert ours.item() == pytest.approx(rdist_loss(z_s, z_t, vm).item(), abs=1e-6)
    for a, b in zip(torch.autograd.grad(ours, (h_s, w_s, b_s)),
                    torch.autograd.grad(ref, (h_s, w_s, b_s))):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    none = linear_rdist_loss(h_s, w_s, h_t, w_t, torch.zeros_like(vm))
    assert none.item() == 0.0 and none.requires_grad


def test_llava_kd_terms_use_their_positions(setup):
    root, tok = setup
    trainer, batch = tiny_batch(root, tok)
    stage = make_config(root, "llava_kd").stages[2]  # dft: every term
    losses = LlavaKDLosses(trainer.student, trainer.teacher, stage, trainer.config, trainer.acc)
    terms = losses(HiddenStates(trainer.student), batch)
    assert set(terms) == {"lm", "kd", "kd_vis", "rdist"}
    _, z_s = full_logits(trainer.student, batch)
    _, z_t = full_logits(trainer.teacher, batch)
    labels = shift_labels(batch["labels"])
    visual = batch["input_ids"] == trainer.student.config.image_token_id
    assert 0 < int(visual.sum()) < int(batch["attention_mask"].sum())
    mask = batch["attention_mask"]
    expect = {
        "kd_vis": ref_logit_kd(z_s, z_t, labels, positions="visual", attention_mask=mask,
                               visual_mask=visual),
        "kd": ref_logit_kd(z_s, z_t, labels, positions="response"),
        "rdist": ref_rdist(z_s, z_t, visual),
        "lm": torch.nn.functional.cross_entropy(z_s.flatten(0, 1), labels.flatten()),
    }
    for name, value in expect.items():
        assert terms[name].item() == pytest.approx(value.item(), rel=1e-4, abs=1e-6), name
    other = ref_logit_kd(z_s, z_t, labels, positions="all", attention_mask=mask)
    assert terms["kd_vis"].item() != pytest.approx(other.item(), rel=1e-3)


def test_llava_kd_trains_the_connector_then_lora(setup):
    from compodistill.train.config import default_stage
    from compodistill.train.stages import prepare_trainable

    root, _ = setup
    student = load_student(root / "student")
    prepare_trainable(student, default_stage("dpt", "llava_kd"))
    names = {n for n, p in student.named_parameters() if p.requires_grad}
    assert names and all(n.startswith("model.multi_modal_projector.") for n in names)
    peft_model, _ = prepare_trainable(student, default_stage("dft", "llava_kd", lora_r=2))
    names = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert any("lora_A" in n for n in names) and any("multi_modal_projector" in n for n in names)
    assert all("lora" in n or "multi_modal_projector" in n for n in names)


def test_llava_kd_end_to_end(setup):
    root, _ = setup
    lora = dict(lora_r=2, lora_alpha=4)
    stages = [dict(kind="dpt", max_steps=1, batch_size=2, warmup_ratio=0.0),
              dict(kind="sft", max_steps=1, batch_size=2, warmup_ratio=0.0, **lora),
              dict(kind="dft", max_steps=1, batch_size=2, warmup_ratio=0.0, **lora)]
    trainer = CompoDistillTrainer(make_config(root, "llava_kd", stages), show_progress=False)
    connector = {k: v.clone() for k, v in
                 trainer.student.model.multi_modal_projector.state_dict().items()}
    results = trainer.run()
    assert [r.name for r in results] == ["dpt", "sft", "dft"]
    every = {"loss", "loss_lm", "loss_kd", "loss_kd_vis", "loss_rdist"}
    assert [set(r.final_losses) for r in results] == [every, {"loss", "loss_lm"}, every]
    assert all(torch.isfinite(torch.tensor(list(r.final_losses.values()))).all()
               for r in results)
    final = load_student(root / "llava_kd" / "3-dft" / "model")
    assert not isinstance(final, TAFLlavaForConditionalGeneration)  # no TAF in LLaVA-KD
    after = final.model.multi_modal_projector.state_dict()
    assert any(not torch.equal(after[k], v) for k, v in connector.items())


# ---------------------------------------------------------------------------- LLAVADI
def test_llavadi_terms_match_references(setup):
    root, tok = setup
    trainer, batch = tiny_batch(root, tok)
    config = make_config(root, "llavadi", llavadi={"proj_hidden": 8})
    stage = config.stages[1]
    losses = LlavaDILosses(trainer.student, trainer.teacher, stage, config, trainer.acc)
    projector = FeatureProjector(32, 64, 8)
    terms = losses(ProjectedHiddenStates(trainer.student, projector), batch)
    assert set(terms) == {"lm", "kd", "feat"}
    h_s, z_s = full_logits(trainer.student, batch)
    h_t, z_t = full_logits(trainer.teacher, batch)
    mask = batch["attention_mask"]
    kd = ref_logit_kd(z_s, z_t, positions="all", attention_mask=mask, zscore=True)
    assert terms["kd"].item() == pytest.approx(kd.item(), rel=1e-4)
    keep = mask.bool()
    feat = ref_llavadi_feature_mse(projector(h_s)[keep], h_t[keep])
    assert terms["feat"].item() == pytest.approx(feat.item(), rel=1e-5)


def test_llavadi_projector_saved_and_dropped_at_export(setup):
    from safetensors.torch import load_file

    root, _ = setup
    stages = [dict(kind="dpt", max_steps=1, batch_size=2, warmup_ratio=0.0),
              dict(kind="dft", max_steps=2, batch_size=2, lora_r=2, lora_alpha=4)]
    config = make_config(root, "llavadi", stages, llavadi={"proj_hidden": 16})
    results = CompoDistillTrainer(config, show_progress=False).run()
    assert [set(r.final_losses) for r in results] == [
        {"loss", "loss_lm"}, {"loss", "loss_lm", "loss_kd", "loss_feat"}]
    stage_dir = root / "llavadi" / "2-dft"
    state = load_file(str(stage_dir / PROJECTOR_FILE))
    assert {k: tuple(v.shape) for k, v in state.items()} == {
        "net.0.weight": (16, 32), "net.0.bias": (16,), "net.2.weight": (64, 16),
        "net.2.bias": (64,)}
    assert not (root / "llavadi" / "1-dpt" / PROJECTOR_FILE).exists()  # no feat, no projector
    model_dir = stage_dir / "model"
    keys = set()
    for f in model_dir.glob("*.safetensors"):
        keys |= set(load_file(str(f)))
    assert keys and not any("projector.net" in k or k.startswith("projector") for k in keys)
    assert type(load_student(model_dir)).__name__ == "LlavaForConditionalGeneration"


# ---------------------------------------------------------------------------- CoMD judges
def test_judge_parsing_is_strict():
    assert parse_judge_scores("7 3") == (7.0, 3.0)
    assert parse_judge_scores(" 10, 1.5\n") == (10.0, 1.5)
    for bad in ("7", "7 3 2", "Assistant 1: 7, Assistant 2: 3", "0 5", "11 2", "", "7 x"):
        with pytest.raises(JudgeParseError):
            parse_judge_scores(bad)
    replies = iter(["8 2", "score: 9"])
    judge = ModelJudge(lambda prompts, images: [next(replies) for _ in prompts],
                       prompt="{instruction}|{first}|{second}")
    request = JudgeRequest("<image>\nq", "a", "b", "ref", [])
    assert judge([request, request]) == [(8.0, 2.0), None]
    assert token_f1("a red circle", "the red circle") == 1.0
    assert token_f1("blue", "red") == 0.0
    overlap = ReferenceOverlapJudge()([JudgeRequest("q", "red circle", "blue", "red circle")])
    assert overlap == [(10.0, 1.0)]


# ---------------------------------------------------------------------------- CoMD loop
class CountingJudge:
    """The teacher always wins by 5 points; each call is one order (teacher first, then second)."""

    def __init__(self):
        self.calls = 0

    def __call__(self, requests):
        self.calls += 1
        return [(8.0, 3.0) if self.calls % 2 else (3.0, 8.0) for _ in requests]


def comd_config(root, rounds, out="comd"):
    stage = [dict(kind="sft", max_steps=1, batch_size=2, lora_r=2, lora_alpha=4,
                  warmup_ratio=0.0)]
    return make_config(root, "comd", stage, out=out,
                       comd={"rounds": rounds, "max_new_tokens": 3,
                             "instruction_max_new_tokens": 4, "assess_samples": 3,
                             # the random tiny teacher ends the default prompt's reply at once
                             "augment_prompt": "{instruction}"})


def test_comd_rounds_write_files_and_resume(setup):
    root, _ = setup
    judge = CountingJudge()
    trainer = CompoDistillTrainer(comd_config(root, 1), show_progress=False,
                                  recipe=CoMDRecipe(judge=judge))
    trainer.run()
    out = root / "comd"
    r1 = out / "round-1"
    for name in ("instructions.json", "answers.json", "scores.json", "hard.json",
                 "augmented.json", "done.json"):
        assert (r1 / name).exists(), name
    answers = json.loads((r1 / "answers.json").read_text())
    scores = json.loads((r1 / "scores.json").read_text())
    assert len(answers) == 3 and {"teacher", "student", "reference"} <= set(answers[0])
    assert scores[0]["teacher_scores"] == [8.0, 8.0] and scores[0]["gap"] == 5.0
    assert len(json.loads((r1 / "hard.json").read_text())) == 3
    augmented = json.loads((r1 / "augmented.json").read_text())
    assert augmented and all(rec["conversations"][1]["from"] == "gpt" and
                             rec["image"].startswith("images/") for rec in augmented)
    assert (r1 / "tune-augmented" / "1-sft" / "model").exists()  # step 4 trained on them
    assert (out / "model").exists() and judge.calls == 2  # both orders, once each

    # Two rounds on the same folder: round 1 is skipped (no new judging), round 2 runs.
    judge2 = CountingJudge()
    trainer = CompoDistillTrainer(comd_config(root, 2), show_progress=False,
                                  recipe=CoMDRecipe(judge=judge2))
    results = trainer.run()
    assert judge2.calls == 2
    r2 = out / "round-2"
    instructions = json.loads((r2 / "instructions.json").read_text())
    first = json.loads((r1 / "instructions.json").read_text())
    assert len(instructions) == len(first) + len(augmented)  # accumulated
    assert (r2 / "done.json").exists() and results
    assert json.loads((r2 / "done.json").read_text())["round"] == 2

    # Resume inside a round: scores and hard samples are reused, augmentation redone.
    (r2 / "done.json").unlink()
    (r2 / "augmented.json").unlink()
    judge3 = CountingJudge()
    CompoDistillTrainer(comd_config(root, 2), show_progress=False,
                        recipe=CoMDRecipe(judge=judge3)).run()
    assert judge3.calls == 0 and (r2 / "augmented.json").exists() and (r2 / "done.json").exists()


def test_comd_from_the_cli_with_overlap_judge(setup, tmp_path):
    import yaml

    from compodistill.cli import main

    root, _ = setup
    raw = {"recipe": "comd", "student": str(root / "student"), "teacher": str(root / "teacher"),
           "output_dir": str(tmp_path / "cli"),
           "data": {"train_json": str(root / "data" / "train.json"),
                    "image_folder": str(root / "data"), "max_length": 128},
           "comd": {"rounds": 1, "judge": "overlap", "threshold": -9, "max_new_tokens": 2,
                    "instruction_max_new_tokens": 3, "assess_samples": 2},
           "stages": [{"kind": "sft", "max_steps": 1, "batch_size": 2, "lora_r": 2}]}
    path = tmp_path / "comd.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert main(["train", "--config", str(path), "--quiet"]) == 0
    scores = json.loads((tmp_path / "cli" / "round-1" / "scores.json").read_text())
    assert len(scores) == 2 and all(s["hard"] for s in scores)  # threshold -9: all hard
    assert all(1.0 <= s["teacher"] <= 10.0 for s in scores)
    assert (tmp_path / "cli" / "model").exists()
