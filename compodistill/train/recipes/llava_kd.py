"""LLaVA-KD (docs/stages.md): ``CE + KL_res + KL_vis + RDist``, stages DPT → SFT → DFT.

- CE and KL_res (KD on the response tokens) and KL_vis (KD on the image positions) come from the
  fused :func:`~compodistill.logit_kd.linear.linear_distillation_loss`, so no (tokens × vocab) logits.
- RDist (:func:`linear_rdist_loss`) needs ``R = Z Zᵀ`` for the logits Z of the visual positions.
  With ``Z = H Wᵀ + b`` that is ``R = [H 1] Gram [H 1]ᵀ`` where ``Gram = [W b]ᵀ [W b]`` is a
  (d+1) × (d+1) matrix summed over vocab chunks of the lm_head. So only the visual hidden
  states are gathered, and the (Nv × V) logits exist for neither model, not even per chunk.
  The teacher's Gram (and a frozen student lm_head's) is computed once and cached.
- Visual positions (KL_vis, RDist) are the family's image/video placeholder tokens
  (:func:`.family.visual_mask`); both forwards get the batch's family inputs.
"""
from __future__ import annotations

import torch
from torch import nn

from ...logit_kd.linear import linear_distillation_loss
from ..stages import HiddenStates, lm_head, lm_loss
from .base import Recipe, StageParts
from .facts import LLAVA_KD as FACTS
from .family import RecipeLosses

__all__ = ["LlavaKDRecipe", "LlavaKDLosses", "linear_rdist_loss", "lm_head_gram"]


def lm_head_gram(weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                 vocab_chunk: int = 8192) -> torch.Tensor:
    """``[W b]ᵀ [W b]`` in float32, (d+1) × (d+1), accumulated ``vocab_chunk`` rows at a time.

    Differentiable w.r.t. ``weight``/``bias`` (autograd then keeps each float32 chunk, i.e. one
    float32 copy of the weight); pass frozen weights under ``no_grad`` to keep nothing.
    """
    if vocab_chunk < 1:
        raise ValueError(f"vocab_chunk must be >= 1, got {vocab_chunk}")
    d = weight.shape[1]
    gram = torch.zeros(d + 1, d + 1, dtype=torch.float32, device=weight.device)
    for v0 in range(0, weight.shape[0], vocab_chunk):
        w = weight[v0:v0 + vocab_chunk].float()
        b = (torch.zeros(w.shape[0], 1, dtype=torch.float32, device=w.device) if bias is None
             else bias[v0:v0 + vocab_chunk].float()[:, None])
        block = torch.cat([w, b], 1)
        gram = gram + block.T @ block  # out of place: autograd sees every chunk
    return gram


