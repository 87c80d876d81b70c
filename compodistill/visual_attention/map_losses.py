"""Distances between student and teacher visual maps (docs/visual_attention.md, docs/CONVENTIONS.md).

Every function here works on the small gathered maps (B, Qmax, Vmax), never on attention
itself, so one implementation serves all map backends: the loss's gradient
G = ∂L/∂A_s is what the map backends fold into their attention backward. Two
implementations of the loss itself: on CUDA (``backend="auto"``) the fused Triton passes of
compodistill/kernels/map_loss.py, which write G in the forward; elsewhere, and for float64
maps, the PyTorch ops below, where autograd builds G.
"""
from __future__ import annotations

import torch

from .._backend import kernels_module, resolve_backend
from .layout import VisualLayout

LOSSES = ("cosine", "kl", "reverse_kl", "jsd", "mse")
COSINE_MODES = ("flat", "row", "pooled")
DISTRIBUTIONS = ("renorm", "rest")
REDUCTIONS = ("mean", "sum", "none")

_COS_EPS = 1e-12
_LOG_EPS = 1e-30


def _cosine(a: torch.Tensor, b: torch.Tensor, dim) -> torch.Tensor:
    # max(|a||b|, eps) written on the squared norms so a zero vector gives 0, not NaN grads.
    dot = (a * b).sum(dim)
    denom = torch.sqrt(torch.clamp_min((a * a).sum(dim) * (b * b).sum(dim), _COS_EPS ** 2))
    return dot / denom


