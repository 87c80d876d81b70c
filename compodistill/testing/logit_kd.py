"""Plain float32 references for the logit-distillation losses.

Definitions: docs/logit_kd.md, docs/stages.md and docs/CONVENTIONS.md.

Everything here materialises the full (B, N, V) probabilities in float32 and follows the
conventions line by line, so it is slow but obviously right. It imports only torch and is
independent of :mod:`compodistill.logit_kd.from_logits` and the fused paths, which are tested against it.
"""
from __future__ import annotations

import torch

__all__ = ["ref_logit_kd", "ref_rdist", "ref_llavadi_feature_mse", "ref_selected_positions"]


def ref_selected_positions(shape, labels=None, positions="response", attention_mask=None,
                           visual_mask=None) -> torch.Tensor:
    """(B, N) bool mask of the tokens the KD loss averages over (CONVENTIONS.md)."""
    B, N = shape
    if positions == "response":
        return labels != -100
    attn = (torch.ones(B, N, dtype=torch.bool) if attention_mask is None
            else attention_mask.bool().cpu())
    if positions == "all":
        return attn
    if positions == "visual":
        return visual_mask.bool().cpu() & attn
    raise ValueError(f"unknown positions {positions!r}")


def _zscore(z: torch.Tensor) -> torch.Tensor:
    # LLAVADI: per token over the vocab, population std, eps added to the std.
    mean = z.mean(-1, keepdim=True)
    std = z.std(-1, keepdim=True, unbiased=False)
    return (z - mean) / (std + 1e-6)


def ref_logit_kd(student_logits, teacher_logits, labels=None, *, loss="kl", beta=0.5,
                 temperature=1.0, positions="response", attention_mask=None, visual_mask=None,
                 zscore=False, compute_dtype=torch.float32) -> torch.Tensor:
    """Token-level logit distillation loss, float32, on the device of ``student_logits``.

    student_logits (B, N, Vs), teacher_logits (B, N, Vt >= Vs, truncated to Vs), labels (B, N)
    aligned with the logits (-100 ignored). ``loss``: ``kl`` = KL(p_t‖p_s), ``reverse_kl`` =
    KL(p_s‖p_t), ``jsd`` = β·KL(p_t‖m) + (1−β)·KL(p_s‖m) with m = β·p_t + (1−β)·p_s. The loss
    is multiplied by T² and averaged over the selected tokens; 0 (attached) when none.
    Gradients flow to the student logits only. ``compute_dtype=torch.float64`` gives the
    yardstick for ill-conditioned inputs (z-scoring nearly equal logits), where float32
    itself loses digits; the result is then float64.
    """
    Vs = student_logits.shape[-1]
    zs = student_logits.to(compute_dtype)
    zt = teacher_logits[..., :Vs].detach().to(compute_dtype)
    if zscore:
        zs, zt = _zscore(zs), _zscore(zt)
    lp_s = torch.log_softmax(zs / temperature, dim=-1)
    lp_t = torch.log_softmax(zt / temperature, dim=-1)
    p_s, p_t = lp_s.exp(), lp_t.exp()
    if loss == "kl":
        per_token = (p_t * (lp_t - lp_s)).sum(-1)
    elif loss == "reverse_kl":
        per_token = (p_s * (lp_s - lp_t)).sum(-1)
    elif loss == "jsd":
        # log m computed in log space; log(0) = -inf is harmless inside logaddexp.
        log_b = torch.log(torch.tensor(float(beta)))
        log_1mb = torch.log(torch.tensor(1.0 - float(beta)))
        lm = torch.logaddexp(log_b + lp_t, log_1mb + lp_s)
        per_token = (beta * (p_t * (lp_t - lm)).sum(-1)
                     + (1.0 - beta) * (p_s * (lp_s - lm)).sum(-1))
    else:
        raise ValueError(f"unknown loss {loss!r}")
    sel = ref_selected_positions(student_logits.shape[:2],
                                 None if labels is None else labels.cpu(), positions,
                                 attention_mask, visual_mask).to(per_token.device)
    per_token = per_token * temperature ** 2
    if int(sel.sum()) == 0:
        return per_token.sum() * 0.0
    return per_token[sel].sum() / sel.sum()


def ref_rdist(student_logits, teacher_logits, visual_mask) -> torch.Tensor:
    """LLaVA-KD relation distillation: per sample with visual tokens, Z = raw float32 logits at
    the visual positions (teacher truncated to the student vocab), R = Z Zᵀ,
    1 − cos(vec(R_s), vec(R_t)) with the norm product clamped at 1e-12; mean over those samples.
    """
    Vs = student_logits.shape[-1]
    losses = []
    for b in range(student_logits.shape[0]):
        m = visual_mask[b].bool()
        if not bool(m.any()):
            continue
        zs = student_logits[b][m].float()
        zt = teacher_logits[b][m][:, :Vs].detach().float()
        rs, rt = (zs @ zs.T).flatten(), (zt @ zt.T).flatten()
        cos = (rs * rt).sum() / torch.clamp(rs.norm() * rt.norm(), min=1e-12)
        losses.append(1.0 - cos)
    if not losses:
        return student_logits.float().sum() * 0.0
    return torch.stack(losses).mean()


def ref_llavadi_feature_mse(proj_h_s, h_t) -> torch.Tensor:
    """LLAVADI feature loss: plain mean squared error between proj(h_s) and h_t (float32)."""
    return ((proj_h_s.float() - h_t.detach().float()) ** 2).mean()
