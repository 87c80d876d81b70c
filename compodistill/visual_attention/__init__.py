"""Visual-attention distillation: the head-mean attention of query rows on image tokens and
the alignment losses on it, without an N×N matrix (definitions: docs/visual_attention.md).

- :mod:`.layout`: which keys are image tokens and which rows enter the loss (:func:`visual_layout`).
- :mod:`.api`: :func:`visual_attention_maps` and :func:`visual_attention_loss` from ``q, k``.
- :mod:`.map_losses`: :func:`visual_map_loss` on maps you already have.
- :mod:`.module`: :class:`VisualAttentionLoss`, the loss as an ``nn.Module``.
- :mod:`.chunked`: the PyTorch path for CPU tensors (the Triton kernels are in
  :mod:`compodistill.kernels`).
"""
from .api import visual_attention_loss, visual_attention_maps
from .layout import (QUERY_MODES, QueryArg, VisualArg, VisualLayout, response_rows, spans_to_mask,
                     visual_layout)
from .module import VisualAttentionLoss
from .map_losses import (COSINE_MODES, DISTRIBUTIONS, LOSSES, REDUCTIONS, check_map_loss_options,
                         visual_map_loss)

__all__ = ["VisualAttentionLoss", "visual_attention_maps", "visual_attention_loss",
           "visual_map_loss", "visual_layout", "spans_to_mask", "response_rows", "VisualLayout", "QueryArg", "VisualArg", "QUERY_MODES", "LOSSES",
           "COSINE_MODES", "DISTRIBUTIONS", "REDUCTIONS", "check_map_loss_options"]
