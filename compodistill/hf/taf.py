"""TAF (docs/taf.md): the student's connector becomes a frozen copy of the teacher's followed
by a trainable ``Linear(d_t, d_s)`` post-connector.

How TAF survives ``save_pretrained``: :func:`apply_taf` returns a
:class:`TAFLlavaForConditionalGeneration` that adopts the student's parameters (no copy),
whose config class :class:`TAFLlavaConfig` (``model_type="compodistill_taf_llava"``) records
the teacher width ``taf_hidden_size``. Both are registered with transformers' Auto classes
when this module is imported, so ``AutoModelForImageTextToText.from_pretrained(path)`` and
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
from transformers import (AutoConfig, AutoModelForImageTextToText, LlavaConfig,
                          LlavaForConditionalGeneration)
from transformers.activations import ACT2FN

__all__ = ["TAFLlavaConfig", "TAFLlavaForConditionalGeneration", "TAFProjector", "apply_taf",
           "load_student", "taf_config"]


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




def taf_config(config: LlavaConfig, taf_hidden_size: int) -> TAFLlavaConfig:
    """A :class:`TAFLlavaConfig` copy of ``config`` with the teacher width ``taf_hidden_size``.

    Goes through ``to_dict`` as ``save_pretrained`` does; the attention (and experts)
    implementations are not serialised, so they are carried over separately.
    """
    impls = {}
    for name in ("attn_implementation", "experts_implementation"):
        if not hasattr(config, f"_{name}"):
            continue
        impl = {"": getattr(config, f"_{name}")}
        for key in config.sub_configs:
            sub = getattr(config, key, None)
            if sub is not None:
                impl[key] = getattr(sub, f"_{name}", None)
        impls[name] = impl
    fields = config.to_dict()
    fields.pop("model_type", None)
    fields["taf_hidden_size"] = int(taf_hidden_size)
    return TAFLlavaConfig.from_dict(fields, **impls)


def _adopt_tensors(target: nn.Module, source: nn.Module, skip: str) -> None:
    """Put ``source``'s parameter and buffer objects into ``target`` under the same names,
    except those under ``skip``: shared storage and ``requires_grad``, nothing copied."""
    for name, param in source.named_parameters(remove_duplicate=False):  # tied names too
        if not name.startswith(skip):
            owner, _, leaf = name.rpartition(".")
            target.get_submodule(owner).register_parameter(leaf, param)
    for name, buf in source.named_buffers(remove_duplicate=False):
        if not name.startswith(skip):
            owner, _, leaf = name.rpartition(".")
            module = target.get_submodule(owner)
            module.register_buffer(leaf, buf,
                                   persistent=leaf not in module._non_persistent_buffers_set)
    left = [n for n, t in (*target.named_parameters(), *target.named_buffers()) if t.is_meta]
    if left:
        raise RuntimeError(f"apply_taf: the student has no tensor for {left[:5]} "
                           f"({len(left)} in all); is it a plain LlavaForConditionalGeneration?")


def apply_taf(student: LlavaForConditionalGeneration,
              teacher: LlavaForConditionalGeneration) -> TAFLlavaForConditionalGeneration:
    """The student with its connector replaced by TAF (docs/taf.md), as a new model object.

    The new connector is a frozen copy of the teacher's (``linear_1``/``linear_2``, in the
    student's dtype and device) followed by a trainable ``Linear(d_t, d_s)``. The result is
    a :class:`TAFLlavaForConditionalGeneration` (config: :class:`TAFLlavaConfig`, attention
    implementations kept) so that ``save_pretrained`` / :func:`load_student` restore it. It
    holds the student's own parameter objects (no copy, ``requires_grad`` kept): use the
    returned model, ``student = apply_taf(student, teacher)``; the student object itself
    keeps its class, config and old connector.

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
    ref = student.model.multi_modal_projector.linear_1.weight
    projector = TAFProjector(s_in, d_t, d_s, s_cfg.projector_hidden_act,
                             t_proj.linear_1.bias is not None)
    projector.linear_1.load_state_dict(t_proj.linear_1.state_dict())
    projector.linear_2.load_state_dict(t_proj.linear_2.state_dict())
    projector.act = copy.deepcopy(t_proj.act)
    projector.to(device=ref.device, dtype=ref.dtype)
    projector.freeze_teacher_part()
    # Built on the meta device: no memory or init time for weights the student already has.
    with torch.device("meta"):
        model = TAFLlavaForConditionalGeneration(taf_config(s_cfg, d_t))
    model.model.multi_modal_projector = projector
    _adopt_tensors(model, student, skip="model.multi_modal_projector.")
    model.generation_config = copy.deepcopy(student.generation_config)
    model.train(student.training)
    return model


def load_student(path: str | Path, *, config=None, **kwargs) -> LlavaForConditionalGeneration:
    """Load a student saved with ``save_pretrained`` from a local directory.

    Picks :class:`TAFLlavaForConditionalGeneration` when the saved config is a TAF one
    (the teacher part of the connector comes back frozen), else
    ``LlavaForConditionalGeneration``. ``config``: the folder's config when already read
    (it is then not read again); ``kwargs`` go to ``from_pretrained``.
    """
    if config is None:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
    cls = (TAFLlavaForConditionalGeneration if isinstance(config, TAFLlavaConfig)
           else LlavaForConditionalGeneration)
    return cls.from_pretrained(path, config=config, local_files_only=True, **kwargs)
