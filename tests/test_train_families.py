"""The trainer on the non-LLaVA families (docs/families.md): tiny Qwen2.5-VL and Qwen3-VL
teachers and students
saved to disk with a locally trained tokenizer and the family's own image processor, the
project's records with images of three sizes (dynamic resolution), DPT -> DFT -> SFT with KD
and VAT, the final model reloaded, and an interrupted stage resumed."""
from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("peft")
pytest.importorskip("accelerate")

from compodistill.train.config import ConfigError, config_from_dict  # noqa: E402
from compodistill.train.trainer import DistillationTrainer  # noqa: E402

from _helpers import crash_and_resume, local_bpe_tokenizer  # noqa: E402

# Per image (width, height) -> tokens after the 2x2 merge of 4-px patches, pixel budget
# 16*16 .. 32*32: the Qwen processor keeps these sizes (multiples of 8).
SIZES = {0: ((16, 16), 4), 1: ((24, 16), 6), 2: ((32, 32), 16)}


CLASSES = {"qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
           "qwen3_vl": "Qwen3VLForConditionalGeneration"}


@pytest.fixture(scope="module", params=sorted(CLASSES))
def qwen_pair(request, tmp_path_factory):
    import transformers as tf
    from PIL import Image

    from compodistill.data import generate_synthetic
    from compodistill.hf.families import tiny_family_pair

    family = request.param
    root = tmp_path_factory.mktemp(family)
    generate_synthetic(str(root / "data"), num=6, num_eval=1, image_size=16, progress=False)
    for index, ((w, h), _) in SIZES.items():  # dynamic resolution: three image sizes
        path = root / "data" / "images" / f"train_{index:06d}.png"
        Image.open(path).convert("RGB").resize((w, h)).save(path)
    records = json.loads((root / "data" / "train.json").read_text())
    texts = [t["value"] for r in records for t in r["conversations"]]
    tok = local_bpe_tokenizer(root / "student", texts)
    # The teacher's vocabulary has 8 extra rows (as Qwen2.5-VL 7B vs 3B): KD truncates it.
    student, teacher = tiny_family_pair(family, vocab_size=len(tok),
                                        teacher_vocab_size=len(tok) + 8)
    processor = tf.Qwen2VLImageProcessorPil(patch_size=4, merge_size=2, temporal_patch_size=2,
                                            min_pixels=16 * 16, max_pixels=32 * 32)
    student.save_pretrained(root / "student")
    processor.save_pretrained(root / "student")
    teacher.save_pretrained(root / "teacher")
    return root, family


def make_config(root, stages, out, **extra):
    return config_from_dict({
        "student": str(root / "student"), "teacher": str(root / "teacher"),
        "output_dir": str(root / out), "taf": extra.pop("taf", False), "cpu_threads": 1,
        "data": {"train_json": str(root / "data" / "train.json"),
                 "image_folder": str(root / "data"), "max_length": 256},
        "vat": {"student_layers": [0, 1], "teacher_layers": [1, 2, 3]},
        "stages": stages, **extra})


CHAIN = [dict(kind="dpt", trainable="connector", max_steps=2, batch_size=2, lr=1e-3),
         dict(kind="dft", trainable="lora+connector", max_steps=2, batch_size=2, lora_r=4,
              lora_alpha=8),
         dict(kind="sft", max_steps=2, batch_size=2, lora_r=4, lora_alpha=8)]


def test_dataset_and_collator_build_qwen_inputs(qwen_pair):
    """Each image becomes vision_start + its own count of image tokens + vision_end; the
    batch carries the pixel patches, one image_grid_thw row per image and the token types
    that M-RoPE needs."""
    root, _ = qwen_pair
    trainer = DistillationTrainer(make_config(root, CHAIN, "data-check"), show_progress=False)
    cfg = trainer.student.config
    img = cfg.image_token_id
    by_image = {}
    for i, sample in enumerate(trainer.dataset.samples):
        name = sample["images"][0].rsplit("train_", 1)[1]
        by_image.setdefault(int(name.split(".")[0]), i)
    for index, (_, count) in SIZES.items():
        item = trainer.dataset[by_image[index]]
        ids = item["input_ids"].tolist()
        start = ids.index(cfg.vision_start_token_id)
        assert ids[start + 1:start + 2 + count] == [img] * count + [cfg.vision_end_token_id]
        assert ids.count(img) == count
        assert int(item["image_grid_thw"].prod()) // 4 == count
    loader = trainer.data_loader(trainer.config.stages[0])
    batch = next(iter(loader))
    n_img = int((batch["input_ids"] == img).sum())
    assert n_img == int(batch["image_grid_thw"].prod(-1).sum()) // 4
    assert batch["pixel_values"].shape[0] == int(batch["image_grid_thw"].prod(-1).sum())
    assert torch.equal(batch["mm_token_type_ids"], (batch["input_ids"] == img).long())
    # The stages' forward gives the model its M-RoPE positions (3-D, from the image grids),
    # not the 1-D fallback transformers takes silently when an input is missing.
    from compodistill.train.stages import HiddenStates, family_inputs

    model = trainer.student.eval()
    with torch.no_grad():
        got = HiddenStates(model)(batch["input_ids"], batch["attention_mask"],
                                  batch["pixel_values"], **family_inputs(batch))
        positions, _ = model.model.get_rope_index(
            batch["input_ids"], image_grid_thw=batch["image_grid_thw"],
            attention_mask=batch["attention_mask"],
            mm_token_type_ids=batch["mm_token_type_ids"])
        common = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                      pixel_values=batch["pixel_values"], image_grid_thw=batch["image_grid_thw"])
        want = model.model(position_ids=positions, **common).last_hidden_state
        flat = batch["attention_mask"].cumsum(-1) - 1
        one_d = model.model(position_ids=flat[None].expand(3, -1, -1), **common).last_hidden_state
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(got[real], want[real])
    assert not torch.allclose(one_d[real], want[real], atol=1e-3)


