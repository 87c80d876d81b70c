"""The trainer on the non-LLaVA families (docs/families.md): tiny Qwen2.5-VL, Qwen3-VL,
LLaVA-OneVision, Gemma 3 and InternVL teachers and students saved to disk with a locally
trained tokenizer and the family's own image processor, the project's records with images of
three sizes (dynamic resolution, anyres), DPT -> DFT -> SFT with TAF, KD and VAT, the final
model reloaded, TAF folded and rebuilt, and an interrupted stage resumed."""
from __future__ import annotations


import pytest
import torch

pytest.importorskip("peft")
pytest.importorskip("accelerate")

from compodistill.train.config import ConfigError, config_from_dict  # noqa: E402
from compodistill.train.trainer import CompoDistillTrainer  # noqa: E402

from _helpers import crash_and_resume, write_family_pair  # noqa: E402

# Per image (width, height) -> tokens after the 2x2 merge of 4-px patches, pixel budget
# 16*16 .. 32*32: the Qwen processor keeps these sizes (multiples of 8).
SIZES = {0: ((16, 16), 4), 1: ((24, 16), 6), 2: ((32, 32), 16)}
# The other families: LLaVA-OneVision's anyres counts differ per size (16x16 fits the base
# tile, 32x16 a 2x1 grid, 30x30 the 2x2 grid); Gemma 3 and InternVL resize to one tile.
OTHER_SIZES = {0: (16, 16), 1: (32, 16), 2: (30, 30)}
QWEN = ("qwen2_5_vl", "qwen3_vl")

CLASSES = {"qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
           "qwen3_vl": "Qwen3VLForConditionalGeneration",
           "llava_onevision": "LlavaOnevisionForConditionalGeneration",
           "gemma3": "Gemma3ForConditionalGeneration",
           "internvl": "InternVLForConditionalGeneration"}
# Each family's own image processor class, PIL backend (the default backend needs
# torchvision, which is not installed here); the tile size of the tiny vision towers.
PROCESSORS = {"qwen2_5_vl": "Qwen2VLImageProcessorPil", "qwen3_vl": "Qwen2VLImageProcessorPil",
              "llava_onevision": "LlavaOnevisionImageProcessorPil",
              "gemma3": "Gemma3ImageProcessorPil", "internvl": "GotOcr2ImageProcessorPil"}
# Where each family's connector(s) sit in the state dict, and a vision-tower weight that
# never trains.
CONNECTOR = {"qwen2_5_vl": "model.visual.merger.", "qwen3_vl": "model.visual.merger.",
             "llava_onevision": "model.multi_modal_projector.",
             "gemma3": "model.multi_modal_projector.",
             "internvl": "model.multi_modal_projector."}
VISION = {"qwen2_5_vl": "model.visual.patch_embed.proj.weight",
          "qwen3_vl": "model.visual.patch_embed.proj.weight",
          "llava_onevision": "model.vision_tower.embeddings.patch_embedding.weight",
          "gemma3": "model.vision_tower.embeddings.patch_embedding.weight",
          "internvl": "model.vision_tower.embeddings.patch_embeddings.projection.weight"}
# Connectors whose hidden width is the language model's: a teacher's (64) is wider than the
# student's (32), so a TAF student has no plain checkpoint (docs/taf.md).
WIDE_CONNECTOR = ("llava_onevision", "internvl")
GEMMA_WINDOW = 8  # Gemma 3's local layers: a window shorter than the samples


@pytest.fixture(scope="module", params=sorted(CLASSES))
def family_pair(request, tmp_path_factory):
    family = request.param
    root = tmp_path_factory.mktemp(family)
    sizes = [wh for wh, _ in SIZES.values()] if family in QWEN else list(OTHER_SIZES.values())
    write_family_pair(root, family, sizes=sizes,
                      sliding_window=GEMMA_WINDOW if family == "gemma3" else None)
    return root, family


def make_config(root, stages, out, **extra):
    return config_from_dict({
        "student": str(root / "student"), "teacher": str(root / "teacher"),
        "output_dir": str(root / out), "taf": extra.pop("taf", False), "cpu_threads": 1,
        "data": {"train_json": str(root / "data" / "train.json"),
                 "image_folder": str(root / "data"), "max_length": 256},
        # Gemma 3: text query rows only (its image tokens attend both ways)
        "vat": {"student_layers": [0, 1], "teacher_layers": [1, 2, 3],
                "query": "text" if "gemma3" in str(root.name) else "all"},
        "stages": stages, **extra})


