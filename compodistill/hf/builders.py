"""LLaVA-style student/teacher models built from configs (no download).

* :func:`build_llava`: ``LlavaForConditionalGeneration`` from a vision-tower config (SigLIP
  or CLIP) and a language-model config (Qwen2 or Llama), connector ``mlp2x_gelu``
  (Linear → GELU → Linear, transformers' ``LlavaMultiModalProjector``).
* :func:`tiny_llava_pair`: a small teacher and a smaller student that share the vision
  tower (config and weights), the vocabulary and the image token, for tests and examples.
"""
from __future__ import annotations

import torch
from transformers import (CLIPVisionConfig, LlamaConfig, LlavaConfig,
                          LlavaForConditionalGeneration, PretrainedConfig, Qwen2Config,
                          SiglipVisionConfig)

__all__ = ["PROJECTORS", "build_llava", "tiny_llava_pair"]

PROJECTORS = ("mlp2x_gelu",)
_VISION = {"siglip": SiglipVisionConfig, "clip": CLIPVisionConfig}
_TEXT = {"qwen2": Qwen2Config, "llama": LlamaConfig}


def _as_config(cfg, kinds: dict, what: str) -> PretrainedConfig:
    if isinstance(cfg, PretrainedConfig):
        return cfg
    if isinstance(cfg, dict):
        cfg = dict(cfg)
        kind = cfg.pop("model_type", None)
        for name, cls in kinds.items():
            if kind in (name, cls.model_type):
                return cls(**cfg)
        raise ValueError(f"{what} dict needs model_type in {sorted(kinds)}, got {kind!r}")
    raise TypeError(f"{what} must be a transformers config or a dict, got {type(cfg).__name__}")


def _num_image_tokens(vision, strategy: str) -> int:
    patches = (vision.image_size // vision.patch_size) ** 2
    tokens = patches + (1 if vision.model_type.startswith("clip") else 0)  # CLIP adds CLS
    return tokens - 1 if strategy == "default" else tokens  # "default" drops the first token


def build_llava(vision_config, text_config, *, projector: str = "mlp2x_gelu",
                image_token_id: int | None = None, vision_feature_layer: int = -2,
                vision_feature_select_strategy: str | None = None,
                attn_implementation: str | dict | None = None,
                dtype: torch.dtype | None = None) -> LlavaForConditionalGeneration:
    """A randomly initialised LLaVA model from configs (no download).

    Args:
        vision_config: a ``SiglipVisionConfig`` / ``CLIPVisionConfig`` or a dict with
            ``model_type`` ``"siglip"`` or ``"clip"`` (plus config fields).
        text_config: a ``Qwen2Config`` / ``LlamaConfig`` or a dict with ``model_type``
            ``"qwen2"`` or ``"llama"``.
        projector: connector type; only ``"mlp2x_gelu"`` (LLaVA-1.5's).
        image_token_id: placeholder id in the text vocabulary; default the last id.
        vision_feature_layer: vision hidden state fed to the connector.
        vision_feature_select_strategy: ``"full"`` (default for SigLIP, which has no CLS
            token) or ``"default"`` (drop CLS; default for CLIP).
        attn_implementation: e.g. ``{"text_config": "compodistill", "vision_config":
            "sdpa"}``; default sdpa everywhere.
        dtype: parameter dtype (default float32).

    The number of image tokens per image is ``config.image_seq_length``; ``input_ids`` must
    hold that many ``image_token_id`` per image.
    """
    if projector not in PROJECTORS:
        raise ValueError(f"projector must be one of {PROJECTORS}, got {projector!r}")
    vision = _as_config(vision_config, _VISION, "vision_config")
    text = _as_config(text_config, _TEXT, "text_config")
    strategy = vision_feature_select_strategy or (
        "default" if vision.model_type.startswith("clip") else "full")
    token = text.vocab_size - 1 if image_token_id is None else int(image_token_id)
    if not 0 <= token < text.vocab_size:
        raise ValueError(f"image_token_id {token} outside the text vocabulary "
                         f"(vocab_size {text.vocab_size})")
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=token,
                         image_seq_length=_num_image_tokens(vision, strategy),
                         vision_feature_layer=vision_feature_layer,
                         vision_feature_select_strategy=strategy, projector_hidden_act="gelu")
    model = LlavaForConditionalGeneration(config)
    if attn_implementation is not None:
        model.set_attn_implementation(attn_implementation)
    return model.to(dtype) if dtype is not None else model


def tiny_llava_pair(vision: str = "siglip", text: str = "qwen2", *, teacher_hidden: int = 64,
                    student_hidden: int = 32, teacher_layers: int = 4, student_layers: int = 2,
                    vocab_size: int = 128, image_size: int = 32, patch_size: int = 8,
                    seed: int = 0, attn_implementation: str | dict | None = None
                    ) -> tuple[LlavaForConditionalGeneration, LlavaForConditionalGeneration]:
    """``(student, teacher)``: tiny random LLaVA models sharing vision tower and vocabulary.

    Both use the same vision config and the same vision-tower weights (as when both come
    from one model family), the same vocabulary and image token; the teacher's language
    model is wider and deeper. GQA: 4 query heads over 2 kv heads in both.
    """
    if vision not in _VISION or text not in _TEXT:
        raise ValueError(f"vision must be one of {sorted(_VISION)} and text one of "
                         f"{sorted(_TEXT)}, got {vision!r}, {text!r}")
    torch.manual_seed(seed)
    vis = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
               num_attention_heads=4, image_size=image_size, patch_size=patch_size)

    def lm(hidden, layers):
        return _TEXT[text](hidden_size=hidden, intermediate_size=2 * hidden,
                           num_hidden_layers=layers, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=vocab_size,
                           max_position_embeddings=512, tie_word_embeddings=False)

    teacher = build_llava(_VISION[vision](**vis), lm(teacher_hidden, teacher_layers),
                          attn_implementation=attn_implementation)
    student = build_llava(_VISION[vision](**vis), lm(student_hidden, student_layers),
                          attn_implementation=attn_implementation)
    student.model.vision_tower.load_state_dict(teacher.model.vision_tower.state_dict())
    return student, teacher
