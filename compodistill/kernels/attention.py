"""Flash attention forward and backward in Triton, with the visual-loss terms.

Layout: ``q`` (B, Hq, N, d), ``k``/``v`` (B, Hkv, N, d), any strides as long as the head dim
is dense; query head ``h`` reads kv head ``h // (Hq // Hkv)`` (no repeated k/v is built).
``key_mask`` (B, N) bool (True = real token) or None. A key j is allowed for query i iff
``key_mask[b, j]`` and (not causal or ``j <= i``); a row with no allowed key gets output 0
and ``lse = -inf`` (docs/CONVENTIONS.md; the row max is ``-inf`` there).

Forward (``flash_forward``): the usual online softmax, one program per (block of query rows,
batch·head). Scores live in log2 units (``exp2``); the saved row statistics are the row max
``m`` and ``log2 l`` kept apart, (2, B, Hq, N) float32 (one fp32 ``lse = m + log2 l`` loses
~3e-4 relative accuracy in P at |s| ~ 1e4). With ``v=None`` only the statistics are computed
(what the visual-map pass needs when the attention output itself is not wanted).

Backward (``flash_backward``), per docs/visual_attention.md, "Gradient of the fused backward"::

    dS_h[i, j] = P_h[i, j] * (dP_h[i, j] + [j in V] * G[i, j] / Hq - D_i - c_h[i])

with ``dP = dO Vᵀ`` and ``D_i = rowsum(dO ∘ O)`` (both absent when there is no ``dO``),
``G = dL/dA`` in the gathered map layout (B, Qmax, Vmax) and ``c`` (B, Hq, N) the row terms
written by :func:`kernels.visual_attention.visual_row_terms`. ``G`` is read through two inverse
index maps, ``query_row`` (B, N) (gathered row of a position, -1 if not a query row) and
``visual_col`` (B, N) (gathered column of a position, -1 if not an image token), so no
(N × N) or (N × Nv) buffer exists. Two kernels: one program per (key block, batch·kv head)
accumulates dk/dv over every query head of its GQA group (no atomics: each dk/dv row is
written by one program). dq, by default, is accumulated in the same pass (the 5-matmul,
FlashAttention-2 style backward, ``_bwd_dkdvdq_kernel``): each program adds its ``dS K`` to a
float32 (B, Hq, N, d) buffer with ``tl.atomic_add``, cast to q's dtype at the end; the
order of those float additions varies from run to run. The deterministic mode
(:func:`deterministic`) runs instead one program per (query block, batch·head) that
accumulates dq in registers (``_bwd_dq_kernel``, recomputing QKᵀ and dP: 7 matmuls).
"""
from __future__ import annotations

import math

import torch

from ._common import (LOG2E, all_configs, autotune_configs, block_d, check_window,  # noqa: F401
                      config_key, fits_class, fits_target, launch_table, window_arg,
                      configs_for, default_scale, deterministic, device_capability,
                      dot_precision, fit_table, fitted_configs, interpreting, kernel_input,
                      launch, map_operand, prune_class, prune_configs, prune_hook,
                      recording_launches, require_triton, table_variant,
                      target_class, tl, triton)

if triton is not None:
    from ._common import load_row_stats, log2_scale, window_key_start, window_query_end


# --------------------------------------------------------------------------- helpers

def _key_mask_arg(key_mask: torch.Tensor | None, ref: torch.Tensor) -> torch.Tensor:
    """(B, N) int8 for the kernels, or a dummy pointer (``HAS_MASK=False``)."""
    return ref if key_mask is None else key_mask.to(torch.int8).contiguous()


