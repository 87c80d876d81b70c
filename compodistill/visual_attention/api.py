"""Public functional API for visual-attention distillation (docs/visual_attention.md).

>>> target = visual_attention_maps(q_t, k_t, visual=image_mask)          # teacher, no grad
>>> loss = visual_attention_loss(q_s, k_s, target, visual=image_mask)    # student

Both calls dispatch to the Triton kernels for CUDA tensors and to a chunked PyTorch path
on CPU; neither ever builds the N×N attention matrix.
"""
from __future__ import annotations

import math

import torch

from .._backend import kernels_module, resolve_backend
from .chunked import chunked_visual_maps, chunked_visual_maps_with_rest
from .layout import QueryArg, VisualArg, VisualLayout, visual_layout
from .map_losses import check_map_loss_options, visual_map_loss

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_qk(q: torch.Tensor, k: torch.Tensor, q_name: str = "q", k_name: str = "k") -> None:
    """Validate query/key tensors of one attention layer (shapes, GQA, dtype, device)."""
    for name, t in ((q_name, q), (k_name, k)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must have shape (B, H, N, d), got {tuple(t.shape)}")
        if t.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{name} must be float16/bfloat16/float32/float64, got {t.dtype}")
    (b, hq, n, d), (bk, hkv, nk, dk) = q.shape, k.shape
    if (b, n) != (bk, nk):
        raise ValueError(f"{q_name} {tuple(q.shape)} and {k_name} {tuple(k.shape)} must agree on "
                         f"batch size B and sequence length N")
    if d != dk:
        raise ValueError(f"{q_name} {tuple(q.shape)} and {k_name} {tuple(k.shape)} must have the "
                         f"same head dim d")
    if hkv == 0 or hq % hkv:
        raise ValueError(f"query heads ({hq}, {q_name} {tuple(q.shape)}) must be a multiple of "
                         f"key heads ({hkv}, {k_name} {tuple(k.shape)})")
    if q.dtype != k.dtype:
        raise TypeError(f"{q_name} ({q.dtype}) and {k_name} ({k.dtype}) must share a dtype")
    if q.device != k.device:
        raise ValueError(f"{q_name} ({q.device}) and {k_name} ({k.device}) are on different "
                         f"devices")
    if n == 0 or b == 0:
        raise ValueError(f"{q_name} {tuple(q.shape)} is empty")


def check_all_finite(**tensors: torch.Tensor | None) -> None:
    """ValueError naming the first tensor holding a NaN or inf (docs/visual_attention.md).

    One reduction per tensor and one host sync for all of them together."""
    named = [(name, t) for name, t in tensors.items() if t is not None]
    if not named:
        return
    ok = torch.stack([torch.isfinite(t.detach()).all() for _, t in named]).cpu()
    for (name, t), fine in zip(named, ok.tolist()):
        if not fine:
            raise ValueError(f"{name} {tuple(t.shape)} contains NaN or inf; pass "
                             f"check_finite=False to get NaN maps and losses instead")


def _scale(scale: float | None, head_dim: int) -> float:
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    if not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale must be a positive finite number, got {scale!r}")
    return float(scale)


def _layout_for(q: torch.Tensor, visual, query, attention_mask, causal,
                window=None) -> VisualLayout:
    b, _, n, _ = q.shape
    if isinstance(visual, VisualLayout):
        if (visual.batch_size, visual.seq_len) != (b, n):
            raise ValueError(f"visual layout is for (B, N) = ({visual.batch_size}, "
                             f"{visual.seq_len}) but q has shape {tuple(q.shape)}")
        return visual.to(q.device).with_window(window)
    return visual_layout(visual, b, n, query=query, attention_mask=attention_mask,
                         causal=causal, window=window, device=q.device)


def visual_attention_maps(q: torch.Tensor, k: torch.Tensor, visual: VisualArg | VisualLayout, *,
                          query: QueryArg = "all", attention_mask: torch.Tensor | None = None,
                          causal: bool = True, scale: float | None = None,
                          backend: str = "auto", lse: torch.Tensor | None = None,
                          window: int | None = None, with_rest: bool = False,
                          check_finite: bool = True
                          ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Head-mean attention of the query rows on the visual keys, without the attention matrix.

    ``A[b, r, c] = (1/Hq) Σ_h softmax_j(q_h·k_j·scale)[query_index[b, r], visual_index[b, c]]``
    with the causal and padding masks applied, a full-softmax probability restricted to
    visual columns (docs/visual_attention.md). Differentiable w.r.t. ``q`` and ``k``.

    Args:
        q: (B, Hq, N, d) queries of one layer. k: (B, Hkv, N, d) keys, ``Hq % Hkv == 0``.
        visual: image-token positions: a (B, N) bool mask, per-sample spans
            ``[[(start, end), ...], ...]`` (end exclusive; ``[]`` for a sample without
            images), or a prebuilt :class:`~compodistill.visual_attention.layout.VisualLayout` (which then
            also fixes the query rows, padding and causality: ``query``,
            ``attention_mask`` and ``causal`` are not used).
        query: rows entering the loss: ``"all"``, ``"visual"``, ``"text"`` or a (B, N) mask.
        attention_mask: (B, N) 1 for real tokens, 0 for padding.
        causal: apply the causal mask. scale: defaults to ``1/sqrt(d)``.
        window: sliding-window attention (query i sees keys j with ``i - j < window``), as
            in Gemma 3's local layers.
        backend: ``"auto"`` (Triton on CUDA, chunked PyTorch on CPU), ``"triton"``, ``"torch"``.
        lse: optional (B, Hq, N) natural-log log-sum-exp of these scores (same masks and
            scale), e.g. from the layer's attention kernel: the Triton path then skips its
            lse-only forward; the PyTorch path computes its own and ignores it. Not with
            ``with_rest`` (the rest mass needs the forward's non-visual log-sum).
        with_rest: also return ``rest`` (B, Qmax), the head-mean attention mass on the
            non-visual keys, ``(1/Hq) Σ_h exp(lse_text_h − lse_h)`` (0 on padding rows),
            differentiable: the rest bucket of ``distribution="rest"`` without the
            cancellation of ``1 − Σ_v A``. Pass ``(maps, rest)`` as a teacher target.
        check_finite: raise ValueError when q or k holds a NaN or inf (one reduction each
            and a host sync). With False a non-finite input gives non-finite maps on every
            row that attends to it (docs/visual_attention.md, "Non-finite input").

    Returns:
        float32 tensor (B, Qmax, Vmax); see :mod:`compodistill.visual_attention.layout` for its layout.
        Rows before the first image (causal) and samples without images hold zeros.
        With ``with_rest``: ``(maps, rest)``.
    """
    check_qk(q, k)
    layout = _layout_for(q, visual, query, attention_mask, causal, window)
    scale = _scale(scale, q.shape[-1])
    if with_rest and lse is not None:
        raise ValueError("lse cannot be combined with with_rest=True: the rest mass needs the "
                         "forward's log-sum over the non-visual keys")
    if check_finite:
        check_all_finite(q=q, k=k)
    triton = resolve_backend(backend, q.device, "autograd") == "triton"
    if with_rest:
        if triton:
            return kernels_module("autograd").visual_maps_with_rest(q, k, layout, scale=scale)
        return chunked_visual_maps_with_rest(q, k, layout, scale)
    if triton:
        return kernels_module("autograd").visual_maps(q, k, layout, scale, lse=lse)
    return chunked_visual_maps(q, k, layout, scale)


def visual_attention_loss(q: torch.Tensor, k: torch.Tensor, target: torch.Tensor,
                          visual: VisualArg | VisualLayout, *, query: QueryArg = "all",
                          attention_mask: torch.Tensor | None = None, causal: bool = True,
                          scale: float | None = None, loss: str = "cosine",
                          cosine: str = "flat", distribution: str = "renorm",
                          beta: float = 0.5, reduction: str = "mean",
                          backend: str = "auto", window: int | None = None,
                          check_finite: bool = True) -> torch.Tensor:
    """Visual-attention alignment loss (VAT) of one student layer against a target.

    Definitions: docs/visual_attention.md.

    ``target`` is a (B, Qmax, Vmax) teacher map from :func:`visual_attention_maps` computed
    with the same ``visual``, ``query`` and ``attention_mask`` (for group matching, the mean
    of a window of teacher layers; see :func:`compodistill.match_layers`), or the pair
    ``(maps, rest)`` from ``visual_attention_maps(..., with_rest=True)``, whose rest mass
    ``distribution="rest"`` then uses instead of ``1 − Σ_v target`` (the student's own rest
    always comes from its statistics). The teacher gets
    no gradient. Loss options are those of :func:`compodistill.visual_map_loss`; for the
    official code's numbers use ``query="visual", cosine="pooled"`` and sum the layers.

    Samples whose query rows see no image token (no image, or every query row before it)
    contribute nothing; with none in the batch the loss is 0 and gradients are zero.

    ``check_finite`` (default on): ValueError when q, k or the target holds a NaN or inf;
    with False such input gives a NaN loss (docs/visual_attention.md, "Non-finite input").
    """
    check_map_loss_options(loss, cosine, distribution, beta, reduction)
    check_qk(q, k)
    layout = _layout_for(q, visual, query, attention_mask, causal, window)
    target_rest = None
    if isinstance(target, (tuple, list)):
        if len(target) != 2:
            raise TypeError(f"target must be a tensor or a (maps, rest) pair, got a "
                             f"{type(target).__name__} of {len(target)}")
        target, target_rest = target
    for name, t in (("target", target), ("target rest", target_rest)):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}")
    if check_finite:
        check_all_finite(q=q, k=k, target=target, target_rest=target_rest)
    student_rest = None
    if distribution == "rest" and loss in ("kl", "reverse_kl", "jsd"):
        maps, student_rest = visual_attention_maps(q, k, layout, scale=scale, backend=backend,
                                                   with_rest=True, check_finite=False)
    else:
        maps = visual_attention_maps(q, k, layout, scale=scale, backend=backend,
                                     check_finite=False)
    return visual_map_loss(maps, target, layout, loss=loss, cosine=cosine,
                           distribution=distribution, beta=beta, reduction=reduction,
                           student_rest=student_rest, target_rest=target_rest,
                           backend=backend)