def test_chain_with_kd_and_vat_and_reload(qwen_pair):
    from transformers import AutoImageProcessor, AutoModelForImageTextToText

    root, family = qwen_pair
    trainer = DistillationTrainer(make_config(root, CHAIN, "run"), show_progress=False)
    before = {k: v.clone() for k, v in trainer.student.state_dict().items()}
    results = trainer.run()
    assert [r.name for r in results] == ["dpt", "dft", "sft"]
    terms = [set(r.final_losses) for r in results]
    layers = {"loss_vat_layer0", "loss_vat_layer1"}
    assert terms == [{"loss", "loss_lm", "loss_kd"},
                     {"loss", "loss_lm", "loss_kd", "loss_vat"} | layers, {"loss", "loss_lm"}]
    for r in results:
        assert all(torch.isfinite(torch.tensor(v)) for v in r.final_losses.values())
    assert results[1].final_losses["loss_vat"] > 0
    final = root / "run" / "3-sft" / "model"
    model = AutoModelForImageTextToText.from_pretrained(final, local_files_only=True)
    assert type(model).__name__ == CLASSES[family]
    assert type(AutoImageProcessor.from_pretrained(final)).__name__ == "Qwen2VLImageProcessorPil"
    state = model.state_dict()
    assert not any("lora" in k for k in state)  # merged, plain weights
    q_proj = "model.language_model.layers.1.self_attn.q_proj.weight"
    assert not torch.equal(state[q_proj], before[q_proj])  # LoRA updates were merged in
    merger = [k for k in state if k.startswith("model.visual.merger.")]
    assert merger and not all(torch.equal(state[k], before[k]) for k in merger)  # DPT, DFT
    # Qwen3-VL's DeepStack mergers are part of its connector: they train with it.
    deepstack = [k for k in state if k.startswith("model.visual.deepstack_merger_list.")]
    assert bool(deepstack) == (family == "qwen3_vl")
    assert not deepstack or not all(torch.equal(state[k], before[k]) for k in deepstack)
    vision = "model.visual.patch_embed.proj.weight"
    assert torch.equal(state[vision], before[vision])  # never trained


def test_interrupted_stage_resumes_with_the_same_losses(qwen_pair, monkeypatch):
    from compodistill.train.metrics import read_metrics

    root, family = qwen_pair
    taf = family == "qwen2_5_vl"  # the post-connector's state is resumed too
    stage = [dict(kind="dft", trainable="lora+post_connector" if taf else "lora+connector",
                  max_steps=4, batch_size=2, lora_r=2, lora_alpha=4)]
    DistillationTrainer(make_config(root, stage, "straight", save_every=2, taf=taf),
                        show_progress=False).run()
    crash_and_resume(monkeypatch, lambda: DistillationTrainer(
        make_config(root, stage, "crashed", save_every=2, taf=taf), show_progress=False))
    straight = [r["loss"] for r in read_metrics(root / "straight" / "1-dft" / "metrics.jsonl")]
    resumed = [r["loss"] for r in read_metrics(root / "crashed" / "1-dft" / "metrics.jsonl")]
    assert len(straight) == 4
    assert resumed == pytest.approx(straight, rel=1e-5)


def test_taf_is_refused_where_it_does_not_exist(qwen_pair):
    root, family = qwen_pair
    if family != "qwen3_vl":
        pytest.skip("Qwen2.5-VL has TAF")
    with pytest.raises(ConfigError, match=r"^taf: .*, not for Qwen3-VL"):
        DistillationTrainer(make_config(root, CHAIN, "taf", taf=True), show_progress=False)


