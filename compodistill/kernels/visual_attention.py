"""Visual-map passes: the head-mean attention on visual columns, rebuilt from ``lse``.

``A[b, r, c] = (1/Hq) Σ_h exp(s_h[i, j] - lse_h[i])`` with ``i = query_index[b, r]`` and
``j = visual_index[b, c]`` (the gathered layout of ``compodistill.visual_attention.layout``), 0 on padding
rows/columns and on causal-masked pairs. The full attention matrix never exists: one
program per (sample, block of gathered query rows, chunk of visual columns) loops over the
heads, accumulating the head mean in registers (docs/visual_attention.md, "How the kernels
compute it"; the column chunks are spread over programs instead of looped so that a small
|Q| still fills the GPU, and they are the fastest grid dimension, so the programs that read
one block of q rows run together and q is read from DRAM about once instead of once per
column chunk).

Every fresh map comes from the gathered map pass below (after the refine gate), written
once in the maps' dtype (bfloat16 for bfloat16 inputs) with no zero fill: fewer bytes than
the forward kernel's second phase (:func:`kernels.attention.flash_forward` with ``maps=``),
whose float32 atomics need a zeroed float32 buffer and a read-modify-write of it; that
phase serves the in-place accumulation into a float32 window buffer (group matching).

- :func:`visual_maps_from_lse`: writes ``A`` (B, Qmax, Vmax), or accumulates
  ``out += weight * A`` into an existing buffer (teacher targets averaged over a window of
  layers in place, group matching).
- :func:`visual_row_terms`: the backward pre-pass ``c_h[i] = Σ_v P_h[i, v] G[i, v] / Hq``,
  scattered to (B, Hq, N) float32 at the query positions (0 elsewhere); one program per
  (sample, head, block of rows) looping over the visual chunks.
- :func:`inverse_index`: (B, N) int32 map position -> gathered row/column (-1 if none),
  how the flash backward reads ``G`` without scattering it.
- :func:`visual_rest_heads` / :func:`visual_rest_mass`: the mass on the non-visual keys per
  head (B, Hq, N) and its head mean on the query rows (B, Qmax), from the forward's third
  statistics plane (the ``rest`` bucket of the KL losses).

Visual keys are real tokens by construction of the layout (``visual_layout`` rejects image
tokens on padding), so the key mask is not consulted here; ``lse`` already accounts for it.
"""
from __future__ import annotations

import torch

from ._common import (block_d, default_scale, dot_precision, kernel_input, launch,
                      map_buffer, map_dtype, map_operand, require_triton, triton, tl,
                      window_arg)

