"""compodistill: distil large vision-language models into small ones, with fused
visual-attention distillation losses that never materialise the attention maps.

Public API (everything else is private):

- :func:`visual_attention_maps`, :func:`visual_attention_loss`, :func:`visual_map_loss`
- :func:`visual_layout`, :func:`spans_to_mask`, :class:`VisualLayout`
- :func:`match_layers`, :func:`layer_preset`, :class:`LayerMatch`
- :func:`logit_distillation_loss`, :func:`shift_labels`, :func:`rdist_loss` (from logits)
- :func:`linear_distillation_loss`, :class:`LinearDistillationLoss` (fused with ``lm_head``:
  the tokens × vocab logits of neither model ever exist)
- :class:`FusedLinearKDLoss` (the same with Liger-Kernel's argument names and the trainers'
  label conventions) and :class:`VisualAttentionLoss`: loss modules (docs/integrations.md)
Feature packages: :mod:`compodistill.visual_attention`, :mod:`compodistill.logit_kd`,
:mod:`compodistill.matching`, :mod:`compodistill.kernels`, :mod:`compodistill.hf`,
:mod:`compodistill.train`, :mod:`compodistill.data`, :mod:`compodistill.eval`, and the fp32
references in :mod:`compodistill.testing`.

- :class:`AttentionDistiller` (Hugging Face models), :class:`CompoDistillTrainer`,
  :class:`DistillConfig`, :func:`load_config` (the DPT → DFT → SFT trainer; ``train`` extra)
"""
from .logit_kd import (FusedLinearKDLoss, LinearDistillationLoss, linear_distillation_loss,
                       logit_distillation_loss, rdist_loss, shift_labels)
from .matching import LayerMatch, layer_preset, match_layers
from .visual_attention import (VisualAttentionLoss, VisualLayout, spans_to_mask,
                               visual_attention_loss, visual_attention_maps, visual_layout,
                               visual_map_loss)

__version__ = "0.1.0"

# Training-side entry points need the `train` extra (transformers, accelerate, peft); they are
# imported on first use so `import compodistill` needs only torch.
_LAZY = {
    "AttentionDistiller": "compodistill.hf",
    "CompoDistillTrainer": "compodistill.train.trainer",
    "DistillConfig": "compodistill.train.config",
    "load_config": "compodistill.train.config",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'compodistill' has no attribute {name!r}")

__all__ = [
    "AttentionDistiller",
    "CompoDistillTrainer",
    "DistillConfig",
    "FusedLinearKDLoss",
    "LayerMatch",
    "LinearDistillationLoss",
    "VisualAttentionLoss",
    "VisualLayout",
    "layer_preset",
    "linear_distillation_loss",
    "load_config",
    "logit_distillation_loss",
    "match_layers",
    "rdist_loss",
    "shift_labels",
    "spans_to_mask",
    "visual_attention_loss",
    "visual_attention_maps",
    "visual_layout",
    "visual_map_loss",
]