def test_cli_names_taf_and_the_family_in_one_line(qwen_pair, capsys):
    """CompoDistill's recipe turns TAF on by default: for Qwen, `compodistill train` says in
    one line which key to change, before any step runs."""
    from compodistill.cli import main

    from _helpers import assert_one_line_error

    root, family = qwen_pair
    if family != "qwen3_vl":
        pytest.skip("Qwen2.5-VL has TAF")
    cfg = root / "default-taf.yaml"
    cfg.write_text(f"student: {root / 'student'}\nteacher: {root / 'teacher'}\n"
                   f"output_dir: {root / 'default-taf'}\n"
                   f"data: {{train_json: {root / 'data' / 'train.json'}, "
                   f"image_folder: {root / 'data'}}}\n")
    code, err = main(["train", "--config", str(cfg)]), capsys.readouterr().err
    assert_one_line_error(code, err, "taf:", "Qwen3-VL", "taf: false")
    assert not (root / "default-taf" / "1-dpt").exists()


def test_taf_chain_saves_a_plain_checkpoint_and_reloads_the_taf_merger(qwen_pair):
    """Qwen2.5-VL with TAF: the teacher's merger (frozen) plus a post-connector trains through
    DPT -> DFT -> SFT; each output is a plain checkpoint (post-connector folded into the
    merger's last layer) that computes what the TAF model computes, and the trainer's
    loader rebuilds the TAF merger from it."""
    from transformers import AutoModelForImageTextToText

    from compodistill.hf.families import load_family_model
    from compodistill.hf.family_taf import is_taf

    root, family = qwen_pair
    if family != "qwen2_5_vl":
        pytest.skip("TAF: Qwen2.5-VL only")
    stages = [dict(kind="dpt", max_steps=2, batch_size=2, lr=1e-3),
              dict(kind="dft", max_steps=2, batch_size=2, lora_r=4, lora_alpha=8),
              dict(kind="sft", max_steps=1, batch_size=2, lora_r=4, lora_alpha=8)]
    trainer = DistillationTrainer(make_config(root, stages, "taf-run", taf=True),
                                  show_progress=False)
    results = trainer.run()
    assert [r.name for r in results] == ["dpt", "dft", "sft"]
    assert set(results[1].final_losses) >= {"loss_lm", "loss_kd", "loss_vat"}
    assert all(torch.isfinite(torch.tensor(v)) for r in results for v in r.final_losses.values())
    assert is_taf(trainer.student)
    teacher = AutoModelForImageTextToText.from_pretrained(root / "teacher")
    frozen = dict(trainer.student.model.visual.merger.teacher.named_parameters())
    for name, p in teacher.model.visual.merger.named_parameters():  # the teacher's, untouched
        assert torch.equal(frozen[name], p), name
    final = root / "taf-run" / "3-sft" / "model"
    plain = AutoModelForImageTextToText.from_pretrained(final).eval()
    assert not is_taf(plain)
    rebuilt = load_family_model(final).eval()
    assert is_taf(rebuilt)
    batch = next(iter(trainer.data_loader(trainer.config.stages[0])))
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values",
                                    "image_grid_thw", "mm_token_type_ids")}
    with torch.no_grad():
        want = trainer.student.eval()(**inputs).logits
        torch.testing.assert_close(plain(**inputs).logits, want, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(rebuilt(**inputs).logits, want, rtol=1e-4, atol=1e-5)


def test_unreadable_image_is_skipped_with_its_reason(qwen_pair, tmp_path):
    """A family's per-image token count reads each image's header: a broken file is a
    skipped record named "unreadable image", like LLaVA's."""
    from compodistill.data import LlavaDataset
    from compodistill.data.family_inputs import family_image_inputs
    from transformers import AutoConfig, AutoTokenizer

    root, _ = qwen_pair
    (tmp_path / "broken.png").write_bytes(b"not a png")
    records = [{"image": "broken.png", "conversations": [
        {"from": "human", "value": "<image>\nwhat color"}, {"from": "gpt", "value": "red"}]}]
    config = AutoConfig.from_pretrained(root / "student")
    with pytest.warns(UserWarning, match="1 unreadable image"):
        data = LlavaDataset(records, str(tmp_path), AutoTokenizer.from_pretrained(root / "student"),
                            1, num_image_tokens=1, image_token_id=config.image_token_id,
                            image_inputs=family_image_inputs(config, root / "student"))
    assert len(data) == 0 and data.problems[0].reason == "unreadable image"


def test_a_teacher_of_another_family_is_refused(qwen_pair, tmp_path):
    from compodistill.hf import tiny_llava_pair

    root, family = qwen_pair
    _, llava = tiny_llava_pair(vocab_size=64, image_size=16, patch_size=8)
    llava.save_pretrained(tmp_path / "llava")
    config = make_config(root, CHAIN, "mixed")
    config.teacher = str(tmp_path / "llava")
    with pytest.raises(ConfigError, match=r"^teacher: a LLaVA \(1\.5\) teacher cannot teach"):
        DistillationTrainer(config, show_progress=False)