def _masked_row_mean(values: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Mean of (B, Q) values over the rows marked True, per sample (0 when none)."""
    total = torch.where(rows, values, 0.0).sum(-1)
    return total / rows.sum(-1).clamp_min(1)


def _pooled_cosine(a_s, a_t, real, allowed):
    n = real.sum((1, 2)).clamp_min(1).to(a_s.dtype)[:, None, None]

    def threshold(a):  # μ + σ of the real block (unbiased σ, 0 for a single entry)
        a = a.detach()
        mean = torch.where(real, a, 0.0).sum((1, 2), keepdim=True) / n
        var = torch.where(real, (a - mean) ** 2, 0.0).sum((1, 2), keepdim=True)
        var = var / (n - 1).clamp_min(1)
        return mean + torch.sqrt(var)

    keep = (a_s.detach() <= threshold(a_s)) & (a_t <= threshold(a_t))
    mask = (keep & (a_t != 0) & allowed).to(a_s.dtype)
    count = mask.sum(1).clamp_min(1)
    pooled_s = (mask * a_s).sum(1) / count
    pooled_t = (mask * a_t).sum(1) / count
    return 1.0 - _cosine(pooled_s, pooled_t, -1)


def _row_distribution(a, allowed, distribution, rest=None):
    # Subnormal probabilities count as 0: their reciprocals, which the KL gradient
    # −p_t/a carries, would overflow float32 (NaN gradients once |scores| reach ~1e2).
    # Written as "not below tiny" so that a NaN stays in (a finite loss must never hide it).
    a = torch.where(allowed & ~(a < torch.finfo(torch.float32).tiny), a, 0.0)
    total = a.sum(-1, keepdim=True)
    if distribution == "renorm":
        return a / torch.clamp_min(total, _LOG_EPS)
    if rest is None:  # maps without their rest mass: 1 − Σ, which cancels near 1
        rest = torch.clamp_min(1.0 - total, 0.0)
    else:
        rest = rest.to(a.dtype)[..., None]
        rest = torch.where(~(rest < torch.finfo(torch.float32).tiny), rest, 0.0)
    return torch.cat([a, rest], dim=-1)


def _kl_rows(p, q):
    """Σ p (log p − log q) per row; terms with p = 0 are 0."""
    log_ratio = torch.log(torch.clamp_min(p, _LOG_EPS)) - torch.log(torch.clamp_min(q, _LOG_EPS))
    return torch.where(p == 0, 0.0, p * log_ratio).sum(-1)  # NaN p stays NaN


def _divergence_rows(p_s, p_t, loss, beta):
    if loss == "kl":
        return _kl_rows(p_t, p_s)
    if loss == "reverse_kl":
        return _kl_rows(p_s, p_t)
    mix = beta * p_t + (1.0 - beta) * p_s
    return beta * _kl_rows(p_t, mix) + (1.0 - beta) * _kl_rows(p_s, mix)


def check_map_loss_options(loss: str, cosine: str, distribution: str, beta: float,
                           reduction: str) -> None:
    """Raise ValueError on an unknown option (shared by every public loss entry point)."""
    for name, value, allowed in (("loss", loss, LOSSES), ("cosine", cosine, COSINE_MODES),
                                 ("distribution", distribution, DISTRIBUTIONS),
                                 ("reduction", reduction, REDUCTIONS)):
        if value not in allowed:
            raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
    if not 0.0 <= float(beta) <= 1.0:
        raise ValueError(f"beta must lie in [0, 1], got {beta}")


def per_sample_map_loss(student: torch.Tensor, target: torch.Tensor, layout: VisualLayout, *,
                        loss: str = "cosine", cosine: str = "flat",
                        distribution: str = "renorm", beta: float = 0.5,
                        student_rest: torch.Tensor | None = None,
                        target_rest: torch.Tensor | None = None, backend: str = "auto"
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample loss (B,) and the mask (B,) of contributing samples (CONVENTIONS.md).

    A NaN or inf anywhere in a contributing sample's real block of either map (or rest)
    makes its loss NaN, whatever the loss (docs/visual_attention.md, "Non-finite input").
    ``backend``: ``"auto"`` (Triton for CUDA maps), ``"triton"`` or ``"torch"``; float64
    and empty maps always take the PyTorch path (the kernels compute in float32)."""
    if _use_triton(backend, student):
        return kernels_module("map_loss").per_sample_map_loss(
            student, target, layout.query_index, layout.query_count, layout.visual_index,
            layout.visual_count, layout.causal, layout.window, loss=loss, cosine=cosine,
            distribution=distribution, beta=beta, student_rest=student_rest,
            target_rest=target_rest)
    dtype = torch.promote_types(student.dtype, torch.float32)  # fp32 math, fp64 kept
    a_s, a_t = student.to(dtype), target.detach().to(dtype)
    allowed = layout.allowed()
    real = layout.query_valid[:, :, None] & layout.visual_valid[:, None, :]
    valid_rows = allowed.any(-1)
    contributing = valid_rows.any(-1)
    a_s = torch.where(real, a_s, 0.0)
    a_t = torch.where(real, a_t, 0.0)
    if loss == "cosine" and cosine == "flat":
        value = 1.0 - _cosine(a_s, a_t, (1, 2))
    elif loss == "cosine" and cosine == "row":
        value = _masked_row_mean(1.0 - _cosine(a_s, a_t, -1), valid_rows)
    elif loss == "cosine":
        value = _pooled_cosine(a_s, a_t, real, allowed)
    elif loss == "mse":
        count = real.sum((1, 2)).clamp_min(1)
        value = ((a_s - a_t) ** 2).sum((1, 2)) / count
    else:
        p_s = _row_distribution(a_s, allowed, distribution, student_rest)
        p_t = _row_distribution(a_t, allowed, distribution, _detached(target_rest))
        value = _masked_row_mean(_divergence_rows(p_s, p_t, loss, beta), valid_rows)
    # One reduction per map, no host sync: a corrupt map gives a NaN loss, never a finite
    # one (the pooled filter and the subnormal cut would otherwise drop NaN entries).
    bad = _nonfinite(a_s, (1, 2)) | _nonfinite(a_t, (1, 2))
    for rest in (student_rest, target_rest):
        if rest is not None and distribution == "rest" and loss not in ("cosine", "mse"):
            bad = bad | _nonfinite(torch.where(layout.query_valid, rest.detach(), 0.0), 1)
    value = torch.where(bad, float("nan"), value)
    return torch.where(contributing, value, 0.0), contributing


def _use_triton(backend: str, student: torch.Tensor) -> bool:
    triton = resolve_backend(backend, student.device, "map_loss") == "triton"
    return triton and student.dtype != torch.float64 and student.numel() > 0


def _detached(t):
    return None if t is None else t.detach()


def _nonfinite(t, dims):
    return ~torch.isfinite(t.detach()).all(dims) if t.numel() else \
        torch.zeros(t.shape[0], dtype=torch.bool, device=t.device)


def reduce_samples(values: torch.Tensor, contributing: torch.Tensor, reduction: str):
    """Mean/sum over contributing samples; 0 (still attached to the graph) when none."""
    if reduction == "none":
        return values
    total = values.sum()
    if reduction == "sum":
        return total
    return total / contributing.sum().clamp_min(1)


def visual_map_loss(student_maps: torch.Tensor, target_maps: torch.Tensor,
                    layout: VisualLayout, *, loss: str = "cosine", cosine: str = "flat",
                    distribution: str = "renorm", beta: float = 0.5,
                    reduction: str = "mean", student_rest: torch.Tensor | None = None,
                    target_rest: torch.Tensor | None = None,
                    backend: str = "auto") -> torch.Tensor:
    """Distance between a student's visual maps and a (teacher) target, docs/visual_attention.md.

    Args:
        student_maps: (B, Qmax, Vmax) maps from :func:`compodistill.visual_attention_maps`.
        target_maps: same shape; detached (no gradient flows to the teacher).
        layout: the :class:`~compodistill.visual_attention.layout.VisualLayout` both were computed with.
        loss: ``"cosine"`` (paper), ``"kl"``, ``"reverse_kl"``, ``"jsd"`` or ``"mse"``.
        cosine: ``"flat"`` (paper: whole |Q|×Nv block), ``"row"`` or ``"pooled"``
            (official code: μ+σ outlier filter, then column pooling).
        distribution: for the KL family, ``"renorm"`` (over visual keys) or ``"rest"``
            (visual keys plus a rest bucket).
        student_rest, target_rest: (B, Qmax) mass on the non-visual keys, as returned by
            ``visual_attention_maps(..., with_rest=True)``; used by ``distribution="rest"``.
            Without one, that side's rest bucket is ``max(0, 1 − Σ_v A)``, which cancels
            in float32 when a row looks almost only at the image.
        beta: JSD mixing weight (teacher share of the mixture).
        reduction: ``"mean"`` or ``"sum"`` over samples that have at least one query row
            seeing an image token, or ``"none"`` for a (B,) tensor.
        backend: ``"auto"`` (the fused Triton passes for CUDA maps, PyTorch otherwise),
            ``"triton"`` (CUDA, or CPU under ``TRITON_INTERPRET=1``) or ``"torch"``.
            Float64 maps always use PyTorch.
    """
    check_map_loss_options(loss, cosine, distribution, beta, reduction)
    for name, maps in (("student_maps", student_maps), ("target_maps", target_maps)):
        if not isinstance(maps, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(maps).__name__}")
        if tuple(maps.shape) != layout.map_shape:
            raise ValueError(
                f"{name} has shape {tuple(maps.shape)} but the layout expects (B, Qmax, Vmax) = "
                f"{layout.map_shape}; were student and teacher maps computed with the same "
                f"visual positions, query rows and attention mask?")
        if not maps.dtype.is_floating_point:
            raise TypeError(f"{name} must be a floating tensor, got {maps.dtype}")
    for name, rest in (("student_rest", student_rest), ("target_rest", target_rest)):
        if rest is None:
            continue
        if not isinstance(rest, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor or None, got {type(rest).__name__}")
        if tuple(rest.shape) != layout.map_shape[:2]:
            raise ValueError(f"{name} has shape {tuple(rest.shape)} but the layout expects "
                             f"(B, Qmax) = {layout.map_shape[:2]}")
    values, contributing = per_sample_map_loss(student_maps, target_maps, layout, loss=loss,
                                               cosine=cosine, distribution=distribution,
                                               beta=beta, student_rest=student_rest,
                                               target_rest=target_rest, backend=backend)
    return reduce_samples(values, contributing, reduction)
