"""Triton kernels of compodistill (installed as ``compodistill.kernels``).

Imports only torch and triton. Without triton the package still imports, ``HAS_TRITON`` is
False and calling a kernel raises a RuntimeError; callers pick the PyTorch path instead.
"""
from .attention import (attention_delta, flash_backward, flash_forward, interpreting,
                        lse_from_stats, stats_from_lse, triton)
from .autograd import (attention_with_visual_maps, flash_attention,
                       teacher_attention_with_visual_maps,
                       teacher_visual_maps, unsupported_reason, visual_maps,
                       visual_maps_with_rest)
from .visual_attention import inverse_index, visual_maps_from_lse, visual_row_terms

HAS_TRITON = triton is not None
del triton

__all__ = [
    "HAS_TRITON", "interpreting",
    # differentiable entry points (torch.library custom ops)
    "flash_attention", "attention_with_visual_maps", "visual_maps", "visual_maps_with_rest",
    "teacher_attention_with_visual_maps", "teacher_visual_maps",
    # whether the kernels serve a shape (the HF hook falls back when not)
    "unsupported_reason",
    # raw launchers (no autograd)
    "flash_forward", "flash_backward", "attention_delta", "lse_from_stats", "stats_from_lse",
    "visual_maps_from_lse", "visual_row_terms", "inverse_index",
]
