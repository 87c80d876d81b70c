"""LLaVA-style student/teacher models from configs, and TAF (docs/taf.md).

* :func:`build_llava`: ``LlavaForConditionalGeneration`` from a vision-tower config (SigLIP
  or CLIP) and a language-model config (Qwen2 or Llama), connector ``mlp2x_gelu``
  (Linear → GELU → Linear, transformers' ``LlavaMultiModalProjector``).
* :func:`tiny_llava_pair`: a small teacher and a smaller student that share the vision
  tower (config and weights), the vocabulary and the image token, for tests and examples.
* :func:`apply_taf`: the student's connector becomes a frozen copy of the teacher's followed
  by a trainable ``Linear(d_t, d_s)`` post-connector.

How TAF survives ``save_pretrained``: :func:`apply_taf` turns the student (in place, no
copy of its weights) into a :class:`TAFLlavaForConditionalGeneration`, whose config class
:class:`TAFLlavaConfig` (``model_type="compodistill_taf_llava"``) records the teacher width
``taf_hidden_size``. Both are registered with transformers' Auto classes when this module is
imported, so ``AutoModelForImageTextToText.from_pretrained(path)`` and
``TAFLlavaForConditionalGeneration.from_pretrained(path)`` rebuild the projector with the
frozen part frozen again; plain ``LlavaForConditionalGeneration.from_pretrained`` cannot
(its projector has other shapes). :func:`load_student` loads either kind from a local path.
"""
from __future__ import annotations

import copy
from pathlib import Path

import torch
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import (AutoConfig, AutoModelForImageTextToText, CLIPVisionConfig,
                          LlamaConfig, LlavaConfig, LlavaForConditionalGeneration,
                          PretrainedConfig, Qwen2Config, SiglipVisionConfig)
from transformers.activations import ACT2FN

__all__ = ["build_llava", "tiny_llava_pair", "apply_taf", "load_student", "TAFProjector",
           "TAFLlavaConfig", "TAFLlavaForConditionalGeneration", "PROJECTORS"]

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


# --------------------------------------------------------------------------- TAF

class TAFProjector(nn.Module):
    """Teacher connector (frozen) → trainable post-connector ``Linear(d_t, d_s)``.

    ``linear_1``/``act``/``linear_2`` mirror transformers' ``LlavaMultiModalProjector`` at
    the teacher's width, so the teacher's weights load into them unchanged.
    """

    def __init__(self, in_features: int, teacher_hidden: int, student_hidden: int,
                 act: str = "gelu", bias: bool = True):
        super().__init__()
        self.linear_1 = nn.Linear(in_features, teacher_hidden, bias=bias)
        self.act = ACT2FN[act]
        self.linear_2 = nn.Linear(teacher_hidden, teacher_hidden, bias=bias)
        self.post = nn.Linear(teacher_hidden, student_hidden)
        self.freeze_teacher_part()

    def freeze_teacher_part(self) -> None:
        """Only ``post`` trains (docs/taf.md)."""
        for p in (*self.linear_1.parameters(), *self.linear_2.parameters()):
            p.requires_grad_(False)

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        return self.post(self.linear_2(self.act(self.linear_1(image_features))))


@strict
class TAFLlavaConfig(LlavaConfig):
    """A :class:`LlavaConfig` whose connector is a :class:`TAFProjector` of width
    ``taf_hidden_size`` (the teacher's hidden size)."""

    model_type = "compodistill_taf_llava"
    taf_hidden_size: int | None = None


def _projector_in_features(config: LlavaConfig) -> int:
    layers = config.vision_feature_layer
    return config.vision_config.hidden_size * (1 if isinstance(layers, int) else len(layers))


class TAFLlavaForConditionalGeneration(LlavaForConditionalGeneration):
    """LLaVA with a TAF connector; loads with ``from_pretrained`` like any LLaVA model."""

    config_class = TAFLlavaConfig

    def __init__(self, config: TAFLlavaConfig):
        super().__init__(config)
        if config.taf_hidden_size is None:
            raise ValueError("TAFLlavaConfig.taf_hidden_size (teacher hidden size) is not set")
        self.model.multi_modal_projector = TAFProjector(
            _projector_in_features(config), config.taf_hidden_size,
            config.text_config.hidden_size, config.projector_hidden_act,
            config.multimodal_projector_bias)

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """``LlavaForConditionalGeneration.from_pretrained``, then re-freeze the teacher part
        of the connector (loading recreates parameters, dropping ``requires_grad=False``)."""
        model = super().from_pretrained(*args, **kwargs)
        model.model.multi_modal_projector.freeze_teacher_part()
        return model


AutoConfig.register(TAFLlavaConfig.model_type, TAFLlavaConfig, exist_ok=True)


