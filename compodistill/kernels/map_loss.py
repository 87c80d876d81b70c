"""Triton kernels: the visual-map loss and its gradient G = ∂D_b/∂A_s in the forward.

The map loss (docs/visual_attention.md, "Alignment loss") compares the student's gathered
maps ``A_s`` (B, Qmax, Vmax) with a target ``A_t``. Written as PyTorch ops it is ~59
kernels over the maps; here every variant is one to three passes, each a grid of
``(row blocks, B)`` programs (a row block is ``BLOCK_ROWS`` query rows of one sample, the
columns walked in ``BLOCK_COLS`` chunks), and G is written once, padding included (no
zero-fill). Sample-level sums leave each program as a partial (B, row blocks, ...) that
torch adds up: deterministic, no atomics.

- ``mse``: one pass (:func:`_map_sums_kernel`, SUM_MODE 1) writes G and the sums.
- ``cosine="flat"``: pass 1 (the forward) sums ``A_s·A_t``, ``|A_s|²``, ``|A_t|²``; pass 2
  (:func:`_map_grad_kernel`, in the backward) writes ``G = u_b (α_b A_t + β_b A_s)`` with
  the upstream gradient ``u_b`` folded into the coefficients, so G is neither held from
  the forward nor rescaled by a PyTorch op (12 bytes per element in all, bfloat16 maps).
- ``cosine="pooled"``: pass 1 the per-sample mean and M2 (Chan's merge of exact per-tile
  moments) of both maps, giving the μ+σ thresholds; pass 2 (:func:`_map_pool_kernel`) the
  column sums of the kept entries as per-block partials; pass 3 writes ``G = mask · w[c]``.
- ``cosine="row"`` and the KL family (:func:`_map_rows_kernel`): one launch; each program
  walks its rows twice (totals, then G) or, for ``distribution="renorm"``, three times
  (totals, Σ_c g_c p_c, then G); the re-reads are of the program's own row block.

The maps come in float32 or bfloat16 (the maps' dtype, :func:`kernels._common.map_dtype`)
and G is written in theirs; the arithmetic is float32. A NaN or inf in a sample's real
block (or rest) gives a NaN value; non-contributing samples give 0. Except for the flat
cosine, the backward only scales G by the upstream gradient times a per-sample factor
(1/valid rows for the row means). Imports only torch and triton; runs
on CUDA and under TRITON_INTERPRET=1. Takes index tensors, not a layout object.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

import triton
import triton.language as tl

from ._common import interpreting, launch, map_operand

# The variants, as the launcher's ``variant`` code.
VARIANTS = ("cosine_flat", "cosine_row", "cosine_pooled", "kl", "reverse_kl", "jsd", "mse")
ROW_LOSS = {"cosine_row": 0, "kl": 1, "reverse_kl": 2, "jsd": 3}
BLOCK_ROWS = 16
BLOCK_COLS = 64
WARPS = 4  # every kernel: a 16 x 64 tile is 8 entries a thread
# The row kernel under ptxas's default register target spills 4-16 B in 9 of its 96
# (specialisation, target) compiles (low register counts: an allocator choice, not pressure);
# a 128-register cap gives 0 in all (compodistill/kernels/report.py, Triton 3.8). The same
# cap on the G kernel: on bf16 maps its pooled mode spilled 4 B at 48 registers on sm_90.
ROWS_MAXNREG = 128
_TINY = 1.1754943508222875e-38  # float32's smallest normal number
_LOG_EPS = 1e-30
_COS_EPS2 = 1e-24  # (1e-12)², the cosine's clamp on the product of squared norms
_PARTS = 8  # slots per program in the sample partials: [valid rows, bad, x0..x5]


# --------------------------------------------------------------------------- helpers

@triton.jit
def _row_info(qi_ptr, qc_ptr, vc_ptr, b, Q, BLOCK_ROWS: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    qn = tl.load(qc_ptr + b).to(tl.int32)
    vn = tl.load(vc_ptr + b).to(tl.int32)
    real_row = rows < qn
    qrow = tl.load(qi_ptr + b * Q + rows, mask=real_row, other=0)
    return rows, qn, vn, real_row, qrow


@triton.jit
def _tile(as_ptr, at_ptr, vi_ptr, b, base, rows, real_row, qrow, start, vn, Q, V, window,
          CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, BLOCK_COLS: tl.constexpr):
    """One (rows, cols) tile: the maps (0 off the real block), its offsets, the real and
    allowed masks and ``inside`` (the tile's part of the (Qmax, Vmax) buffer)."""
    cols = start + tl.arange(0, BLOCK_COLS)
    vcol = tl.load(vi_ptr + b * V + cols, mask=cols < vn, other=0)
    real = real_row[:, None] & (cols < vn)[None, :]
    allowed = real
    if CAUSAL:
        allowed = allowed & (vcol[None, :] <= qrow[:, None])
    if HAS_WINDOW:
        allowed = allowed & (qrow[:, None] - vcol[None, :] < window)
    offs = base + rows.to(tl.int64)[:, None] * V + cols[None, :]
    # The maps may be bfloat16 (bfloat16 models): the arithmetic is float32 throughout.
    a_s = tl.load(as_ptr + offs, mask=real, other=0.0).to(tl.float32)
    a_t = tl.load(at_ptr + offs, mask=real, other=0.0).to(tl.float32)
    inside = (rows < Q)[:, None] & (cols < V)[None, :]
    return cols, offs, real, allowed, a_s, a_t, inside


@triton.jit
def _nonfinite(x, mask):
    """Per row, how many entries of x under mask are NaN or ±inf (row vectors accumulate
    inside the column loops; the one cross-warp sum comes after them)."""
    bad = mask & ~((x == x) & (tl.abs(x) < float("inf")))
    return tl.sum(bad.to(tl.float32), 1)


@triton.jit
def _cut(a, allowed):
    """The distribution's Ã: allowed and not below float32's smallest normal (NaN kept)."""
    keep = allowed & ~(a < 1.1754943508222875e-38)
    return tl.where(keep, a, 0.0), keep


@triton.jit
def _divergence(ps, pt, beta, omb, ROW_LOSS: tl.constexpr):
    """(per-entry loss term, its derivative with respect to p_s), as torch's autograd of
    Σ where(p = 0, 0, p (log max(p, ε) − log max(q, ε))) gives them (ε = 1e-30)."""
    eps = 1e-30
    ls = tl.log(tl.maximum(ps, eps))
    lt = tl.log(tl.maximum(pt, eps))
    if ROW_LOSS == 1:  # KL(p_t ‖ p_s)
        val = tl.where(pt == 0, 0.0, pt * (lt - ls))
        grad = tl.where((pt != 0) & (ps >= eps), -pt / tl.maximum(ps, eps), 0.0)
    elif ROW_LOSS == 2:  # KL(p_s ‖ p_t)
        val = tl.where(ps == 0, 0.0, ps * (ls - lt))
        grad = tl.where(ps != 0, ls - lt + tl.where(ps >= eps, 1.0, 0.0), 0.0)
    else:  # β KL(p_t ‖ m) + (1 − β) KL(p_s ‖ m), m = β p_t + (1 − β) p_s
        m = beta * pt + omb * ps
        lm = tl.log(tl.maximum(m, eps))
        inv_m = tl.where(m >= eps, 1.0 / tl.maximum(m, eps), 0.0)
        val = beta * tl.where(pt == 0, 0.0, pt * (lt - lm)) + \
            omb * tl.where(ps == 0, 0.0, ps * (ls - lm))
        grad = beta * omb * tl.where(pt != 0, -pt * inv_m, 0.0) + \
            omb * tl.where(ps != 0, ls - lm + tl.where(ps >= eps, 1.0, 0.0) - ps * omb * inv_m,
                           0.0)
    return val, grad


# --------------------------------------------------------------------------- kernels

@triton.jit
def _map_sums_kernel(as_ptr, at_ptr, g_ptr, part_ptr, qi_ptr, qc_ptr, vi_ptr, vc_ptr, Q, V,
                     window, SUM_MODE: tl.constexpr, CAUSAL: tl.constexpr,
                     HAS_WINDOW: tl.constexpr, BLOCK_ROWS: tl.constexpr,
                     BLOCK_COLS: tl.constexpr):
    """Sample sums of one row block, as a partial of 8 slots [valid rows, non-finite, x0..].

    SUM_MODE 0 (flat cosine): x = Σ A_s·A_t, Σ A_s², Σ A_t². 1 (mse): x0 = Σ (A_s − A_t)²,
    and G = 2 (A_s − A_t) / (|Q|·Nv) is written. 2 (pooled): x = n, mean_s, M2_s, mean_t,
    M2_t of the block, merged with Chan's formula from each row tile's exact moments."""
    b = tl.program_id(1)
    rows, qn, vn, real_row, qrow = _row_info(qi_ptr, qc_ptr, vc_ptr, b, Q, BLOCK_ROWS)
    base = b.to(tl.int64) * Q * V
    zero = tl.zeros([BLOCK_ROWS], tl.float32)
    n_ok = zero
    bad = zero
    # Per-row accumulators (no cross-warp reduction inside the loop); pooled: each row's
    # (n, mean, M2) of both maps, merged over tiles with Chan's formula.
    x0 = zero
    x1 = zero
    x2 = zero
    x3 = zero
    x4 = zero
    two_over_n = 2.0 / tl.maximum(qn * vn, 1).to(tl.float32)
    for start in range(0, V, BLOCK_COLS):
        cols, offs, real, allowed, a_s, a_t, inside = _tile(
            as_ptr, at_ptr, vi_ptr, b, base, rows, real_row, qrow, start, vn, Q, V, window,
            CAUSAL, HAS_WINDOW, BLOCK_COLS)
        bad += _nonfinite(a_s, real) + _nonfinite(a_t, real)
        n_ok += tl.sum(allowed.to(tl.float32), 1)
        if SUM_MODE == 0:
            x0 += tl.sum(a_s * a_t, 1)
            x1 += tl.sum(a_s * a_s, 1)
            x2 += tl.sum(a_t * a_t, 1)
        elif SUM_MODE == 1:
            d = a_s - a_t
            x0 += tl.sum(d * d, 1)
            tl.store(g_ptr + offs, tl.where(real, d * two_over_n, 0.0), mask=inside)
        else:
            nt = tl.sum(real.to(tl.float32), 1)
            total = x0 + nt
            w = nt / tl.maximum(total, 1.0)
            ms = tl.sum(a_s, 1) / tl.maximum(nt, 1.0)
            ds = tl.where(real, a_s - ms[:, None], 0.0)
            delta = ms - x1
            x1 += delta * w
            x2 += tl.sum(ds * ds, 1) + delta * delta * x0 * w
            mt = tl.sum(a_t, 1) / tl.maximum(nt, 1.0)
            dt = tl.where(real, a_t - mt[:, None], 0.0)
            delta = mt - x3
            x3 += delta * w
            x4 += tl.sum(dt * dt, 1) + delta * delta * x0 * w
            x0 = total
    out = part_ptr + (b * tl.num_programs(0) + tl.program_id(0)) * 8
    tl.store(out, tl.sum(tl.where(n_ok > 0, 1.0, 0.0), 0))
    tl.store(out + 1, tl.sum(bad, 0))
    if SUM_MODE == 2:  # merge the rows: n, mean, M2 of the block
        n = tl.sum(x0, 0)
        ms = tl.sum(x0 * x1, 0) / tl.maximum(n, 1.0)
        mt = tl.sum(x0 * x3, 0) / tl.maximum(n, 1.0)
        tl.store(out + 2, n)
        tl.store(out + 3, ms)
        tl.store(out + 4, tl.sum(x2 + x0 * (x1 - ms) * (x1 - ms), 0))
        tl.store(out + 5, mt)
        tl.store(out + 6, tl.sum(x4 + x0 * (x3 - mt) * (x3 - mt), 0))
    else:
        tl.store(out + 2, tl.sum(x0, 0))
        tl.store(out + 3, tl.sum(x1, 0))
        tl.store(out + 4, tl.sum(x2, 0))


@triton.jit
def _map_pool_kernel(as_ptr, at_ptr, thr_ptr, part_ptr, qi_ptr, qc_ptr, vi_ptr, vc_ptr, Q, V,
                     window, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
                     BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr):
    """Pooled cosine, pass 2: per column, the row block's count and sums of the kept
    entries (A_s <= thr_s, A_t <= thr_t, A_t != 0, allowed) into part (B, blocks, 3, V)."""
    b = tl.program_id(1)
    rows, qn, vn, real_row, qrow = _row_info(qi_ptr, qc_ptr, vc_ptr, b, Q, BLOCK_ROWS)
    base = b.to(tl.int64) * Q * V
    thr_s = tl.load(thr_ptr + 2 * b)
    thr_t = tl.load(thr_ptr + 2 * b + 1)
    out = part_ptr + (b * tl.num_programs(0) + tl.program_id(0)).to(tl.int64) * 3 * V
    for start in range(0, V, BLOCK_COLS):
        cols, offs, real, allowed, a_s, a_t, inside = _tile(
            as_ptr, at_ptr, vi_ptr, b, base, rows, real_row, qrow, start, vn, Q, V, window,
            CAUSAL, HAS_WINDOW, BLOCK_COLS)
        keep = (a_s <= thr_s) & (a_t <= thr_t) & (a_t != 0) & allowed
        m = keep.to(tl.float32)
        tl.store(out + cols, tl.sum(m, 0), mask=cols < V)
        tl.store(out + V + cols, tl.sum(m * a_s, 0), mask=cols < V)
        tl.store(out + 2 * V + cols, tl.sum(m * a_t, 0), mask=cols < V)


@triton.jit
def _map_grad_kernel(as_ptr, at_ptr, g_ptr, coef_ptr, w_ptr, qi_ptr, qc_ptr, vi_ptr, vc_ptr,
                     Q, V, window, GRAD_MODE: tl.constexpr, CAUSAL: tl.constexpr,
                     HAS_WINDOW: tl.constexpr, BLOCK_ROWS: tl.constexpr,
                     BLOCK_COLS: tl.constexpr):
    """G of the sample-level variants. GRAD_MODE 0 (flat cosine): α A_t + β A_s on the real
    block, (α, β) = coef[b]. 1 (pooled): w[b, c] on the kept entries, thresholds coef[b]."""
    b = tl.program_id(1)
    rows, qn, vn, real_row, qrow = _row_info(qi_ptr, qc_ptr, vc_ptr, b, Q, BLOCK_ROWS)
    base = b.to(tl.int64) * Q * V
    c0 = tl.load(coef_ptr + 2 * b)
    c1 = tl.load(coef_ptr + 2 * b + 1)
    for start in range(0, V, BLOCK_COLS):
        cols, offs, real, allowed, a_s, a_t, inside = _tile(
            as_ptr, at_ptr, vi_ptr, b, base, rows, real_row, qrow, start, vn, Q, V, window,
            CAUSAL, HAS_WINDOW, BLOCK_COLS)
        if GRAD_MODE == 0:
            g = tl.where(real, c0 * a_t + c1 * a_s, 0.0)
        else:
            w = tl.load(w_ptr + b * V + cols, mask=cols < V, other=0.0)
            keep = (a_s <= c0) & (a_t <= c1) & (a_t != 0) & allowed
            g = tl.where(keep, w[None, :], 0.0)
        tl.store(g_ptr + offs, g, mask=inside)


@triton.jit
def _map_rows_kernel(as_ptr, at_ptr, g_ptr, srest_ptr, trest_ptr, grest_ptr, part_ptr,
                     qi_ptr, qc_ptr, vi_ptr, vc_ptr, Q, V, window, beta, omb,
                     ROW_LOSS: tl.constexpr, RENORM: tl.constexpr, HAS_SREST: tl.constexpr,
                     HAS_TREST: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
                     BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr):
    """Row cosine (ROW_LOSS 0) or the KL family (1 kl, 2 reverse_kl, 3 jsd) with the renorm
    or rest distribution: G and the partial [valid rows, non-finite, Σ_valid d_r]; with a
    student rest also dD/d(rest) into grest (B, Qmax). The row mean's 1/|valid rows| is
    left to the backward's per-sample factor."""
    b = tl.program_id(1)
    beta = tl.cast(beta, tl.float32)
    omb = tl.cast(omb, tl.float32)
    rows, qn, vn, real_row, qrow = _row_info(qi_ptr, qc_ptr, vc_ptr, b, Q, BLOCK_ROWS)
    base = b.to(tl.int64) * Q * V
    n_ok = tl.zeros([BLOCK_ROWS], tl.float32)
    x0 = tl.zeros([BLOCK_ROWS], tl.float32)  # cosine: Σ a_s a_t; KL: Σ Ã_s
    x1 = tl.zeros([BLOCK_ROWS], tl.float32)  # cosine: Σ a_s²;    KL: Σ Ã_t
    x2 = tl.zeros([BLOCK_ROWS], tl.float32)  # cosine: Σ a_t²
    bad = tl.zeros([BLOCK_ROWS], tl.float32)
    # ---- walk 1: row sums
    for start in range(0, V, BLOCK_COLS):
        cols, offs, real, allowed, a_s, a_t, inside = _tile(
            as_ptr, at_ptr, vi_ptr, b, base, rows, real_row, qrow, start, vn, Q, V, window,
            CAUSAL, HAS_WINDOW, BLOCK_COLS)
        bad += _nonfinite(a_s, real) + _nonfinite(a_t, real)
        n_ok += tl.sum(allowed.to(tl.float32), 1)
        if ROW_LOSS == 0:
            x0 += tl.sum(a_s * a_t, 1)
            x1 += tl.sum(a_s * a_s, 1)
            x2 += tl.sum(a_t * a_t, 1)
        else:
            c_s, _ = _cut(a_s, allowed)
            c_t, _ = _cut(a_t, allowed)
            x0 += tl.sum(c_s, 1)
            x1 += tl.sum(c_t, 1)
    valid = n_ok > 0
    d_row = tl.zeros([BLOCK_ROWS], tl.float32)
    if ROW_LOSS == 0:
        prod = x1 * x2
        denom = tl.sqrt(tl.maximum(prod, 1e-24))
        cos = x0 / denom
        d_row = 1.0 - cos
        alpha = -1.0 / denom
        # dot·|t|²/denom³ = cos/|s|² unclamped; the cube would overflow float32 at |s|~1e13
        beta_c = tl.where(prod >= 1e-24, cos / x1, 0.0)
        for start in range(0, V, BLOCK_COLS):
            cols, offs, real, allowed, a_s, a_t, inside = _tile(
                as_ptr, at_ptr, vi_ptr, b, base, rows, real_row, qrow, start, vn, Q, V,
                window, CAUSAL, HAS_WINDOW, BLOCK_COLS)
            g = alpha[:, None] * a_t + beta_c[:, None] * a_s
            tl.store(g_ptr + offs, tl.where(real & valid[:, None], g, 0.0), mask=inside)
    else:
        t_s = tl.maximum(x0, 1e-30)
        t_t = tl.maximum(x1, 1e-30)
        dep = tl.zeros([BLOCK_ROWS], tl.float32)  # ∂rest_s/∂Ã = −dep (rest = 1 − Σ Ã)
        g_rest = tl.zeros([BLOCK_ROWS], tl.float32)
        if not RENORM:
            if HAS_SREST:
                r = tl.load(srest_ptr + b * Q + rows, mask=real_row, other=0.0)
                bad += tl.where(real_row & ~((r == r) & (tl.abs(r) < float("inf"))), 1.0, 0.0)
                keep_rs = ~(r < 1.1754943508222875e-38)
                rest_s = tl.where(keep_rs, r, 0.0)
            else:
                rest_s = tl.maximum(1.0 - x0, 0.0)
                dep = tl.where(1.0 - x0 >= 0.0, 1.0, 0.0)
            if HAS_TREST:
                r = tl.load(trest_ptr + b * Q + rows, mask=real_row, other=0.0)
                bad += tl.where(real_row & ~((r == r) & (tl.abs(r) < float("inf"))), 1.0, 0.0)
                rest_t = tl.where(~(r < 1.1754943508222875e-38), r, 0.0)
            else:
                rest_t = tl.maximum(1.0 - x1, 0.0)
            d_row, g_rest = _divergence(rest_s, rest_t, beta, omb, ROW_LOSS)
            if HAS_SREST:
                tl.store(grest_ptr + b * Q + rows,
                         tl.where(valid & keep_rs, g_rest, 0.0), mask=rows < Q)
        # ---- walk 2: the row loss; G (rest) or Σ_c g_c p_c (renorm)
        s_gp = tl.zeros([BLOCK_ROWS], tl.float32)
        for start in range(0, V, BLOCK_COLS):
            cols, offs, real, allowed, a_s, a_t, inside = _tile(
                as_ptr, at_ptr, vi_ptr, b, base, rows, real_row, qrow, start, vn, Q, V,
                window, CAUSAL, HAS_WINDOW, BLOCK_COLS)
            p_s, keep = _cut(a_s, allowed)
            p_t, _ = _cut(a_t, allowed)
            if RENORM:
                p_s = p_s / t_s[:, None]
                p_t = p_t / t_t[:, None]
            val, g = _divergence(p_s, p_t, beta, omb, ROW_LOSS)
            d_row += tl.sum(val, 1)
            if RENORM:
                s_gp += tl.sum(g * p_s, 1)
            else:
                g = g - (dep * g_rest)[:, None]
                tl.store(g_ptr + offs, tl.where(keep, g, 0.0), mask=inside)
        if RENORM:
            # ---- walk 3: G = (g − [Σ Ã >= ε] Σ_c g_c p_c) / max(Σ Ã, ε)
            s_gp = tl.where(x0 >= 1e-30, s_gp, 0.0)
            for start in range(0, V, BLOCK_COLS):
                cols, offs, real, allowed, a_s, a_t, inside = _tile(
                    as_ptr, at_ptr, vi_ptr, b, base, rows, real_row, qrow, start, vn, Q, V,
                    window, CAUSAL, HAS_WINDOW, BLOCK_COLS)
                p_s, keep = _cut(a_s, allowed)
                p_t, _ = _cut(a_t, allowed)
                p_s = p_s / t_s[:, None]
                p_t = p_t / t_t[:, None]
                _, g = _divergence(p_s, p_t, beta, omb, ROW_LOSS)
                g = (g - s_gp[:, None]) / t_s[:, None]
                tl.store(g_ptr + offs, tl.where(keep, g, 0.0), mask=inside)
    out = part_ptr + (b * tl.num_programs(0) + tl.program_id(0)) * 8
    tl.store(out, tl.sum(tl.where(valid, 1.0, 0.0), 0))
    tl.store(out + 1, tl.sum(bad, 0))
    tl.store(out + 2, tl.sum(tl.where(valid, d_row, 0.0), 0))


# --------------------------------------------------------------------------- launchers

def _grid(maps: Tensor) -> tuple[int, int]:
    return (triton.cdiv(maps.shape[1], BLOCK_ROWS), maps.shape[0])


def _geometry(maps: Tensor, causal: bool, window: int) -> dict:
    return dict(CAUSAL=bool(causal), HAS_WINDOW=window > 0, BLOCK_ROWS=BLOCK_ROWS,
                BLOCK_COLS=BLOCK_COLS)


def map_sums(a_s: Tensor, a_t: Tensor, index: tuple, causal: bool, window: int, mode: int,
             grad: Tensor | None = None) -> Tensor:
    """Pass 1 of the sample-level variants: partials (B, row blocks, 8), summed by torch."""
    grid = _grid(a_s)
    part = torch.empty((grid[1], grid[0], _PARTS), device=a_s.device, dtype=torch.float32)
    B, Q, V = a_s.shape
    launch(_map_sums_kernel, grid, a_s, a_t, a_s if grad is None else grad, part, *index,
           Q, V, window, SUM_MODE=mode, **_geometry(a_s, causal, window),
           num_warps=WARPS)
    return part


def map_pool(a_s: Tensor, a_t: Tensor, thresholds: Tensor, index: tuple, causal: bool,
             window: int) -> Tensor:
    """Pooled pass 2: column partials (B, row blocks, 3, Vmax) of count, Σ A_s, Σ A_t."""
    grid = _grid(a_s)
    B, Q, V = a_s.shape
    part = torch.empty((B, grid[0], 3, V), device=a_s.device, dtype=torch.float32)
    launch(_map_pool_kernel, grid, a_s, a_t, thresholds, part, *index, Q, V, window,
           **_geometry(a_s, causal, window), num_warps=WARPS)
    return part


def map_grad(a_s: Tensor, a_t: Tensor, coef: Tensor, weights: Tensor | None, index: tuple,
             causal: bool, window: int, mode: int) -> Tensor:
    """Last pass of the flat (mode 0) and pooled (mode 1) cosine: G (B, Qmax, Vmax)."""
    B, Q, V = a_s.shape
    grad = torch.empty_like(a_s)
    launch(_map_grad_kernel, _grid(a_s), a_s, a_t, grad, coef,
           coef if weights is None else weights, *index, Q, V, window, GRAD_MODE=mode,
           **_geometry(a_s, causal, window), num_warps=WARPS,
           **({} if interpreting() else {"maxnreg": ROWS_MAXNREG}))
    return grad


def map_rows(a_s: Tensor, a_t: Tensor, s_rest: Tensor | None, t_rest: Tensor | None,
             index: tuple, causal: bool, window: int, row_loss: int, renorm: bool,
             beta: float) -> tuple[Tensor, Tensor, Tensor | None]:
    """Row cosine / KL family: (G, partials (B, row blocks, 8), dD/d(student rest) or None)."""
    grid = _grid(a_s)
    B, Q, V = a_s.shape
    grad = torch.empty_like(a_s)
    part = torch.empty((grid[1], grid[0], _PARTS), device=a_s.device, dtype=torch.float32)
    grest = torch.empty((B, Q), device=a_s.device, dtype=torch.float32) \
        if s_rest is not None else None
    launch(_map_rows_kernel, grid, a_s, a_t, grad, a_s if s_rest is None else s_rest,
           a_s if t_rest is None else t_rest, grad if grest is None else grest, part, *index,
           Q, V, window, float(beta), 1.0 - float(beta), ROW_LOSS=row_loss,
           RENORM=bool(renorm), HAS_SREST=s_rest is not None, HAS_TREST=t_rest is not None,
           **_geometry(a_s, causal, window), num_warps=WARPS,
           **({} if interpreting() else {"maxnreg": ROWS_MAXNREG}))
    return grad, part, grest


def _cosine_coefficients(dot: Tensor, ss: Tensor, tt: Tensor):
    """1 − cos and its gradient ∂/∂a = α b + β a, as torch's autograd of
    dot / sqrt(max(|a|²|b|², ε²)) gives it."""
    prod = ss * tt
    denom = torch.sqrt(torch.clamp_min(prod, _COS_EPS2))
    cos = dot / denom
    # dot·|b|²/denom³ = cos/|a|² when unclamped (the cube overflows float32 much earlier)
    beta = torch.where(prod >= _COS_EPS2, cos / ss, 0.0)
    return 1.0 - cos, -1.0 / denom, beta


def _pooled_thresholds(part: Tensor) -> Tensor:
    """μ + σ per sample and map (B, 2) from the per-block (n, mean, M2) partials."""
    n_i = part[:, :, 2]
    n = n_i.sum(1).clamp_min(1)
    out = []
    for mean_i, m2_i in ((part[:, :, 3], part[:, :, 4]), (part[:, :, 5], part[:, :, 6])):
        mean = (n_i * mean_i).sum(1) / n
        m2 = m2_i.sum(1) + (n_i * (mean_i - mean[:, None]) ** 2).sum(1)
        out.append(mean + torch.sqrt(m2 / (n - 1).clamp_min(1)))
    return torch.stack(out, 1).contiguous()


def _forward(a_s, a_t, s_rest, t_rest, qi, qc, vi, vc, causal, window, variant, renorm, beta):
    index = (qi, qc, vi, vc)
    B, Q, V = a_s.shape
    grest = a_s.new_empty((0,))
    if variant == "mse":
        grad = torch.empty_like(a_s)
        part = map_sums(a_s, a_t, index, causal, window, 1, grad)
        count = (qc * vc).clamp_min(1).to(torch.float32)
        value, scale = part[:, :, 2].sum(1) / count, torch.ones(B, device=a_s.device)
    elif variant == "cosine_flat":
        part = map_sums(a_s, a_t, index, causal, window, 0)
        sums = part.sum(1)
        value, alpha, beta_c = _cosine_coefficients(sums[:, 2], sums[:, 3], sums[:, 4])
        # G waits for the backward (pass 2 there, with the upstream gradient folded in).
        coef = torch.stack([alpha, beta_c], 1).contiguous()
        grad = a_s.new_empty((0,))
        scale = torch.ones(B, device=a_s.device)
    elif variant == "cosine_pooled":
        part = map_sums(a_s, a_t, index, causal, window, 2)
        thresholds = _pooled_thresholds(part)
        cols = map_pool(a_s, a_t, thresholds, index, causal, window).sum(1)
        count = cols[:, 0].clamp_min(1)
        p_s, p_t = cols[:, 1] / count, cols[:, 2] / count
        value, alpha, beta_c = _cosine_coefficients((p_s * p_t).sum(1), (p_s * p_s).sum(1),
                                                    (p_t * p_t).sum(1))
        weights = ((alpha[:, None] * p_t + beta_c[:, None] * p_s) / count).contiguous()
        grad = map_grad(a_s, a_t, thresholds, weights, index, causal, window, 1)
        scale = torch.ones(B, device=a_s.device)
    else:
        grad, part, g_rest = map_rows(a_s, a_t, s_rest, t_rest, index, causal, window,
                                      ROW_LOSS[variant], renorm, beta)
        if g_rest is not None:
            grest = g_rest
        rows = part[:, :, 0].sum(1)
        value = part[:, :, 2].sum(1) / rows.clamp_min(1)
        scale = 1.0 / rows.clamp_min(1)
    rows = part[:, :, 0].sum(1)
    bad = part[:, :, 1].sum(1) > 0
    contributing = rows > 0
    value = torch.where(contributing, torch.where(bad, float("nan"), value), 0.0)
    # A NaN sample gets no gradient (as torch's where gives it); G may still hold its NaN.
    scale = torch.where(contributing & ~bad, scale, 0.0)
    if variant != "cosine_flat":
        coef = scale.new_empty((0,))
    return value, contributing, grad, grest, scale, coef


@torch.library.custom_op("compodistill::map_loss_fwd", mutates_args=())
def _map_loss_fwd(a_s: Tensor, a_t: Tensor, s_rest: Optional[Tensor], t_rest: Optional[Tensor],
                  query_index: Tensor, query_count: Tensor, visual_index: Tensor,
                  visual_count: Tensor, causal: bool, window: int, variant: str,
                  renorm: bool, beta: float
                  ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(D (B,), contributing (B,) bool, G (B, Qmax, Vmax) or empty (the flat cosine, whose
    backward writes it), dD/d(student rest) (B, Qmax) or empty, per-sample gradient factor
    (B,), the flat cosine's (α, β) (B, 2) or empty)."""
    return _forward(a_s, a_t, s_rest, t_rest, query_index, query_count, visual_index,
                    visual_count, causal, window, variant, renorm, beta)


@_map_loss_fwd.register_fake
def _map_loss_fwd_fake(a_s, a_t, s_rest, t_rest, query_index, query_count, visual_index,
                       visual_count, causal, window, variant, renorm, beta):
    B, Q, _ = a_s.shape
    rest = a_s.new_empty((B, Q) if s_rest is not None and variant in ROW_LOSS else (0,))
    flat = variant == "cosine_flat"
    f32 = dict(dtype=torch.float32)
    return (a_s.new_empty((B,), **f32), a_s.new_empty((B,), dtype=torch.bool),
            a_s.new_empty((0,)) if flat else torch.empty_like(a_s), rest,
            a_s.new_empty((B,), **f32), a_s.new_empty((B, 2) if flat else (0,), **f32))


def _setup_context(ctx, inputs, output):
    a_s, a_t = inputs[0], inputs[1]
    ctx.index, ctx.causal, ctx.window = inputs[4:8], inputs[8], inputs[9]
    deferred = output[5].numel() > 0  # the flat cosine: G is written in the backward
    ctx.save_for_backward(output[2], output[3], output[4], output[5],
                          a_s if deferred else None, a_t if deferred else None)
    ctx.mark_non_differentiable(*output[1:])


def _backward(ctx, d_value, _d_contributing, _dg, _dgrest, _dscale, _dcoef):
    grad, grest, scale, coef, a_s, a_t = ctx.saved_tensors
    if d_value is None:
        d_value = torch.zeros_like(scale)
    factor = d_value * scale
    d_rest = grest * factor[:, None] if grest.numel() else None
    if coef.numel():
        grad = map_grad(a_s, a_t, (coef * factor[:, None]).contiguous(), None, ctx.index,
                        ctx.causal, ctx.window, 0)
    else:
        # In G's own dtype: a float32 factor would promote a bfloat16 G (and the maps'
        # gradient must come back in the maps' dtype anyway).
        grad = grad * factor.to(grad.dtype)[:, None, None]
    return (grad, None, d_rest) + (None,) * 10


_map_loss_fwd.register_autograd(_backward, setup_context=_setup_context)


def per_sample_map_loss(student: Tensor, target: Tensor, query_index: Tensor,
                        query_count: Tensor, visual_index: Tensor, visual_count: Tensor,
                        causal: bool, window: int | None, *, loss: str, cosine: str,
                        distribution: str, beta: float, student_rest: Tensor | None = None,
                        target_rest: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Per-sample loss (B,) and contributing mask (B,) on float32 or bfloat16 maps;
    differentiable with respect to ``student`` and ``student_rest``. Options as
    ``compodistill.visual_attention.map_losses.per_sample_map_loss`` (checked there)."""
    variant = f"cosine_{cosine}" if loss == "cosine" else loss
    rest = distribution == "rest" and variant in ("kl", "reverse_kl", "jsd")
    as_f32 = lambda t: None if t is None else t.to(torch.float32).contiguous()  # noqa: E731
    values, contributing, _, _, _, _ = torch.ops.compodistill.map_loss_fwd(
        map_operand(student), map_operand(target.detach()),
        as_f32(student_rest) if rest else None,
        as_f32(target_rest.detach()) if rest and target_rest is not None else None,
        query_index.contiguous(), query_count.contiguous(), visual_index.contiguous(),
        visual_count.contiguous(), bool(causal), int(window or 0), variant, not rest,
        float(beta))
    return values, contributing
