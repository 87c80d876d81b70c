"""TRLFusedDistillationTrainer: TRL's DistillationTrainer (on-policy) with our fused KD and
VAT, on a tiny causal-LM pair and a tiny Qwen2.5-VL pair, tokenizer and processor built in
code.

The logged loss of an accumulated step equals, on the very micro-batches TRL generated:
TRL's own loss (its ``_compute_loss``) plus our VAT computed directly; and the KD part equals
an fp32 reference from full logits. Dropping the VAT weight breaks the equality.
"""
from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("trl")

import trl  # noqa: E402

from compodistill.data.tiny_tokenizer import IMAGE_TOKEN, build_tiny_tokenizer  # noqa: E402
from compodistill.hf import AttentionDistiller  # noqa: E402
from compodistill.integrations.trl import (MULTIMODAL_KEYS,  # noqa: E402
                                           TRLFusedDistillationTrainer)

PROMPTS = ["<image> <image> <image> what color is the circle",
           "<image> <image> how many red squares are there",
           "is the star left of the cross ?", "<image> <image> <image> <image> describe the image"]


def tiny_pair(vocab):
    import transformers as tf

    def lm(hidden, layers, seed):
        torch.manual_seed(seed)
        return tf.Qwen2ForCausalLM(tf.Qwen2Config(
            hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
            num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab,
            tie_word_embeddings=False, max_position_embeddings=128))

    return lm(32, 2, 0), lm(64, 4, 1).eval()


def trl_setup(tmp_path, *, vat_weight=1e4, gradient_checkpointing=False, **config):
    from datasets import Dataset

    tok = build_tiny_tokenizer()
    tok.padding_side = "left"
    student, teacher = tiny_pair(len(tok))
    for model in (student, teacher):
        model.generation_config.eos_token_id = tok.eos_token_id
        model.generation_config.pad_token_id = tok.pad_token_id
    image_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    # A causal LM has no image tower: the "<image>" words stand in for the visual keys.
    distiller = AttentionDistiller(student, teacher, image_token_id=image_id, preset="all")
    base = dict(output_dir=str(tmp_path), per_device_train_batch_size=2,
                gradient_accumulation_steps=2, max_steps=1, learning_rate=0.0, logging_steps=1,
                max_completion_length=6, report_to=[], use_cpu=True, save_strategy="no",
                bf16=False, gradient_checkpointing=gradient_checkpointing, beta=0.4,
                temperature=1.5, disable_tqdm=True, seed=0)
    args = trl.DistillationConfig(**{**base, **config})
    trainer = TRLFusedDistillationTrainer(
        model=student, teacher_model=teacher, args=args,
        train_dataset=Dataset.from_dict({"prompt": PROMPTS}), processing_class=tok,
        vat=distiller, vat_weight=vat_weight)
    return trainer, student, teacher, distiller


def direct(trainer, student, teacher, distiller, vat_weight):
    """On TRL's buffered micro-batches: TRL's own loss, our VAT, and an fp32 reference KD."""
    student.eval()
    trl_total, vat_total, ref_total = 0.0, 0.0, 0.0
    batches = trainer._buffered_inputs
    n_items = float(batches[0]["num_items_in_batch"])
    for mb in batches:
        with torch.no_grad():
            loss, _, _ = trl.DistillationTrainer._compute_loss(trainer, student, mb, n_items)
            trl_total += float(loss)
            ids = torch.cat([mb["prompt_ids"], mb["completion_ids"]], 1)
            mask = torch.cat([mb["prompt_mask"], mb["completion_mask"]], 1)
            extra = {k: mb[k] for k in MULTIMODAL_KEYS if k in mb}
            with distiller.capture(ids, attention_mask=mask) as cap:
                zt = teacher(input_ids=ids, attention_mask=mask, **extra).logits
                zs = student(input_ids=ids, attention_mask=mask, **extra).logits
            vat_total += float(cap.loss())
            c = mb["completion_ids"].shape[1]
            ref_total += float(_ref_generalized_jsd(zs[:, -c - 1:-1], zt[:, -c - 1:-1],
                                                    mb["completion_mask"], 0.4, 1.5)) / n_items
    return trl_total, vat_total / len(batches), ref_total


def _ref_generalized_jsd(zs, zt, mask, beta, temperature):
    # TRL's definition in fp32 from full logits: m = (1-β)p_s + βp_t, summed over tokens.
    lp_s = (zs.float() / temperature).log_softmax(-1)
    lp_t = (zt.float() / temperature).log_softmax(-1)
    lm = torch.logaddexp(lp_s + math.log(1 - beta), lp_t + math.log(beta))
    per = (beta * lp_t.exp() * (lp_t - lm) + (1 - beta) * lp_s.exp() * (lp_s - lm)).sum(-1)
    return (per * mask).sum()


