"""Last hidden states and the ``lm_head`` of a Hugging Face model, without its logits.

A ``...ForCausalLM`` or ``...ForConditionalGeneration`` forward projects every position onto
the vocabulary: (B, N, V) logits, the tensor the fused losses exist to avoid. Running only
the backbone (``model.base_model``: the decoder of a causal LM, the multimodal model of a
VLM, so image features are still merged in) gives the hidden states the fused KD reads
together with the ``lm_head`` weight. Measured in docs/integrations.md.

>>> hidden, head = hidden_states_and_head(student, input_ids=ids, attention_mask=mask,
...                                       pixel_values=pixels)
>>> loss = FusedLinearKDLoss()(hidden, head.weight, h_t, head_t.weight, labels)
"""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["hidden_states_and_head", "unwrap_peft"]

# Text-config fields that change the logits after the lm_head; the fused losses apply none.
_LOGIT_POSTPROCESSING = ("final_logit_softcapping", "logit_scale", "logits_scaling",
                         "output_multiplier", "lm_head_multiplier")


def unwrap_peft(model: nn.Module) -> nn.Module:
    """The transformers model inside a peft wrapper (the LoRA layers stay in it), or ``model``."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _check_head(model: nn.Module) -> nn.Module:
    config = model.config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for name in _LOGIT_POSTPROCESSING:
        value = getattr(text, name, None)
        if value not in (None, 1, 1.0):
            raise ValueError(f"{type(model).__name__}: {name}={value} changes the logits after "
                             f"the lm_head and the fused losses do not apply it; distil from "
                             f"logits (logit_distillation_loss) for this model")
    head = model.get_output_embeddings()
    if not isinstance(head, nn.Linear):
        raise ValueError(f"{type(model).__name__} has no nn.Linear output embedding (lm_head), "
                         f"got {type(head).__name__}")
    return head


def hidden_states_and_head(model: nn.Module, **inputs) -> tuple[torch.Tensor, nn.Linear]:
    """``(last_hidden_state (B, N, d), lm_head)`` of ``model`` on ``inputs``; no logits built.

    Args:
        model: a causal LM or a vision-language ``...ForConditionalGeneration`` of any
            supported family (docs/families.md), a TAF student, or a peft wrapper of one
            (LoRA layers are in the backbone and stay active).
        inputs: the model's usual keyword inputs (``input_ids``, ``attention_mask``,
            ``pixel_values``, ``image_grid_thw``, ...). ``labels`` is refused: the backbone
            computes no loss. ``use_cache`` defaults to False.

    Raises:
        ValueError: a model whose logits are post-processed after the lm_head (Gemma 2's
            final softcapping, Cohere's logit scale...), or ``labels`` in ``inputs``.
    """
    core = unwrap_peft(model)
    head = _check_head(core)
    if "labels" in inputs:
        raise ValueError("hidden_states_and_head runs the backbone only: pass labels to the "
                         "loss, not to the model")
    backbone = core.base_model
    if backbone is core:  # no base_model_prefix: the forward would build the logits
        raise ValueError(f"{type(core).__name__} exposes no backbone (base_model is the model "
                         f"itself)")
    inputs.setdefault("use_cache", False)
    out = backbone(**inputs)
    return out.last_hidden_state, head
