"""LLaVA assembly from configs, save/load from a local path, and TAF (docs/taf.md)."""
import pytest
import torch

pytest.importorskip("transformers")
from transformers import AutoModelForImageTextToText, LlavaForConditionalGeneration  # noqa: E402

from compodistill.hf import (TAFLlavaConfig, TAFLlavaForConditionalGeneration,  # noqa: E402
                             apply_taf, build_llava, load_student, tiny_llava_pair)


def inputs(model, batch=2, extra=6):
    nv, img = model.config.image_seq_length, model.config.image_token_id
    ids = torch.randint(0, 100, (batch, nv + extra))
    ids[:, 2:2 + nv] = img
    mask = torch.ones_like(ids)
    mask[-1, :1] = 0
    return dict(input_ids=ids, attention_mask=mask, pixel_values=torch.randn(batch, 3, 32, 32))


@pytest.mark.parametrize("vision,text", [("siglip", "qwen2"), ("clip", "llama")])
def test_pair_builds_runs_and_round_trips(tmp_path, vision, text):
    student, teacher = tiny_llava_pair(vision, text)
    assert student.config.image_token_id == teacher.config.image_token_id
    assert student.config.text_config.vocab_size == teacher.config.text_config.vocab_size
    expected = 16  # (32/8)² patches: SigLIP "full"; CLIP adds CLS and "default" drops it
    assert student.config.image_seq_length == expected
    for a, b in zip(student.model.vision_tower.parameters(), teacher.model.vision_tower.parameters()):
        assert torch.equal(a, b)
    assert student.config.text_config.hidden_size < teacher.config.text_config.hidden_size
    x = inputs(student)
    student.eval()
    logits = student(**x).logits
    student.save_pretrained(tmp_path)
    loaded = load_student(tmp_path).eval()
    assert type(loaded) is LlavaForConditionalGeneration
    torch.testing.assert_close(loaded(**x).logits, logits)


def test_build_llava_from_dicts_and_errors():
    vision = dict(model_type="siglip", hidden_size=32, intermediate_size=64,
                  num_hidden_layers=1, num_attention_heads=4, image_size=32, patch_size=16)
    text = dict(model_type="qwen2", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                num_attention_heads=4, num_key_value_heads=2, vocab_size=64)
    model = build_llava(vision, text, attn_implementation={"text_config": "compodistill"})
    assert model.config.image_seq_length == 4 and model.config.image_token_id == 63
    assert model.config.text_config._attn_implementation == "compodistill"
    with pytest.raises(ValueError, match="projector"):
        build_llava(vision, text, projector="linear")
    with pytest.raises(ValueError, match="model_type"):
        build_llava({**vision, "model_type": "vit"}, text)
    with pytest.raises(ValueError, match="outside the text vocabulary"):
        build_llava(vision, text, image_token_id=64)


def test_taf_trainable_set_and_forward():
    student, teacher = tiny_llava_pair()
    d_t, d_s = teacher.config.text_config.hidden_size, student.config.text_config.hidden_size
    before = {n for n, p in student.named_parameters() if p.requires_grad}
    student = apply_taf(student, teacher)
    assert isinstance(student, TAFLlavaForConditionalGeneration)
    proj = student.model.multi_modal_projector
    assert (proj.post.in_features, proj.post.out_features) == (d_t, d_s)
    t_proj = teacher.model.multi_modal_projector
    assert torch.equal(proj.linear_1.weight, t_proj.linear_1.weight)
    assert proj.linear_1.weight.data_ptr() != t_proj.linear_1.weight.data_ptr()  # a copy
    trainable = {n for n, p in student.named_parameters() if p.requires_grad}
    projector = {n for n in trainable if "multi_modal_projector" in n}
    assert projector == {"model.multi_modal_projector.post.weight",
                         "model.multi_modal_projector.post.bias"}
    assert trainable - projector == {n for n in before if "multi_modal_projector" not in n}
    out = student(**inputs(student), labels=inputs(student)["input_ids"])
    out.loss.backward()
    assert proj.post.weight.grad is not None and proj.linear_1.weight.grad is None