@pytest.mark.parametrize("plant", [False, True], ids=["ours", "planted_vat_weight_dropped"])
def test_trl_logged_loss_equals_trl_kd_plus_our_vat(tmp_path, plant):
    trainer, student, teacher, distiller = trl_setup(tmp_path)
    if plant:
        trainer.distill.vat_weight = 0.0
    trainer.train()
    logged = trainer.state.log_history[0]
    assert {"loss", "kd_ce", "vat"} <= set(logged)
    trl_kd, vat, ref_kd = direct(trainer, student, teacher, distiller, 1e4)
    assert math.isclose(trl_kd, ref_kd, rel_tol=1e-4), (trl_kd, ref_kd)
    assert 1e4 * vat > 1e-2  # the VAT term weighs in the total
    # our fused KD alone: the two micro-batches' terms (logged as their mean) add up to TRL's
    assert math.isclose(2 * logged["kd_ce"], trl_kd, rel_tol=1e-4), (logged, trl_kd)
    expected = trl_kd + 1e4 * vat
    close = math.isclose(logged["loss"], expected, rel_tol=1e-4, abs_tol=1e-6)
    assert close != plant, (logged, expected)


IMAGE_ONLY_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def qwen_vl_setup(tmp_path, vat_weight):
    """A tiny Qwen2.5-VL pair and an image-only Qwen2.5-VL processor over the tiny tokenizer
    (its four placeholder tokens last, where tiny_family_pair puts the config's ids)."""
    import transformers as tf
    from datasets import Dataset
    from PIL import Image

    from compodistill.hf.families import tiny_family_pair

    tok = build_tiny_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": [
        "<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>"]})
    tok.padding_side = "left"
    tok.chat_template = IMAGE_ONLY_TEMPLATE

    class ImageOnlyProcessor(tf.Qwen2_5_VLProcessor):
        # Qwen's video processor needs torchvision, which the CPU test environment lacks.
        def __init__(self, image_processor=None, tokenizer=None, chat_template=None):
            self.image_token, self.video_token = "<|image_pad|>", "<|video_pad|>"
            self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
            self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
            tf.ProcessorMixin.__init__(self, image_processor, tokenizer,
                                       chat_template=chat_template)

    images = tf.Qwen2VLImageProcessorPil(patch_size=4, merge_size=2, temporal_patch_size=2,
                                         min_pixels=16 * 16, max_pixels=32 * 32)
    processor = ImageOnlyProcessor(images, tok, chat_template=IMAGE_ONLY_TEMPLATE)
    student, teacher = tiny_family_pair("qwen2_5_vl", vocab_size=len(tok))
    assert student.config.image_token_id == tok.convert_tokens_to_ids("<|image_pad|>")
    for model in (student, teacher):
        model.generation_config.eos_token_id = tok.eos_token_id
        model.generation_config.pad_token_id = tok.pad_token_id
    g = torch.Generator().manual_seed(0)
    pictures = [Image.fromarray((torch.rand(h, w, 3, generator=g) * 255).byte().numpy())
                for w, h in ((16, 16), (32, 16), (16, 32), (16, 16))]
    questions = ["what color is the circle", "how many squares", "describe the image",
                 "is the star left of the cross"]
    data = Dataset.from_dict({"prompt": [[{"role": "user", "content": q}] for q in questions],
                              "image": pictures})
    distiller = AttentionDistiller(student, teacher, preset="all")
    args = trl.DistillationConfig(
        output_dir=str(tmp_path), per_device_train_batch_size=2, gradient_accumulation_steps=2,
        max_steps=1, learning_rate=0.0, logging_steps=1, max_completion_length=5, report_to=[],
        use_cpu=True, save_strategy="no", bf16=False, gradient_checkpointing=False, beta=0.4,
        temperature=1.5, disable_tqdm=True, seed=0)
    trainer = TRLFusedDistillationTrainer(model=student, teacher_model=teacher, args=args,
                                          train_dataset=data, processing_class=processor,
                                          vat=distiller, vat_weight=vat_weight)
    return trainer, student, teacher, distiller


@pytest.mark.parametrize("plant", [False, True], ids=["ours", "planted_vat_weight_dropped"])
def test_trl_qwen2_5_vl_logged_loss(tmp_path, plant):
    trainer, student, teacher, distiller = qwen_vl_setup(tmp_path, 1e3)
    if plant:
        trainer.distill.vat_weight = 0.0
    trainer.train()
    logged = trainer.state.log_history[0]
    mb = trainer._buffered_inputs[0]
    assert "pixel_values" in mb and "image_grid_thw" in mb  # images went through TRL
    trl_kd, vat, ref_kd = direct(trainer, student, teacher, distiller, 1e3)
    assert math.isclose(trl_kd, ref_kd, rel_tol=1e-4), (trl_kd, ref_kd)
    assert math.isclose(2 * logged["kd_ce"], trl_kd, rel_tol=1e-4), (logged, trl_kd)
    assert 1e3 * vat > 1e-3
    close = math.isclose(logged["loss"], trl_kd + 1e3 * vat, rel_tol=1e-4, abs_tol=1e-6)
    assert close != plant, (logged, trl_kd, vat)


def test_trl_trains_a_few_steps_with_checkpointing(tmp_path):
    trainer, student, _, _ = trl_setup(tmp_path, max_steps=3, learning_rate=1e-2,
                                       gradient_checkpointing=True)
    before = student.lm_head.weight.detach().clone()
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    assert not torch.equal(before, student.lm_head.weight)


def test_trl_refuses_a_teacher_id(tmp_path):
    with pytest.raises(TypeError, match="teacher_model must be an instantiated model"):
        TRLFusedDistillationTrainer(model=None, teacher_model="org/teacher")