if triton is not None:
    from ._common import load_row_stats, log2_scale

    @triton.jit
    def _gathered_q(Q, b, h, qpos, r_ok, stride_qb, stride_qh, stride_qn,
                    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
        """The q tile of a block of gathered rows, loaded once by a program that walks the
        visual chunks (the row-terms pass)."""
        offs_d = tl.arange(0, BLOCK_D)
        return tl.load(Q + b * stride_qb + h * stride_qh + qpos[:, None] * stride_qn
                       + offs_d[None, :], mask=r_ok[:, None] & (offs_d < HEAD_DIM)[None, :],
                       other=0.0)

    @triton.jit
    def _chunk_logits(q, K, b, hk, vpos, c_ok, stride_kb, stride_kh, stride_kn, qk_scale,
                      HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr):
        """Scaled scores (log2 units) of a loaded q tile against one chunk of visual keys:
        the product :func:`_gathered_logits` computes, so the rounding is the same."""
        offs_d = tl.arange(0, BLOCK_D)
        kk = tl.load(K + b * stride_kb + hk * stride_kh + vpos[:, None] * stride_kn
                     + offs_d[None, :], mask=c_ok[:, None] & (offs_d < HEAD_DIM)[None, :],
                     other=0.0)
        return tl.dot(q, tl.trans(kk), input_precision=DOT_PREC) * qk_scale

    @triton.jit
    def _gathered_logits(Q, K, b, h, hk, qpos, vpos, r_ok, c_ok,
                         stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
                         qk_scale, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                         DOT_PREC: tl.constexpr):
        """Scaled scores (log2 units) on (gathered rows × gathered visual columns).

        Every gathered pass scores visual keys with this one tile product (the row-terms
        pass through its two halves, q loaded once), in the same
        (BLOCK_Q, BLOCK_V) tiles, so a visual score rounds the same way in each.
        """
        q = _gathered_q(Q, b, h, qpos, r_ok, stride_qb, stride_qh, stride_qn, HEAD_DIM, BLOCK_D)
        return _chunk_logits(q, K, b, hk, vpos, c_ok, stride_kb, stride_kh, stride_kn, qk_scale,
                             HEAD_DIM, BLOCK_D, DOT_PREC)

    @triton.jit
    def _gathered_scores(Q, K, RowMax, RowLog2Sum, b, h, hk, qpos, vpos, r_ok, c_ok,
                         stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
                         N, Hq, qk_scale,
                         HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr):
        """P_h on (gathered rows × gathered visual columns), before the pair mask."""
        bh = b * Hq + h
        m, l2 = load_row_stats(RowMax + bh * N, RowLog2Sum + bh * N, qpos, r_ok)
        s = _gathered_logits(Q, K, b, h, hk, qpos, vpos, r_ok, c_ok, stride_qb, stride_qh,
                             stride_qn, stride_kb, stride_kh, stride_kn, qk_scale, HEAD_DIM,
                             BLOCK_D, DOT_PREC)
        return tl.math.exp2((s - m[:, None]) - l2[:, None])

    @triton.jit
    def _visual_stats_kernel(Q, K, RowMax, RowLog2Text, QIdx, QCnt, VIdx, VCnt,
                             OutMax, OutLog2Sum,
                             stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
                             N, Hq, GROUP, QMAX, VMAX, scale, WINDOW, refine_at,
                             CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr,
                             BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr,
                             BLOCK_Q: tl.constexpr, BLOCK_V: tl.constexpr,
                             HAS_WINDOW: tl.constexpr = False):
        """Row statistics of the query rows with the visual keys rescored by the map tiles:
        the forward's non-visual sum (``RowLog2Text``, relative to ``RowMax``) plus an online
        softmax over the visual keys, written as (max, log2 sum) at the query positions.

        Only a block of rows whose largest |row max| (log2 units) reaches ``refine_at`` is
        rescored; the others keep the forward's statistics (already in the output), so at
        moderate scores this pass reads one plane of row maxima and scores nothing."""
        pid_r = tl.program_id(0)
        h = tl.program_id(1)
        b = tl.program_id(2).to(tl.int64)
        qcnt = tl.load(QCnt + b).to(tl.int32)
        vcnt = tl.load(VCnt + b).to(tl.int32)
        offs_r = pid_r * BLOCK_Q + tl.arange(0, BLOCK_Q)
        r_ok = offs_r < qcnt
        qpos = tl.load(QIdx + b * QMAX + offs_r, mask=r_ok, other=0)
        m_row = tl.load(RowMax + (b * Hq + h) * N + qpos, mask=r_ok, other=0.0)
        # A row with no key (m = -inf) needs nothing; a NaN row max (NaN input) is rescored,
        # so the NaN reaches the statistics the maps use either way.
        big = tl.where(m_row == float("-inf"), 0.0, tl.abs(m_row))
        big = tl.where(m_row != m_row, float("inf"), big)
        if (pid_r * BLOCK_Q < qcnt) & (tl.max(big) >= tl.cast(refine_at, tl.float32)):
            qk_scale = log2_scale(scale)
            mv = tl.full([BLOCK_Q], float("-inf"), dtype=tl.float32)
            lv = tl.zeros([BLOCK_Q], dtype=tl.float32)
            for c0 in range(0, vcnt, BLOCK_V):
                offs_c = c0 + tl.arange(0, BLOCK_V)
                c_ok = offs_c < vcnt
                vpos = tl.load(VIdx + b * VMAX + offs_c, mask=c_ok, other=0)
                allowed = r_ok[:, None] & c_ok[None, :]
                if CAUSAL:
                    allowed = allowed & (vpos[None, :] <= qpos[:, None])
                if HAS_WINDOW:
                    allowed = allowed & (qpos[:, None] - vpos[None, :] < WINDOW)
                # A chunk with no allowed pair (before every row's window) would leave
                # (mv, lv) exactly as they are: skip its scores. Only with a window, where
                # such chunks are common; the branch stops the loads being pipelined.
                visit = True
                if HAS_WINDOW:
                    visit = tl.max(tl.where(allowed, 1, 0)) > 0
                if visit:
                    # q is reloaded per chunk here: held across the loop it spills 4 B at
                    # d = 256 with a window on sm_80 (this pass runs only in the
                    # deterministic mode, on rows past the gate).
                    s = _gathered_logits(Q, K, b, h, h // GROUP, qpos, vpos, r_ok, c_ok,
                                         stride_qb, stride_qh, stride_qn, stride_kb, stride_kh,
                                         stride_kn, qk_scale, HEAD_DIM, BLOCK_D, DOT_PREC)
                    s = tl.where(allowed, s, float("-inf"))
                    m_new = tl.maximum(mv, tl.max(s, 1))
                    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
                    lv = (lv * tl.math.exp2(mv - m_safe)
                          + tl.sum(tl.math.exp2(s - m_safe[:, None]), 1))
                    mv = m_new
            rows = (b * Hq + h) * N + qpos
            m_t = tl.load(RowMax + rows, mask=r_ok, other=float("-inf"))
            lt2 = tl.load(RowLog2Text + rows, mask=r_ok, other=float("-inf"))
            # Reference max over both parts; the text part stays split as (m_t, log2 l_text)
            # so no exponent of size |s| is ever rounded again.
            ref = tl.maximum(m_t, mv)
            empty = ref == float("-inf")
            ref_safe = tl.where(empty, 0.0, ref)
            total = (tl.math.exp2((m_t - ref_safe) + lt2)
                     + lv * tl.math.exp2(mv - ref_safe))
            tl.store(OutMax + rows, tl.where(empty, float("-inf"), ref), mask=r_ok)
            tl.store(OutLog2Sum + rows, tl.where(empty, 0.0, tl.math.log2(total)), mask=r_ok)

    @triton.jit
    def _visual_maps_kernel(Q, K, RowMax, RowLog2Sum, QIdx, QCnt, VIdx, VCnt, Out,
                            stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
                            N, Hq, GROUP, QMAX, VMAX, scale, weight, WINDOW,
                            ACCUMULATE: tl.constexpr, CAUSAL: tl.constexpr,
                            HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                            DOT_PREC: tl.constexpr, BLOCK_Q: tl.constexpr,
                            BLOCK_V: tl.constexpr, HAS_WINDOW: tl.constexpr = False):
        # Column chunk fastest: the programs of one row block (which read the same q rows
        # of every head) are launched together, so q comes from DRAM once, not once per
        # column chunk.
        pid_c = tl.program_id(0)
        pid_r = tl.program_id(1)
        b = tl.program_id(2).to(tl.int64)
        qcnt = tl.load(QCnt + b).to(tl.int32)
        vcnt = tl.load(VCnt + b).to(tl.int32)
        offs_r = pid_r * BLOCK_Q + tl.arange(0, BLOCK_Q)
        offs_c = pid_c * BLOCK_V + tl.arange(0, BLOCK_V)
        ptrs = Out + b * QMAX * VMAX + offs_r[:, None].to(tl.int64) * VMAX + offs_c[None, :]
        if (pid_r * BLOCK_Q < qcnt) & (pid_c * BLOCK_V < vcnt):
            qk_scale = log2_scale(scale)
            inv_h = 1.0 / tl.cast(Hq, tl.float32)
            r_ok = offs_r < qcnt
            qpos = tl.load(QIdx + b * QMAX + offs_r, mask=r_ok, other=0)
            c_ok = offs_c < vcnt
            vpos = tl.load(VIdx + b * VMAX + offs_c, mask=c_ok, other=0)
            allowed = r_ok[:, None] & c_ok[None, :]
            if CAUSAL:
                allowed = allowed & (vpos[None, :] <= qpos[:, None])
            if HAS_WINDOW:
                allowed = allowed & (qpos[:, None] - vpos[None, :] < WINDOW)
            acc = tl.zeros([BLOCK_Q, BLOCK_V], dtype=tl.float32)
            # Causal tiles entirely after every row of the block are all zeros: skip the heads.
            if tl.max(tl.where(allowed, 1, 0)) > 0:
                for h in range(Hq):
                    acc += _gathered_scores(Q, K, RowMax, RowLog2Sum, b, h, h // GROUP, qpos, vpos, r_ok, c_ok,
                                            stride_qb, stride_qh, stride_qn, stride_kb,
                                            stride_kh, stride_kn, N, Hq, qk_scale, HEAD_DIM,
                                            BLOCK_D, DOT_PREC)
            a = tl.where(allowed, acc * inv_h, 0.0)
            if ACCUMULATE:
                st_mask = r_ok[:, None] & c_ok[None, :]
                a = tl.load(ptrs, mask=st_mask, other=0.0).to(tl.float32) \
                    + tl.cast(weight, tl.float32) * a
                tl.store(ptrs, a, mask=st_mask)
            else:
                # Every entry of the buffer, padding included (it is not zero-filled).
                st_mask = (offs_r < QMAX)[:, None] & (offs_c < VMAX)[None, :]
                tl.store(ptrs, a * tl.cast(weight, tl.float32), mask=st_mask)
        elif not ACCUMULATE:
            st_mask = (offs_r < QMAX)[:, None] & (offs_c < VMAX)[None, :]
            tl.store(ptrs, tl.zeros([BLOCK_Q, BLOCK_V], dtype=tl.float32), mask=st_mask)

    @triton.jit
    def _visual_row_terms_kernel(Q, K, RowMax, RowLog2Sum, QIdx, QCnt, VIdx, VCnt, G, C,
                                 stride_qb, stride_qh, stride_qn,
                                 stride_kb, stride_kh, stride_kn,
                                 N, Hq, GROUP, QMAX, VMAX, scale, WINDOW,
                                 CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr,
                                 BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr,
                                 BLOCK_Q: tl.constexpr, BLOCK_V: tl.constexpr,
                                 HAS_WINDOW: tl.constexpr = False):
        # Heads fastest: the Hq programs that read one block of G rows run together, so G
        # comes from DRAM about once per row block instead of once per query head.
        h = tl.program_id(0)
        pid_r = tl.program_id(1)
        b = tl.program_id(2).to(tl.int64)
        qcnt = tl.load(QCnt + b).to(tl.int32)
        vcnt = tl.load(VCnt + b).to(tl.int32)
        if pid_r * BLOCK_Q < qcnt:
            qk_scale = log2_scale(scale)
            inv_h = 1.0 / tl.cast(Hq, tl.float32)
            offs_r = pid_r * BLOCK_Q + tl.arange(0, BLOCK_Q)
            r_ok = offs_r < qcnt
            qpos = tl.load(QIdx + b * QMAX + offs_r, mask=r_ok, other=0)
            # q and the row statistics once per program, not once per visual chunk.
            q = _gathered_q(Q, b, h, qpos, r_ok, stride_qb, stride_qh, stride_qn, HEAD_DIM,
                            BLOCK_D)
            m, l2 = load_row_stats(RowMax + (b * Hq + h) * N, RowLog2Sum + (b * Hq + h) * N,
                                   qpos, r_ok)
            c_row = tl.zeros([BLOCK_Q], dtype=tl.float32)
            for c0 in range(0, vcnt, BLOCK_V):
                offs_c = c0 + tl.arange(0, BLOCK_V)
                c_ok = offs_c < vcnt
                vpos = tl.load(VIdx + b * VMAX + offs_c, mask=c_ok, other=0)
                allowed = r_ok[:, None] & c_ok[None, :]
                if CAUSAL:
                    allowed = allowed & (vpos[None, :] <= qpos[:, None])
                if HAS_WINDOW:
                    allowed = allowed & (qpos[:, None] - vpos[None, :] < WINDOW)
                if tl.max(tl.where(allowed, 1, 0)) > 0:
                    g = tl.load(G + b * QMAX * VMAX + offs_r[:, None].to(tl.int64) * VMAX + offs_c[None, :],
                                mask=allowed, other=0.0).to(tl.float32)
                    s = _chunk_logits(q, K, b, h // GROUP, vpos, c_ok, stride_kb, stride_kh,
                                      stride_kn, qk_scale, HEAD_DIM, BLOCK_D, DOT_PREC)
                    p = tl.math.exp2((s - m[:, None]) - l2[:, None])
                    c_row += tl.sum(tl.where(allowed, p * g, 0.0), 1)
            tl.store(C + (b * Hq + h) * N + qpos, c_row * inv_h, mask=r_ok)


_BLOCK_Q = 64
_BLOCK_V = 64

# Rows whose |row max| (log2-scaled score, s·scale·log2 e) stays below this keep the
# forward's statistics: a score rounded in two tile shapes differs by a few ulps of |s|,
# i.e. P moves by ~|s|·2⁻²² relative, which at |s| < 64 (2⁶) is under the 1e-5 absolute
# allowance of the accuracy rule. Above it the visual keys are rescored (exact at 1e4).
REFINE_AT = 64.0


def visual_block_q() -> int:
    """The query-row tile of the three gathered passes (every head dim)."""
    return _BLOCK_Q


def visual_block_v(head_dim: int) -> int:
    """The visual-column tile of the three gathered passes (one value for all three, so a
    visual score rounds the same way in each): 32 at BLOCK_D = 256, where the row-terms
    pass spills 8 B on sm_80 with 64 columns."""
    return 32 if block_d(head_dim) > 128 else _BLOCK_V


def _launch_args(q: torch.Tensor, k: torch.Tensor, stats: torch.Tensor,
                 query_index: torch.Tensor, query_count: torch.Tensor,
                 visual_index: torch.Tensor, visual_count: torch.Tensor):
    q, k = kernel_input(q), kernel_input(k)
    B, Hq, N, D = q.shape
    index = [t.contiguous() for t in (query_index, query_count, visual_index, visual_count)]
    strides = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2))
    common = dict(HEAD_DIM=D, BLOCK_D=block_d(D), DOT_PREC=dot_precision(q.dtype),
                  BLOCK_Q=_BLOCK_Q, BLOCK_V=visual_block_v(D), num_warps=4 if D <= 64 else 8,
                  num_stages=2)
    rows = triton.cdiv(query_index.shape[1], _BLOCK_Q)
    stats = stats.float().contiguous()
    return q, k, (stats[0], stats[1]), index, strides, common, rows


