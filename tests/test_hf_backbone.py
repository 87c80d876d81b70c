"""hidden_states_and_head: the last hidden states and the lm_head of every supported family
(a causal LM, LLaVA, TAF, the VLM families, a peft wrapper) without building the logits."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from compodistill.hf.backbone import hidden_states_and_head  # noqa: E402
from compodistill.hf.builders import tiny_llava_pair  # noqa: E402
from compodistill.hf.families import (TINY_FAMILIES, tiny_family_batch,  # noqa: E402
                                      tiny_family_pair)
from compodistill.testing.memory import peak_memory  # noqa: E402


def tiny_causal_lm(vocab=50, hidden=32, **extra):
    import transformers as tf

    cfg = tf.Qwen2Config(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, vocab_size=vocab, **extra)
    torch.manual_seed(0)
    return tf.Qwen2ForCausalLM(cfg).eval()


def _check(model, inputs):
    hidden, head = hidden_states_and_head(model, **inputs)
    with torch.no_grad():
        logits = model(**inputs).logits
    assert head is model.get_output_embeddings()
    torch.testing.assert_close(head(hidden), logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_vlm_families(family):
    student, _ = tiny_family_pair(family)
    _check(student, tiny_family_batch(student, [[4], []], seq_len=24))


def test_causal_lm_llava_taf_and_peft():
    from peft import LoraConfig, get_peft_model

    from compodistill.hf.taf import apply_taf

    lm = tiny_causal_lm()
    _check(lm, dict(input_ids=torch.randint(0, 50, (2, 9)), attention_mask=torch.ones(2, 9)))
    student, teacher = tiny_llava_pair()
    cfg = student.config
    ids = torch.randint(0, 100, (1, cfg.image_seq_length + 6))
    ids[0, 2:2 + cfg.image_seq_length] = cfg.image_token_id
    inputs = dict(input_ids=ids, pixel_values=torch.randn(1, 3, 32, 32))
    _check(student, inputs)
    _check(apply_taf(student, teacher).eval(), inputs)
    lora = LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False)
    peft = get_peft_model(student, lora)
    hidden, _ = hidden_states_and_head(peft, **inputs)
    with torch.no_grad():
        plain, _ = hidden_states_and_head(peft.get_base_model(), **inputs)
        peft.disable_adapter_layers()
        off, _ = hidden_states_and_head(peft, **inputs)
    torch.testing.assert_close(hidden, plain)
    assert not torch.allclose(hidden, off)  # the LoRA layers were in the backbone


def test_refusals():
    lm = tiny_causal_lm(final_logit_softcapping=30.0)
    with pytest.raises(ValueError, match="final_logit_softcapping=30.0"):
        hidden_states_and_head(lm, input_ids=torch.zeros(1, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="pass labels to the loss"):
        hidden_states_and_head(tiny_causal_lm(), input_ids=torch.zeros(1, 3, dtype=torch.long),
                               labels=torch.zeros(1, 3, dtype=torch.long))


def test_no_logits_are_built():
    vocab, b, n = 4096, 2, 64
    lm = tiny_causal_lm(vocab=vocab)
    ids = torch.randint(0, vocab, (b, n))
    with torch.no_grad(), peak_memory() as full:
        lm(input_ids=ids)
    with torch.no_grad(), peak_memory() as hidden:
        hidden_states_and_head(lm, input_ids=ids)
    logits_bytes = b * n * vocab * 4
    assert full.bytes >= logits_bytes
    assert hidden.bytes < logits_bytes / 4
