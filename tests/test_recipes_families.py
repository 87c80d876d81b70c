"""The LLaVA-KD, LLAVADI and CoMD recipes on the trainer families other than LLaVA
(docs/stages.md#recipes-on-every-family): tiny teacher/student pairs of each family saved to
disk with a local tokenizer and the family's image processor, images of three sizes (one token
count each).

On every family (cheap): each recipe's terms on one batch equal a direct computation from the
models' own forwards with every input of the batch, so the family's inputs reach both models
and the visual positions are the family's; CoMD's generator feeds the model the same logits as
a direct forward. On Qwen2.5-VL (heavier): each recipe's stages, or one CoMD round, run end to
end."""
from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("peft")
pytest.importorskip("accelerate")

from compodistill.data import LlavaCollator  # noqa: E402
from compodistill.hf.families import FAMILIES as ALL_FAMILIES  # noqa: E402
from compodistill.hf.families import TRAINER_FAMILIES, visual_token_ids  # noqa: E402
from compodistill.logit_kd.from_logits import shift_labels  # noqa: E402
from compodistill.testing.logit_kd import (ref_llavadi_feature_mse, ref_logit_kd,  # noqa: E402
                                           ref_rdist)
from compodistill.train.config import ConfigError, config_from_dict  # noqa: E402
from compodistill.train.recipes import get_recipe  # noqa: E402
from compodistill.train.trainer import CompoDistillTrainer  # noqa: E402

from _helpers import write_family_pair  # noqa: E402

FAMILIES = [f for f in TRAINER_FAMILIES if f != "llava"]
# Families whose images all get one token count (one tile each).
FIXED_COUNT = ("gemma3", "internvl")
# A judge's image processor that counts otherwise than the student's (Gemma 3's count is the
# config's, LLaVA-OneVision's pinpoints must be the config's: none for them).
JUDGE_PROCESSOR = {"qwen2_5_vl": {"max_pixels": 16 * 16}, "qwen3_vl": {"max_pixels": 16 * 16},
                   "internvl": {"crop_to_patches": True, "max_patches": 4}}
HEAVY = "qwen2_5_vl"  # the end-to-end runs: one family keeps the suite's time budget


