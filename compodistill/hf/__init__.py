"""Hugging Face integration: attention distillation inside real transformers models.

Importing this package registers the ``"compodistill"`` attention implementation with
transformers (needs ``transformers>=5``). A few lines enable VAT on any pair of models::

    from compodistill.hf import AttentionDistiller
    distiller = AttentionDistiller(student, teacher, image_token_id=cfg.image_token_id)
    with distiller.capture(input_ids, attention_mask=mask) as cap:
        with torch.no_grad():
            teacher(input_ids=input_ids, pixel_values=pixels, attention_mask=mask)
        out = student(input_ids=input_ids, pixel_values=pixels, attention_mask=mask,
                      labels=labels)
    loss = out.loss + cap.loss()

Public API: :class:`AttentionDistiller` (and its :class:`Capture`), :func:`enable_attention`,
:func:`hidden_states_and_head` (:mod:`.backbone`: the fused losses' inputs without logits),
:func:`build_llava`, :func:`tiny_llava_pair` (:mod:`.builders`), :func:`apply_taf`,
:func:`load_student`, :class:`TAFLlavaForConditionalGeneration` (:mod:`.taf`).
"""
from .attention import ATTN_IMPLEMENTATION, enable_attention, register
from .backbone import hidden_states_and_head
from .builders import build_llava, tiny_llava_pair
from .distiller import AttentionDistiller, Capture
from .taf import (TAFLlavaConfig, TAFLlavaForConditionalGeneration, TAFProjector, apply_taf,
                  load_student)

__all__ = ["ATTN_IMPLEMENTATION", "AttentionDistiller", "Capture", "TAFLlavaConfig",
           "TAFLlavaForConditionalGeneration", "TAFProjector", "apply_taf", "build_llava",
           "enable_attention", "hidden_states_and_head", "load_student", "register",
           "tiny_llava_pair"]