CHAIN = [dict(kind="dpt", trainable="connector", max_steps=2, batch_size=2, lr=1e-3),
         dict(kind="dft", trainable="lora+connector", max_steps=2, batch_size=2, lora_r=4,
              lora_alpha=8),
         dict(kind="sft", max_steps=2, batch_size=2, lora_r=4, lora_alpha=8)]


def test_dataset_and_collator_build_qwen_inputs(family_pair):
    """Each image becomes vision_start + its own count of image tokens + vision_end; the
    batch carries the pixel patches, one image_grid_thw row per image and the token types
    that M-RoPE needs."""
    root, family = family_pair
    if family not in QWEN:
        pytest.skip("Qwen's inputs")
    trainer = CompoDistillTrainer(make_config(root, CHAIN, "data-check"), show_progress=False)
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
    from compodistill.data.family_inputs import family_inputs
    from compodistill.train.stages import HiddenStates

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


def model_image_tokens(model, family, extras) -> list[int]:
    """The model's own count of visual features per image, from the pixel inputs."""
    inner = model.model
    with torch.no_grad():
        if family == "llava_onevision":
            out = inner.get_image_features(extras["pixel_values"], extras["image_sizes"],
                                           batch_num_images=extras["batch_num_images"])
            return [int(f.shape[0]) for f in out.pooler_output]
        out = inner.get_image_features(pixel_values=extras["pixel_values"])
        feats = getattr(out, "pooler_output", out)
        return [int(f.shape[0]) for f in feats]


def test_image_blocks_match_the_models_own_feature_counts(family_pair):
    """LLaVA-OneVision, Gemma 3, InternVL: each image's block is the family's markers around
    as many image tokens as the model makes features from the image processor's pixels; the
    collated batch (images of different crop counts, Gemma 3's token_type_ids) runs through
    the stages' forward, and LLaVA-OneVision's anyres counts are the processor's own."""
    from PIL import Image

    from compodistill.data.family_inputs import family_inputs

    from compodistill.train.stages import HiddenStates

    root, family = family_pair
    if family in QWEN:
        pytest.skip("test_dataset_and_collator_build_qwen_inputs")
    trainer = CompoDistillTrainer(make_config(root, CHAIN, "data-check"), show_progress=False)
    model, cfg = trainer.student.eval(), trainer.student.config
    inputs = trainer.image_inputs
    img = cfg.image_token_id
    markers = ((cfg.boi_token_id, cfg.eoi_token_id) if family == "gemma3" else
               trainer.tokenizer.convert_tokens_to_ids(["<vision_start>", "<vision_end>"])
               if family == "internvl" else ())
    counts = {}
    for i, sample in enumerate(trainer.dataset.samples):
        item = trainer.dataset[i]
        ids = item["input_ids"].tolist()
        want = model_image_tokens(model, family, item)
        assert ids.count(img) == sum(want) and len(want) == 1
        first = ids.index(img)
        if markers:
            assert ids[first - 1] == markers[0] and ids[first + want[0]] == markers[1]
        assert ids[first:first + want[0]] == [img] * want[0]
        counts[Image.open(sample["images"][0]).size] = want[0]
    if family == "llava_onevision":
        # anyres: three sizes, three counts, as LLaVA-OneVision's processor counts them (its
        # counting method; the processor itself needs torchvision to be built)
        from transformers import LlavaOnevisionProcessor

        proc = object.__new__(LlavaOnevisionProcessor)
        proc.image_processor, proc.num_image_tokens = inputs.processor, 4
        proc.vision_aspect_ratio = cfg.vision_aspect_ratio
        assert len(set(counts.values())) == 3, counts
        for (w, h), n in counts.items():
            assert proc._get_number_of_features(h, w, 16, 16) == n, (w, h)
        # several images in one sample: the base tile and a newline each, as the model packs
        pair = [Image.new("RGB", (32, 16)), Image.new("RGB", (30, 30))]
        assert inputs.token_counts([im.size for im in pair]) == model_image_tokens(
            model, family, inputs(pair)) == [5, 5]
    else:
        assert set(counts.values()) == {4}
    if family == "internvl":  # tiles: a processor saved with crop_to_patches=True
        from transformers import GotOcr2ImageProcessorPil

        from compodistill.data.family_inputs import InternVLImageInputs

        tiled = InternVLImageInputs(GotOcr2ImageProcessorPil(
            size={"height": 16, "width": 16}, crop_to_patches=True, max_patches=4), cfg,
            *markers)
        images = [Image.new("RGB", (32, 16)), Image.new("RGB", (16, 16))]
        got = tiled.token_counts([im.size for im in images])
        want = [sum(model_image_tokens(model, family, tiled([im]))) for im in images]
        assert got == want and got[0] > got[1] == 4  # 2 tiles + thumbnail vs one tile
    batch = next(iter(trainer.data_loader(trainer.config.stages[0])))
    extra = family_inputs(batch)
    assert set(extra) == {"llava_onevision": {"image_sizes", "batch_num_images"},
                          "gemma3": {"token_type_ids"}, "internvl": set()}[family]
    if family == "gemma3":
        assert torch.equal(extra["token_type_ids"], (batch["input_ids"] == img).long())
        # the local layers' window is shorter than every sample: the trainer's VAT runs
        # through the windowed path
        assert cfg.get_text_config().sliding_window == GEMMA_WINDOW
        assert min(int(m.sum()) for m in batch["attention_mask"]) > GEMMA_WINDOW
    with torch.no_grad():  # the model raises when placeholders and features disagree
        hidden = HiddenStates(model)(batch["input_ids"], batch["attention_mask"],
                                     batch["pixel_values"], **extra)
    assert torch.isfinite(hidden).all()


