"""Fused linear logit distillation: KD (and optional CE) from hidden states and lm_head weights.

The (tokens × vocab) logits never exist in full for either model. Only the selected tokens
are processed, in chunks sized from a memory budget; per chunk the forward pass computes both
models' logits, the loss and dL/dlogits_s (Triton on CUDA, float32 PyTorch on CPU, written over
the student logits), then folds that gradient into dL/dh_s (dlogits @ W_s) and dL/dW_s
(Σ dlogitsᵀ @ h_s) right away. Backward only scales the stored gradients by grad_output
(the Liger-Kernel scheme). The teacher never receives a gradient.
"""
from __future__ import annotations

import torch
from torch import nn

from .._backend import use_triton
from .from_logits import (IGNORE_INDEX, check_kd_options, chunk_rows, kd_chunk, selected_rows)

__all__ = ["linear_distillation_loss", "LinearDistillationLoss"]

WEIGHT_GRAD_BLOCK = 16384  # vocab rows per step when adding a half-precision product in fp32


def _accumulate_weight_grad(grad_w: torch.Tensor, dz: torch.Tensor, h: torch.Tensor) -> None:
    """grad_w += dzᵀ @ h. A float32 accumulator over half inputs is filled vocab block by
    vocab block so the half-precision temporary stays small."""
    if grad_w.dtype == dz.dtype:
        grad_w.addmm_(dz.T, h)
        return
    for v0 in range(0, grad_w.shape[0], WEIGHT_GRAD_BLOCK):
        grad_w[v0:v0 + WEIGHT_GRAD_BLOCK] += dz[:, v0:v0 + WEIGHT_GRAD_BLOCK].T @ h


class _FusedLinearKD(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h_s, w_s, b_s, h_t, w_t, b_t, rows, kd_scale, labels, ce_scale, opts):
        n, chunk = rows.numel(), opts["chunk"]
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        dev, dt = h_s.device, h_s.dtype
        grad_h = torch.empty(n, h_s.shape[-1], dtype=dt, device=dev) if need_h else None
        # One chunk: a single GEMM in the weight dtype, like plain PyTorch. Several: add the
        # per-chunk products in float32 so rounding does not pile up across chunks.
        acc_dtype = w_s.dtype if n <= chunk else torch.float32
        grad_w = torch.zeros(w_s.shape, dtype=acc_dtype, device=dev) if need_w else None
        grad_b = torch.zeros(w_s.shape[0], dtype=torch.float32, device=dev) if need_b else None
        total = torch.zeros((), dtype=torch.float32, device=dev)
        ce_total = torch.zeros((), dtype=torch.float32, device=dev)
        kd_on = opts["kd_on"]
        for s in range(0, n, chunk):
            idx = rows[s:s + chunk]
            hs_c = h_s[idx]
            zs = hs_c @ w_s.T if b_s is None else torch.addmm(b_s, hs_c, w_s.T)
            if kd_on:
                ht_c = h_t[idx]
                zt = ht_c @ w_t.T if b_t is None else torch.addmm(b_t, ht_c, w_t.T)
                del ht_c
            else:  # a KD weight of 0 costs no teacher lm_head: its rows are never read
                zt = zs
            part, dz, ce_part = kd_chunk(
                zs, zt, kd_scale[s:s + chunk], loss=opts["loss"], beta=opts["beta"],
                temperature=opts["temperature"], zscore=opts["zscore"],
                labels=None if labels is None else labels[s:s + chunk],
                ce_scale=None if ce_scale is None else ce_scale[s:s + chunk],
                triton=opts["triton"],
                grad_out=zs if kd_on else None)  # in place over zs, unless zt aliases it
            del zt
            total += part
            ce_total += ce_part
            if need_h:
                torch.mm(dz, w_s, out=grad_h[s:s + idx.numel()])
            if need_w:
                _accumulate_weight_grad(grad_w, dz, hs_c)
            if need_b:
                grad_b += dz.sum(0, dtype=torch.float32)
            del zs, dz, hs_c
        ctx.save_for_backward(
            rows, grad_h,
            None if grad_w is None else grad_w.to(w_s.dtype),
            None if grad_b is None else grad_b.to(b_s.dtype))
        ctx.h_shape = h_s.shape
        ctx.mark_non_differentiable(ce_total)
        return total, ce_total

    @staticmethod
    def backward(ctx, grad_output, _grad_ce_part):
        rows, grad_h_rows, grad_w, grad_b = ctx.saved_tensors
        grad_h = None
        if grad_h_rows is not None:
            grad_h = torch.zeros(ctx.h_shape, dtype=grad_h_rows.dtype, device=grad_h_rows.device)
            grad_h.index_copy_(0, rows, grad_h_rows * grad_output.to(grad_h_rows.dtype))
        if grad_w is not None:
            grad_w = grad_w * grad_output.to(grad_w.dtype)
        if grad_b is not None:
            grad_b = grad_b * grad_output.to(grad_b.dtype)
        return grad_h, grad_w, grad_b, None, None, None, None, None, None, None, None