def _visual_rows(h: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, m, d+1) float32 ``[h 1]`` rows of the visual positions (ascending, zero-padded to the
    largest count m) and the per-sample counts (B,)."""
    counts = mask.sum(1)
    m = int(counts.max()) if counts.numel() else 0
    order = torch.sort((~mask).to(torch.int8), dim=1, stable=True).indices[:, :m]
    rows = torch.gather(h, 1, order[..., None].expand(-1, -1, h.shape[-1])).float()
    rows = torch.cat([rows, torch.ones_like(rows[..., :1])], -1)
    valid = torch.arange(m, device=h.device)[None] < counts[:, None]
    return rows * valid[..., None], counts  # padding rows are 0, so their R entries are 0


def linear_rdist_loss(h_s: torch.Tensor, W_s: torch.Tensor, h_t: torch.Tensor,
                      W_t: torch.Tensor, visual_mask: torch.Tensor, *,
                      b_s: torch.Tensor | None = None, b_t: torch.Tensor | None = None,
                      attention_mask: torch.Tensor | None = None, vocab_chunk: int = 8192,
                      gram_s: torch.Tensor | None = None,
                      gram_t: torch.Tensor | None = None) -> torch.Tensor:
    """RDist from hidden states and lm_head weights; equals :func:`~compodistill.logit_kd.from_logits.
    rdist_loss` on the full logits (docs/stages.md, CONVENTIONS.md), a float32 scalar.

    Per sample with visual tokens: ``R = Z Zᵀ`` with Z the raw logits of the visual positions
    (teacher vocab truncated to the student's), loss ``1 − cos(vec(R_s), vec(R_t))`` (norm
    product clamped at 1e-12), mean over those samples; 0 (attached) when there are none.

    Args:
        h_s: (B, N, d_s) student last hidden states; W_s (Vs, d_s), b_s (Vs,) its lm_head.
        h_t: (B, N, d_t) teacher hidden states; W_t (Vt >= Vs, d_t), b_t. No teacher gradient.
        visual_mask: (B, N) bool, the image positions (ANDed with ``attention_mask``).
        vocab_chunk: lm_head rows per step when building the Gram matrices.
        gram_s, gram_t: precomputed :func:`lm_head_gram` results (the teacher's truncated to Vs).
    """
    if h_s.dim() != 3 or h_t.shape[:2] != h_s.shape[:2]:
        raise ValueError(f"need h_s (B, N, d_s) and h_t (B, N, d_t), got {tuple(h_s.shape)}, "
                         f"{tuple(h_t.shape)}")
    if W_t.shape[0] < W_s.shape[0]:
        raise ValueError(f"teacher vocab ({W_t.shape[0]}) is smaller than the student's "
                         f"({W_s.shape[0]}); it is truncated, never padded")
    vs = W_s.shape[0]
    mask = visual_mask.to(h_s.device).bool()
    if attention_mask is not None:
        mask = mask & attention_mask.to(h_s.device).bool()
    if gram_s is None:
        gram_s = lm_head_gram(W_s, b_s, vocab_chunk=vocab_chunk)
    if gram_t is None:
        with torch.no_grad():
            gram_t = lm_head_gram(W_t[:vs], None if b_t is None else b_t[:vs],
                                  vocab_chunk=vocab_chunk)
    rows_s, counts = _visual_rows(h_s, mask)
    with torch.no_grad():
        rows_t, _ = _visual_rows(h_t.detach(), mask)
        r_t = rows_t @ gram_t.detach().to(h_s.device) @ rows_t.transpose(1, 2)
    r_s = rows_s @ gram_s @ rows_s.transpose(1, 2)
    norms = torch.clamp(r_s.flatten(1).norm(dim=1) * r_t.flatten(1).norm(dim=1), min=1e-12)
    cos = (r_s * r_t).sum((1, 2)) / norms
    has = counts > 0
    if not bool(has.any()):
        return h_s.float().sum() * 0.0
    return (1.0 - cos[has]).mean()


class LlavaKDLosses(RecipeLosses):
    """``{"lm", "kd", "kd_vis", "rdist"}`` for one LLaVA-KD stage (terms with weight 0 skipped).

    ``kd`` is KL_res (response positions) and ``kd_vis`` KL_vis (visual positions) whatever
    ``config.kd.positions`` says; loss / temperature / beta come from ``config.kd``.
    """

    TEACHER_TERMS = ("kd", "kd_vis", "rdist")

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._gram_cache: dict = {}

    def _gram(self, weight, bias, *, truncate: int | None = None) -> torch.Tensor:
        """Gram of an lm_head; cached while the weights are frozen and unchanged."""
        trainable = weight.requires_grad or (bias is not None and bias.requires_grad)
        if truncate is not None:
            weight, bias = weight[:truncate], None if bias is None else bias[:truncate]
        chunk = self.config.llava_kd.vocab_chunk
        if trainable:
            return lm_head_gram(weight, bias, vocab_chunk=chunk)
        key = (weight.data_ptr(), weight._version, tuple(weight.shape), weight.device)
        if key not in self._gram_cache:
            with torch.no_grad():
                self._gram_cache[key] = lm_head_gram(weight, bias, vocab_chunk=chunk)
        return self._gram_cache[key]

    def __call__(self, prepared: nn.Module, batch: dict) -> dict:
        w = self.stage.weights
        labels, h_t, h_s, _ = self.forwards(prepared, batch)
        head_s = lm_head(self.student)
        if not self.need_teacher:  # SFT: CE only
            return {"lm": lm_loss(h_s, head_s, labels)}
        head_t = lm_head(self.teacher)
        common = self.kd_options(batch, head_s, head_t)
        args = (h_s, head_s.weight, h_t, head_t.weight, labels)
        terms = {}
        if w.lm:
            terms["lm"] = linear_distillation_loss(*args, ce_weight=1.0, kd_weight=0.0, **common)
        if w.kd:
            terms["kd"] = linear_distillation_loss(*args, **{**common, "positions": "response"})
        if w.kd_vis:
            terms["kd_vis"] = linear_distillation_loss(*args, **{**common, "positions": "visual"})
        if w.rdist:
            vs = head_s.weight.shape[0]
            terms["rdist"] = linear_rdist_loss(
                h_s, head_s.weight, h_t, head_t.weight, common["visual_mask"],
                attention_mask=batch["attention_mask"], gram_s=self._gram(head_s.weight, head_s.bias),
                gram_t=self._gram(head_t.weight, head_t.bias, truncate=vs))
        return terms


class LlavaKDRecipe(Recipe):
    """LLaVA-KD: :class:`LlavaKDLosses` on the plain student (no TAF)."""

    name = "llava_kd"
    facts = FACTS

    def stage_parts(self, trainer, student, params, stage, stage_dir) -> StageParts:
        losses = LlavaKDLosses(student, trainer.teacher, stage, trainer.config, trainer.acc)
        return StageParts(HiddenStates(student), params, losses)