def test_chain_with_kd_and_vat_and_reload(family_pair):
    from transformers import AutoImageProcessor, AutoModelForImageTextToText

    root, family = family_pair
    trainer = CompoDistillTrainer(make_config(root, CHAIN, "run"), show_progress=False)
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
    assert type(AutoImageProcessor.from_pretrained(final)).__name__ == PROCESSORS[family]
    state = model.state_dict()
    assert not any("lora" in k for k in state)  # merged, plain weights
    q_proj = "model.language_model.layers.1.self_attn.q_proj.weight"
    assert not torch.equal(state[q_proj], before[q_proj])  # LoRA updates were merged in
    merger = [k for k in state if k.startswith(CONNECTOR[family])]
    assert merger and not all(torch.equal(state[k], before[k]) for k in merger)  # DPT, DFT
    # Qwen3-VL's DeepStack mergers are part of its connector: they train with it.
    deepstack = [k for k in state if k.startswith("model.visual.deepstack_merger_list.")]
    assert bool(deepstack) == (family == "qwen3_vl")
    assert not deepstack or not all(torch.equal(state[k], before[k]) for k in deepstack)
    assert torch.equal(state[VISION[family]], before[VISION[family]])  # never trained
    # LoRA reached the language model only (vision towers have q_proj-like names too)
    vision = [k for k in state if ("vision" in k or "visual" in k)
              and not k.startswith(CONNECTOR[family]) and "deepstack" not in k]
    assert vision and all(torch.equal(state[k], before[k]) for k in vision)


def test_interrupted_stage_resumes_with_the_same_losses(family_pair, monkeypatch):
    from compodistill.train.metrics import read_metrics

    root, family = family_pair
    # with TAF: the post-connectors' state is resumed too
    stage = [dict(kind="dft", trainable="lora+post_connector", max_steps=4, batch_size=2,
                  lora_r=2, lora_alpha=4)]
    CompoDistillTrainer(make_config(root, stage, "straight", save_every=2, taf=True),
                        show_progress=False).run()
    crash_and_resume(monkeypatch, lambda: CompoDistillTrainer(
        make_config(root, stage, "crashed", save_every=2, taf=True), show_progress=False))
    straight = [r["loss"] for r in read_metrics(root / "straight" / "1-dft" / "metrics.jsonl")]
    resumed = [r["loss"] for r in read_metrics(root / "crashed" / "1-dft" / "metrics.jsonl")]
    assert len(straight) == 4
    assert resumed == pytest.approx(straight, rel=1e-5)


def test_gemma3_vat_serves_text_queries_only(family_pair, capsys):
    """Gemma 3's image tokens attend to each other both ways under its token_type_ids: VAT
    on image query rows is refused when the config loads, in one line from the CLI (the
    default config's DFT has VAT with query "all"), before any step runs."""
    from compodistill.cli import main

    from _helpers import assert_one_line_error

    root, family = family_pair
    if family != "gemma3":
        pytest.skip("Gemma 3 only")
    config = make_config(root, CHAIN, "query")
    config.vat.query = "visual"
    with pytest.raises(ConfigError, match=r"^vat\.query: 'visual' is not served for Gemma 3"):
        CompoDistillTrainer(config, show_progress=False)
    cfg = root / "default-query.yaml"
    cfg.write_text(f"student: {root / 'student'}\nteacher: {root / 'teacher'}\n"
                   f"output_dir: {root / 'default-query'}\n"
                   f"data: {{train_json: {root / 'data' / 'train.json'}, "
                   f"image_folder: {root / 'data'}}}\n")
    code, err = main(["train", "--config", str(cfg)]), capsys.readouterr().err
    assert_one_line_error(code, err, "vat.query:", "Gemma 3", "query: text")
    assert not (root / "default-query" / "1-dpt").exists()
    # configs/gemma3.yaml, the template users start from, passes the family checks
    from pathlib import Path

    from compodistill.train.config import load_config
    from compodistill.train.families import check_family_options

    template = load_config(Path(__file__).resolve().parents[1] / "configs" / "gemma3.yaml")
    check_family_options(template, root / "student", root / "teacher")