@pytest.fixture(scope="module", params=FAMILIES)
def family_pair(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    write_family_pair(root, request.param)
    return root, request.param


def make_config(root, recipe, stages, out, **extra):
    return config_from_dict({
        "recipe": recipe, "student": str(root / "student"), "teacher": str(root / "teacher"),
        "output_dir": str(root / out), "cpu_threads": 1,
        "data": {"train_json": str(root / "data" / "train.json"),
                 "image_folder": str(root / "data"), "max_length": 256},
        "stages": stages, **extra})


def one_batch(trainer) -> dict:
    """Every training sample in one right-padded batch (images of all three sizes)."""
    collate = LlavaCollator(trainer.tokenizer.pad_token_id, image_inputs=trainer.image_inputs)
    return collate([trainer.dataset[i] for i in range(len(trainer.dataset))])


def direct(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(last hidden state, logits) of the model called with every key of the batch but the
    labels: what the family's own forward computes, independent of the recipes' plumbing."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        h = model.model(**inputs, use_cache=False).last_hidden_state
        return h, model.lm_head(h)


def stage_parts(trainer, recipe_name, stage):
    from compodistill.train.stages import prepare_trainable

    student, params = prepare_trainable(trainer.student, stage)
    parts = get_recipe(recipe_name).stage_parts(trainer, student, params, stage,
                                                trainer.stage_dir(stage))
    return student, parts


# ---------------------------------------------------------------------------- every family
def test_llava_kd_terms_equal_the_family_forward(family_pair):
    root, family = family_pair
    stage = dict(kind="dft", trainable="connector", max_steps=1, batch_size=2)
    trainer = CompoDistillTrainer(make_config(root, "llava_kd", [stage], "kd-terms"),
                                  show_progress=False)
    batch = one_batch(trainer)
    _, parts = stage_parts(trainer, "llava_kd", trainer.config.stages[0])
    terms = parts.losses(parts.module, batch)
    assert set(terms) == {"lm", "kd", "kd_vis", "rdist"}
    (h_s, z_s), (h_t, z_t) = direct(trainer.student, batch), direct(trainer.teacher, batch)
    # Both forwards see the family's inputs (without mm_token_type_ids Qwen would take 1-D
    # positions: a change of ~1e-3 here that the loss values alone can hide).
    _, got_t, got_s, _ = parts.losses.forwards(parts.module, batch)
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(got_s[real], h_s[real], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_t[real], h_t[real], rtol=1e-5, atol=1e-5)
    cfg = trainer.student.config
    visual = torch.isin(batch["input_ids"], torch.tensor(visual_token_ids(cfg)))
    # the image tokens of every image (its own count) and nothing else: no vision markers
    assert int(visual.sum()) == int((batch["input_ids"] == cfg.image_token_id).sum()) > 0
    for marker in ("vision_start_token_id", "boi_token_id"):  # the family's image markers
        if getattr(cfg, marker, None) is not None:
            assert not visual[batch["input_ids"] == getattr(cfg, marker)].any()
    labels, mask = shift_labels(batch["labels"]), batch["attention_mask"]
    expect = {
        "kd_vis": ref_logit_kd(z_s, z_t, labels, positions="visual", attention_mask=mask,
                               visual_mask=visual),
        "kd": ref_logit_kd(z_s, z_t, labels, positions="response"),
        "rdist": ref_rdist(z_s, z_t, visual),
        "lm": torch.nn.functional.cross_entropy(z_s.flatten(0, 1), labels.flatten()),
    }
    for name, value in expect.items():
        assert terms[name].item() == pytest.approx(value.item(), rel=1e-4, abs=1e-6), name


def test_llavadi_terms_and_projector_widths_on_the_family(family_pair):
    root, family = family_pair
    stage = dict(kind="dft", trainable="connector", max_steps=1, batch_size=2)
    trainer = CompoDistillTrainer(make_config(root, "llavadi", [stage], "di-terms",
                                              llavadi={"proj_hidden": 8}), show_progress=False)
    batch = one_batch(trainer)
    _, parts = stage_parts(trainer, "llavadi", trainer.config.stages[0])
    projector = parts.extras["projector"]
    # widths from each model's text config (tiny_family_pair: student 32, teacher 64)
    assert projector.net[0].in_features == 32 and projector.net[2].out_features == 64
    terms = parts.losses(parts.module, batch)
    assert set(terms) == {"lm", "kd", "feat"}
    h_s, z_s = direct(trainer.student, batch)
    h_t, z_t = direct(trainer.teacher, batch)
    mask = batch["attention_mask"]
    keep = mask.bool()
    _, got_t, (got_s, projected), _ = parts.losses.forwards(parts.module, batch)
    torch.testing.assert_close(got_s[keep], h_s[keep], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_t[keep], h_t[keep], rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        feat = ref_llavadi_feature_mse(projector(h_s)[keep], h_t[keep])
    kd = ref_logit_kd(z_s, z_t, positions="all", attention_mask=mask, zscore=True)
    assert terms["feat"].item() == pytest.approx(feat.item(), rel=1e-5)
    assert terms["kd"].item() == pytest.approx(kd.item(), rel=1e-4)


def test_comd_generation_gives_the_model_the_family_inputs(family_pair):
    """CoMD's generator encodes each image with its own token count and hands ``generate`` the
    family's keys: the prompt step's logits, left-padded in one batch, equal a direct forward
    of each prompt alone; the first new token is their argmax."""
    from compodistill.train.recipes.comd import CoMDRecipe

    root, family = family_pair
    stage = dict(kind="sft", max_steps=1, batch_size=2)
    trainer = CompoDistillTrainer(make_config(root, "comd", [stage], "comd-gen"),
                                  show_progress=False)
    model = trainer.teacher
    generator = CoMDRecipe().generator(trainer, model, 2)
    images = [[str(root / "data" / "images" / f"train_{i:06d}.png")] for i in range(3)]
    features = [generator.encode("<image>\nwhat is it", im) for im in images]
    counts = [int((f["input_ids"] == model.config.image_token_id).sum()) for f in features]
    # one token count per image size (Gemma 3 and InternVL: one tile, one count)
    assert len(set(counts)) == (1 if family in FIXED_COUNT else 3)
    seen = []
    hook = model.register_forward_hook(lambda m, args, out: seen.append(out.logits[:, -1]))
    try:
        new = generator.generate_ids(features)
    finally:
        hook.remove()
    prompt_step = seen[0]
    for i, feature in enumerate(features):
        batch = generator.batch([feature])
        _, logits = direct(model, batch)
        torch.testing.assert_close(prompt_step[i], logits[0, -1], rtol=1e-4, atol=1e-5)
        if new[i]:
            assert new[i][0] == int(logits[0, -1].argmax())


def test_every_builtin_recipe_is_accepted_and_a_llava_only_one_refused(family_pair):
    import transformers

    from compodistill.train.families import check_family_options
    from compodistill.train.recipes import RecipeFacts, register_recipe, unregister_recipe
    from compodistill.train.recipes.llava_kd import LlavaKDRecipe

    root, family = family_pair
    stage = [dict(kind="sft", max_steps=1, batch_size=2)]
    for name in ("llava_kd", "llavadi", "comd"):
        check_family_options(make_config(root, name, stage, "check"), root / "student",
                             root / "teacher")

    class LlavaOnly(LlavaKDRecipe):
        facts = RecipeFacts(terms=("lm",), stage_defaults={}, default_stages=("sft",),
                            families=("llava",))

    class ThisFamilyOnly(LlavaKDRecipe):
        facts = RecipeFacts(terms=("lm",), stage_defaults={}, default_stages=("sft",),
                            families=(family,))

    register_recipe("llava_only", LlavaOnly)
    register_recipe("family_only", ThisFamilyOnly)
    try:
        with pytest.raises(ConfigError) as err:
            CompoDistillTrainer(make_config(root, "llava_only", stage, "refused"),
                                show_progress=False)
        mine = make_config(root, "family_only", stage, "check")
        check_family_options(mine, root / "student", root / "teacher")
        with pytest.raises(ConfigError, match=r"^recipe: 'family_only' is implemented for "
                                              r".*, not for LLaVA \(1\.5\)"):
            check_family_options(mine, transformers.LlavaConfig())
    finally:
        unregister_recipe("llava_only")
        unregister_recipe("family_only")
    message = str(err.value)
    assert message.startswith("recipe: 'llava_only' is implemented for LLaVA (1.5), not for ")
    assert "\n" not in message and ALL_FAMILIES[family].title in message


# ---------------------------------------------------------------------------- end to end
def heavy(family_pair):
    root, family = family_pair
    if family != HEAVY:
        pytest.skip(f"end-to-end runs on {HEAVY} only (time budget); the terms are checked "
                    f"on {family} above")
    return root


LORA = dict(lora_r=2, lora_alpha=4, warmup_ratio=0.0)


def test_llava_kd_stages_end_to_end(family_pair):
    from transformers import AutoModelForImageTextToText

    root = heavy(family_pair)
    stages = [dict(kind="dpt", max_steps=1, batch_size=2, warmup_ratio=0.0),
              dict(kind="sft", max_steps=1, batch_size=2, **LORA),
              dict(kind="dft", max_steps=2, batch_size=2, **LORA)]
    trainer = CompoDistillTrainer(make_config(root, "llava_kd", stages, "kd-run"),
                                  show_progress=False)
    merger = {k: v.clone() for k, v in trainer.student.model.visual.merger.state_dict().items()}
    results = trainer.run()
    every = {"loss", "loss_lm", "loss_kd", "loss_kd_vis", "loss_rdist"}
    assert [r.name for r in results] == ["dpt", "sft", "dft"]
    assert [set(r.final_losses) for r in results] == [every, {"loss", "loss_lm"}, every]
    assert all(torch.isfinite(torch.tensor(list(r.final_losses.values()))).all()
               for r in results)
    assert results[2].final_losses["loss_kd_vis"] > 0 and results[2].final_losses["loss_rdist"] > 0
    final = AutoModelForImageTextToText.from_pretrained(root / "kd-run" / "3-dft" / "model")
    assert type(final).__name__ == "Qwen2_5_VLForConditionalGeneration"
    after = final.model.visual.merger.state_dict()  # no TAF: the student's merger trained
    assert any(not torch.equal(after[k], v) for k, v in merger.items())


def test_llavadi_stages_end_to_end(family_pair):
    from safetensors.torch import load_file

    root = heavy(family_pair)
    stages = [dict(kind="dpt", max_steps=1, batch_size=2, warmup_ratio=0.0),
              dict(kind="dft", max_steps=2, batch_size=2, **LORA)]
    results = CompoDistillTrainer(make_config(root, "llavadi", stages, "di-run",
                                              llavadi={"proj_hidden": 16}),
                                  show_progress=False).run()
    assert [set(r.final_losses) for r in results] == [
        {"loss", "loss_lm"}, {"loss", "loss_lm", "loss_kd", "loss_feat"}]
    assert all(torch.isfinite(torch.tensor(list(r.final_losses.values()))).all()
               for r in results)
    state = load_file(str(root / "di-run" / "2-dft" / "feature_projector.safetensors"))
    assert tuple(state["net.0.weight"].shape) == (16, 32)
    assert tuple(state["net.2.weight"].shape) == (64, 16)
    keys = set()
    for f in (root / "di-run" / "2-dft" / "model").glob("*.safetensors"):
        keys |= set(load_file(str(f)))
    assert keys and not any(k.startswith("projector") for k in keys)  # never exported


def test_comd_round_end_to_end(family_pair):
    from transformers import AutoModelForImageTextToText

    root = heavy(family_pair)
    stage = [dict(kind="sft", max_steps=1, batch_size=2, **LORA)]
    config = make_config(root, "comd", stage, "comd-run",
                         comd={"rounds": 1, "judge": "overlap", "threshold": -9,
                               "max_new_tokens": 3, "instruction_max_new_tokens": 4,
                               "assess_samples": 3, "augment_prompt": "{instruction}"})
    trainer = CompoDistillTrainer(config, show_progress=False)
    results = trainer.run()
    r1 = root / "comd-run" / "round-1"
    answers = json.loads((r1 / "answers.json").read_text())
    assert len(answers) == 3 and all(1.0 <= s["teacher"] <= 10.0 for s in
                                     json.loads((r1 / "scores.json").read_text()))
    augmented = json.loads((r1 / "augmented.json").read_text())
    assert augmented and (r1 / "tune-augmented" / "1-sft" / "model").exists()
    assert all(torch.isfinite(torch.tensor(list(r.final_losses.values()))).all()
               for r in results) and len(results) == 2
    # the augmented records train like the input data: each image its own token count
    data = trainer.load_dataset(augmented)
    img = trainer.student.config.image_token_id
    for i in range(len(data)):
        item = data[i]
        assert int((item["input_ids"] == img).sum()) == int(item["image_grid_thw"].prod()) // 4
    final = AutoModelForImageTextToText.from_pretrained(root / "comd-run" / "model")
    assert type(final).__name__ == "Qwen2_5_VLForConditionalGeneration"


def test_comd_judge_model_of_the_family(family_pair, tmp_path):
    """``comd.judge_model`` names a checkpoint of the family: it loads as that family's model
    and judges with the image processor saved next to it (here one with a smaller pixel
    budget than the student's, so another token count per image)."""
    from transformers import AutoModelForImageTextToText

    from compodistill.data.family_inputs import family_image_inputs
    from compodistill.train.recipes.comd import CoMDRecipe
    from compodistill.train.recipes.comd_judges import JudgeRequest, ModelJudge

    from _helpers import family_image_processor

    root, family = family_pair
    judge_dir = tmp_path / "judge"
    AutoModelForImageTextToText.from_pretrained(root / "student").save_pretrained(judge_dir)
    family_image_processor(family, **JUDGE_PROCESSOR.get(family, {})).save_pretrained(judge_dir)
    stage = [dict(kind="sft", max_steps=1, batch_size=2)]
    config = make_config(root, "comd", stage, "comd-judge",
                         comd={"judge": "model", "judge_model": str(judge_dir),
                               "judge_max_new_tokens": 2})
    trainer = CompoDistillTrainer(config, show_progress=False)
    judge = CoMDRecipe().resolve_judge(trainer)
    assert isinstance(judge, ModelJudge)
    model = judge.generate.model
    assert type(model) is type(trainer.student) and model is not trainer.student
    own = family_image_inputs(model.config, judge_dir,
                              trainer.tokenizer).token_counts([(32, 32)])[0]
    if family in JUDGE_PROCESSOR:  # another token count than the student's processor gives
        assert own != trainer.image_inputs.token_counts([(32, 32)])[0]
    image = str(root / "data" / "images" / "train_000002.png")  # 32 x 32
    sample = judge.generate.encode("<image>\nwhich is better", [image])
    assert int((sample["input_ids"] == model.config.image_token_id).sum()) == own
    verdicts = judge([JudgeRequest("<image>\nwhat is it", "red", "blue", "red", [image])])
    assert len(verdicts) == 1  # a random tiny judge: a verdict, or None when unparsable
