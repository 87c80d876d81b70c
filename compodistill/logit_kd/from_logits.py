"""Logit distillation losses computed from logits (docs/logit_kd.md, docs/stages.md, CONVENTIONS.md).

:func:`logit_distillation_loss` (KD: kl / reverse_kl / jsd, temperature, z-scoring, response /
all / visual positions) and :func:`rdist_loss` (LLaVA-KD relation distillation).

Only the selected tokens are processed, in chunks of tokens, so the float32 working copies are
bounded by the chunk, never (tokens × vocab) for the whole batch. The loss and its gradient
w.r.t. the student logits are computed together in the forward pass (Triton on CUDA, float32
PyTorch otherwise); backward only scales the stored gradient. The teacher is a target: it
never receives a gradient.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .._backend import load_kernel_module, use_triton

__all__ = ["logit_distillation_loss", "shift_labels", "rdist_loss"]

LOSSES = ("kl", "reverse_kl", "jsd")
POSITIONS = ("response", "all", "visual")
IGNORE_INDEX = -100
# Working memory for one chunk of rows when the caller gives no chunk size.
DEFAULT_BUDGET_BYTES = {"cuda": 512 * 2**20, "cpu": 64 * 2**20}


def shift_labels(labels: torch.Tensor) -> torch.Tensor:
    """Hugging Face labels (B, N) -> labels aligned with the logits: ``labels[:, 1:]`` padded
    with -100 on the right, so ``out[b, i]`` is the token ``logits[b, i]`` predicts."""
    if not isinstance(labels, torch.Tensor) or labels.dim() < 1:
        raise TypeError("shift_labels expects a tensor with a sequence dimension last")
    pad = torch.full_like(labels[..., :1], IGNORE_INDEX)
    return torch.cat([labels[..., 1:], pad], dim=-1)


# ---------------------------------------------------------------------------- validation
def check_kd_options(loss: str, beta: float, temperature: float, positions: str) -> None:
    """Raise ValueError for a bad loss name, beta outside [0, 1], temperature <= 0, positions."""
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    if not 0.0 <= float(beta) <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    if not float(temperature) > 0.0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if positions not in POSITIONS:
        raise ValueError(f"positions must be one of {POSITIONS}, got {positions!r}")


def _check_mask(name: str, mask, lead: tuple) -> None:
    if mask is None:
        return
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(mask).__name__}")
    if tuple(mask.shape) != lead:
        raise ValueError(f"{name} has shape {tuple(mask.shape)}, expected {lead} "
                         f"(the leading dims of the student input)")


def selected_rows(lead: tuple, labels, positions: str, attention_mask, visual_mask,
                  device: torch.device) -> torch.Tensor:
    """Flat (prod(lead),) bool mask of the tokens the KD term averages over."""
    _check_mask("labels", labels, lead)
    _check_mask("attention_mask", attention_mask, lead)
    _check_mask("visual_mask", visual_mask, lead)
    if labels is not None and (labels.dtype.is_floating_point or labels.dtype == torch.bool):
        raise TypeError(f"labels must be an integer tensor, got {labels.dtype}")
    if positions == "response":
        if labels is None:
            raise ValueError("positions='response' needs labels (aligned, -100 = ignored)")
        sel = labels != IGNORE_INDEX
    else:
        sel = (torch.ones(lead, dtype=torch.bool, device=device) if attention_mask is None
               else attention_mask.to(device).bool())
        if positions == "visual":
            if visual_mask is None:
                raise ValueError("positions='visual' needs visual_mask")
            sel = sel & visual_mask.to(device).bool()
    return sel.reshape(-1).to(device)


def _check_logits(student_logits, teacher_logits) -> None:
    for name, t in (("student_logits", student_logits), ("teacher_logits", teacher_logits)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
        if not t.dtype.is_floating_point:
            raise TypeError(f"{name} must be floating point, got {t.dtype}")
        if t.dim() < 2:
            raise ValueError(f"{name} must be (B, N, V) or (T, V), got shape {tuple(t.shape)}")
    if student_logits.shape[:-1] != teacher_logits.shape[:-1]:
        raise ValueError(f"student_logits {tuple(student_logits.shape)} and teacher_logits "
                         f"{tuple(teacher_logits.shape)} differ in the token dims")
    if teacher_logits.shape[-1] < student_logits.shape[-1]:
        raise ValueError(f"teacher vocab ({teacher_logits.shape[-1]}) is smaller than the "
                         f"student's ({student_logits.shape[-1]}); it is truncated, never padded")
    if student_logits.device != teacher_logits.device:
        raise ValueError(f"student_logits on {student_logits.device}, teacher_logits on "
                         f"{teacher_logits.device}")


def chunk_rows(bytes_per_row: int, budget_bytes: int | None, device: torch.device) -> int:
    """Rows per chunk so a chunk's working memory stays within ``budget_bytes``."""
    if budget_bytes is None:
        budget_bytes = DEFAULT_BUDGET_BYTES["cuda" if device.type == "cuda" else "cpu"]
    return max(1, int(budget_bytes) // max(1, int(bytes_per_row)))


# ------------------------------------------------------------------ per-chunk loss + grad
def _zscore(z: torch.Tensor) -> torch.Tensor:
    std = z.std(-1, keepdim=True, unbiased=False)
    return (z - z.mean(-1, keepdim=True)) / (std + 1e-6)


def _kd_rows_torch(a_s: torch.Tensor, a_t: torch.Tensor, loss: str, beta: float) -> torch.Tensor:
    """Per-row divergence between softmax(a_t) and softmax(a_s) (float32, differentiable)."""
    lp_s = torch.log_softmax(a_s, dim=-1)
    lp_t = torch.log_softmax(a_t, dim=-1)
    if loss == "kl":
        return (lp_t.exp() * (lp_t - lp_s)).sum(-1)
    if loss == "reverse_kl":
        return (lp_s.exp() * (lp_s - lp_t)).sum(-1)
    # log m in log space; log(0) = -inf (beta at 0 or 1) is harmless inside logaddexp.
    log_b = torch.tensor(float(beta), device=a_s.device).log()
    log_1mb = torch.tensor(1.0 - float(beta), device=a_s.device).log()
    lm = torch.logaddexp(log_b + lp_t, log_1mb + lp_s)
    return (beta * (lp_t.exp() * (lp_t - lm)).sum(-1)
            + (1.0 - beta) * (lp_s.exp() * (lp_s - lm)).sum(-1))


def kd_chunk(zs: torch.Tensor, zt: torch.Tensor, kd_scale: torch.Tensor, *, loss: str,
             beta: float, temperature: float, zscore: bool, labels: torch.Tensor | None = None,
             ce_scale: torch.Tensor | None = None, triton: bool = False,
             grad_out: torch.Tensor | None = None
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Weighted loss of a chunk of rows and its gradient w.r.t. the student logits ``zs``.

    zs (n, Vs), zt (n, Vt >= Vs), kd_scale (n,) float32 row weights (T² and the mean's 1/n
    included), optional CE on the raw student logits with labels (n,) and ce_scale (n,).
    Returns (float32 scalar, grad (n, Vs) in the dtype of ``grad_out`` or ``zs``, the CE part
    of the scalar); ``grad_out`` may be ``zs`` itself (Triton writes in place, PyTorch copies
    into it).
    """
    if triton and not zscore:
        kern = load_kernel_module("logit_kd")
        row_loss, grad = kern.kd_rows(zs, zt, kd_scale, loss=loss, beta=beta,
                                      temperature=temperature, labels=labels,
                                      ce_scale=ce_scale, grad_out=grad_out)
        return row_loss.sum(), grad, row_loss[:, 1].sum()
    # PyTorch path (and zscore, whose backward the kernel does not do): autograd on a float32
    # copy of the chunk only, so nothing outlives the chunk.
    V = zs.shape[-1]
    with torch.enable_grad():
        a = zs.detach().float().requires_grad_(True)
        b = zt[:, :V].detach().float()
        a_s, a_t = (_zscore(a), _zscore(b)) if zscore else (a, b)
        rows = _kd_rows_torch(a_s / temperature, a_t / temperature, loss, beta)
        total = (rows * kd_scale).sum()
        ce_part = total.new_zeros(())
        if labels is not None and ce_scale is not None:
            safe = torch.where(labels == IGNORE_INDEX, torch.zeros_like(labels), labels)
            ce_part = (F.cross_entropy(a, safe, reduction="none") * ce_scale).sum()
            total = total + ce_part
        (grad,) = torch.autograd.grad(total, a)
    if grad_out is None:
        return total.detach(), grad.to(zs.dtype), ce_part.detach()
    grad_out.copy_(grad)
    return total.detach(), grad_out, ce_part.detach()


# ------------------------------------------------------------------------- autograd glue
class _LogitKD(torch.autograd.Function):
    """Loss over the selected rows; the gradient is computed in forward, chunk by chunk."""

    @staticmethod
    def forward(ctx, zs, zt, rows, opts):
        n = rows.numel()
        grad_rows = torch.empty(n, zs.shape[-1], dtype=zs.dtype, device=zs.device)
        total = torch.zeros((), dtype=torch.float32, device=zs.device)
        kd_scale_all = torch.full((min(n, opts["chunk"]),), opts["scale"], dtype=torch.float32,
                                  device=zs.device)
        for start in range(0, n, opts["chunk"]):
            idx = rows[start:start + opts["chunk"]]
            part, _, _ = kd_chunk(zs[idx], zt[idx, :zs.shape[-1]], kd_scale_all[:idx.numel()],
                               loss=opts["loss"],
                               beta=opts["beta"], temperature=opts["temperature"],
                               zscore=opts["zscore"], triton=opts["triton"],
                               grad_out=grad_rows[start:start + idx.numel()])
            total += part
        ctx.save_for_backward(rows, grad_rows)
        ctx.shape = zs.shape
        return total

    @staticmethod
    def backward(ctx, grad_output):
        rows, grad_rows = ctx.saved_tensors
        grad = torch.zeros(ctx.shape, dtype=grad_rows.dtype, device=grad_rows.device)
        grad.index_copy_(0, rows, grad_rows * grad_output.to(grad_rows.dtype))
        return grad, None, None, None


def logit_distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                            labels: torch.Tensor | None = None, *, loss: str = "kl",
                            beta: float = 0.5, temperature: float = 1.0,
                            positions: str = "response",
                            attention_mask: torch.Tensor | None = None,
                            visual_mask: torch.Tensor | None = None, zscore: bool = False,
                            chunk_size: int | None = None,
                            backend: str = "auto") -> torch.Tensor:
    """Token-level logit distillation loss (docs/logit_kd.md), a float32 scalar.

    Args:
        student_logits: (B, N, Vs) (or (T, Vs)), any float dtype; receives the gradient.
        teacher_logits: (B, N, Vt) with Vt >= Vs, truncated to the first Vs entries; no gradient.
        labels: (B, N) aligned with the logits (see :func:`shift_labels`), -100 = ignored.
            Needed for ``positions="response"``.
        loss: ``"kl"`` = KL(p_t‖p_s), ``"reverse_kl"`` = KL(p_s‖p_t), ``"jsd"`` =
            β·KL(p_t‖m) + (1−β)·KL(p_s‖m), m = β·p_t + (1−β)·p_s.
        beta: JSD weight in [0, 1].
        temperature: T > 0; softmax(z / T) for both models, loss multiplied by T².
        positions: ``"response"`` (labels != -100), ``"all"`` (attention_mask, all if None) or
            ``"visual"`` (visual_mask & attention_mask).
        zscore: LLAVADI: standardise each token's logits over the vocab before T.
        chunk_size: tokens per chunk (default: from a memory budget).
        backend: ``"auto"`` (Triton on CUDA), ``"triton"`` or ``"torch"``.

    Returns:
        Mean over the selected tokens of the batch; 0 (still attached to the graph) when none.
    """
    _check_logits(student_logits, teacher_logits)
    check_kd_options(loss, beta, temperature, positions)
    lead = tuple(student_logits.shape[:-1])
    device = student_logits.device
    sel = selected_rows(lead, labels, positions, attention_mask, visual_mask, device)
    rows = sel.nonzero().squeeze(1)
    n = rows.numel()
    Vs = student_logits.shape[-1]
    triton = use_triton(backend, device, "logit_kd")
    if chunk_size is None:
        per_row = Vs * 4 * (3 if triton and not zscore else 10)
        chunk_size = chunk_rows(per_row, None, device)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    zs = student_logits.reshape(-1, Vs)
    zt = teacher_logits.detach().reshape(-1, teacher_logits.shape[-1])
    opts = dict(loss=loss, beta=float(beta), temperature=float(temperature), zscore=bool(zscore),
                triton=triton, chunk=int(chunk_size),
                scale=float(temperature) ** 2 / max(n, 1))
    return _LogitKD.apply(zs, zt, rows, opts)


# -------------------------------------------------------------------------------- RDist
def _gram_rows(z: torch.Tensor, idx: torch.Tensor, vocab_chunk: int) -> torch.Tensor:
    """Z Zᵀ in float32 for Z = z[idx] (n × V), accumulated over vocab chunks."""
    out = torch.zeros(idx.numel(), idx.numel(), dtype=torch.float32, device=z.device)
    for v0 in range(0, z.shape[-1], vocab_chunk):
        zc = z[idx, v0:v0 + vocab_chunk].float()
        out.addmm_(zc, zc.T)
    return out


class _VisualGram(torch.autograd.Function):
    """Per-sample Gram matrices R_b = Z_b Z_bᵀ of the visual rows, chunked over the vocab in
    both directions so no float32 copy of a whole (Nv × V) block is kept."""

    @staticmethod
    def forward(ctx, logits, index, counts, vocab_chunk):
        B, m = index.shape
        out = torch.zeros(B, m, m, dtype=torch.float32, device=logits.device)
        for b, n in enumerate(counts):
            if n:
                out[b, :n, :n] = _gram_rows(logits[b], index[b, :n], vocab_chunk)
        ctx.save_for_backward(logits, index)
        ctx.counts, ctx.vocab_chunk = counts, vocab_chunk
        return out

    @staticmethod
    def backward(ctx, g):
        logits, index = ctx.saved_tensors
        grad = torch.zeros_like(logits)
        for b, n in enumerate(ctx.counts):
            if not n:
                continue
            idx = index[b, :n]
            sym = g[b, :n, :n] + g[b, :n, :n].T  # d(Z Zᵀ) = dZ Zᵀ + Z dZᵀ
            for v0 in range(0, logits.shape[-1], ctx.vocab_chunk):
                zc = logits[b, idx, v0:v0 + ctx.vocab_chunk].float()
                grad[b, idx, v0:v0 + ctx.vocab_chunk] = (sym @ zc).to(grad.dtype)
        return grad, None, None, None


def rdist_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
               visual_mask: torch.Tensor, *, vocab_chunk: int = 8192) -> torch.Tensor:
    """LLaVA-KD relation distillation (RDist), a float32 scalar.

    Per sample with visual tokens: Z = raw logits at the visual positions (teacher truncated to
    the student's vocab), R = Z Zᵀ (Nv × Nv, float32, accumulated over ``vocab_chunk`` columns
    at a time), loss 1 − cos(vec(R_s), vec(R_t)) with the norm product clamped at 1e-12. Mean
    over those samples; 0 (attached) when no sample has a visual token. No teacher gradient.

    Args:
        student_logits: (B, N, Vs). teacher_logits: (B, N, Vt >= Vs). visual_mask: (B, N) bool.
        vocab_chunk: vocab columns per step (bounds the float32 working copy to Nv × chunk).
    """
    _check_logits(student_logits, teacher_logits)
    if student_logits.dim() != 3:
        raise ValueError(f"rdist_loss needs (B, N, V) logits, got {tuple(student_logits.shape)}")
    _check_mask("visual_mask", visual_mask, tuple(student_logits.shape[:2]))
    if vocab_chunk < 1:
        raise ValueError(f"vocab_chunk must be >= 1, got {vocab_chunk}")
    vm = visual_mask.to(student_logits.device).bool()
    counts = [int(c) for c in vm.sum(1).tolist()]
    m = max(counts + [0])
    # Visual positions first (ascending), padded with 0.
    order = torch.sort((~vm).to(torch.int8), dim=1, stable=True).indices[:, :m]
    Vs = student_logits.shape[-1]
    r_s = _VisualGram.apply(student_logits, order, counts, int(vocab_chunk))
    zt = teacher_logits.detach()[..., :Vs]
    losses = []
    for b, n in enumerate(counts):
        if not n:
            continue
        rs = r_s[b, :n, :n].reshape(-1)
        rt = _gram_rows(zt[b], order[b, :n], int(vocab_chunk)).reshape(-1)
        cos = (rs * rt).sum() / torch.clamp(rs.norm() * rt.norm(), min=1e-12)
        losses.append(1.0 - cos)
    if not losses:
        return r_s.sum() * 0.0
    return torch.stack(losses).mean()
