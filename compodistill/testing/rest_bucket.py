"""float64 reference of the ``distribution="rest"`` KL-family losses (docs/visual_attention.md).

Builds the full attention matrix in float64 and takes the rest mass as the sum of P over the
non-visual keys (not ``1 − Σ``), so it keeps its digits when the rest is below 1e-6.
Imports only torch.
"""
from __future__ import annotations

import math

import torch


def ref_maps_rest_fp64(q, k, visual, causal=True, scale=None):
    """(A (B, N, Nv) over query rows = all positions, rest (B, N)) in float64; one image mask
    ``visual`` (N,) bool shared by the batch, no padding."""
    q, k = q.double(), k.double()
    b, hq, n, d = q.shape
    k = k.repeat_interleave(hq // k.shape[1], dim=1)
    s = q @ k.transpose(-1, -2) * (1.0 / math.sqrt(d) if scale is None else scale)
    if causal:
        s = s.masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), float("-inf"))
    p = torch.softmax(s, -1)
    return p[..., visual].mean(1), p[..., ~visual].sum(-1).mean(1)


def ref_rest_loss_fp64(a_s, r_s, a_t, r_t, allowed, loss, beta=0.5):
    """Mean over rows with an allowed visual column of the divergence on [A, rest]."""
    valid = allowed.any(-1)
    p_s = torch.cat([torch.where(allowed, a_s, 0.0), r_s[..., None]], -1)[valid]
    p_t = torch.cat([torch.where(allowed, a_t, 0.0), r_t[..., None]], -1)[valid]

    def kl(p, m):
        return torch.where(p > 0, p * (torch.log(p.clamp_min(1e-300)) - torch.log(m.clamp_min(1e-300))), 0.0).sum(-1)
    if loss == "kl":
        rows = kl(p_t, p_s)
    elif loss == "reverse_kl":
        rows = kl(p_s, p_t)
    else:
        mix = beta * p_t + (1 - beta) * p_s
        rows = beta * kl(p_t, mix) + (1 - beta) * kl(p_s, mix)
    return rows.mean()