def refine_visual_stats(q: torch.Tensor, k: torch.Tensor, stats: torch.Tensor,
                        query_index: torch.Tensor, query_count: torch.Tensor,
                        visual_index: torch.Tensor, visual_count: torch.Tensor,
                        causal: bool, scale: float | None,
                        window: int | None = None,
                        refine_at: float | None = None) -> torch.Tensor:
    """(2, B, Hq, N) row statistics whose visual keys are scored by the map tiles.

    ``stats`` (3, B, Hq, N) from :func:`kernels.attention.flash_forward` with ``visual_col``
    (plane 2: the non-visual log-sum). The forward scores a visual key in its own tile
    shape, the map pass in another; the two roundings of a score of ~1e4 differ by ulps of
    1e4, i.e. ~1e-3 relative in P. Rebuilding the visual part of the statistics from the
    map tiles makes every visual score enter both the statistics and P bit-identically.
    Cost: one more gathered pass (2·|Q|·Nv·d FLOP and |Q|·Nv exp2 per head), paid only by
    the blocks of rows (per head) whose largest |row max| reaches ``refine_at`` (log2 units;
    default :data:`REFINE_AT`): below it the two roundings agree to the accuracy rule and
    the forward's statistics are kept as they are.
    """
    refine_at = REFINE_AT if refine_at is None else refine_at
    if stats.shape[0] != 3:
        raise ValueError(f"stats must have 3 planes (flash_forward with visual_col), got "
                         f"shape {tuple(stats.shape)}")
    refined = stats[:2].clone()
    B, Hq, N, D = q.shape
    if q.numel() == 0 or query_index.shape[1] == 0:
        return refined
    q, k, _, index, strides, common, rows = _launch_args(
        q, k, stats, query_index, query_count, visual_index, visual_count)
    launch(_visual_stats_kernel, (rows, Hq, B),
        q, k, stats[0], stats[2], *index, refined[0], refined[1], *strides, N, Hq,
        Hq // k.shape[1], query_index.shape[1], visual_index.shape[1], default_scale(D, scale),
        window_arg(window, N), float(refine_at), HAS_WINDOW=window is not None,
        # 8 warps at every head dim: 4 warps at d = 64 sit at 128 registers on sm_80 and
        # spill 4 B with Triton 3.6 (bf16). One stage for the padded head dims: with the
        # gate's loads, two spill 4 B at d = 80/96 on sm_80 (full sweep), while one stage
        # spills 8 B at d = 128 there under Triton 3.6.
        CAUSAL=bool(causal), **{**common, "num_warps": 8,
                                "num_stages": 1 if block_d(D) != D else 2},
    )
    return refined