def _register_checkpoint_layout() -> None:
    """Load TAF checkpoints with LLaVA's key renaming.

    transformers 5 saves LLaVA weights in the original checkpoint layout
    (``language_model.lm_head.weight``, ...) and renames them on load by ``model_type``;
    without this our model type would load with a missing ``lm_head``.
    """
    try:
        from transformers.conversion_mapping import (get_checkpoint_conversion_mapping,
                                                     register_checkpoint_conversion_mapping)
    except ImportError:  # older transformers: keys are saved as the modules name them
        return
    mapping = get_checkpoint_conversion_mapping("llava")
    if mapping:
        register_checkpoint_conversion_mapping(TAFLlavaConfig.model_type, mapping, overwrite=True)


_register_checkpoint_layout()
AutoModelForImageTextToText.register(TAFLlavaConfig, TAFLlavaForConditionalGeneration,
                                     exist_ok=True)


def apply_taf(student: LlavaForConditionalGeneration,
              teacher: LlavaForConditionalGeneration) -> TAFLlavaForConditionalGeneration:
    """Replace the student's connector by TAF (docs/taf.md), in place; returns the student.

    The new connector is a frozen copy of the teacher's (``linear_1``/``linear_2``, in the
    student's dtype and device) followed by a trainable ``Linear(d_t, d_s)``; every other
    parameter keeps its ``requires_grad``. The student object becomes a
    :class:`TAFLlavaForConditionalGeneration` (config: :class:`TAFLlavaConfig`) so that
    ``save_pretrained`` / :func:`load_student` restore it.

    Raises:
        ValueError: vision feature sizes (vision hidden size, feature layers, selection
            strategy) differ, so the teacher's connector cannot read the student's features.
    """
    for name, model in (("student", student), ("teacher", teacher)):
        if not isinstance(model, LlavaForConditionalGeneration):
            raise TypeError(f"{name} must be a LlavaForConditionalGeneration, "
                            f"got {type(model).__name__}")
    if isinstance(student, TAFLlavaForConditionalGeneration):
        raise ValueError("the student already has a TAF connector")
    s_cfg, t_cfg = student.config, teacher.config
    t_proj = teacher.model.multi_modal_projector
    if isinstance(t_proj, TAFProjector):
        raise ValueError("the teacher's connector is itself a TAF connector")
    s_in, t_in = _projector_in_features(s_cfg), _projector_in_features(t_cfg)
    same = (s_in == t_in == t_proj.linear_1.in_features
            and s_cfg.vision_feature_select_strategy == t_cfg.vision_feature_select_strategy
            and s_cfg.image_seq_length == t_cfg.image_seq_length)
    if not same:
        raise ValueError(
            f"TAF needs the same vision features in both models: student connector input "
            f"{s_in} (vision hidden {s_cfg.vision_config.hidden_size}, layers "
            f"{s_cfg.vision_feature_layer}, {s_cfg.image_seq_length} tokens, "
            f"{s_cfg.vision_feature_select_strategy!r}) vs teacher {t_in} (vision hidden "
            f"{t_cfg.vision_config.hidden_size}, layers {t_cfg.vision_feature_layer}, "
            f"{t_cfg.image_seq_length} tokens, {t_cfg.vision_feature_select_strategy!r})")
    d_t, d_s = t_proj.linear_2.out_features, s_cfg.text_config.hidden_size
    old = student.model.multi_modal_projector
    ref = old.linear_1.weight
    projector = TAFProjector(s_in, d_t, d_s, s_cfg.projector_hidden_act,
                             t_proj.linear_1.bias is not None)
    projector.linear_1.load_state_dict(t_proj.linear_1.state_dict())
    projector.linear_2.load_state_dict(t_proj.linear_2.state_dict())
    projector.act = copy.deepcopy(t_proj.act)
    projector.to(device=ref.device, dtype=ref.dtype)
    projector.freeze_teacher_part()
    student.model.multi_modal_projector = projector
    # Same instance layout, more specific class: save_pretrained writes the TAF config.
    student.config.__class__ = TAFLlavaConfig
    student.config.taf_hidden_size = d_t
    student.__class__ = TAFLlavaForConditionalGeneration
    return student


def load_student(path: str | Path, **kwargs) -> LlavaForConditionalGeneration:
    """Load a student saved with ``save_pretrained`` from a local directory.

    Picks :class:`TAFLlavaForConditionalGeneration` when the saved config is a TAF one
    (the teacher part of the connector comes back frozen), else
    ``LlavaForConditionalGeneration``. ``kwargs`` go to ``from_pretrained``.
    """
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    cls = (TAFLlavaForConditionalGeneration if isinstance(config, TAFLlavaConfig)
           else LlavaForConditionalGeneration)
    return cls.from_pretrained(path, local_files_only=True, **kwargs)