def _check_linear(h_s, W_s, h_t, W_t, b_s, b_t) -> None:
    for name, t in (("h_s", h_s), ("W_s", W_s), ("h_t", h_t), ("W_t", W_t)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
        if not t.dtype.is_floating_point:
            raise TypeError(f"{name} must be floating point, got {t.dtype}")
    if h_s.dim() not in (2, 3) or W_s.dim() != 2 or W_t.dim() != 2:
        raise ValueError(f"expected h_s (B, N, d_s) or (T, d_s), W_s (Vs, d_s), W_t (Vt, d_t); "
                         f"got h_s {tuple(h_s.shape)}, W_s {tuple(W_s.shape)}, "
                         f"W_t {tuple(W_t.shape)}")
    if h_t.shape[:-1] != h_s.shape[:-1]:
        raise ValueError(f"h_s {tuple(h_s.shape)} and h_t {tuple(h_t.shape)} differ in the "
                         f"token dims")
    if W_s.shape[1] != h_s.shape[-1] or W_t.shape[1] != h_t.shape[-1]:
        raise ValueError(f"hidden sizes do not match: h_s {tuple(h_s.shape)} vs W_s "
                         f"{tuple(W_s.shape)}, h_t {tuple(h_t.shape)} vs W_t {tuple(W_t.shape)}")
    if W_t.shape[0] < W_s.shape[0]:
        raise ValueError(f"teacher vocab ({W_t.shape[0]}) is smaller than the student's "
                         f"({W_s.shape[0]}); it is truncated, never padded")
    if h_s.dtype != W_s.dtype or h_t.dtype != W_t.dtype:
        raise TypeError(f"dtype mismatch: h_s {h_s.dtype} / W_s {W_s.dtype}, "
                        f"h_t {h_t.dtype} / W_t {W_t.dtype}")
    for name, b, w in (("b_s", b_s, W_s), ("b_t", b_t, W_t)):
        if b is not None and tuple(b.shape) != (w.shape[0],):
            raise ValueError(f"{name} has shape {tuple(b.shape)}, expected ({w.shape[0]},)")
    devices = {t.device for t in (h_s, W_s, h_t, W_t, b_s, b_t) if t is not None}
    if len(devices) > 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}")