def visual_rest_heads(stats: torch.Tensor, refined: torch.Tensor) -> torch.Tensor:
    """Per-head attention mass on the non-visual keys, (B, Hq, N) float32.

    ``stats`` (3, B, Hq, N) from :func:`kernels.attention.flash_forward` with ``visual_col``
    (plane 2: log2 of the non-visual sum, shifted by the row max of plane 0) and ``refined``
    (2, B, Hq, N) from :func:`refine_visual_stats`: ``exp(lse_text − lse_all)``, a ratio, so a
    rest of 1e-7 keeps its digits where ``1 − Σ_v A`` cancels in float32.
    """
    if stats.shape[0] != 3:
        raise ValueError(f"stats must have 3 planes (flash_forward with visual_col), got "
                         f"shape {tuple(stats.shape)}")
    m, lt2 = stats[0], stats[2]
    ref, l2 = refined[0], refined[1]
    log2_rest = (m - torch.where(ref == float("-inf"), 0.0, ref)) + (lt2 - l2)
    # No text key (lt2 = -inf) or no key at all (ref = -inf): 0; a NaN stays NaN.
    return torch.where((lt2 == float("-inf")) | (ref == float("-inf")), 0.0,
                       torch.exp2(log2_rest))


def visual_rest_mass(rest_heads: torch.Tensor, query_index: torch.Tensor,
                     query_count: torch.Tensor) -> torch.Tensor:
    """Head-mean of :func:`visual_rest_heads` on the query rows, (B, Qmax) float32, 0 on
    padding rows (the ``rest`` bucket of the KL losses)."""
    B, Hq, _ = rest_heads.shape
    idx = query_index.to(torch.int64)[:, None, :].expand(B, Hq, -1)
    rows = torch.gather(rest_heads, 2, idx).mean(1)
    real = torch.arange(query_index.shape[1], device=rows.device)[None, :] < query_count[:, None]
    return torch.where(real, rows, 0.0)


