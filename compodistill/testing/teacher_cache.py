"""Plain float32 references for the teacher cache (docs/teacher_cache.md).

They materialise the full (B, N, V) probabilities and the dense maps, loop where that is
clearer, and import only torch, so the cache's writer and its chunked loss are tested
against definitions, not against themselves.
"""
from __future__ import annotations

import torch

__all__ = ["ref_topk_targets", "ref_topk_kd", "ref_map_topk", "ref_map_from_topk"]


def ref_topk_targets(teacher_logits: torch.Tensor, k: int, temperature: float = 1.0):
    """``(logp (..., k), index (..., k), rest (...,))`` of softmax(z / T): the k most likely ids
    (ties: the lower id first), their log-probabilities and 1 − their total probability."""
    p = torch.softmax(teacher_logits.double() / temperature, dim=-1)
    V = p.shape[-1]
    # Sort by probability, then by id: a stable descending order.
    order = torch.sort(p, dim=-1, descending=True, stable=True).indices[..., :k]
    top = p.gather(-1, order)
    rest = (1.0 - top.sum(-1)).clamp_min(0.0) if k < V else torch.zeros(p.shape[:-1],
                                                                         dtype=p.dtype)
    return top.log().float(), order, rest.float()


def ref_topk_kd(student_logits, teacher_logp, teacher_index, teacher_rest, labels=None, *,
                loss="kl", beta=0.5, temperature=1.0, positions="response",
                attention_mask=None, visual_mask=None) -> torch.Tensor:
    """KD over k + 1 buckets (k teacher ids and the rest), times T², mean over KD positions.

    ``student_logits`` (B, N, V); the teacher targets are (R, k) / (R,) rows of the KD
    positions in row-major order. The student's rest bucket is the sum of its probabilities
    over the ids not in the row's top-k; with k = V there is no rest bucket.
    """
    from .logit_kd import ref_selected_positions

    B, N, V = student_logits.shape
    sel = ref_selected_positions((B, N), None if labels is None else labels.cpu(), positions,
                                 attention_mask, visual_mask)
    p_s = torch.softmax(student_logits.float() / temperature, dim=-1)[sel.to(
        student_logits.device)]
    k = teacher_index.shape[-1]
    losses = []
    for r in range(p_s.shape[0]):
        ids = teacher_index[r].long()
        outside = torch.ones(V, dtype=torch.bool, device=p_s.device)
        outside[ids] = False
        q_s = p_s[r][ids]
        q_t = teacher_logp[r].float().exp()
        if k < V:
            q_s = torch.cat([q_s, p_s[r][outside].sum()[None]])
            q_t = torch.cat([q_t, teacher_rest[r].float()[None]])
        q_t = q_t.clamp_min(1e-38)
        if loss == "kl":
            d = (q_t * (q_t.log() - q_s.log())).sum()
        elif loss == "reverse_kl":
            d = (q_s * (q_s.log() - q_t.log())).sum()
        else:
            m = beta * q_t + (1 - beta) * q_s
            d = beta * (q_t * (q_t.log() - m.log())).sum() + (1 - beta) * (
                q_s * (q_s.log() - m.log())).sum()
        losses.append(d)
    if not losses:
        return student_logits.float().sum() * 0.0
    return torch.stack(losses).mean() * temperature ** 2


def ref_map_topk(maps: torch.Tensor, k: int):
    """Per row of a (Q, V) map: the k largest columns (ties: lower column first), their
    values and the rest of the row's mass."""
    order = torch.sort(maps.double(), dim=-1, descending=True, stable=True).indices[..., :k]
    values = maps.double().gather(-1, order)
    rest = (maps.double().sum(-1) - values.sum(-1)).clamp_min(0.0)
    return values.float(), order, rest.float()


def ref_map_from_topk(values, index, rest, allowed: torch.Tensor) -> torch.Tensor:
    """The dense (Q, V) map rebuilt from a top-k: kept columns get their values, the rest mass
    is spread evenly over the row's other allowed columns (``allowed`` (Q, V) bool)."""
    Q, V = allowed.shape
    out = torch.zeros(Q, V, dtype=torch.float64)
    for i in range(Q):
        free = allowed[i].clone()
        free[index[i].long()] = False
        if int(free.sum()):
            out[i, free] = float(rest[i]) / int(free.sum())
        out[i, index[i].long()] = values[i].double()
    return out.float()