def linear_distillation_loss(h_s: torch.Tensor, W_s: torch.Tensor, h_t: torch.Tensor,
                             W_t: torch.Tensor, labels: torch.Tensor | None = None, *,
                             b_s: torch.Tensor | None = None, b_t: torch.Tensor | None = None,
                             loss: str = "kl", beta: float = 0.5, temperature: float = 1.0,
                             positions: str = "response",
                             attention_mask: torch.Tensor | None = None,
                             visual_mask: torch.Tensor | None = None, zscore: bool = False,
                             ce_weight: float = 0.0, kd_weight: float = 1.0,
                             chunk_size: int | None = None,
                             memory_budget_bytes: int | None = None,
                             backend: str = "auto", return_terms: bool = False):
    """``kd_weight · KD + ce_weight · CE`` from hidden states, without full logits (float32).

    Both terms come from one pass over each lm_head, so a trainer that needs the LM loss and
    KD calls this once with both weights; a weight of 0 costs nothing (``kd_weight=0``
    skips the teacher's lm_head entirely).

    KD is :func:`compodistill.logit_kd.from_logits.logit_distillation_loss` on
    ``logits_s = h_s @ W_sᵀ + b_s`` and ``logits_t = (h_t @ W_tᵀ + b_t)[..., :Vs]``; CE is the
    student's cross-entropy on the raw logits, mean over the response tokens (labels != -100).

    Args:
        h_s: (B, N, d_s) or (T, d_s) student hidden states before the lm_head.
        W_s: (Vs, d_s) student lm_head weight; b_s optional (Vs,) bias.
        h_t: (B, N, d_t) or (T, d_t) teacher hidden states; W_t (Vt >= Vs, d_t); b_t (Vt,).
            Only the first Vs teacher rows are used; the teacher gets no gradient.
        labels: aligned labels (B, N) / (T,), -100 ignored; needed for positions="response"
            and for ce_weight > 0.
        loss, beta, temperature, positions, attention_mask, visual_mask, zscore: as in
            :func:`~compodistill.logit_kd.from_logits.logit_distillation_loss`.
        ce_weight, kd_weight: weights of the two terms (each term is a mean; 0 when it has no
            token).
        chunk_size: tokens per chunk; default derived from ``memory_budget_bytes`` (default
            1 GiB on CUDA, 64 MiB on CPU) for the per-chunk logits and working copies.
        backend: ``"auto"`` (Triton on CUDA), ``"triton"`` or ``"torch"``.
        return_terms: also return the unweighted terms, detached, for logging.

    Returns:
        A float32 scalar, attached to the graph even when no token is selected; with
        ``return_terms``, ``(scalar, {"ce": CE, "kd": KD})`` (a term with weight 0 is 0).
    """
    _check_linear(h_s, W_s, h_t, W_t, b_s, b_t)
    check_kd_options(loss, beta, temperature, positions)
    if ce_weight < 0 or kd_weight < 0:
        raise ValueError(f"ce_weight and kd_weight must be >= 0, got {ce_weight}, {kd_weight}")
    if ce_weight > 0 and labels is None:
        raise ValueError("ce_weight > 0 needs labels")
    lead, device = tuple(h_s.shape[:-1]), h_s.device
    Vs, ds, dt = W_s.shape[0], W_s.shape[1], W_t.shape[1]
    kd_sel = selected_rows(lead, labels, positions, attention_mask, visual_mask, device)
    if kd_weight == 0:
        kd_sel = torch.zeros_like(kd_sel)
    ce_sel = (labels.reshape(-1).to(device) != IGNORE_INDEX) if ce_weight > 0 else None
    sel = kd_sel if ce_sel is None else kd_sel | ce_sel
    rows = sel.nonzero().squeeze(1)
    n_kd = int(kd_sel.sum())
    kd_scale = kd_sel[rows].float() * (kd_weight * float(temperature) ** 2 / max(n_kd, 1))
    flat_labels = ce_scale = None
    if ce_sel is not None:
        flat_labels = labels.reshape(-1).to(device)[rows]
        bad = ce_sel[rows] & ((flat_labels < 0) | (flat_labels >= Vs))
        if bool(bad.any()):
            raise ValueError(f"labels must be -100 or in [0, {Vs}) for the CE term")
        ce_scale = ce_sel[rows].float() * (float(ce_weight) / max(int(ce_sel.sum()), 1))

    triton = use_triton(backend, device, "logit_kd")
    if chunk_size is None:
        # per token: student logits/grad + teacher logits (+ float32 working copies off-Triton)
        work = Vs * (h_s.element_size() + W_t.element_size())
        work += Vs * 4 * (0 if triton and not zscore else 10) + 4 * (ds + dt)
        budget = memory_budget_bytes
        if budget is None and device.type == "cuda":
            budget = 2**30
        chunk_size = chunk_rows(work, budget, device)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    opts = dict(loss=loss, beta=float(beta), temperature=float(temperature), zscore=bool(zscore),
                triton=triton, chunk=int(chunk_size), kd_on=kd_weight > 0)
    total, ce_part = _FusedLinearKD.apply(
        h_s.reshape(-1, ds), W_s, b_s, h_t.detach().reshape(-1, dt), W_t.detach()[:Vs],
        None if b_t is None else b_t.detach()[:Vs], rows, kd_scale, flat_labels, ce_scale, opts)
    if not return_terms:
        return total
    kd_part = total.detach() - ce_part
    return total, {"ce": ce_part / ce_weight if ce_weight else ce_part * 0.0,
                   "kd": kd_part / kd_weight if kd_weight else kd_part * 0.0}


class LinearDistillationLoss(nn.Module):
    """Module form of :func:`linear_distillation_loss`; the options are fixed at construction.

    ``forward(h_s, W_s, h_t, W_t, labels=None, *, b_s=None, b_t=None, attention_mask=None,
    visual_mask=None)`` returns the float32 scalar loss.
    """

    def __init__(self, *, loss: str = "kl", beta: float = 0.5, temperature: float = 1.0,
                 positions: str = "response", zscore: bool = False, ce_weight: float = 0.0,
                 kd_weight: float = 1.0, chunk_size: int | None = None,
                 memory_budget_bytes: int | None = None, backend: str = "auto"):
        super().__init__()
        check_kd_options(loss, beta, temperature, positions)
        self.options = dict(loss=loss, beta=beta, temperature=temperature, positions=positions,
                            zscore=zscore, ce_weight=ce_weight, kd_weight=kd_weight,
                            chunk_size=chunk_size, memory_budget_bytes=memory_budget_bytes,
                            backend=backend)

    def forward(self, h_s, W_s, h_t, W_t, labels=None, *, b_s=None, b_t=None,
                attention_mask=None, visual_mask=None) -> torch.Tensor:
        return linear_distillation_loss(h_s, W_s, h_t, W_t, labels, b_s=b_s, b_t=b_t,
                                        attention_mask=attention_mask, visual_mask=visual_mask,
                                        **self.options)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items() if v is not None)
