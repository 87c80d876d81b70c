"""FusedDistillTrainer: a transformers.Trainer run with our fused KD and VAT on tiny models.

The logged loss of an accumulated step equals our losses computed directly on the same two
micro-batches, with Trainer's token weighting; dropping the VAT weight breaks the equality.
"""
from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("transformers")

import compodistill as cd  # noqa: E402
from compodistill.hf import AttentionDistiller  # noqa: E402
from compodistill.hf.builders import tiny_llava_pair  # noqa: E402
from compodistill.integrations.hf_trainer import FusedDistillTrainer  # noqa: E402


def llava_samples(student, lengths=(14, 11), prompt=(3, 5), seed=0):
    cfg = student.config
    g = torch.Generator().manual_seed(seed)
    n_img, n = cfg.image_seq_length, max(lengths) + cfg.image_seq_length
    out = []
    for length, p in zip(lengths, prompt):
        ids = torch.randint(0, cfg.image_token_id, (n,), generator=g)
        ids[1:1 + n_img] = cfg.image_token_id
        mask = torch.zeros(n, dtype=torch.long)
        mask[:n_img + length] = 1
        labels = ids.masked_fill(mask == 0, -100)
        labels[:1 + n_img + p] = -100  # image and prompt
        out.append(dict(input_ids=ids, attention_mask=mask, labels=labels,
                        pixel_values=torch.randn(3, 32, 32, generator=g)))
    return out


def tiny_causal_pair(vocab=64):
    import transformers as tf

    def lm(hidden, layers, seed):
        torch.manual_seed(seed)
        cfg = tf.Qwen2Config(hidden_size=hidden, intermediate_size=2 * hidden,
                             num_hidden_layers=layers, num_attention_heads=4,
                             num_key_value_heads=2, vocab_size=vocab, tie_word_embeddings=False)
        return tf.Qwen2ForCausalLM(cfg)

    return lm(32, 2, 0), lm(64, 4, 1).eval()


