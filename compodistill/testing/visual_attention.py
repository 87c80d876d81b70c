"""Reference implementation of the visual-attention maps, losses and layer matching
(docs/visual_attention.md, docs/layer_matching.md), in plain float32 PyTorch.

This module is the yardstick for the chunked PyTorch path and the Triton kernels. It is
written to be *obviously right*, not fast: it materialises the full attention matrix
``P`` (B, Hq, N, N), loops over samples in Python and keeps visual maps as one
``(|Q_b|, Nv_b)`` tensor per sample, so it has no padding conventions of its own.
It imports nothing from the rest of the library (only ``torch`` and ``math``), so a bug
elsewhere cannot leak into it. Every convention follows
``docs/CONVENTIONS.md``.

Autograd flows through everything that depends on the student (``q``, ``k``,
``maps_s``), so tests get reference gradients with ``torch.autograd.grad``.
"""
from __future__ import annotations

import math
from typing import Sequence, Union

import torch

__all__ = [
    "ref_attention_probs", "ref_attention_output", "ref_query_rows", "ref_visual_maps",
    "ref_visual_allowed", "ref_renormalized", "ref_rest_bucket", "ref_visual_loss",
    "ref_group_targets", "ref_simple_teacher_layer", "ref_adaptive_choice",
]

QueryArg = Union[str, torch.Tensor]

_COS_EPS = 1e-12   # CONVENTIONS: cos = a·b / max(|a||b|, 1e-12)
_LOG_EPS = 1e-30   # CONVENTIONS: log p = log(max(p, 1e-30))
_LOSSES = ("cosine", "kl", "reverse_kl", "jsd", "mse")
_COSINES = ("flat", "row", "pooled")
_DISTRIBUTIONS = ("renorm", "rest")
_REDUCTIONS = ("mean", "sum", "none")


# --------------------------------------------------------------------------- attention

def _key_allowed(batch: int, n: int, attention_mask: torch.Tensor | None, causal: bool,
                 device: torch.device, window: int | None = None) -> torch.Tensor:
    """(B, N, N) bool: ``[b, i, j]`` is True when query i may attend to key j."""
    allowed = torch.ones(batch, n, n, dtype=torch.bool, device=device)
    if attention_mask is not None:
        allowed = allowed & attention_mask.to(device=device, dtype=torch.bool)[:, None, :]
    if causal:
        allowed = allowed & torch.ones(n, n, dtype=torch.bool, device=device).tril()
    if window is not None:  # i - j < window
        allowed = allowed & torch.ones(n, n, dtype=torch.bool, device=device).triu(1 - window)
    return allowed


