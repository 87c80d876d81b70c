"""Chunked pure-PyTorch visual maps: the CPU backend.

Computes the head-mean visual map of docs/visual_attention.md without ever holding an N×N score matrix:
the log-sum-exp of each gathered query row is accumulated over key chunks, then the
probabilities on the visual columns are rebuilt from it, one query chunk at a time.
The backward is written out (docs/visual_attention.md, "Gradient") and re-walks the same chunks, so
autograd never stores per-chunk score blocks either.

GQA without copying k: query heads ``h = kv * group + g`` share kv head ``kv``, so
q is viewed as (B, Hkv, group * rows, d) and multiplied by k (B, Hkv, keys, d)ᵀ.
"""
from __future__ import annotations

import torch

from .layout import VisualLayout

# Elements in one (B, H, rows, keys) score block. Small enough to stay in cache-sized
# chunks on CPU, large enough that the Python loop is not the bottleneck.
_BLOCK_BUDGET = 1 << 18
_KEY_CHUNK = 64


def _compute_dtype(q: torch.Tensor) -> torch.dtype:
    # fp16/bf16 inputs are upcast (maps are probabilities, compared in fp32); fp64 stays
    # fp64 so gradcheck can verify the hand-written backward.
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def _gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x (B, H, N, d), index (B, R) -> (B, H, R, d)."""
    b, h, _, d = x.shape
    return torch.gather(x, 2, index[:, None, :, None].expand(b, h, index.shape[1], d))


def _grouped_scores(q_rows: torch.Tensor, keys: torch.Tensor, scale: float) -> torch.Tensor:
    """q_rows (B, Hq, R, d) · keys (B, Hkv, K, d)ᵀ -> scores (B, Hq, R, K) without repeating k."""
    b, hq, r, d = q_rows.shape
    hkv = keys.shape[1]
    s = torch.matmul(q_rows.reshape(b, hkv, (hq // hkv) * r, d), keys.transpose(-1, -2))
    return s.view(b, hq, r, keys.shape[2]) * scale


def _grouped_matmul(w: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """w (B, Hq, R, K) · keys (B, Hkv, K, d) -> (B, Hq, R, d)."""
    b, hq, r, kk = w.shape
    hkv = keys.shape[1]
    out = torch.matmul(w.reshape(b, hkv, (hq // hkv) * r, kk), keys)
    return out.view(b, hq, r, keys.shape[-1])


def _grouped_key_grad(w: torch.Tensor, q_rows: torch.Tensor, hkv: int) -> torch.Tensor:
    """wᵀ · q_rows summed over the query heads of each kv head -> (B, Hkv, K, d)."""
    b, hq, r, kk = w.shape
    d = q_rows.shape[-1]
    wt = w.reshape(b, hkv, (hq // hkv) * r, kk).transpose(-1, -2)
    return torch.matmul(wt, q_rows.reshape(b, hkv, (hq // hkv) * r, d))


def _key_allowed(layout: VisualLayout, q_pos: torch.Tensor, q_ok: torch.Tensor,
                 k_pos: torch.Tensor, k_ok: torch.Tensor) -> torch.Tensor:
    """(B, 1, R, K) mask: row real, key real/not padding, causal order and window."""
    ok = q_ok[:, :, None] & k_ok[:, None, :]
    if layout.causal:
        ok = ok & (k_pos[:, None, :] <= q_pos[:, :, None])
    if layout.window is not None:
        ok = ok & (q_pos[:, :, None] - k_pos[:, None, :] < layout.window)
    return ok[:, None]


class _Plan:
    """Chunk sizes and the per-chunk index tensors shared by forward and backward."""

    def __init__(self, q: torch.Tensor, layout: VisualLayout):
        b, hq, n, _ = q.shape
        self.n = n
        self.q_rows = layout.query_index.shape[1]
        self.v_cols = layout.visual_index.shape[1]
        self.key_chunk = max(1, min(_KEY_CHUNK, n))
        widest = max(self.key_chunk, self.v_cols, 1)
        self.row_chunk = max(1, min(self.q_rows, _BLOCK_BUDGET // max(1, b * hq * widest)))
        self.key_mask = (layout.key_mask if layout.key_mask is not None
                         else torch.ones(b, n, dtype=torch.bool, device=q.device))
        # Visual keys are scored once, through the gathered k_vis product, both inside the
        # log-sum-exp and for their probabilities; the key chunks skip them. Scoring a key
        # twice with differently shaped matmuls rounds differently, and with large scores
        # (|s| ~ 1e3 and up) exp(s - lse) then drifts far from the softmax, even past 1.
        is_visual = torch.zeros(b, n + 1, dtype=torch.bool, device=q.device)
        slots = torch.where(layout.visual_valid, layout.visual_index, n)  # padding -> spare
        is_visual.scatter_(1, slots, True)
        self.nonvisual = self.key_mask & ~is_visual[:, :n]

    def row_chunks(self):
        for start in range(0, self.q_rows, self.row_chunk):
            yield slice(start, min(start + self.row_chunk, self.q_rows))

    def key_chunks(self, device: torch.device):
        for start in range(0, self.n, self.key_chunk):
            stop = min(start + self.key_chunk, self.n)
            yield start, stop, torch.arange(start, stop, device=device)


def _visual_scores(qc, k_vis, layout, q_pos, q_ok, scale):
    """Scores (B, Hq, R, Vmax) of a row chunk on the visual columns, -inf where masked."""
    vis_ok = layout.visual_valid
    if layout.key_mask is not None:  # visual tokens are never padding; kept for safety
        vis_ok = vis_ok & torch.gather(layout.key_mask, 1, layout.visual_index)
    allowed = _key_allowed(layout, q_pos, q_ok, layout.visual_index, vis_ok)
    return _grouped_scores(qc, k_vis, scale).masked_fill(~allowed, float("-inf"))


def _visual_probs(qc, k_vis, lse_c, layout, q_pos, q_ok, scale):
    """Probabilities (B, Hq, R, Vmax) of a row chunk on the visual columns (0 where masked)."""
    vis_ok = layout.visual_valid
    if layout.key_mask is not None:
        vis_ok = vis_ok & torch.gather(layout.key_mask, 1, layout.visual_index)
    allowed = _key_allowed(layout, q_pos, q_ok, layout.visual_index, vis_ok)
    s = _grouped_scores(qc, k_vis, scale)
    # Masked by position, not by s > -inf: a NaN score gives a NaN map (docs/visual_attention.md).
    return torch.where(allowed, _exp_minus_lse(s, lse_c), 0.0)


def _rest_mass(lse_c):
    """Head-mean mass on the non-visual keys (B, R), exp(lse_text − lse_all): no 1 − Σ."""
    return _head_rest(lse_c).mean(1)


def _head_rest(lse_c):
    """Per-head mass on the non-visual keys (B, Hq, R)."""
    log_rest = (lse_c[..., 2] - lse_c[..., 0]) + (lse_c[..., 3] - lse_c[..., 1])
    rest = torch.exp(log_rest)
    # No text key (lse_text = -inf) or no key at all: 0. NaN stays NaN.
    rest = torch.where((lse_c[..., 3] == float("-inf")) | (lse_c[..., 1] == float("-inf")),
                       0.0, rest)
    return rest


def _chunk_probs(qc, kf, start, stop, arange, lse_c, plan, layout, q_pos, q_ok, scale):
    """Probabilities (B, Hq, R, K) of a row chunk on the non-visual keys in [start, stop)."""
    b = qc.shape[0]
    k_pos = arange[None, :].expand(b, -1)
    allowed = _key_allowed(layout, q_pos, q_ok, k_pos, plan.nonvisual[:, start:stop])
    s = _grouped_scores(qc, kf[:, :, start:stop], scale)
    return torch.where(allowed, _exp_minus_lse(s, lse_c), 0.0)


def _row_lse(qc, kf, k_vis, plan, layout, q_pos, q_ok, scale):
    """Log-sum-exp (B, Hq, R, 4) of a row chunk over all allowed keys (as row max and log of
    the shifted sum, see :func:`_exp_minus_lse`), then the same over the non-visual keys
    alone (planes 2, 3: the rest mass is their ratio): the visual keys through
    the gathered product (scored exactly as :func:`_visual_probs` scores them), the other
    keys by key chunks."""
    b, hq, r, _ = qc.shape

    def score_blocks():
        if k_vis.shape[2]:
            yield True, _visual_scores(qc, k_vis, layout, q_pos, q_ok, scale)
        for start, stop, arange in plan.key_chunks(qc.device):
            k_pos = arange[None, :].expand(b, -1)
            allowed = _key_allowed(layout, q_pos, q_ok, k_pos, plan.nonvisual[:, start:stop])
            s = _grouped_scores(qc, kf[:, :, start:stop], scale)
            yield False, s.masked_fill(~allowed, float("-inf"))

    full = _RunningLse(b, hq, r, qc)
    text = _RunningLse(b, hq, r, qc)  # the non-visual keys alone: the rest mass
    for is_visual, s in score_blocks():
        full.add(s)
        if not is_visual:
            text.add(s)
    return torch.stack([*full.result(), *text.result()], dim=-1)


class _RunningLse:
    """Online log-sum-exp over score blocks, kept as (row max, log of the shifted sum)."""

    def __init__(self, b, hq, r, like):
        self.max = torch.full((b, hq, r), float("-inf"), device=like.device, dtype=like.dtype)
        self.sum = torch.zeros((b, hq, r), device=like.device, dtype=like.dtype)

    def add(self, s):
        new_max = torch.maximum(self.max, s.amax(-1))
        # Only an all-masked max (-inf) is replaced: a NaN or inf score must reach the maps.
        safe_max = torch.where(new_max == float("-inf"), 0.0, new_max)
        self.sum = (self.sum * torch.exp(self.max - safe_max)
                    + torch.exp(s - safe_max[..., None]).sum(-1))
        self.max = new_max

    def result(self):
        safe_max = torch.where(self.max == float("-inf"), 0.0, self.max)
        # log(0) = -inf for rows with no allowed key (their probabilities are masked to 0).
        return safe_max, torch.log(self.sum)


def _exp_minus_lse(s, lse_c):
    """exp(s − lse) with lse kept as (row max, log of the shifted sum), (B, Hq, R, 2).

    Folding the two into one number rounds it to the ulp of the max (1e-3 at |s| ~ 1e4),
    a relative error the probabilities would inherit; s − max is exact instead.
    """
    return torch.exp((s - lse_c[..., 0, None]) - lse_c[..., 1, None])


class ChunkedVisualMaps(torch.autograd.Function):
    """maps = head-mean P on (query rows × visual columns) and rest (B, Qmax), the head-mean
    mass on the other keys; exact dq, dk in backward."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, layout: VisualLayout, scale: float):
        qf, kf = q.to(_compute_dtype(q)), k.to(_compute_dtype(q))
        plan = _Plan(q, layout)
        q_rows = _gather_rows(qf, layout.query_index)
        k_vis = _gather_rows(kf, layout.visual_index)
        hq = q.shape[1]
        maps = torch.zeros(layout.map_shape, dtype=qf.dtype, device=q.device)
        rest = torch.zeros(layout.map_shape[:2], dtype=qf.dtype, device=q.device)
        lse = torch.empty(q.shape[0], hq, plan.q_rows, 4, dtype=qf.dtype, device=q.device)
        q_valid = layout.query_valid
        for rows in plan.row_chunks():
            qc, q_pos, q_ok = q_rows[:, :, rows], layout.query_index[:, rows], q_valid[:, rows]
            lse_c = _row_lse(qc, kf, k_vis, plan, layout, q_pos, q_ok, scale)
            lse[:, :, rows] = lse_c
            p = _visual_probs(qc, k_vis, lse_c, layout, q_pos, q_ok, scale)
            maps[:, rows] = p.sum(1) / hq
            rest[:, rows] = _rest_mass(lse_c)
        ctx.save_for_backward(q, k, lse)
        ctx.layout, ctx.scale = layout, scale
        return maps, rest

    @staticmethod
    def backward(ctx, grad_maps: torch.Tensor, grad_rest: torch.Tensor):
        q, k, lse = ctx.saved_tensors
        layout, scale = ctx.layout, ctx.scale
        qf, kf = q.to(_compute_dtype(q)), k.to(_compute_dtype(q))
        b, hq, n, d = q.shape
        hkv = k.shape[1]
        plan = _Plan(q, layout)
        q_rows = _gather_rows(qf, layout.query_index)
        k_vis = _gather_rows(kf, layout.visual_index)
        dq_rows = torch.zeros_like(q_rows)
        dk = torch.zeros_like(kf)
        dk_vis = torch.zeros_like(k_vis)
        # ∂L/∂P_h on visual columns (docs/visual_attention.md); γ/Hq on every other key, the
        # rest's gradient, kept apart: folding it into G (G − γ) cancels in float32 when γ is
        # large (forward KL with a rest of 1e-8).
        g_scaled = grad_maps.to(qf.dtype) / hq
        gamma = (torch.zeros(layout.map_shape[:2], dtype=qf.dtype, device=q.device)
                 if grad_rest is None else grad_rest.to(qf.dtype)) / hq
        q_valid = layout.query_valid
        for rows in plan.row_chunks():
            qc, q_pos, q_ok = q_rows[:, :, rows], layout.query_index[:, rows], q_valid[:, rows]
            lse_c = lse[:, :, rows]
            # Visual columns: dS = P·(G/Hq − c).
            p_vis = _visual_probs(qc, k_vis, lse_c, layout, q_pos, q_ok, scale)
            w = p_vis * g_scaled[:, None, rows]
            gam = gamma[:, None, rows]
            # c_h[i] = Σ_v P·G/Hq + r_h·γ/Hq, the softmax row term
            c = w.sum(-1) + _head_rest(lse_c) * gam
            w = w - p_vis * c[..., None]
            dq_rows[:, :, rows] += scale * _grouped_matmul(w, k_vis)
            dk_vis += scale * _grouped_key_grad(w, qc, hkv)
            # Every other allowed key: dS = P·(γ/Hq − c).
            for start, stop, arange in plan.key_chunks(q.device):
                p = _chunk_probs(qc, kf, start, stop, arange, lse_c, plan, layout, q_pos, q_ok,
                                 scale)
                wc = p * (c - gam)[..., None]
                dq_rows[:, :, rows] -= scale * _grouped_matmul(wc, kf[:, :, start:stop])
                dk[:, :, start:stop] -= scale * _grouped_key_grad(wc, qc, hkv)
        dq = torch.zeros_like(qf)
        dq.scatter_add_(2, layout.query_index[:, None, :, None].expand(b, hq, -1, d), dq_rows)
        dk.scatter_add_(2, layout.visual_index[:, None, :, None].expand(b, hkv, -1, d), dk_vis)
        return dq.to(q.dtype), dk.to(k.dtype), None, None


def chunked_visual_maps(q: torch.Tensor, k: torch.Tensor, layout: VisualLayout,
                        scale: float) -> torch.Tensor:
    """Visual maps (B, Qmax, Vmax), float32 (float64 for float64 input), from q (B, Hq, N, d), k (B, Hkv, N, d)."""
    return ChunkedVisualMaps.apply(q, k, layout, scale)[0]


def chunked_visual_maps_with_rest(q: torch.Tensor, k: torch.Tensor, layout: VisualLayout,
                                  scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(maps, rest): rest (B, Qmax) is the head-mean mass on the non-visual keys,
    ``exp(lse_text − lse_all)`` per head (0 on padding rows), differentiable."""
    return ChunkedVisualMaps.apply(q, k, layout, scale)
