"""``VisualAttentionLoss``: the VAT loss of one layer as an ``nn.Module`` (options fixed at
construction), over :func:`~compodistill.visual_attention.api.visual_attention_loss`.

>>> vat = VisualAttentionLoss(query="visual", cosine="pooled")
>>> target = vat.target(q_t, k_t, image_mask)       # teacher map, no gradient
>>> loss = vat(q_s, k_s, target, image_mask)
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .api import visual_attention_loss, visual_attention_maps
from .layout import QUERY_MODES, QueryArg, VisualArg, VisualLayout
from .map_losses import check_map_loss_options

__all__ = ["VisualAttentionLoss"]

BACKENDS = ("auto", "triton", "torch")


class VisualAttentionLoss(nn.Module):
    """Visual-attention alignment loss of one student layer against a teacher map.

    Args:
        query: rows entering the loss: ``"all"`` (paper), ``"visual"`` (official code),
            ``"text"``; a per-batch (B, N) mask can be given to :meth:`forward` instead.
        causal: apply the causal mask. scale: score scale, default ``1/sqrt(d)``.
        loss, cosine, distribution, beta, reduction: as in
            :func:`~compodistill.visual_attention.map_losses.visual_map_loss`.
        window: sliding-window attention (Gemma 3's local layers).
        backend: ``"auto"`` (Triton on CUDA, chunked PyTorch on CPU), ``"triton"``, ``"torch"``.
    """

    def __init__(self, *, query: QueryArg = "all", causal: bool = True,
                 scale: float | None = None, loss: str = "cosine", cosine: str = "flat",
                 distribution: str = "renorm", beta: float = 0.5, reduction: str = "mean",
                 window: int | None = None, backend: str = "auto"):
        super().__init__()
        check_map_loss_options(loss, cosine, distribution, beta, reduction)
        if isinstance(query, str) and query not in QUERY_MODES:
            raise ValueError(f"query must be one of {QUERY_MODES} or a (B, N) mask, got {query!r}")
        if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))
                                  or not math.isfinite(scale) or scale <= 0):
            raise ValueError(f"scale must be a positive finite number or None, got {scale!r}")
        if window is not None and (isinstance(window, bool) or not isinstance(window, int)
                                   or window < 1):
            raise ValueError(f"window must be a positive int or None, got {window!r}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.query, self.causal, self.scale = query, bool(causal), scale
        self.window, self.backend = window, backend
        self.loss_options = dict(loss=loss, cosine=cosine, distribution=distribution,
                                 beta=float(beta), reduction=reduction)

    def _common(self, query, attention_mask) -> dict:
        return dict(query=self.query if query is None else query, attention_mask=attention_mask,
                    causal=self.causal, scale=self.scale, backend=self.backend,
                    window=self.window)

    @torch.no_grad()
    def target(self, q_t: torch.Tensor, k_t: torch.Tensor, visual: VisualArg | VisualLayout, *,
               attention_mask: torch.Tensor | None = None, query: QueryArg | None = None
               ) -> torch.Tensor:
        """The teacher's (B, Qmax, Vmax) map with this module's options, without gradient."""
        return visual_attention_maps(q_t, k_t, visual, **self._common(query, attention_mask))

    def forward(self, q: torch.Tensor, k: torch.Tensor, target: torch.Tensor,
                visual: VisualArg | VisualLayout, *, attention_mask: torch.Tensor | None = None,
                query: QueryArg | None = None) -> torch.Tensor:
        """The loss, a float32 scalar, differentiable w.r.t. ``q`` and ``k``.

        Args:
            q: (B, Hq, N, d) student queries of one layer; k: (B, Hkv, N, d) its keys.
            target: (B, Qmax, Vmax) teacher map (:meth:`target`, or a window mean of several).
            visual: image-token positions: a (B, N) bool mask, per-sample spans, or a
                :class:`~compodistill.visual_attention.layout.VisualLayout`.
            attention_mask: (B, N) 1 for real tokens. query: overrides the module's ``query``.
        """
        return visual_attention_loss(q, k, target, visual, **self._common(query, attention_mask),
                                     **self.loss_options)

    def extra_repr(self) -> str:
        q = self.query if isinstance(self.query, str) else "mask"
        opts = ", ".join(f"{k}={v!r}" for k, v in self.loss_options.items())
        return f"query={q!r}, causal={self.causal}, {opts}"
