"""compodistill: distil large vision-language models into small ones, with fused
visual-attention distillation losses that never materialise the attention maps.

Public API (everything else is private):

- :func:`visual_attention_maps`, :func:`visual_attention_loss`, :func:`visual_map_loss`
- :func:`visual_layout`, :func:`spans_to_mask`, :class:`VisualLayout`
- :func:`match_layers`, :func:`layer_preset`, :class:`LayerMatch`
- :func:`logit_distillation_loss`, :func:`shift_labels`, :func:`rdist_loss` (from logits)
- :func:`linear_distillation_loss`, :class:`LinearDistillationLoss` (fused with ``lm_head``:
  the tokens × vocab logits of neither model ever exist)
"""
from .layout import VisualLayout, spans_to_mask, visual_layout
from .linear_kd import LinearDistillationLoss, linear_distillation_loss
from .logit_losses import logit_distillation_loss, rdist_loss, shift_labels
from .losses import visual_attention_loss, visual_attention_maps
from .map_losses import visual_map_loss
from .matching import LayerMatch, layer_preset, match_layers

__version__ = "0.1.0"

__all__ = [
    "LayerMatch",
    "LinearDistillationLoss",
    "VisualLayout",
    "layer_preset",
    "linear_distillation_loss",
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
