"""Logit KD against cached top-k teacher targets, chunked over tokens (docs/teacher_cache.md).

The teacher is a distribution over k + 1 buckets: its k most likely tokens (their
log-probabilities at temperature T) and one *rest* bucket holding the remaining mass. The
student's distribution is folded onto the same buckets: its log-probabilities at the k
token ids, and the log of its mass on every other id. KL / reverse KL / JSD are then taken
over the buckets, times T², averaged over the KD positions. With k = vocabulary the rest
bucket is empty and dropped, and the loss is the online KD loss.

The student's (tokens × vocab) logits are never held for more than one chunk of rows: each
chunk runs under activation checkpointing, so the backward recomputes its logits.
"""
from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from ..logit_kd.from_logits import (IGNORE_INDEX, check_kd_options, chunk_rows,
                                    selected_rows)

__all__ = ["topk_distillation_loss", "bucket_divergence", "LOG_TINY"]

# log of the smallest normal float32: a teacher rest mass that underflowed to 0 is clamped
# here, so reverse KL / JSD stay finite (the mass it stands for is below 1e-38).
LOG_TINY = -87.3


def bucket_divergence(lp_s: torch.Tensor, lp_t: torch.Tensor, loss: str, beta: float
                      ) -> torch.Tensor:
    """Per-row divergence of two distributions given as log-probabilities over buckets."""
    lp_t = lp_t.clamp_min(LOG_TINY)
    if loss == "kl":
        return (lp_t.exp() * (lp_t - lp_s)).sum(-1)
    if loss == "reverse_kl":
        return (lp_s.exp() * (lp_s - lp_t)).sum(-1)
    log_b = torch.tensor(float(beta), device=lp_s.device).log()
    log_1mb = torch.tensor(1.0 - float(beta), device=lp_s.device).log()
    lm = torch.logaddexp(log_b + lp_t, log_1mb + lp_s)
    return (beta * (lp_t.exp() * (lp_t - lm)).sum(-1)
            + (1.0 - beta) * (lp_s.exp() * (lp_s - lm)).sum(-1))


def _chunk_terms(h, w, b, kd_here, t_logp, t_idx, t_rest, labels, kd_scale, ce_scale, opts):
    """Weighted KD and CE sums of one chunk of rows (float32)."""
    z = (h @ w.T if b is None else torch.addmm(b, h, w.T)).float()
    ce = z.new_zeros(())
    if labels is not None:
        ce_rows = labels != IGNORE_INDEX
        if bool(ce_rows.any()):
            ce = (torch.nn.functional.cross_entropy(z[ce_rows], labels[ce_rows],
                                                    reduction="none") * ce_scale[ce_rows]).sum()
    kd = z.new_zeros(())
    if t_logp is not None and t_logp.shape[0]:
        a = z[kd_here] / opts["temperature"]
        lse = torch.logsumexp(a, dim=-1, keepdim=True)
        lp_s = a.gather(-1, t_idx) - lse
        lp_t = t_logp.float()
        if t_idx.shape[-1] < a.shape[-1]:  # the rest bucket
            rest_s = torch.logsumexp(a.scatter(-1, t_idx, float("-inf")), dim=-1,
                                     keepdim=True) - lse
            lp_s = torch.cat([lp_s, rest_s], dim=-1)
            lp_t = torch.cat([lp_t, t_rest.float().clamp_min(0).log()[:, None]], dim=-1)
        kd = (bucket_divergence(lp_s, lp_t, opts["loss"], opts["beta"]) * kd_scale).sum()
    return kd, ce


