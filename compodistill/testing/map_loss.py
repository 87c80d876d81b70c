"""Independent reference of the visual-map losses (docs/visual_attention.md, "Alignment loss").

One sample at a time on its real ``|Q(b)| × Nv(b)`` block, written from the formulas of the
docs (no masks over padding, no fused passes), in float64 or float32; gradients come from
autograd. The kernels of compodistill/kernels/map_loss.py and the PyTorch backend of
compodistill/visual_attention/map_losses.py are both checked against it. Imports only torch.
"""
from __future__ import annotations

import torch

_TINY = torch.finfo(torch.float32).tiny


def _cos_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return 1.0 - (a * b).sum(-1) / torch.clamp_min(a.norm(dim=-1) * b.norm(dim=-1), 1e-12)


def _kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    log_ratio = torch.log(p.clamp_min(1e-30)) - torch.log(q.clamp_min(1e-30))
    return torch.where(p > 0, p * log_ratio, 0.0).sum(-1)


def _distribution(a, allowed, distribution, rest):
    a = torch.where(allowed & (a >= _TINY), a, 0.0)
    total = a.sum(-1)
    if distribution == "renorm":
        return a / total.clamp_min(1e-30)[:, None]
    if rest is None:
        rest = (1.0 - total).clamp_min(0.0)
    else:
        rest = torch.where(rest >= _TINY, rest, 0.0)
    return torch.cat([a, rest[:, None]], -1)


def _sample_loss(s, t, allowed, loss, cosine, distribution, beta, s_rest, t_rest):
    valid = allowed.any(-1)
    if loss == "mse":
        return ((s - t) ** 2).mean()
    if loss == "cosine" and cosine == "flat":
        return _cos_distance(s.reshape(-1), t.reshape(-1))
    if loss == "cosine" and cosine == "row":
        return _cos_distance(s[valid], t[valid]).mean()
    if loss == "cosine":  # pooled: μ + σ filter, column means over the kept rows
        def threshold(a):
            a = a.detach().reshape(-1)
            sigma = a.std() if a.numel() > 1 else a.new_zeros(())
            return a.mean() + sigma
        mask = (s.detach() <= threshold(s)) & (t <= threshold(t)) & (t != 0) & allowed
        mask = mask.to(s.dtype)
        count = mask.sum(0).clamp_min(1)
        return _cos_distance((mask * s).sum(0) / count, (mask * t).sum(0) / count)
    p_s = _distribution(s, allowed, distribution, s_rest)[valid]
    p_t = _distribution(t, allowed, distribution, t_rest)[valid]
    if loss == "kl":
        rows = _kl(p_t, p_s)
    elif loss == "reverse_kl":
        rows = _kl(p_s, p_t)
    else:
        mix = beta * p_t + (1 - beta) * p_s
        rows = beta * _kl(p_t, mix) + (1 - beta) * _kl(p_s, mix)
    return rows.mean()


def ref_map_loss(student, target, query_count, visual_count, allowed, *, loss="cosine",
                 cosine="flat", distribution="renorm", beta=0.5, student_rest=None,
                 target_rest=None, dtype=torch.float64, weights=None):
    """Per-sample loss (B,) in ``dtype`` and the gradients of ``Σ_b weights[b] · D_b``
    (weights default 1) with respect to the student maps and, for ``distribution="rest"``
    with a student rest, that rest: ``(values, grad_maps, grad_rest or None)``.

    ``allowed`` (B, Qmax, Vmax) bool is the layout's allowed mask. A non-finite entry in a
    sample's real block (or rest) gives NaN; a sample without a valid row gives 0.
    """
    uses_rest = distribution == "rest" and loss in ("kl", "reverse_kl", "jsd")
    s_all = student.detach().to(dtype).requires_grad_()
    r_all = student_rest.detach().to(dtype).requires_grad_() \
        if uses_rest and student_rest is not None else None
    values = []
    for b in range(student.shape[0]):
        q, v = int(query_count[b]), int(visual_count[b])
        s, t = s_all[b, :q, :v], target[b, :q, :v].detach().to(dtype)
        al = allowed[b, :q, :v]
        rs = None if r_all is None else r_all[b, :q]
        rt = None if not uses_rest or target_rest is None else target_rest[b, :q].to(dtype)
        if not bool(al.any()):
            values.append(s_all.new_zeros(()))
            continue
        finite = [s, t] + ([x for x in (rs, rt) if x is not None] if uses_rest else [])
        if not all(bool(torch.isfinite(x.detach()).all()) for x in finite):
            values.append(s_all.new_tensor(float("nan")))
            continue
        values.append(_sample_loss(s, t, al, loss, cosine, distribution, beta, rs, rt))
    values = torch.stack(values)
    w = torch.ones_like(values) if weights is None else weights.to(dtype)
    wanted = [s_all] + ([r_all] if r_all is not None else [])
    grads = torch.autograd.grad(torch.where(torch.isnan(values), 0.0, values * w).sum(),
                                wanted, allow_unused=True)
    grads = [torch.zeros_like(x) if g is None else g for x, g in zip(wanted, grads)]
    return values.detach(), grads[0], grads[1] if r_all is not None else None