def visual_maps_from_lse(q: torch.Tensor, k: torch.Tensor, stats: torch.Tensor,
                         query_index: torch.Tensor, query_count: torch.Tensor,
                         visual_index: torch.Tensor, visual_count: torch.Tensor,
                         causal: bool, scale: float | None, *,
                         out: torch.Tensor | None = None, weight: float = 1.0,
                         window: int | None = None,
                         dtype: torch.dtype | None = None) -> torch.Tensor:
    """Head-mean visual map ``A`` (B, Qmax, Vmax) from q, k and the forward's row
    statistics ``stats`` (P, B, Hq, N) (:func:`kernels.attention.flash_forward`, or
    :func:`kernels.attention.stats_from_lse` of an external lse). With P = 3 (the forward
    saw the visual columns) the statistics are first completed by
    :func:`refine_visual_stats`, which makes large scores (|s| ≥ 1e3) exact.

    A fresh map comes in ``dtype``, by default :func:`kernels._common.map_dtype` of q's
    dtype (bfloat16 for bfloat16 inputs, else float32), and ``weight * A`` is written to
    every entry, padding included, so the buffer needs no zero fill. With ``out`` (a
    contiguous float32 (B, Qmax, Vmax) buffer) the map is accumulated instead:
    ``out += weight * A`` on the real entries, and ``out`` is returned. No autograd here
    (see :mod:`kernels.autograd`).
    """
    require_triton()
    B, Hq, N, D = q.shape
    shape = (B, query_index.shape[1], visual_index.shape[1])
    accumulate = out is not None
    dtype = dtype or map_dtype(q.dtype)
    if out is None:
        if q.numel() == 0 or 0 in shape:
            return torch.zeros(shape, device=q.device, dtype=dtype)
        out = map_buffer(shape, dtype, q.device)
    if out.numel() == 0 or q.numel() == 0:
        return out
    if stats.shape[0] == 3:
        stats = refine_visual_stats(q, k, stats, query_index, query_count, visual_index,
                                    visual_count, causal, scale, window)
    q, k, stats, index, strides, common, rows = _launch_args(
        q, k, stats, query_index, query_count, visual_index, visual_count)
    launch(_visual_maps_kernel, (triton.cdiv(shape[2], common["BLOCK_V"]), rows, B),
        q, k, *stats, *index, out, *strides, N, Hq, Hq // k.shape[1], shape[1], shape[2],
        default_scale(D, scale), float(weight), window_arg(window, N),
        HAS_WINDOW=window is not None, ACCUMULATE=accumulate, CAUSAL=bool(causal),
        **common,
    )
    return out if accumulate else out.to(dtype)