def test_taf_chain_saves_a_plain_checkpoint_and_reloads_the_taf_connectors(family_pair):
    """TAF on every family: each connector of the student (Qwen3-VL: the merger and each
    DeepStack merger) is the teacher's (frozen) plus its own post-connector, trained through
    DPT -> DFT -> SFT with KD and VAT; each output is a plain checkpoint (post-connectors
    folded into the connectors' last layers; Gemma 3's bias-free) that computes what the TAF
    model computes, and the trainer's loader rebuilds the TAF connectors from it."""
    from transformers import AutoModelForImageTextToText

    from compodistill.hf.loading import load_family_model
    from compodistill.hf.family_taf import TAFConnector, is_taf, taf_sites
    from compodistill.data.family_inputs import family_inputs

    root, family = family_pair
    stages = [dict(kind="dpt", max_steps=2, batch_size=2, lr=1e-3),
              dict(kind="dft", max_steps=2, batch_size=2, lora_r=4, lora_alpha=8),
              dict(kind="sft", max_steps=1, batch_size=2, lora_r=4, lora_alpha=8)]
    trainer = CompoDistillTrainer(make_config(root, stages, "taf-run", taf=True),
                                  show_progress=False)
    results = trainer.run()
    assert [r.name for r in results] == ["dpt", "dft", "sft"]
    assert set(results[1].final_losses) >= {"loss_lm", "loss_kd", "loss_vat"}
    assert all(torch.isfinite(torch.tensor(v)) for r in results for v in r.final_losses.values())
    student = trainer.student
    teacher = AutoModelForImageTextToText.from_pretrained(root / "teacher")
    sites = taf_sites(student)
    assert len(sites) == (2 if family == "qwen3_vl" else 1)  # Qwen3-VL: merger + 1 DeepStack
    for site, _ in sites:
        connector = student.get_submodule(site)
        assert isinstance(connector, TAFConnector)
        assert (connector.post.bias is None) == (family == "gemma3")
        frozen = dict(connector.teacher.named_parameters())
        for name, p in teacher.get_submodule(site).named_parameters():  # untouched
            assert torch.equal(frozen[name], p), (site, name)
    final = root / "taf-run" / "3-sft" / "model"
    rebuilt = load_family_model(final).eval()
    assert is_taf(rebuilt)
    batch = next(iter(trainer.data_loader(trainer.config.stages[0])))
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values")}
    inputs.update(family_inputs(batch))
    with torch.no_grad():
        want = student.eval()(**inputs).logits
        torch.testing.assert_close(rebuilt(**inputs).logits, want, rtol=1e-4, atol=1e-5)
        if family in WIDE_CONNECTOR:  # no plain form: plain loading refuses, never guesses
            with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
                AutoModelForImageTextToText.from_pretrained(final)
            return
        plain = AutoModelForImageTextToText.from_pretrained(final).eval()
        assert not is_taf(plain) and type(plain).__name__ == CLASSES[family]
        torch.testing.assert_close(plain(**inputs).logits, want, rtol=1e-4, atol=1e-5)


def test_unreadable_image_is_skipped_with_its_reason(family_pair, tmp_path):
    """A family's per-image token count reads each image's header: a broken file is a
    skipped record named "unreadable image", like LLaVA's."""
    from compodistill.data import LlavaDataset
    from compodistill.data.family_inputs import family_image_inputs
    from transformers import AutoConfig, AutoTokenizer

    root, _ = family_pair
    (tmp_path / "broken.png").write_bytes(b"not a png")
    records = [{"image": "broken.png", "conversations": [
        {"from": "human", "value": "<image>\nwhat color"}, {"from": "gpt", "value": "red"}]}]
    config = AutoConfig.from_pretrained(root / "student")
    tokenizer = AutoTokenizer.from_pretrained(root / "student")
    with pytest.warns(UserWarning, match="1 unreadable image"):
        data = LlavaDataset(records, str(tmp_path), tokenizer, 1, num_image_tokens=1,
                            image_token_id=config.image_token_id,
                            image_inputs=family_image_inputs(config, root / "student", tokenizer))
    assert len(data) == 0 and data.problems[0].reason == "unreadable image"