def text_samples(lengths=(12, 7), n=14, vocab=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for length in lengths:
        ids = torch.randint(0, vocab, (n,), generator=g)
        mask = (torch.arange(n) < length).long()
        labels = ids.masked_fill(mask == 0, -100)
        labels[:2] = -100
        out.append(dict(input_ids=ids, attention_mask=mask, labels=labels))
    return out


def train_args(tmp_path, **kw):
    from transformers import TrainingArguments

    base = dict(output_dir=str(tmp_path), per_device_train_batch_size=1,
                gradient_accumulation_steps=2, max_steps=1, learning_rate=0.0, logging_steps=1,
                report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True, seed=0)
    return TrainingArguments(**{**base, **kw})


def direct_loss(student, teacher, samples, kd, distiller, vat_weight):
    """KD + CE over both samples as one mean over tokens, VAT as the mean of the two."""
    batch = {k: torch.stack([s[k] for s in samples]) for k in samples[0]}
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        h_t, head_t = cd.hf.hidden_states_and_head(teacher, **inputs)
        h_s, head_s = cd.hf.hidden_states_and_head(student, **inputs)
        total = kd(h_s, head_s.weight, h_t, head_t.weight, batch["labels"],
                   attention_mask=batch["attention_mask"])
    if distiller is None:
        return float(total)
    vats = []
    for s in samples:
        one = {k: v[None] for k, v in s.items() if k != "labels"}
        with torch.no_grad(), distiller.capture(one["input_ids"],
                                                attention_mask=one["attention_mask"]) as cap:
            teacher(**one)
            student(**one)
        vats.append(float(cap.loss()))
    return float(total) + vat_weight * sum(vats) / len(vats)


@pytest.mark.parametrize("plant", [False, True], ids=["ours", "planted_vat_weight_dropped"])
def test_trainer_llava_kd_vat_logged_loss_equals_direct(tmp_path, plant):
    student, teacher = tiny_llava_pair()
    distiller = AttentionDistiller(student, teacher, preset="all")
    kd = cd.FusedLinearKDLoss(weight_hard_loss=1.0, weight_soft_loss=0.5, loss="kl",
                              temperature=2.0)
    samples = llava_samples(student)
    trainer = FusedDistillTrainer(model=student, teacher_model=teacher, args=train_args(tmp_path),
                                  train_dataset=samples, kd_loss=kd, vat=distiller,
                                  vat_weight=1000.0)
    if plant:
        trainer.distill.vat_weight = 0.0
    trainer.train()
    logged = trainer.state.log_history[0]
    assert {"loss", "kd_ce", "vat"} <= set(logged)
    student.eval()
    expected = direct_loss(student, teacher, samples, kd, distiller, 1000.0)
    vat_mean = logged["vat"]
    assert 1000.0 * vat_mean > 1e-2  # the term weighs in the total
    close = math.isclose(logged["loss"], expected, rel_tol=1e-5, abs_tol=1e-6)
    assert close != plant, (logged, expected)


def test_trainer_causal_lm_pair_weights_tokens_like_trainer(tmp_path):
    student, teacher = tiny_causal_pair()
    samples = text_samples()
    kd = cd.FusedLinearKDLoss(weight_hard_loss=1.0, weight_soft_loss=1.0, loss="jsd", beta=0.3)
    trainer = FusedDistillTrainer(model=student, teacher_model=teacher, args=train_args(tmp_path),
                                  train_dataset=samples, kd_loss=kd)
    trainer.train()
    logged = trainer.state.log_history[0]["loss"]
    student.eval()
    expected = direct_loss(student, teacher, samples, kd, None, 0.0)
    assert math.isclose(logged, expected, rel_tol=1e-5), (logged, expected)
    # the mean of per-sample means (no token weighting) is another number
    means = [direct_loss(student, teacher, [s], kd, None, 0.0) for s in samples]
    assert abs(logged - sum(means) / 2) > 20 * abs(logged - expected) + 1e-5


def test_trainer_trains_and_refuses_bad_setup(tmp_path):
    student, teacher = tiny_causal_pair()
    before = student.lm_head.weight.detach().clone()
    trainer = FusedDistillTrainer(model=student, teacher_model=teacher,
                                  args=train_args(tmp_path, max_steps=3, learning_rate=1e-2),
                                  train_dataset=text_samples() * 3)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    assert not torch.equal(before, student.lm_head.weight)
    assert all(not p.requires_grad for p in teacher.parameters())
    with pytest.raises(ValueError, match="needs teacher_model"):
        FusedDistillTrainer(model=student, args=train_args(tmp_path))
    with pytest.raises(TypeError, match="kd_loss must be a FusedLinearKDLoss"):
        FusedDistillTrainer(model=student, teacher_model=teacher, args=train_args(tmp_path),
                            kd_loss=torch.nn.KLDivLoss())


def test_trainer_qwen2_5_vl_kd_vat(tmp_path):
    # A VLM family whose pixels are flattened patches: a collator hands Trainer the
    # family's own micro-batches (one sample each, different token counts).
    from compodistill.hf.families import tiny_family_batch, tiny_family_pair

    student, teacher = tiny_family_pair("qwen2_5_vl")
    batch = tiny_family_batch(student, [[4], [4]], seq_len=20)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    labels = labels.masked_fill(batch["mm_token_type_ids"] != 0, -100)
    labels[:, :8] = -100
    batch["labels"] = labels
    per = batch["pixel_values"].shape[0] // 2
    micro = [{k: (v[i * per:(i + 1) * per] if k == "pixel_values" else v[i:i + 1])
              for k, v in batch.items()} for i in range(2)]
    distiller = AttentionDistiller(student, teacher, preset="all")
    kd = cd.FusedLinearKDLoss(weight_hard_loss=1.0, weight_soft_loss=1.0, loss="kl")
    trainer = FusedDistillTrainer(model=student, teacher_model=teacher,
                                  args=train_args(tmp_path, remove_unused_columns=False),
                                  train_dataset=[0, 1], data_collator=lambda idx: micro[idx[0]],
                                  kd_loss=kd, vat=distiller, vat_weight=1000.0)
    trainer.train()
    logged = trainer.state.log_history[0]
    student.eval()
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        h_t, head_t = cd.hf.hidden_states_and_head(teacher, **inputs)
        h_s, head_s = cd.hf.hidden_states_and_head(student, **inputs)
        kd_all = float(kd(h_s, head_s.weight, h_t, head_t.weight, labels))
    vats = []
    for mb in micro:
        one = {k: v for k, v in mb.items() if k != "labels"}
        with torch.no_grad(), distiller.capture(one["input_ids"],
                                                attention_mask=one["attention_mask"]) as cap:
            teacher(**one)
            student(**one)
        vats.append(float(cap.loss()))
    assert 1000.0 * sum(vats) / 2 > 1e-2
    expected = kd_all + 1000.0 * sum(vats) / 2
    assert math.isclose(logged["loss"], expected, rel_tol=1e-5), (logged, expected)