def visual_row_terms(q: torch.Tensor, k: torch.Tensor, stats: torch.Tensor,
                     query_index: torch.Tensor, query_count: torch.Tensor,
                     visual_index: torch.Tensor, visual_count: torch.Tensor,
                     grad_maps: torch.Tensor, causal: bool, scale: float | None,
                     window: int | None = None) -> torch.Tensor:
    """Backward pre-pass: ``c`` (B, Hq, N) float32, ``c[b, h, i] = Σ_v P_h[i, v] G[r, v] / Hq``.

    ``G = grad_maps`` (B, Qmax, Vmax) in the gathered layout; ``i = query_index[b, r]``.
    Positions that are not query rows hold 0.
    """
    require_triton()
    B, Hq, N, D = q.shape
    c = torch.zeros((B, Hq, N), device=q.device, dtype=torch.float32)
    if grad_maps.numel() == 0 or q.numel() == 0:
        return c
    q, k, stats, index, strides, common, rows = _launch_args(
        q, k, stats, query_index, query_count, visual_index, visual_count)
    launch(_visual_row_terms_kernel, (Hq, rows, B),
        q, k, *stats, *index, map_operand(grad_maps), c, *strides, N, Hq,
        Hq // k.shape[1], grad_maps.shape[1], grad_maps.shape[2], default_scale(D, scale),
        window_arg(window, N), HAS_WINDOW=window is not None, CAUSAL=bool(causal),
        **{**common, "num_warps": 8},  # 4 warps spill at d = 64
    )
    return c


def inverse_index(index: torch.Tensor, count: torch.Tensor, seq_len: int) -> torch.Tensor:
    """(B, N) int32: the gathered slot of each position, -1 where the position is not gathered.

    ``index`` (B, W) ascending positions padded with 0 beyond ``count`` (B,).
    """
    B, W = index.shape
    inv = torch.full((B, seq_len + 1), -1, device=index.device, dtype=torch.int32)
    slot = torch.arange(W, device=index.device, dtype=torch.int32).expand(B, W)
    real = slot < count[:, None]
    # Padding slots write to the spare column seq_len, dropped below.
    target = torch.where(real, index.to(torch.int64),
                         torch.full_like(index, seq_len, dtype=torch.int64))
    inv.scatter_(1, target, torch.where(real, slot, torch.full_like(slot, -1)))
    return inv[:, :seq_len].contiguous()