def test_a_teacher_of_another_family_is_refused(family_pair, tmp_path):
    from compodistill.hf import tiny_llava_pair

    root, family = family_pair
    _, llava = tiny_llava_pair(vocab_size=64, image_size=16, patch_size=8)
    llava.save_pretrained(tmp_path / "llava")
    config = make_config(root, CHAIN, "mixed")
    config.teacher = str(tmp_path / "llava")
    with pytest.raises(ConfigError, match=r"^teacher: a LLaVA \(1\.5\) teacher cannot teach"):
        CompoDistillTrainer(config, show_progress=False)


def test_final_logit_softcapping_is_refused():
    """The fused LM and KD losses never build the capped logits: a checkpoint that caps them
    (Gemma 2 did; Gemma 3's default does not) is refused, naming the key."""
    from transformers import Gemma3Config

    from compodistill.train.families import check_family_options

    config = config_from_dict({"student": "s", "teacher": "t", "output_dir": "o",
                               "vat": {"query": "text"}})
    plain, capped = Gemma3Config(), Gemma3Config(text_config={"final_logit_softcapping": 30.0})
    check_family_options(config, plain, plain)
    with pytest.raises(ConfigError, match=r"^student: Gemma 3 with final_logit_softcapping=30"):
        check_family_options(config, capped, plain)
    with pytest.raises(ConfigError, match=r"^teacher: Gemma 3 with final_logit_softcapping=30"):
        check_family_options(config, plain, capped)


def test_onevision_truncation_never_leaves_one_of_several_images(family_pair, tmp_path):
    """A LLaVA-OneVision image among several has another count than a lone one: a record that
    truncation would cut down to one of its images is skipped as too long."""
    from PIL import Image
    from transformers import AutoConfig, AutoTokenizer

    from compodistill.data import LlavaDataset
    from compodistill.data.family_inputs import family_image_inputs

    root, family = family_pair
    if family != "llava_onevision":
        pytest.skip("LLaVA-OneVision only")
    for name in ("a.png", "b.png"):
        Image.new("RGB", (32, 16)).save(tmp_path / name)
    records = [{"image": ["a.png", "b.png"], "conversations": [
        {"from": "human", "value": "<image>\n<image>\nwhat color"},
        {"from": "gpt", "value": "red"}]}]
    config = AutoConfig.from_pretrained(root / "student")
    tokenizer = AutoTokenizer.from_pretrained(root / "student")
    inputs = family_image_inputs(config, root / "student", tokenizer)

    def dataset(max_length):
        return LlavaDataset(records, str(tmp_path), tokenizer, 1, num_image_tokens=1,
                            image_token_id=config.image_token_id, max_length=max_length,
                            image_inputs=inputs)

    whole = dataset(256)
    assert whole[0]["input_ids"].tolist().count(config.image_token_id) == 10  # 5 + 5
    first = whole[0]["input_ids"].tolist().index(config.image_token_id)
    with pytest.warns(UserWarning, match="keeps 1 of 2 images"):
        cut = dataset(first + 8)  # room for the first image's block, not the second's
        assert len(cut) == 0 or cut[0] is None


def test_taf_needs_the_same_vision_features():
    from compodistill.hf.families import tiny_family_pair
    from compodistill.hf.family_taf import apply_family_taf

    student, teacher = tiny_family_pair("internvl", vocab_size=64)
    student.config.vision_config.hidden_size = 48  # another vision tower
    with pytest.raises(ValueError, match=r"TAF needs the same vision features.*48.*32"):
        apply_family_taf(student, teacher)


def test_llava_next_is_refused_by_the_trainer(tmp_path):
    """LLaVA-NeXT shares LLaVA-OneVision's family for the hook, not its anyres packing: the
    trainer refuses it from config.json, naming the key."""
    from transformers import LlavaNextConfig

    from compodistill.hf.families import check_trainer_checkpoint

    LlavaNextConfig().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"^student: LLaVA-NeXT checkpoints .* not yet with "
                                         r"`compodistill train`, which supports .*Gemma 3"):
        check_trainer_checkpoint(tmp_path, "student")