def topk_distillation_loss(h_s: torch.Tensor, W_s: torch.Tensor, labels: torch.Tensor | None,
                           teacher_logp: torch.Tensor, teacher_index: torch.Tensor,
                           teacher_rest: torch.Tensor, *, b_s: torch.Tensor | None = None,
                           loss: str = "kl", beta: float = 0.5, temperature: float = 1.0,
                           positions: str = "response",
                           attention_mask: torch.Tensor | None = None,
                           visual_mask: torch.Tensor | None = None, ce_weight: float = 0.0,
                           kd_weight: float = 1.0, chunk_size: int | None = None,
                           return_terms: bool = False):
    """``kd_weight · KD + ce_weight · CE`` from student hidden states and cached teacher top-k.

    Args:
        h_s: (B, N, d) or (T, d) student hidden states; ``W_s`` (V, d), ``b_s`` (V,).
        labels: aligned labels (position i predicts token i + 1), -100 ignored.
        teacher_logp: (R, k) teacher log-probabilities at ``temperature`` of its top-k ids, one
            row per KD position in row-major order (R = number of KD positions).
        teacher_index: (R, k) int token ids in [0, V); ``teacher_rest`` (R,) the teacher's
            remaining probability mass.
        loss, beta, temperature, positions, attention_mask, visual_mask, ce_weight,
        kd_weight, return_terms: as in :func:`compodistill.linear_distillation_loss`.
        chunk_size: rows per chunk (default: a 64 MiB working set on the CPU, 512 MiB CUDA).
    """
    check_kd_options(loss, beta, temperature, positions)
    if h_s.dim() not in (2, 3) or W_s.dim() != 2 or W_s.shape[1] != h_s.shape[-1]:
        raise ValueError(f"expected h_s (B, N, d) or (T, d) and W_s (V, d); got h_s "
                         f"{tuple(h_s.shape)}, W_s {tuple(W_s.shape)}")
    if ce_weight < 0 or kd_weight < 0:
        raise ValueError(f"ce_weight and kd_weight must be >= 0, got {ce_weight}, {kd_weight}")
    lead, device, V = tuple(h_s.shape[:-1]), h_s.device, W_s.shape[0]
    kd_sel = selected_rows(lead, labels, positions, attention_mask, visual_mask, device)
    n_kd = int(kd_sel.sum())
    if teacher_logp.dim() != 2 or teacher_index.shape != teacher_logp.shape or \
            tuple(teacher_rest.shape) != (teacher_logp.shape[0],):
        raise ValueError(f"teacher_logp and teacher_index must be (R, k) and teacher_rest (R,); "
                         f"got {tuple(teacher_logp.shape)}, {tuple(teacher_index.shape)}, "
                         f"{tuple(teacher_rest.shape)}")
    if kd_weight > 0 and teacher_logp.shape[0] != n_kd:
        raise ValueError(f"the teacher targets have {teacher_logp.shape[0]} rows but the batch "
                         f"has {n_kd} KD positions ({positions!r})")
    if teacher_logp.shape[1] > V:
        raise ValueError(f"top-k of {teacher_logp.shape[1]} is more than the student's vocabulary "
                         f"{V}")
    if n_kd and (int(teacher_index.min()) < 0 or int(teacher_index.max()) >= V):
        raise ValueError(f"teacher_index must be in [0, {V})")
    flat_labels = None if labels is None else labels.reshape(-1).to(device)
    ce_sel = (flat_labels != IGNORE_INDEX) if ce_weight > 0 else torch.zeros_like(kd_sel)
    if kd_weight == 0:
        kd_sel_used = torch.zeros_like(kd_sel)
    else:
        kd_sel_used = kd_sel
    rows = (kd_sel_used | ce_sel).nonzero().squeeze(1)
    # Row r of the teacher targets belongs to the r-th KD position.
    kd_rank = torch.cumsum(kd_sel.long(), 0) - 1
    h = h_s.reshape(-1, h_s.shape[-1])
    k = teacher_logp.shape[1]
    if chunk_size is None:
        chunk_size = chunk_rows(V * 4 * 6 + k * 16, None if device.type != "cuda" else 2**29,
                                device)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    n_ce = int(ce_sel.sum())
    opts = dict(loss=loss, beta=float(beta), temperature=float(temperature))
    kd_total = h.new_zeros((), dtype=torch.float32)
    ce_total = h.new_zeros((), dtype=torch.float32)
    kd_w = kd_weight * float(temperature) ** 2 / max(n_kd, 1)
    for s in range(0, rows.numel(), chunk_size):
        idx = rows[s:s + chunk_size]
        here = kd_sel_used[idx]
        t_rows = kd_rank[idx][here]
        lab = None
        ce_scale = None
        if ce_weight > 0:
            lab = torch.where(ce_sel[idx], flat_labels[idx], IGNORE_INDEX)
            if bool(((lab != IGNORE_INDEX) & ((lab < 0) | (lab >= V))).any()):
                raise ValueError(f"labels must be -100 or in [0, {V}) for the CE term")
            ce_scale = torch.full((idx.numel(),), ce_weight / max(n_ce, 1), device=device)
        kd_scale = torch.full((int(here.sum()),), kd_w, device=device)
        t = (teacher_logp[t_rows].to(device), teacher_index[t_rows].to(device).long(),
             teacher_rest[t_rows].to(device)) if kd_weight > 0 else (None, None, None)
        kd, ce = checkpoint(_chunk_terms, h[idx], W_s, b_s, here, *t, lab, kd_scale, ce_scale,
                            opts, use_reentrant=False)
        kd_total = kd_total + kd
        ce_total = ce_total + ce
    total = kd_total + ce_total
    if not rows.numel():  # attached to the graph, like the online loss
        total = total + h_s.sum() * 0.0
    if not return_terms:
        return total
    return total, {"ce": (ce_total.detach() / ce_weight if ce_weight else ce_total.detach() * 0),
                   "kd": (kd_total.detach() / kd_weight if kd_weight else kd_total.detach() * 0)}