if triton is not None:

    # ----------------------------------------------------------------------- forward

    @triton.jit
    def _fwd_inner(acc, l_i, lt_i, m_i, q, K_base, V_base, KeyMask_row, VisualCol_row,
                   vis_lo, vis_hi, stride_kn, stride_vn, offs_m, lo, hi, N, qk_scale,
                   HAS_V: tl.constexpr, HAS_MASK: tl.constexpr, HAS_VIS: tl.constexpr,
                   DIAG: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                   BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr, WINDOW,
                   HAS_WINDOW: tl.constexpr):
        """Online softmax over the key blocks [lo, hi); ``DIAG`` applies the causal mask,
        ``HAS_WINDOW`` the sliding window (query i sees keys j with i - j < WINDOW).

        With ``HAS_VIS`` also ``lt_i``, the row sum over the non-visual keys only (same
        running max): the visual-map pass adds the visual keys scored by its own tiles, so
        each key enters the statistics through exactly one rounding of its score. Only the
        key blocks meeting the sample's image span [vis_lo, vis_hi) load the column index
        and select; on the others every key is non-visual and ``lt_i`` takes the whole sum.
        """
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < HEAD_DIM
        for start_n in range(lo, hi, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            n_ok = offs_n < N
            kT = tl.load(K_base + offs_n[None, :] * stride_kn + offs_d[:, None],
                         mask=n_ok[None, :] & d_ok[:, None], other=0.0)
            s = tl.dot(q, kT, input_precision=DOT_PREC) * qk_scale
            key_ok = n_ok
            if HAS_MASK:
                km = tl.load(KeyMask_row + offs_n, mask=n_ok, other=0)
                key_ok = key_ok & (km != 0)
            s = tl.where(key_ok[None, :], s, float("-inf"))
            if DIAG:
                s = tl.where(offs_m[:, None] >= offs_n[None, :], s, float("-inf"))
            if HAS_WINDOW:
                s = tl.where(offs_m[:, None] - offs_n[None, :] < WINDOW, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            # A row that has seen no allowed key keeps m = -inf: shift by 0 instead of -inf.
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.math.exp2(s - m_safe[:, None])
            alpha = tl.math.exp2(m_i - m_safe)
            p_sum = tl.sum(p, 1)
            l_i = l_i * alpha + p_sum
            if HAS_VIS:
                if (start_n < vis_hi) & (start_n + BLOCK_N > vis_lo):
                    vcol = tl.load(VisualCol_row + offs_n, mask=n_ok, other=-1)
                    p_text = tl.sum(tl.where(vcol[None, :] >= 0, 0.0, p), 1)
                else:
                    p_text = p_sum
                lt_i = lt_i * alpha + p_text
            if HAS_V:
                v = tl.load(V_base + offs_n[:, None] * stride_vn + offs_d[None, :],
                            mask=n_ok[:, None] & d_ok[None, :], other=0.0)
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
            m_i = m_new
        return acc, l_i, lt_i, m_i

    # (BLOCK_M, BLOCK_N, warps, stages, head-dim classes fitting sm_80, sm_90 with Triton
    # 3.8[, {other version: (sm_80, sm_90)}]).
    # ALL: both of the smaller classes; d = 256 (Gemma 3) has rows of its own (D256), since
    # at that head dim only 8-warp programs with small tiles hold their accumulators.
    ALL, D64, D128, D256, NONE = (64, 128), (64,), (128,), (256,), ()
    _FWD_CONFIGS = fitted_configs("_fwd_kernel", [
        # Full sweep: d = 80/96 (head-dim mask, padded to 128) spill 8 B on sm_80; 3.6 with a
        # window at d = 64 on sm_80.
        (64, 64, 4, 2, ALL, ALL, {"padded": (D64, ALL), "3.6 padded": (ALL, ALL),
                                  "3.6 window": (D128, ALL)}),
        # With the maps phase and a window it spills 4 B at d = 64 on sm_80 (full sweep).
        (128, 64, 8, 3, D64, ALL, {"3.6 window": (NONE, ALL), "fwdmaps": (NONE, ALL)}),
        # d = 80/96 bf16 spill 4 B on sm_90.
        # With the maps phase (HAS_MAPS) it spills 276-316 B on sm_90.
        (128, 128, 8, 2, NONE, ALL, {"3.6": (NONE, D64), "padded": (NONE, D64),
                                     "fwdmaps": (NONE, NONE), "3.6 fwdmaps": (NONE, NONE)}),
        # d = 64 without a key mask spills 4 B on sm_80 (128 regs; 171 with the mask).
        (128, 32, 8, 3, D128, ALL, {"3.6 window": (NONE, ALL)}),  # 3.6: d = 128 window, sm_80
        (64, 32, 4, 4, ALL, ALL),
        (64, 64, 4, 3, D64, ALL),
        # d = 256: 4 warps spill 8-380 B (64x64 w4, 64x32 w4 on sm_80), 128-row blocks more.
        (64, 64, 8, 2, D256, D256),
        (64, 32, 8, 2, D256, D256),
    ])

    @triton.jit
    def _fwd_maps(q, m_i, l_i, K_base, KeyMask_row, VisualCol_row, QueryRow_row, VisSpan_b,
                  Maps_b, stride_kn, offs_m, m_ok, lo, hi, N, VMAX, qk_scale, map_weight,
                  HAS_MASK: tl.constexpr, CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr,
                  BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr,
                  WINDOW, HAS_WINDOW: tl.constexpr):
        """Second phase: ``Maps[qrow, vcol] += map_weight · P`` on the key blocks that hold
        image tokens, with the row statistics just finished. The scores are recomputed by
        the same tile product as the first phase (same q tile, same key blocks), so each
        visual key enters the statistics and the map through one rounding of its score, at
        any magnitude: no refine pass. Heads (and a teacher's window of layers) meet in
        the map through float32 atomic adds."""
        qrow = tl.load(QueryRow_row + offs_m, mask=m_ok, other=-1)
        if tl.max(qrow) >= 0:
            offs_d = tl.arange(0, BLOCK_D)
            d_ok = offs_d < HEAD_DIM
            empty = l_i == 0.0
            m_use = tl.where(empty, float("inf"), m_i)  # no key: P = 0, never NaN
            l2 = tl.math.log2(tl.where(empty, 1.0, l_i))
            # Only the key blocks of this sample's image span (aligned to BLOCK_N, the
            # first phase's blocks) inside the blocks the first phase visited.
            span_lo = tl.load(VisSpan_b)
            span_hi = tl.load(VisSpan_b + 1)
            k_lo = tl.maximum(lo, span_lo // BLOCK_N * BLOCK_N)
            k_hi = tl.minimum(hi, span_hi)
            for start_n in range(k_lo, k_hi, BLOCK_N):
                offs_n = start_n + tl.arange(0, BLOCK_N)
                n_ok = offs_n < N
                kT = tl.load(K_base + offs_n[None, :] * stride_kn + offs_d[:, None],
                             mask=n_ok[None, :] & d_ok[:, None], other=0.0)
                s = tl.dot(q, kT, input_precision=DOT_PREC) * qk_scale
                vcol = tl.load(VisualCol_row + offs_n, mask=n_ok, other=-1)
                ok = (qrow[:, None] >= 0) & (vcol[None, :] >= 0)
                if HAS_MASK:
                    km = tl.load(KeyMask_row + offs_n, mask=n_ok, other=0)
                    ok = ok & (km[None, :] != 0)
                if CAUSAL:
                    ok = ok & (offs_m[:, None] >= offs_n[None, :])
                if HAS_WINDOW:
                    ok = ok & (offs_m[:, None] - offs_n[None, :] < WINDOW)
                p = tl.math.exp2((s - m_use[:, None]) - l2[:, None])
                ptrs = Maps_b + qrow[:, None].to(tl.int64) * VMAX + vcol[None, :]
                tl.atomic_add(ptrs, p * map_weight, mask=ok)

    @triton.autotune(configs=autotune_configs(_FWD_CONFIGS),
                     prune_configs_by=prune_hook("_fwd_kernel"),
                     key=["HEAD_DIM", "CAUSAL", "HAS_V", "HAS_MASK", "HAS_VIS", "HAS_WINDOW",
                          "HAS_MAPS", "N_BUCKET"])
    @triton.jit
    def _fwd_kernel(Q, K, V, Out, RowMax, RowLog2Sum, RowLog2Text, KeyMask, VisualCol,
                    Maps, QueryRow, VisSpan,
                    stride_qb, stride_qh, stride_qn,
                    stride_kb, stride_kh, stride_kn,
                    stride_vb, stride_vh, stride_vn,
                    stride_ob, stride_oh, stride_on,
                    N, Hq, GROUP, scale, N_BUCKET, WINDOW, QMAX, VMAX, map_weight,
                    HAS_V: tl.constexpr, HAS_MASK: tl.constexpr, HAS_VIS: tl.constexpr,
                    CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                    DOT_PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    HAS_WINDOW: tl.constexpr = False, HAS_MAPS: tl.constexpr = False):
        pid_m = tl.program_id(0)
        if CAUSAL:
            # Longest rows (most key blocks) first, so the short ones fill the tail.
            pid_m = tl.num_programs(0) - 1 - pid_m
        pid_bh = tl.program_id(1)
        b = (pid_bh // Hq).to(tl.int64)
        h = (pid_bh % Hq).to(tl.int64)
        hk = h // GROUP
        qk_scale = log2_scale(scale)

        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        m_ok = offs_m < N
        d_ok = offs_d < HEAD_DIM
        q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qn
                    + offs_d[None, :], mask=m_ok[:, None] & d_ok[None, :], other=0.0)
        K_base = K + b * stride_kb + hk * stride_kh
        V_base = V + b * stride_vb + hk * stride_vh
        KeyMask_row = KeyMask + b * N
        VisualCol_row = VisualCol + b * N
        vis_lo = 0
        vis_hi = 0
        if HAS_VIS:
            vis_lo = tl.load(VisSpan + 2 * b)
            vis_hi = tl.load(VisSpan + 2 * b + 1)

        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        lt_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        hi = N
        lo = 0
        if CAUSAL:
            # Blocks strictly below the diagonal need no causal mask (BLOCK_M % BLOCK_N == 0);
            # the diagonal blocks do; blocks above it are skipped.
            hi = pid_m * BLOCK_M
            if HAS_WINDOW:
                # Key blocks wholly before every row's window are skipped too.
                lo = tl.minimum(window_key_start(pid_m * BLOCK_M, WINDOW, BLOCK_N), hi)
        acc, l_i, lt_i, m_i = _fwd_inner(acc, l_i, lt_i, m_i, q, K_base, V_base, KeyMask_row,
                                         VisualCol_row, vis_lo, vis_hi, stride_kn, stride_vn,
                                         offs_m, lo, hi, N,
                                         qk_scale, HAS_V, HAS_MASK, HAS_VIS, False, HEAD_DIM,
                                         BLOCK_D, BLOCK_N, DOT_PREC, WINDOW, HAS_WINDOW)
        if CAUSAL:
            acc, l_i, lt_i, m_i = _fwd_inner(acc, l_i, lt_i, m_i, q, K_base, V_base,
                                             KeyMask_row, VisualCol_row, vis_lo, vis_hi,
                                             stride_kn, stride_vn,
                                             offs_m, hi, tl.minimum(hi + BLOCK_M, N), N,
                                             qk_scale, HAS_V, HAS_MASK, HAS_VIS, True,
                                             HEAD_DIM, BLOCK_D, BLOCK_N, DOT_PREC, WINDOW,
                                             HAS_WINDOW)
        empty = l_i == 0.0
        l_safe = tl.where(empty, 1.0, l_i)
        # The row max and log2(l) are stored apart, not as one lse = m + log2(l): at
        # |s| ~ 1e4 a half-ulp of that sum is ~5e-4, a 3e-4 relative error in every P that
        # a later pass rebuilds as exp2((s - m) - log2 l). m is -inf on rows with no key.
        rows = (b * Hq + h) * N + offs_m
        tl.store(RowMax + rows, tl.where(empty, float("-inf"), m_i), mask=m_ok)
        tl.store(RowLog2Sum + rows, tl.math.log2(l_safe), mask=m_ok)
        if HAS_VIS:
            tl.store(RowLog2Text + rows, tl.math.log2(lt_i), mask=m_ok)  # -inf: no text key
        if HAS_V:
            out = acc / l_safe[:, None]
            tl.store(Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_on
                     + offs_d[None, :], out.to(Out.dtype.element_ty),
                     mask=m_ok[:, None] & d_ok[None, :])
        if HAS_MAPS:
            end = N
            if CAUSAL:
                end = tl.minimum(hi + BLOCK_M, N)
            _fwd_maps(q, m_i, l_i, K_base, KeyMask_row, VisualCol_row, QueryRow + b * N,
                      VisSpan + b * 2, Maps + b * QMAX * VMAX, stride_kn, offs_m, m_ok, lo,
                      end, N, VMAX, qk_scale, tl.cast(map_weight, tl.float32), HAS_MASK,
                      CAUSAL, HEAD_DIM, BLOCK_D, BLOCK_N, DOT_PREC, WINDOW, HAS_WINDOW)

    # ----------------------------------------------------------------------- backward

    @triton.jit
    def _bwd_delta_kernel(Out, DO, Delta,
                          stride_ob, stride_oh, stride_on,
                          stride_db, stride_dh, stride_dn,
                          N, Hq,
                          HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
        """D_i = rowsum(dO ∘ O) in float32, (B, Hq, N)."""
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = (pid_bh // Hq).to(tl.int64)
        h = (pid_bh % Hq).to(tl.int64)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        mask = (offs_m[:, None] < N) & (offs_d[None, :] < HEAD_DIM)
        o = tl.load(Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_on
                    + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
        do = tl.load(DO + b * stride_db + h * stride_dh + offs_m[:, None] * stride_dn
                     + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
        tl.store(Delta + (b * Hq + h) * N + offs_m, tl.sum(o * do, 1), mask=offs_m < N)

    @triton.jit
    def _g_tile(G_b, qrow, vcol, VMAX, inv_h, G_INT64: tl.constexpr):
        """G / Hq on (query rows × key columns), 0 where a row or column is not gathered.

        Indexed [row, column] so that lanes run along the contiguous visual column of G;
        offsets are int32 unless Qmax·Vmax needs 64 bits (``G_INT64``, set by the launcher).
        """
        g_ok = (qrow[:, None] >= 0) & (vcol[None, :] >= 0)
        row = qrow.to(tl.int64) if G_INT64 else qrow
        g = tl.load(G_b + row[:, None] * VMAX + vcol[None, :], mask=g_ok,
                    other=0.0).to(tl.float32)  # G comes in the maps' dtype
        return g * inv_h

    @triton.jit
    def _dkdv_heads(dk, dv, k, v, key_ok, vcol, offs_n, Q_b, DO_b, RowMax, RowLog2Sum, Delta,
                    G_b, QueryRow_b, DQ_b, b, hk, lo, N, Hq, GROUP, VMAX,
                    stride_qh, stride_qn, stride_dh, stride_dn, stride_dqh, stride_dqn,
                    scale, qk_scale, inv_h,
                    HAS_DO: tl.constexpr, WITH_G: tl.constexpr, G_INT64: tl.constexpr,
                    CAUSAL: tl.constexpr, ATOMIC_DQ: tl.constexpr, HEAD_DIM: tl.constexpr,
                    BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr, WINDOW, HAS_WINDOW: tl.constexpr):
        """dk, dv of one key block summed over the query heads of its kv head and the query
        blocks [lo, hi). ``WITH_G`` (a key block holding image tokens) adds G / Hq to dP.

        ``ATOMIC_DQ`` (the 5-matmul backward): also ``dS K`` of this key block is added to
        the float32 dq buffer ``DQ_b`` with ``tl.atomic_add``, from the same dS as dk (so
        the visual correction in dS reaches dq exactly as in the split dq kernel)."""
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < HEAD_DIM
        for g in range(GROUP):
            h = hk * GROUP + g
            bh = b * Hq + h
            hi = N
            if HAS_WINDOW:
                # Recomputed here from the program id rather than carried from the caller:
                # one long-lived register less (the windowed kernels sit at 255).
                hi = window_query_end(tl.program_id(0) * BLOCK_N, N, WINDOW, BLOCK_N, BLOCK_M)
            for start_m in range(lo, hi, BLOCK_M):
                offs_m = start_m + tl.arange(0, BLOCK_M)
                m_ok = offs_m < N
                tile = offs_m[:, None] * stride_qn + offs_d[None, :]
                q = tl.load(Q_b + h * stride_qh + tile, mask=m_ok[:, None] & d_ok[None, :],
                            other=0.0)
                m_row, l2_row = load_row_stats(RowMax + bh * N, RowLog2Sum + bh * N, offs_m,
                                                m_ok)
                sT = tl.dot(k, tl.trans(q), input_precision=DOT_PREC)  # (BLOCK_N, BLOCK_M)
                pT = tl.math.exp2((sT * qk_scale - m_row[None, :]) - l2_row[None, :])
                allowed = key_ok[:, None] & m_ok[None, :]
                if HAS_WINDOW:
                    # Causal and in the window, 0 <= i - j < WINDOW, in one unsigned compare
                    # (a window is always causal): fewer live mask registers.
                    diff = (offs_m[None, :] - offs_n[:, None]).to(tl.uint32)
                    allowed = allowed & (diff < tl.cast(WINDOW, tl.uint32))
                elif CAUSAL:
                    allowed = allowed & (offs_m[None, :] >= offs_n[:, None])
                pT = tl.where(allowed, pT, 0.0)
                delta = tl.load(Delta + bh * N + offs_m, mask=m_ok, other=0.0)
                if WITH_G:
                    qrow = tl.load(QueryRow_b + offs_m, mask=m_ok, other=-1)
                    dpT = tl.trans(_g_tile(G_b, qrow, vcol, VMAX, inv_h, G_INT64))
                else:
                    dpT = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
                if HAS_DO:
                    do = tl.load(DO_b + h * stride_dh + offs_m[:, None] * stride_dn
                                 + offs_d[None, :], mask=m_ok[:, None] & d_ok[None, :],
                                 other=0.0)
                    dv += tl.dot(pT.to(do.dtype), do, input_precision=DOT_PREC)
                    dpT = tl.dot(v, tl.trans(do), dpT, input_precision=DOT_PREC)
                dsT = pT * (dpT - delta[None, :])
                dk += tl.dot(dsT.to(q.dtype), q, input_precision=DOT_PREC)
                if ATOMIC_DQ:
                    dq = tl.dot(tl.trans(dsT.to(k.dtype)), k, input_precision=DOT_PREC)
                    tl.atomic_add(DQ_b + h * stride_dqh + offs_m[:, None] * stride_dqn
                                  + offs_d[None, :], dq * scale,
                                  mask=m_ok[:, None] & d_ok[None, :], sem="relaxed")
        return dk, dv

    @triton.jit
    def _dq_span(dq, q, do, m_row, l2_row, delta, qrow, offs_m, m_ok, K_base, V_base,
                 KeyMask_b, VisualCol_b, G_b, lo, hi, N, VMAX, stride_kn, stride_vn,
                 qk_scale, inv_h,
                 HAS_DO: tl.constexpr, HAS_MASK: tl.constexpr, WITH_G: tl.constexpr,
                 G_INT64: tl.constexpr, CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr,
                 BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr, WINDOW, HAS_WINDOW: tl.constexpr):
        """dq over the key blocks [lo, hi); ``WITH_G`` for the span holding image tokens."""
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < HEAD_DIM
        for start_n in range(lo, hi, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            n_ok = offs_n < N
            kv_mask = n_ok[:, None] & d_ok[None, :]
            k = tl.load(K_base + offs_n[:, None] * stride_kn + offs_d[None, :], mask=kv_mask,
                        other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)
            p = tl.math.exp2((s * qk_scale - m_row[:, None]) - l2_row[:, None])
            key_ok = n_ok
            if HAS_MASK:
                km = tl.load(KeyMask_b + offs_n, mask=n_ok, other=0)
                key_ok = key_ok & (km != 0)
            allowed = m_ok[:, None] & key_ok[None, :]
            if CAUSAL:
                allowed = allowed & (offs_m[:, None] >= offs_n[None, :])
            if HAS_WINDOW:
                allowed = allowed & (offs_m[:, None] - offs_n[None, :] < WINDOW)
            p = tl.where(allowed, p, 0.0)
            if WITH_G:
                vcol = tl.load(VisualCol_b + offs_n, mask=n_ok, other=-1)
                dp = _g_tile(G_b, qrow, vcol, VMAX, inv_h, G_INT64)
            else:
                dp = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            if HAS_DO:
                v = tl.load(V_base + offs_n[:, None] * stride_vn + offs_d[None, :],
                            mask=kv_mask, other=0.0)
                dp = tl.dot(do, tl.trans(v), dp, input_precision=DOT_PREC)
            ds = p * (dp - delta[:, None])
            dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PREC)
        return dq

    # dk/dv (BLOCK_M query rows streamed, BLOCK_N keys held): 8 warps at d = 128, where
    # k, v, dk and dv alone hold 4·BLOCK_N·128 values per program. "window": the fits with
    # HAS_WINDOW (the window's query-block bound costs registers; measured with 3.8).
    _BWD_CONFIGS = fitted_configs("_bwd_dkdv_kernel", [
        # Maps-only at d = 128 on sm_90 and d = 256 on both targets: clean in every flag state
        # (3.8; 3.6 spills at 128 on sm_80).
        (32, 64, 8, 2, D128, ALL, {"window": (D128, D64), "maps": (D128 + D256, ALL + D256),
                                   "3.6 maps": (D256, ALL + D256)}),
        # Non-causal, d = 128 spills 8 B on sm_80 (plain fp16, mask-free): off that class.
        # Maps-only d = 128 spills 8 B on sm_90 (both versions; clean on sm_80 under 3.6);
        # 3.6: d = 64 spills on sm_80.
        (32, 32, 4, 2, D64, D128, {"3.6": (NONE, D128), "maps": (D64, NONE),
                                   "3.6 maps": (ALL, NONE)}),
        # Non-causal, d = 128 spills 8 B on sm_80 (plain fp16, 255 regs).
        (64, 64, 8, 2, NONE, NONE, {"3.6": (NONE, NONE), "window": (NONE, NONE)}),
        # Maps-only, GQA group 1, d = 64 spills 16 B on sm_80 (bf16, 3.8).
        (16, 128, 8, 2, D64, ALL, {"3.6": (D64, D64), "window": (D64, D64),
                                   "maps": (NONE, D64), "3.6 maps": (D64, D64)}),
        (32, 128, 8, 2, NONE, D64),
        # d = 256: k, v, dk, dv are 4·BLOCK_N·256 values; BLOCK_N = 64 spills (48 B and up).
        # Without dO (maps-only) ptxas caps these 8-warp programs at 128 registers and they
        # spill 8-20 B; 4 warps fit there (and spill with dO).
        (32, 32, 8, 2, D256, D256, {"maps": (NONE, NONE)}),
        (16, 32, 8, 2, D256, D256, {"maps": (NONE, NONE)}),
        # Maps-only at d = 256 (the full sweeps): 16x32 w4 spills 4-8 B in some flag states;
        # one stage is clean on both targets with 3.8 and on sm_80 with 3.6 (16 B on sm_90),
        # and the 32x64 w8 row above is clean on both with either version.
        (16, 32, 4, 2, NONE, NONE, {"maps": (NONE, NONE)}),
        (16, 32, 4, 1, NONE, NONE, {"maps": (D256, D256), "3.6 maps": (D256, NONE)}),
    ])
    # dk/dv/dq with dq by atomics: dk, dv held, a (BLOCK_M, d) dq tile per step on top.
    # The first row is the split dk/dv kernel's first (the interpreter runs it: dk/dv agree
    # bitwise between the two backwards there).
    # With a window nothing fits d = 128 on sm_80 (32x64 w8 spills 4 B, the others more):
    # there the launcher runs the split backward instead (atomic_backward_fits).
    _BWD_ATOMIC_CONFIGS = fitted_configs("_bwd_dkdvdq_kernel", [
        # d = 80/96 spill 12 B on both targets (mask-free student): 32x32 w8 serves them.
        (32, 64, 8, 2, D128, ALL, {"3.6": (D128, D64), "window": (NONE, D64),
                                   "padded": (NONE, D64), "3.6 padded": (D128, D64)}),
        # d = 64 without a key mask spills 16 B on sm_90 (128 regs); windowed, maps-only, 4 B.
        # 3.6: d = 64 spills on both targets.
        # 3.6: maps-only d = 128 spills 12 B on sm_90 (16x64 w4 serves it there).
        (32, 32, 4, 2, NONE, D128, {"3.6": (D128, D128), "window": (NONE, D128),
                                    "3.6 maps": (NONE, NONE)}),
        # Maps-only, GQA group 1, d = 64 spills 12 B on sm_80 (bf16, 3.8); 16x64 w4 is clean
        # in every maps-only state there, with and without a window.
        (16, 128, 8, 2, D64, D64, {"3.6": (NONE, D64), "maps": (NONE, D64)}),
        (16, 64, 4, 2, D64, D64, {"window": (NONE, D64), "maps": (D64, D64),
                                  "3.6 maps": (NONE, ALL)}),
        # Non-causal, d = 64 spills 4 B on sm_90 (student bf16, 255 regs).
        (64, 64, 8, 2, NONE, NONE, {"3.6": (NONE, NONE), "window": (NONE, NONE)}),
        (32, 128, 8, 2, NONE, D64),
        (32, 64, 4, 2, NONE, D64, {"window": (NONE, NONE)}),
        # d = 256: only BLOCK_N = 32 on 8 warps (32x32 spills 32 B on sm_80). Maps-only
        # (no dO): the 8-warp rows spill 4-32 B (capped at 128 registers); one stage fits.
        (16, 32, 8, 2, D256, D256, {"maps": (NONE, NONE)}),
        # 3.6: spills 4 B on sm_90 (student fp16).
        # d = 80/96 on sm_80 (the 32x64 above spills there): clean in every state (3.8).
        (32, 32, 8, 2, NONE, D256, {"3.6": (NONE, NONE), "maps": (NONE, NONE),
                                    "padded": (D128, D256), "3.6 padded": (NONE, NONE)}),
        # Maps-only at d = 256 (kernel_resources_d256*.csv): 16x32 w8 s1 spills 4-12 B on
        # sm_90 with a window, 16x32 w4 4-20 B on sm_80; each is kept where it does not.
        (16, 32, 8, 1, NONE, NONE, {"maps": (D256, NONE)}),
        (16, 32, 4, 2, NONE, NONE, {"maps": (NONE, D256)}),
    ])
    _BWD_DQ_CONFIGS = fitted_configs("_bwd_dq_kernel", [
        (64, 32, 8, 2, ALL, ALL, {"3.6": (D128, ALL)}),  # 3.6: d = 64 spills on sm_80
        # The window mask spills at 128; so does the mask-free student at 128 on sm_90 (8 B),
        # and with GQA group 1 at 64 on sm_80 (4 B, 3.8).
        (128, 32, 8, 2, NONE, D64, {"3.6": (D64, D64), "window": (D64, D64)}),
        (64, 64, 8, 2, D128, D64),
        # d = 80/96 spill 28 B on sm_90 (3.8); 3.6: maps-only d = 64 on sm_80.
        (64, 32, 4, 2, D64, ALL, {"padded": (D64, D64), "3.6 padded": (D64, ALL),
                                  "3.6 maps": (NONE, ALL)}),
        (128, 64, 8, 2, NONE, D64),
        (64, 64, 4, 2, NONE, D64),
        # d = 256 (64x32 w8 spills 104 B on sm_90 there); maps-only, 3.6 spills 4-12 B with
        # these 8-warp rows: 4 warps there.
        (32, 32, 8, 2, D256, D256, {"3.6": (D256, D256), "maps": (NONE, NONE)}),
        (32, 64, 8, 2, D256, D256, {"3.6": (D256, D256), "maps": (NONE, NONE)}),
        (32, 32, 4, 2, NONE, NONE, {"maps": (D256, D256)}),
        (32, 16, 4, 2, NONE, NONE, {"maps": (D256, D256)}),
    ])
    # GROUP: the GQA ratio changes the dk/dv work per program (and GROUP = 1 specialises).
    _BWD_KEY = ["HEAD_DIM", "CAUSAL", "HAS_DO", "HAS_G", "HAS_MASK", "HAS_WINDOW", "GROUP",
                "N_BUCKET"]

    @triton.jit
    def _dkdv_program(Q, K, V, DO, RowMax, RowLog2Sum, Delta, KeyMask, G, QueryRow,
                      VisualCol, DK, DV, DQ,
                      stride_qb, stride_qh, stride_qn,
                      stride_kb, stride_kh, stride_kn,
                      stride_vb, stride_vh, stride_vn,
                      stride_db, stride_dh, stride_dn,
                      stride_dkb, stride_dkh, stride_dkn,
                      stride_dvb, stride_dvh, stride_dvn,
                      stride_dqb, stride_dqh, stride_dqn,
                      N, Hq, Hkv, GROUP, QMAX, VMAX, scale,
                      HAS_DO: tl.constexpr, HAS_G: tl.constexpr, HAS_MASK: tl.constexpr,
                      G_INT64: tl.constexpr, CAUSAL: tl.constexpr, ATOMIC_DQ: tl.constexpr,
                      HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, WINDOW,
                      HAS_WINDOW: tl.constexpr):
        """One (key block, batch·kv head) program of the backward: dk, dv (and with
        ``ATOMIC_DQ`` the dq contributions, see :func:`_dkdv_heads`)."""
        pid_n = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = (pid_bh // Hkv).to(tl.int64)
        hk = (pid_bh % Hkv).to(tl.int64)
        scale = tl.cast(scale, tl.float32)
        qk_scale = log2_scale(scale)
        inv_h = 1.0 / tl.cast(Hq, tl.float32)

        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        n_ok = offs_n < N
        d_ok = offs_d < HEAD_DIM
        kv_mask = n_ok[:, None] & d_ok[None, :]
        k = tl.load(K + b * stride_kb + hk * stride_kh + offs_n[:, None] * stride_kn
                    + offs_d[None, :], mask=kv_mask, other=0.0)
        key_ok = n_ok
        if HAS_MASK:
            km = tl.load(KeyMask + b * N + offs_n, mask=n_ok, other=0)
            key_ok = key_ok & (km != 0)
        v = k
        if HAS_DO:
            v = tl.load(V + b * stride_vb + hk * stride_vh + offs_n[:, None] * stride_vn
                        + offs_d[None, :], mask=kv_mask, other=0.0)
        vcol = tl.full([BLOCK_N], -1, dtype=tl.int32)
        if HAS_G:
            vcol = tl.load(VisualCol + b * N + offs_n, mask=n_ok, other=-1)

        dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        lo = 0
        if CAUSAL:
            lo = (pid_n * BLOCK_N // BLOCK_M) * BLOCK_M
        Q_b = Q + b * stride_qb
        DO_b = DO + b * stride_db
        G_b = G + b * QMAX * VMAX
        QueryRow_b = QueryRow + b * N
        DQ_b = DQ + b * stride_dqb
        # The branch on image tokens is taken once per program, outside the loops: the
        # plain loop then carries none of the G tile's registers.
        if HAS_G:
            if tl.max(vcol, 0) >= 0:
                dk, dv = _dkdv_heads(dk, dv, k, v, key_ok, vcol, offs_n, Q_b, DO_b, RowMax,
                                     RowLog2Sum, Delta, G_b, QueryRow_b, DQ_b, b, hk, lo, N, Hq,
                                     GROUP, VMAX, stride_qh, stride_qn, stride_dh, stride_dn,
                                     stride_dqh, stride_dqn, scale, qk_scale, inv_h, HAS_DO,
                                     True, G_INT64, CAUSAL, ATOMIC_DQ, HEAD_DIM, BLOCK_D,
                                     DOT_PREC, BLOCK_M, BLOCK_N, WINDOW, HAS_WINDOW)
            else:
                dk, dv = _dkdv_heads(dk, dv, k, v, key_ok, vcol, offs_n, Q_b, DO_b, RowMax,
                                     RowLog2Sum, Delta, G_b, QueryRow_b, DQ_b, b, hk, lo, N, Hq,
                                     GROUP, VMAX, stride_qh, stride_qn, stride_dh, stride_dn,
                                     stride_dqh, stride_dqn, scale, qk_scale, inv_h, HAS_DO,
                                     False, G_INT64, CAUSAL, ATOMIC_DQ, HEAD_DIM, BLOCK_D,
                                     DOT_PREC, BLOCK_M, BLOCK_N, WINDOW, HAS_WINDOW)
        else:
            dk, dv = _dkdv_heads(dk, dv, k, v, key_ok, vcol, offs_n, Q_b, DO_b, RowMax,
                                 RowLog2Sum, Delta, G_b, QueryRow_b, DQ_b, b, hk, lo, N, Hq,
                                 GROUP, VMAX, stride_qh, stride_qn, stride_dh, stride_dn,
                                 stride_dqh, stride_dqn, scale, qk_scale, inv_h, HAS_DO, False,
                                 G_INT64, CAUSAL, ATOMIC_DQ, HEAD_DIM, BLOCK_D, DOT_PREC,
                                 BLOCK_M, BLOCK_N, WINDOW, HAS_WINDOW)
        dk = dk * scale
        tl.store(DK + b * stride_dkb + hk * stride_dkh + offs_n[:, None] * stride_dkn
                 + offs_d[None, :], dk.to(DK.dtype.element_ty), mask=kv_mask)
        if HAS_DO:
            tl.store(DV + b * stride_dvb + hk * stride_dvh + offs_n[:, None] * stride_dvn
                     + offs_d[None, :], dv.to(DV.dtype.element_ty), mask=kv_mask)

    @triton.autotune(configs=autotune_configs(_BWD_CONFIGS), key=_BWD_KEY,
                     prune_configs_by=prune_hook("_bwd_dkdv_kernel"))
    @triton.jit
    def _bwd_dkdv_kernel(Q, K, V, DO, RowMax, RowLog2Sum, Delta, KeyMask, G, QueryRow,
                         VisualCol, DK, DV,
                         stride_qb, stride_qh, stride_qn,
                         stride_kb, stride_kh, stride_kn,
                         stride_vb, stride_vh, stride_vn,
                         stride_db, stride_dh, stride_dn,
                         stride_dkb, stride_dkh, stride_dkn,
                         stride_dvb, stride_dvh, stride_dvn,
                         N, Hq, Hkv, GROUP, QMAX, VMAX, scale, N_BUCKET, WINDOW,
                         HAS_DO: tl.constexpr, HAS_G: tl.constexpr, HAS_MASK: tl.constexpr,
                         G_INT64: tl.constexpr, CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr,
                         BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_N: tl.constexpr, HAS_WINDOW: tl.constexpr = False):
        """dk/dv only (the deterministic backward; dq comes from :func:`_bwd_dq_kernel`)."""
        _dkdv_program(Q, K, V, DO, RowMax, RowLog2Sum, Delta, KeyMask, G, QueryRow,
                      VisualCol, DK, DV, DK,
                      stride_qb, stride_qh, stride_qn,
                      stride_kb, stride_kh, stride_kn,
                      stride_vb, stride_vh, stride_vn,
                      stride_db, stride_dh, stride_dn,
                      stride_dkb, stride_dkh, stride_dkn,
                      stride_dvb, stride_dvh, stride_dvn,
                      0, 0, 0,
                      N, Hq, Hkv, GROUP, QMAX, VMAX, scale,
                      HAS_DO, HAS_G, HAS_MASK, G_INT64, CAUSAL, False, HEAD_DIM, BLOCK_D,
                      DOT_PREC, BLOCK_M, BLOCK_N, WINDOW, HAS_WINDOW)

    # The autotuner re-runs a kernel while benchmarking: the atomically accumulated dq
    # buffer is zeroed before each trial.
    @triton.autotune(configs=autotune_configs(_BWD_ATOMIC_CONFIGS), key=_BWD_KEY,
                     prune_configs_by=prune_hook("_bwd_dkdvdq_kernel"), reset_to_zero=["DQ"])
    @triton.jit
    def _bwd_dkdvdq_kernel(Q, K, V, DO, RowMax, RowLog2Sum, Delta, KeyMask, G, QueryRow,
                           VisualCol, DK, DV, DQ,
                           stride_qb, stride_qh, stride_qn,
                           stride_kb, stride_kh, stride_kn,
                           stride_vb, stride_vh, stride_vn,
                           stride_db, stride_dh, stride_dn,
                           stride_dkb, stride_dkh, stride_dkn,
                           stride_dvb, stride_dvh, stride_dvn,
                           stride_dqb, stride_dqh, stride_dqn,
                           N, Hq, Hkv, GROUP, QMAX, VMAX, scale, N_BUCKET, WINDOW,
                           HAS_DO: tl.constexpr, HAS_G: tl.constexpr, HAS_MASK: tl.constexpr,
                           G_INT64: tl.constexpr, CAUSAL: tl.constexpr,
                           HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                           DOT_PREC: tl.constexpr, BLOCK_M: tl.constexpr,
                           BLOCK_N: tl.constexpr, HAS_WINDOW: tl.constexpr = False):
        """The 5-matmul backward: dk, dv and dq (float32 atomics into ``DQ``) in one pass."""
        _dkdv_program(Q, K, V, DO, RowMax, RowLog2Sum, Delta, KeyMask, G, QueryRow,
                      VisualCol, DK, DV, DQ,
                      stride_qb, stride_qh, stride_qn,
                      stride_kb, stride_kh, stride_kn,
                      stride_vb, stride_vh, stride_vn,
                      stride_db, stride_dh, stride_dn,
                      stride_dkb, stride_dkh, stride_dkn,
                      stride_dvb, stride_dvh, stride_dvn,
                      stride_dqb, stride_dqh, stride_dqn,
                      N, Hq, Hkv, GROUP, QMAX, VMAX, scale,
                      HAS_DO, HAS_G, HAS_MASK, G_INT64, CAUSAL, True, HEAD_DIM, BLOCK_D,
                      DOT_PREC, BLOCK_M, BLOCK_N, WINDOW, HAS_WINDOW)

    @triton.autotune(configs=autotune_configs(_BWD_DQ_CONFIGS), key=_BWD_KEY,
                     prune_configs_by=prune_hook("_bwd_dq_kernel"))
    @triton.jit
    def _bwd_dq_kernel(Q, K, V, DO, RowMax, RowLog2Sum, Delta, KeyMask, G, QueryRow,
                       VisualCol, VisualSpan, DQ,
                       stride_qb, stride_qh, stride_qn,
                       stride_kb, stride_kh, stride_kn,
                       stride_vb, stride_vh, stride_vn,
                       stride_db, stride_dh, stride_dn,
                       stride_dqb, stride_dqh, stride_dqn,
                       N, Hq, GROUP, QMAX, VMAX, scale, N_BUCKET, WINDOW,
                       HAS_DO: tl.constexpr, HAS_G: tl.constexpr, HAS_MASK: tl.constexpr,
                       G_INT64: tl.constexpr, CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr,
                       BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_N: tl.constexpr, HAS_WINDOW: tl.constexpr = False):
        pid_m = tl.program_id(0)
        if CAUSAL:
            pid_m = tl.num_programs(0) - 1 - pid_m  # longest rows first
        pid_bh = tl.program_id(1)
        b = (pid_bh // Hq).to(tl.int64)
        h = (pid_bh % Hq).to(tl.int64)
        hk = h // GROUP
        bh = b * Hq + h
        scale = tl.cast(scale, tl.float32)
        qk_scale = log2_scale(scale)
        inv_h = 1.0 / tl.cast(Hq, tl.float32)

        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        m_ok = offs_m < N
        d_ok = offs_d < HEAD_DIM
        q_mask = m_ok[:, None] & d_ok[None, :]
        q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qn
                    + offs_d[None, :], mask=q_mask, other=0.0)
        m_row, l2_row = load_row_stats(RowMax + bh * N, RowLog2Sum + bh * N, offs_m, m_ok)
        delta = tl.load(Delta + bh * N + offs_m, mask=m_ok, other=0.0)
        do = q
        if HAS_DO:
            do = tl.load(DO + b * stride_db + h * stride_dh + offs_m[:, None] * stride_dn
                         + offs_d[None, :], mask=q_mask, other=0.0)
        qrow = tl.full([BLOCK_M], -1, dtype=tl.int32)
        if HAS_G:
            qrow = tl.load(QueryRow + b * N + offs_m, mask=m_ok, other=-1)

        dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        lo = 0
        hi = N
        if CAUSAL:
            hi = tl.minimum((pid_m + 1) * BLOCK_M, N)
            if HAS_WINDOW:
                # Key blocks wholly before every row's window (P = 0 there) are skipped, as in
                # the forward; the spans below start there, still on BLOCK_N boundaries.
                lo = tl.minimum(window_key_start(pid_m * BLOCK_M, WINDOW, BLOCK_N), hi)
        K_base = K + b * stride_kb + hk * stride_kh
        V_base = V + b * stride_vb + hk * stride_vh
        KeyMask_b = KeyMask + b * N
        VisualCol_b = VisualCol + b * N
        G_b = G + b * QMAX * VMAX
        # Key blocks split into plain / image-token / plain spans (the image tokens of a
        # sample lie in [VisualSpan[b, 0], VisualSpan[b, 1])): no per-block branch.
        vis_lo = hi
        vis_hi = hi
        if HAS_G:
            if tl.max(qrow, 0) >= 0:
                vis_lo = tl.minimum(tl.load(VisualSpan + 2 * b) // BLOCK_N * BLOCK_N, hi)
                vis_lo = tl.maximum(vis_lo, lo)
                vis_hi = tl.load(VisualSpan + 2 * b + 1)
                vis_hi = tl.maximum(tl.minimum(tl.cdiv(vis_hi, BLOCK_N) * BLOCK_N, hi), vis_lo)
        dq = _dq_span(dq, q, do, m_row, l2_row, delta, qrow, offs_m, m_ok, K_base, V_base,
                      KeyMask_b, VisualCol_b, G_b, lo, vis_lo, N, VMAX, stride_kn, stride_vn,
                      qk_scale, inv_h, HAS_DO, HAS_MASK, False, G_INT64, CAUSAL, HEAD_DIM,
                      BLOCK_D, DOT_PREC, BLOCK_M, BLOCK_N, WINDOW, HAS_WINDOW)
        if HAS_G:
            dq = _dq_span(dq, q, do, m_row, l2_row, delta, qrow, offs_m, m_ok, K_base, V_base,
                          KeyMask_b, VisualCol_b, G_b, vis_lo, vis_hi, N, VMAX, stride_kn,
                          stride_vn, qk_scale, inv_h, HAS_DO, HAS_MASK, True, G_INT64, CAUSAL,
                          HEAD_DIM, BLOCK_D, DOT_PREC, BLOCK_M, BLOCK_N, WINDOW, HAS_WINDOW)
            dq = _dq_span(dq, q, do, m_row, l2_row, delta, qrow, offs_m, m_ok, K_base, V_base,
                          KeyMask_b, VisualCol_b, G_b, vis_hi, hi, N, VMAX, stride_kn,
                          stride_vn, qk_scale, inv_h, HAS_DO, HAS_MASK, False, G_INT64,
                          CAUSAL, HEAD_DIM, BLOCK_D, DOT_PREC, BLOCK_M, BLOCK_N, WINDOW,
                          HAS_WINDOW)
        dq = dq * scale
        tl.store(DQ + b * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqn
                 + offs_d[None, :], dq.to(DQ.dtype.element_ty), mask=q_mask)



# --------------------------------------------------------------------------- launchers

def _n_bucket(n: int) -> int:
    """Autotuning key for the sequence length: its power-of-two bucket (few re-tunes)."""
    return 1 << max(0, (n - 1).bit_length())


def lse_from_stats(stats: torch.Tensor) -> torch.Tensor:
    """Natural-log ``lse`` (B, Hq, N) from row statistics; ``-inf`` on rows with no key."""
    m, l2 = stats[0], stats[1]
    lse = (m + l2) * math.log(2.0)
    return torch.where(m == float("-inf"), m, lse)


def stats_from_lse(lse: torch.Tensor) -> torch.Tensor:
    """Row statistics (2, B, Hq, N) from an external natural-log ``lse`` (B, Hq, N):
    ``m = lse·log2 e``, ``log2 l = 0``. Exact up to the rounding already in that one fp32
    number (at |s| ~ 1e4 a relative error of ~3e-4 in P, which the statistics written by
    :func:`flash_forward` avoid)."""
    lse = lse.float()
    return torch.stack([lse * LOG2E, torch.zeros_like(lse)]).contiguous()


def flash_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor | None,
                  key_mask: torch.Tensor | None, causal: bool, scale: float | None,
                  visual_col: torch.Tensor | None = None, window: int | None = None, *,
                  maps: torch.Tensor | None = None, query_row: torch.Tensor | None = None,
                  map_weight: float = 1.0, text_sum: bool = True,
                  ) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Flash attention forward: ``(out, stats)``.

    ``out`` has q's shape and dtype (None when ``v`` is None: only ``stats`` is computed).
    ``stats`` (P, B, Hq, N) float32 holds the softmax row statistics in log2 units of the
    scaled scores: ``stats[0]`` the row max m (``-inf`` on rows with no allowed key),
    ``stats[1]`` ``log2 Σ exp2(s - m)``; :func:`lse_from_stats` gives the natural lse.
    With ``visual_col`` ((B, N) int32, -1 off image tokens, see
    :func:`kernels.visual_attention.inverse_index`) P = 3 and ``stats[2]`` is that log-sum over
    the non-visual keys only, which :func:`kernels.visual_attention.visual_maps_from_lse` completes
    with its own scores of the visual keys.
    ``window``: sliding-window attention (causal only): query i sees keys j with
    ``i - j < window``; None for none.

    With ``maps`` (a contiguous float32 (B, Qmax, Vmax) buffer), ``query_row`` ((B, N) int32,
    the gathered row of each position or -1) and ``visual_col``, the kernel's second phase
    adds ``map_weight · P`` of every (query row, visual key) pair into ``maps`` (pass
    ``map_weight = weight / Hq`` for a weighted head mean), scored by the same tiles as the
    statistics. ``text_sum=False`` then skips the non-visual plane (P = 2), which only the
    rest bucket needs.
    Inputs are assumed checked (see :mod:`kernels.autograd`); only the head dim must be dense.
    """
    require_triton()
    check_window(window, causal)
    out_dtype = q.dtype
    q, k = kernel_input(q), kernel_input(k)
    v = None if v is None else kernel_input(v)
    B, Hq, N, D = q.shape
    Hkv = k.shape[1]
    has_maps = maps is not None
    if has_maps and (visual_col is None or query_row is None):
        raise ValueError("flash_forward: maps needs visual_col and query_row")
    has_vis = visual_col is not None and (text_sum or not has_maps)
    stats = torch.empty((3 if has_vis else 2, B, Hq, N), device=q.device, dtype=torch.float32)
    out = torch.empty((B, Hq, N, D), device=q.device, dtype=q.dtype) if v is not None else None
    if q.numel() == 0:
        stats.fill_(float("-inf"))[1].zero_()
        return (None if out is None else out.to(out_dtype)), stats
    v_arg = v if v is not None else k
    o_arg = out if out is not None else q
    vcol = visual_col.to(torch.int32).contiguous() if visual_col is not None else q
    # The image span: the maps phase's key blocks, and the only blocks whose non-visual sum
    # needs the column index.
    span = visual_span(vcol) if has_maps or has_vis else q
    if has_maps:
        qrow, qmax, vmax = query_row.to(torch.int32).contiguous(), maps.shape[1], maps.shape[2]
    else:
        qrow, qmax, vmax = q, 0, 0
    grid = lambda meta: (triton.cdiv(N, meta["BLOCK_M"]), B * Hq)  # noqa: E731
    launch(_fwd_kernel, grid,
        q, k, v_arg, o_arg, stats[0], stats[1], stats[-1], _key_mask_arg(key_mask, q), vcol,
        maps if has_maps else q, qrow, span,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v_arg.stride(0), v_arg.stride(1), v_arg.stride(2),
        o_arg.stride(0), o_arg.stride(1), o_arg.stride(2),
        N, Hq, Hq // Hkv, default_scale(D, scale), _n_bucket(N), window_arg(window, N),
        qmax, vmax, float(map_weight),
        HAS_WINDOW=window is not None, HAS_V=v is not None, HAS_MASK=key_mask is not None,
        HAS_VIS=has_vis, HAS_MAPS=has_maps,
        CAUSAL=bool(causal), HEAD_DIM=D, BLOCK_D=block_d(D), DOT_PREC=dot_precision(q.dtype),
    )
    if out is not None and out.dtype != out_dtype:
        out = out.to(out_dtype)
    return out, stats


def attention_delta(out: torch.Tensor, do: torch.Tensor) -> torch.Tensor:
    """``D_i = rowsum(dO ∘ O)`` as (B, Hq, N) float32."""
    require_triton()
    out, do = kernel_input(out), kernel_input(do)
    B, Hq, N, D = out.shape
    delta = torch.empty((B, Hq, N), device=out.device, dtype=torch.float32)
    if out.numel() == 0:
        return delta.zero_()
    block_m = 64
    launch(_bwd_delta_kernel, (triton.cdiv(N, block_m), B * Hq),
        out, do, delta,
        out.stride(0), out.stride(1), out.stride(2),
        do.stride(0), do.stride(1), do.stride(2),
        N, Hq, HEAD_DIM=D, BLOCK_D=block_d(D), BLOCK_M=block_m, num_warps=4,
    )
    return delta


def visual_span(visual_col: torch.Tensor) -> torch.Tensor:
    """(B, 2) int32 ``[first, last + 1)`` position of the image tokens per sample ((0, 0)
    without any): the dq kernel's image-token span of key blocks."""
    is_vis = visual_col >= 0
    n = visual_col.shape[1]
    first = is_vis.int().argmax(1)
    last = n - is_vis.flip(1).int().argmax(1)
    has = is_vis.any(1)
    span = torch.stack([torch.where(has, first, 0), torch.where(has, last, 0)], 1)
    return span.to(torch.int32).contiguous()


def atomic_backward_fits(window: int | None, head_dim: int, device: torch.device,
                         has_do: bool = True) -> bool:
    """Whether the 5-matmul backward has a spill-free config on this GPU (with a window it
    has none at d = 128 on sm_80; the split backward, which has, runs there)."""
    if device.type != "cuda":
        return True
    table = table_variant("_bwd_dkdvdq_kernel", dict(HAS_DO=has_do,
                                                       HAS_WINDOW=window is not None,
                                                       HEAD_DIM=head_dim,
                                                       BLOCK_D=block_d(head_dim)))
    return fits_target(table, block_d(head_dim), device_capability())


def flash_backward(do: torch.Tensor | None, q: torch.Tensor, k: torch.Tensor,
                   v: torch.Tensor | None, out: torch.Tensor | None, stats: torch.Tensor,
                   key_mask: torch.Tensor | None, causal: bool, scale: float | None, *,
                   grad_maps: torch.Tensor | None = None,
                   query_row: torch.Tensor | None = None,
                   visual_col: torch.Tensor | None = None,
                   row_terms: torch.Tensor | None = None,
                   atomic_dq: bool | None = None, window: int | None = None,
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Flash attention backward with the optional visual terms: ``(dq, dk, dv)``.

    Args:
        do: dL/d out (B, Hq, N, d), or None when the output carries no gradient (then
            ``v``/``out`` are not read and ``dv`` is None).
        stats: the forward's (2, B, Hq, N) float32 row statistics (:func:`flash_forward`).
        grad_maps: ``G = dL/dA`` (B, Qmax, Vmax) in the maps' dtype (float32 or bfloat16),
            or None for plain attention.
        query_row, visual_col: (B, N) int32 inverse index maps (see module docstring).
        row_terms: ``c`` (B, Hq, N) float32 from :func:`kernels.visual_attention.visual_row_terms`.
        atomic_dq: True: the 5-matmul backward (one kernel, dq accumulated by float32
            atomics, whose order is not fixed); False: dk/dv and a separate dq kernel that
            recomputes QKᵀ and dP (7 matmuls, bitwise reproducible). None (default): False
            when :func:`deterministic` says so, and with a window where no 5-matmul config
            fits the GPU (d = 128 on sm_80).
        window: the forward's sliding window (None for none).

    dq/dk/dv have the dtypes of q/k/v; dk/dv of a kv head sum over its query heads.
    """
    require_triton()
    check_window(window, causal)
    dtypes = (q.dtype, k.dtype, None if v is None else v.dtype)
    has_do = do is not None
    has_g = grad_maps is not None
    if not has_do and not has_g:
        raise ValueError("flash_backward: nothing to differentiate (do and grad_maps are None)")
    q, k = kernel_input(q), kernel_input(k)
    B, Hq, N, D = q.shape
    Hkv = k.shape[1]
    if has_do:
        do, v = kernel_input(do), kernel_input(v)
        delta = attention_delta(out, do)
    else:
        delta = torch.zeros((B, Hq, N), device=q.device, dtype=torch.float32)
    if has_g:
        delta = delta + row_terms
        grad_maps = map_operand(grad_maps)
        qmax, vmax = grad_maps.shape[1], grad_maps.shape[2]
        query_row = query_row.to(torch.int32).contiguous()
        visual_col = visual_col.to(torch.int32).contiguous()
    else:
        grad_maps, query_row, visual_col, qmax, vmax = q, q, q, 0, 0
    stats = stats.float().contiguous()
    dk = torch.empty((B, Hkv, N, D), device=q.device, dtype=k.dtype)
    dv = torch.empty((B, Hkv, N, D), device=q.device, dtype=v.dtype) if has_do else None
    if q.numel() == 0:
        return (torch.zeros((B, Hq, N, D), device=q.device, dtype=dtypes[0]), dk.zero_(),
                (dv.zero_() if dv is not None else None))
    do_arg = do if has_do else q
    v_arg = v if has_do else k
    dv_arg = dv if has_do else dk
    km = _key_mask_arg(key_mask, q)
    scale = default_scale(D, scale)
    flags = dict(HAS_DO=has_do, HAS_G=has_g, HAS_MASK=key_mask is not None,
                 G_INT64=qmax * vmax >= 2**31, CAUSAL=bool(causal),
                 WINDOW=window_arg(window, N), HAS_WINDOW=window is not None, HEAD_DIM=D,
                 BLOCK_D=block_d(D), DOT_PREC=dot_precision(q.dtype))
    grid_kv = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), B * Hkv)  # noqa: E731
    if atomic_dq is None:
        atomic_dq = not deterministic() and atomic_backward_fits(window, D, q.device, has_do)
    if atomic_dq:
        dq_acc = torch.zeros((B, Hq, N, D), device=q.device, dtype=torch.float32)
        launch(_bwd_dkdvdq_kernel, grid_kv,
            q, k, v_arg, do_arg, stats[0], stats[1], delta, km, grad_maps, query_row,
            visual_col, dk, dv_arg, dq_acc,
            q.stride(0), q.stride(1), q.stride(2),
            k.stride(0), k.stride(1), k.stride(2),
            v_arg.stride(0), v_arg.stride(1), v_arg.stride(2),
            do_arg.stride(0), do_arg.stride(1), do_arg.stride(2),
            dk.stride(0), dk.stride(1), dk.stride(2),
            dv_arg.stride(0), dv_arg.stride(1), dv_arg.stride(2),
            dq_acc.stride(0), dq_acc.stride(1), dq_acc.stride(2),
            N, Hq, Hkv, Hq // Hkv, qmax, vmax, scale, _n_bucket(N), **flags,
        )
        dq = dq_acc.to(dtypes[0])
        dk = dk.to(dtypes[1])
        dv = dv.to(dtypes[2]) if dv is not None else None
        return dq, dk, dv
    span = visual_span(visual_col) if has_g else q
    dq = torch.empty((B, Hq, N, D), device=q.device, dtype=q.dtype)
    launch(_bwd_dkdv_kernel, grid_kv,
        q, k, v_arg, do_arg, stats[0], stats[1], delta, km, grad_maps, query_row, visual_col,
        dk, dv_arg,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v_arg.stride(0), v_arg.stride(1), v_arg.stride(2),
        do_arg.stride(0), do_arg.stride(1), do_arg.stride(2),
        dk.stride(0), dk.stride(1), dk.stride(2),
        dv_arg.stride(0), dv_arg.stride(1), dv_arg.stride(2),
        N, Hq, Hkv, Hq // Hkv, qmax, vmax, scale, _n_bucket(N), **flags,
    )
    grid_q = lambda meta: (triton.cdiv(N, meta["BLOCK_M"]), B * Hq)  # noqa: E731
    launch(_bwd_dq_kernel, grid_q,
        q, k, v_arg, do_arg, stats[0], stats[1], delta, km, grad_maps, query_row, visual_col,
        span, dq,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v_arg.stride(0), v_arg.stride(1), v_arg.stride(2),
        do_arg.stride(0), do_arg.stride(1), do_arg.stride(2),
        dq.stride(0), dq.stride(1), dq.stride(2),
        N, Hq, Hq // Hkv, qmax, vmax, scale, _n_bucket(N), **flags,
    )
    dq = dq.to(dtypes[0])
    dk = dk.to(dtypes[1])
    dv = dv.to(dtypes[2]) if dv is not None else None
    return dq, dk, dv