def test_taf_builds_a_new_model_that_shares_the_students_weights():
    # No __class__ swap: the student keeps its class, config and connector; the TAF model
    # holds the student's parameter objects (requires_grad kept) under a TAF config.
    student, teacher = tiny_llava_pair(attn_implementation={"text_config": "compodistill",
                                                            "vision_config": "sdpa"})
    student.model.vision_tower.requires_grad_(False)
    old_projector = student.model.multi_modal_projector
    taf = apply_taf(student, teacher)
    assert taf is not student and type(student) is LlavaForConditionalGeneration
    assert type(student.config).__name__ == "LlavaConfig"
    assert student.model.multi_modal_projector is old_projector
    assert type(taf.config) is TAFLlavaConfig and taf.config is not student.config
    s_cfg, t_cfg = student.config.to_dict(), taf.config.to_dict()
    assert t_cfg.pop("taf_hidden_size") == teacher.config.text_config.hidden_size
    assert t_cfg.pop("model_type") == TAFLlavaConfig.model_type
    s_cfg.pop("model_type")
    assert t_cfg == s_cfg
    assert taf.config.text_config._attn_implementation == "compodistill"
    assert taf.config.vision_config._attn_implementation == "sdpa"
    s_params = dict(student.named_parameters())
    for name, p in taf.named_parameters():
        assert not p.is_meta, name
        if "multi_modal_projector" not in name:
            assert p is s_params[name], name
    assert not any(p.requires_grad for p in taf.model.vision_tower.parameters())
    s_buffers = dict(student.named_buffers())
    assert all(b is s_buffers[n] for n, b in taf.named_buffers())  # rotary inv_freq, ...
    assert set(taf.state_dict()) - set(student.state_dict()) == {
        "model.multi_modal_projector.post.weight", "model.multi_modal_projector.post.bias"}


def test_taf_save_load_round_trip(tmp_path):
    student, teacher = tiny_llava_pair()
    student = apply_taf(student, teacher)
    student.eval()
    x = inputs(student)
    logits = student(**x).logits
    student.save_pretrained(tmp_path)
    for loaded in (load_student(tmp_path), AutoModelForImageTextToText.from_pretrained(tmp_path),
                   TAFLlavaForConditionalGeneration.from_pretrained(tmp_path)):
        assert isinstance(loaded, TAFLlavaForConditionalGeneration)
        assert loaded.config.taf_hidden_size == teacher.config.text_config.hidden_size
        trainable = {n for n, p in loaded.named_parameters()
                     if p.requires_grad and "multi_modal_projector" in n}
        assert trainable == {"model.multi_modal_projector.post.weight",
                             "model.multi_modal_projector.post.bias"}
        torch.testing.assert_close(loaded.eval()(**x).logits, logits)


def test_taf_round_trip_of_a_student_loaded_from_disk(tmp_path):
    # transformers 5 remembers the checkpoint layout a model was loaded with and saves in
    # it; the TAF model type must load that layout back (lm_head included).
    student, teacher = tiny_llava_pair()
    student.save_pretrained(tmp_path / "init")
    student = apply_taf(load_student(tmp_path / "init"), teacher)
    student.save_pretrained(tmp_path / "taf")
    expected = student.state_dict()
    assert "lm_head.weight" in expected
    for loaded in (load_student(tmp_path / "taf"),
                   AutoModelForImageTextToText.from_pretrained(tmp_path / "taf")):
        assert isinstance(loaded, TAFLlavaForConditionalGeneration)
        state = loaded.state_dict()
        assert sorted(state) == sorted(expected)
        for name, value in expected.items():
            assert torch.equal(state[name], value), name


def test_taf_errors():
    student, teacher = tiny_llava_pair()
    _, other = tiny_llava_pair(image_size=48)  # 36 image tokens instead of 16
    with pytest.raises(ValueError, match="same vision features"):
        apply_taf(student, other)
    wide = build_llava(dict(model_type="siglip", hidden_size=48, intermediate_size=64,
                            num_hidden_layers=1, num_attention_heads=4, image_size=32,
                            patch_size=8),
                       teacher.config.text_config)
    with pytest.raises(ValueError, match="student connector input 32"):
        apply_taf(student, wide)
    taf = apply_taf(student, teacher)
    with pytest.raises(ValueError, match="already"):
        apply_taf(taf, teacher)
    with pytest.raises(ValueError, match="itself a TAF connector"):
        apply_taf(student, taf)