def _masked_scores(q: torch.Tensor, k: torch.Tensor, attention_mask: torch.Tensor | None,
                   causal: bool, scale: float | None, window: int | None = None):
    """fp32 scores with -inf on forbidden keys, plus the (B, 1, N, N) allowed mask."""
    batch, hq, n, d = q.shape
    hkv = k.shape[1]
    if hq % hkv != 0:
        raise ValueError(f"number of query heads ({hq}) must be a multiple of kv heads ({hkv})")
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    # GQA: query head h reads kv head h // (hq // hkv), exactly Hugging Face's repeat_kv.
    k = k.float().repeat_interleave(hq // hkv, dim=1)
    scores = torch.einsum("bhid,bhjd->bhij", q.float(), k) * scale
    allowed = _key_allowed(batch, n, attention_mask, causal, q.device, window)[:, None]
    return scores.masked_fill(~allowed, float("-inf")), allowed


def _softmax_with_empty_rows(scores: torch.Tensor, allowed: torch.Tensor):
    """Softmax over the last dim where a row with no allowed key gives zeros, lse = -inf.

    Such rows get finite dummy scores (0) before the softmax and are zeroed afterwards,
    so neither the forward nor the backward ever sees ``-inf - (-inf)``.
    """
    has_key = allowed.any(dim=-1, keepdim=True)
    safe = torch.where(has_key, scores, torch.zeros_like(scores))
    probs = torch.softmax(safe, dim=-1) * has_key
    lse = torch.logsumexp(safe, dim=-1).masked_fill(~has_key[..., 0], float("-inf"))
    return probs, lse


def ref_attention_probs(q: torch.Tensor, k: torch.Tensor,
                        attention_mask: torch.Tensor | None = None, causal: bool = True,
                        scale: float | None = None, window: int | None = None) -> torch.Tensor:
    """Full attention probabilities ``P`` (B, Hq, N, N) in float32.

    Args:
        q: (B, Hq, N, d) queries.
        k: (B, Hkv, N, d) keys, ``Hq % Hkv == 0``; query head h uses kv head
            ``h // (Hq // Hkv)``.
        attention_mask: (B, N), 1/True = real token, 0 = padding (keys only are masked
            here; padded query rows still get a distribution over the real keys).
        causal: key j is allowed for query i only if ``j <= i``.
        scale: score scale, default ``1 / sqrt(d)``.
        window: sliding window: key j is allowed for query i only if ``i - j < window``.

    Returns:
        ``P[b, h, i, j]``; a row with no allowed key is all zeros (never NaN).
    """
    scores, allowed = _masked_scores(q, k, attention_mask, causal, scale, window)
    return _softmax_with_empty_rows(scores, allowed)[0]


def ref_attention_output(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         attention_mask: torch.Tensor | None = None, causal: bool = True,
                         scale: float | None = None, window: int | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention output and log-sum-exp, as a flash-attention forward would return them.

    Args: as :func:`ref_attention_probs`, plus ``v`` (B, Hkv, N, d) (same GQA mapping as k).

    Returns:
        ``out`` (B, Hq, N, d) float32 (zeros on rows with no allowed key) and
        ``lse`` (B, Hq, N) float32, the log-sum-exp of the allowed scaled scores
        (``-inf`` on rows with no allowed key).
    """
    scores, allowed = _masked_scores(q, k, attention_mask, causal, scale, window)
    probs, lse = _softmax_with_empty_rows(scores, allowed)
    v = v.float().repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    return probs @ v, lse


# --------------------------------------------------------------------------- visual maps

def ref_query_rows(query: QueryArg, visual_mask: torch.Tensor,
                   attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """(B, N) bool mask of the query rows Q(b) that enter the loss.

    Args:
        query: ``"all"`` (every non-padding row), ``"visual"`` (image rows),
            ``"text"`` (non-padding rows that are not image rows), or an explicit (B, N)
            bool mask, which is ANDed with the attention mask.
        visual_mask: (B, N) bool, True on image tokens.
        attention_mask: (B, N), 1/True = real token; None = no padding.
    """
    vis = visual_mask.to(torch.bool)
    real = torch.ones_like(vis) if attention_mask is None else attention_mask.to(torch.bool)
    if isinstance(query, torch.Tensor):
        return query.to(torch.bool) & real
    if query == "all":
        return real
    if query == "visual":
        # Image tokens are real tokens; the AND only matters for malformed input.
        return vis & real
    if query == "text":
        return real & ~vis
    raise ValueError(f"query must be 'all', 'visual', 'text' or a (B, N) bool mask, "
                     f"got {query!r}")


def ref_visual_maps(q: torch.Tensor, k: torch.Tensor, visual_mask: torch.Tensor,
                    query: QueryArg = "all", attention_mask: torch.Tensor | None = None,
                    causal: bool = True, scale: float | None = None,
                    window: int | None = None) -> list[torch.Tensor]:
    """Head-mean attention on visual keys, one ``(|Q_b|, Nv_b)`` float32 map per sample.

    ``A_b[r, c] = mean_h P[b, h, rows_b[r], cols_b[c]]`` where ``rows_b`` are the query rows
    (:func:`ref_query_rows`) and ``cols_b`` the image positions of sample b, both in
    ascending position order. These are full-softmax probabilities: a row does not sum to 1.
    Differentiable with respect to ``q`` and ``k``.
    """
    probs = ref_attention_probs(q, k, attention_mask, causal, scale, window)
    rows = ref_query_rows(query, visual_mask, attention_mask)
    vis = visual_mask.to(torch.bool)
    head_mean = probs.mean(dim=1)  # (B, N, N)
    return [head_mean[b][rows[b]][:, vis[b]] for b in range(q.shape[0])]


def ref_visual_allowed(visual_mask: torch.Tensor, query: QueryArg = "all",
                       attention_mask: torch.Tensor | None = None,
                       causal: bool = True, window: int | None = None) -> list[torch.Tensor]:
    """Allowed (query row, visual column) pairs, one ``(|Q_b|, Nv_b)`` bool tensor per sample.

    A pair is allowed when the key is not padding and, if causal, the image token does not
    come after the query. Same row/column order as :func:`ref_visual_maps`.
    """
    batch, n = visual_mask.shape
    allowed = _key_allowed(batch, n, attention_mask, causal, visual_mask.device, window)
    rows = ref_query_rows(query, visual_mask, attention_mask)
    vis = visual_mask.to(torch.bool)
    return [allowed[b][rows[b]][:, vis[b]] for b in range(batch)]


# --------------------------------------------------------------------------- distributions

def ref_renormalized(A: torch.Tensor) -> torch.Tensor:
    """Each row of ``A`` (..., Nv) divided by its sum: a distribution over visual keys.

    A row summing to 0 (no allowed visual key) stays all zeros instead of becoming NaN.
    Forbidden pairs are 0 in ``A`` and therefore 0 here.
    """
    total = A.sum(dim=-1, keepdim=True)
    return A / total.clamp_min(_LOG_EPS)


def ref_rest_bucket(A: torch.Tensor) -> torch.Tensor:
    """``A`` (..., Nv) with a last "rest" column ``max(0, 1 - Σ_v A[..., v])``: (..., Nv + 1).

    Each row is then the distribution over the visual keys plus everything else.
    """
    rest = (1.0 - A.sum(dim=-1, keepdim=True)).clamp_min(0.0)
    return torch.cat([A, rest], dim=-1)


# --------------------------------------------------------------------------- losses

def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine along the last dim, with the CONVENTIONS epsilon on the norm product."""
    dot = (a * b).sum(dim=-1)
    return dot / (a.norm(dim=-1) * b.norm(dim=-1)).clamp_min(_COS_EPS)


def _log(p: torch.Tensor) -> torch.Tensor:
    return torch.log(p.clamp_min(_LOG_EPS))


def _kl_rows(p: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Per-row KL(p ‖ r); terms with p = 0 are exactly 0."""
    terms = torch.where(p > 0, p * (_log(p) - _log(r)), torch.zeros_like(p))
    return terms.sum(dim=-1)


def _row_divergence(loss: str, p_s: torch.Tensor, p_t: torch.Tensor, beta: float) -> torch.Tensor:
    if loss == "kl":
        return _kl_rows(p_t, p_s)
    if loss == "reverse_kl":
        return _kl_rows(p_s, p_t)
    mix = beta * p_t + (1.0 - beta) * p_s
    return beta * _kl_rows(p_t, mix) + (1.0 - beta) * _kl_rows(p_s, mix)


def _pooled_cosine(a_s: torch.Tensor, a_t: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Official-code parity: μ+σ outlier filter, column pooling over rows, 1 − cos."""
    with torch.no_grad():  # no gradient through the statistics or the mask
        def keep(a: torch.Tensor) -> torch.Tensor:
            std = a.std() if a.numel() > 1 else torch.zeros((), device=a.device)
            return a <= a.mean() + std
        mask = (keep(a_s) & keep(a_t) & (a_t != 0) & allowed).to(a_s.dtype)
        count = mask.sum(dim=0).clamp_min(1.0)
    pooled_s = (mask * a_s).sum(dim=0) / count
    pooled_t = (mask * a_t).sum(dim=0) / count
    return 1.0 - _cos(pooled_s, pooled_t)


def _sample_loss(a_s: torch.Tensor, a_t: torch.Tensor, allowed: torch.Tensor, valid: torch.Tensor,
                 loss: str, cosine: str, distribution: str, beta: float) -> torch.Tensor:
    """D(A_s, A_t) for one contributing sample (docs/visual_attention.md / CONVENTIONS)."""
    if loss == "mse":
        return ((a_s - a_t) ** 2).sum() / a_s.numel()
    if loss == "cosine":
        if cosine == "flat":
            return 1.0 - _cos(a_s.reshape(-1), a_t.reshape(-1))
        if cosine == "row":
            return (1.0 - _cos(a_s[valid], a_t[valid])).mean()
        return _pooled_cosine(a_s, a_t, allowed)
    # kl family: per valid row, over allowed columns (forbidden entries are 0 in A anyway,
    # masking makes it independent of what a backend stores there).
    # CONVENTIONS: probabilities below float32's smallest normal number count as 0.
    tiny = torch.finfo(torch.float32).tiny
    rows_s = (a_s * (allowed & (a_s >= tiny)))[valid]
    rows_t = (a_t * (allowed & (a_t >= tiny)))[valid]
    to_dist = ref_renormalized if distribution == "renorm" else ref_rest_bucket
    return _row_divergence(loss, to_dist(rows_s), to_dist(rows_t), beta).mean()


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def ref_visual_loss(maps_s: Sequence[torch.Tensor], maps_t: Sequence[torch.Tensor],
                    allowed: Sequence[torch.Tensor], loss: str = "cosine",
                    cosine: str = "flat", distribution: str = "renorm", beta: float = 0.5,
                    reduction: str = "mean") -> torch.Tensor:
    """Visual attention alignment loss of one matched layer pair (docs/visual_attention.md, CONVENTIONS).

    Args:
        maps_s: student maps, one ``(|Q_b|, Nv_b)`` tensor per sample (gradients flow).
        maps_t: teacher targets, same shapes (detached: no gradient to the teacher).
        allowed: allowed pairs, same shapes (:func:`ref_visual_allowed`).
        loss: ``"cosine"``, ``"kl"`` (KL(p_t‖p_s)), ``"reverse_kl"``, ``"jsd"`` or ``"mse"``.
        cosine: for ``loss="cosine"``: ``"flat"`` (whole block), ``"row"`` (mean over valid
            rows) or ``"pooled"`` (official-code μ+σ filter and column pooling).
        distribution: for the kl family: ``"renorm"`` or ``"rest"`` (extra rest bucket).
        beta: JSD mixing weight, ``m = β·p_t + (1−β)·p_s``.
        reduction: over *contributing* samples (at least one valid row, i.e. a real row
            with an allowed visual column): ``"mean"`` (0 when none, still attached to the
            graph), ``"sum"``, or ``"none"`` → (B,) with 0 for the other samples.
    """
    _check_choice("loss", loss, _LOSSES)
    _check_choice("cosine", cosine, _COSINES)
    _check_choice("distribution", distribution, _DISTRIBUTIONS)
    _check_choice("reduction", reduction, _REDUCTIONS)
    if not len(maps_s) == len(maps_t) == len(allowed):
        raise ValueError(f"maps_s, maps_t and allowed must have one entry per sample, got "
                         f"{len(maps_s)}, {len(maps_t)}, {len(allowed)}")
    per_sample, contributing = [], 0
    for a_s, a_t, ok in zip(maps_s, maps_t, allowed):
        a_s, a_t, ok = a_s.float(), a_t.detach().float(), ok.to(torch.bool)
        valid = ok.any(dim=-1)
        if bool(valid.any()):
            contributing += 1
            per_sample.append(_sample_loss(a_s, a_t, ok, valid, loss, cosine, distribution, beta))
        else:
            per_sample.append(a_s.sum() * 0.0)  # zero that stays attached to the graph
    losses = torch.stack(per_sample)
    if reduction == "none":
        return losses
    total = losses.sum()
    return total if reduction == "sum" else total / max(contributing, 1)


# --------------------------------------------------------------------------- layer matching

def ref_group_targets(teacher_maps: Sequence[torch.Tensor], k: int) -> list[torch.Tensor]:
    """Group matching targets (docs/layer_matching.md).

    ``n = m − k + 1``; target j = mean of maps j..j+n−1.

    ``teacher_maps`` are the maps of teacher layers ``t_1..t_m`` in order (any tensors of
    equal shape); returns ``k`` targets.
    """
    m = len(teacher_maps)
    n = m - k + 1
    if k < 1 or n < 1:
        raise ValueError(f"group matching needs 1 <= k <= m, got k={k} student layers and "
                         f"m={m} teacher layers")
    return [torch.stack(list(teacher_maps[j:j + n])).mean(dim=0) for j in range(k)]


def ref_simple_teacher_layer(l: int, num_student_layers: int, num_teacher_layers: int) -> int:
    """Simple matching (docs/layer_matching.md).

    Teacher layer ``round((l+1)·Lt/Ls) − 1`` for student layer l.

    Rounds halves *up* (Python's ``round`` would round them to even) and clamps at 0,
    which only matters for a teacher less than half as deep as the student.
    """
    ratio = (l + 1) * num_teacher_layers / num_student_layers
    return max(0, math.floor(ratio + 0.5) - 1)


def ref_adaptive_choice(student_map: torch.Tensor, candidate_maps: Sequence[torch.Tensor]) -> int:
    """Adaptive matching (our definition): index of the candidate with the highest flat cosine.

    Ties go to the first candidate.
    """
    a = student_map.detach().float().reshape(-1)
    scores = [float(_cos(a, c.detach().float().reshape(-1))) for c in candidate_maps]
    return max(range(len(scores)), key=lambda i: (scores[i], -i))
