"""What the cache stores, computed from the teacher (docs/teacher_cache.md).

- :func:`logit_targets`: top-k log-probabilities, ids and rest mass at the KD positions.
- :class:`TeacherMaps`: a capture of the teacher alone that keeps, per matched student layer,
  the mean of its teacher window's visual maps, added in the same order as
  :class:`compodistill.hf.distiller.Capture` adds them (so the targets are the same numbers).
- :func:`compress_map` / :func:`expand_map`: the optional top-k storage of a map.
"""
from __future__ import annotations

import torch
from torch import nn

from ..hf.attention import SiteCapture, decoder_attention_modules, enable_attention
from ..matching import LayerMatch
from ..visual_attention.layout import VisualLayout

__all__ = ["logit_targets", "TeacherMaps", "compress_map", "expand_map"]


def logit_targets(h_t: torch.Tensor, W_t: torch.Tensor, b_t: torch.Tensor | None, vocab: int,
                  k: int, temperature: float, chunk: int = 256):
    """``(logp (R, k) float32, index (R, k) int32, rest (R,) float32)`` for rows ``h_t`` (R, d).

    The teacher's logits are truncated to the student's ``vocab`` (as online KD does),
    divided by ``temperature``; ``rest`` is the probability of every id outside the top-k
    (exactly 0 when k = vocab).
    """
    k = min(int(k), int(vocab))
    W, b = W_t[:vocab], None if b_t is None else b_t[:vocab]
    out_lp, out_ix, out_rest = [], [], []
    for s in range(0, h_t.shape[0], chunk):
        h = h_t[s:s + chunk]
        z = (h @ W.T if b is None else torch.addmm(b, h, W.T)).float() / temperature
        lse = torch.logsumexp(z, dim=-1, keepdim=True)
        values, index = torch.topk(z, k, dim=-1)
        out_lp.append(values - lse)
        out_ix.append(index.to(torch.int32))
        if k < vocab:
            rest = torch.logsumexp(z.scatter(-1, index, float("-inf")), dim=-1) - lse[:, 0]
            out_rest.append(rest.exp())
        else:
            out_rest.append(torch.zeros(h.shape[0], dtype=torch.float32, device=h.device))
    if not out_lp:
        return (torch.zeros(0, k), torch.zeros(0, k, dtype=torch.int32), torch.zeros(0))
    return torch.cat(out_lp), torch.cat(out_ix), torch.cat(out_rest)


class TeacherMaps(SiteCapture):
    """A capture sink for a teacher forward alone: the (B, Qmax, Vmax) float32 target of
    every match, ``mean`` over its teacher layers (group window or the one simple layer).

    >>> sink = TeacherMaps(teacher, matches, layout)
    >>> with sink, torch.no_grad():
    ...     teacher.model(input_ids=ids, attention_mask=mask, pixel_values=pixels)
    >>> targets = sink.targets()           # one per match
    """

    def __init__(self, teacher: nn.Module, matches: list[LayerMatch], layout: VisualLayout):
        enable_attention(teacher)
        modules = decoder_attention_modules(teacher)
        self.matches, self.layout = matches, layout
        self.sites = {modules[t]: ("teacher", t) for m in matches for t in m.teacher_layers}
        self.sums: list[torch.Tensor | None] = [None] * len(matches)
        self.seen: set[int] = set()
        self.checked_masks: list = []

    # window_target stays None: each layer's map is added in store(), in the online
    # capture's order, so the cached sums equal the online ones bit for bit.
    def store(self, role, layer, maps, accumulated=False):
        if layer in self.seen:
            raise ValueError(f"teacher layer {layer} ran twice inside one capture")
        self.seen.add(layer)
        maps = maps.float()
        for j, m in enumerate(self.matches):
            if layer in m.teacher_layers:
                acc = self.sums[j]
                self.sums[j] = maps.clone() if acc is None else acc.add_(maps)

    def targets(self) -> list[torch.Tensor]:
        missing = sorted({t for m in self.matches for t in m.teacher_layers} - self.seen)
        if missing:
            raise ValueError(f"teacher layers {missing} were not captured: run the teacher's "
                             f"forward inside the sink with attn_implementation='compodistill'")
        return [s / len(m.teacher_layers) for s, m in zip(self.sums, self.matches)]


def compress_map(maps: torch.Tensor, k: int):
    """``(values (Q, k'), index (Q, k') int32, rest (Q,))`` of a (Q, V) map, k' = min(k, V):
    the k' largest columns per row and the rest of the row's mass."""
    k = min(int(k), maps.shape[-1])
    values, index = torch.topk(maps.float(), k, dim=-1)
    rest = (maps.float().sum(-1) - values.sum(-1)).clamp_min(0.0)
    return values, index.to(torch.int32), rest


def expand_map(values: torch.Tensor, index: torch.Tensor, rest: torch.Tensor,
               allowed: torch.Tensor) -> torch.Tensor:
    """The dense (Q, V) float32 map from :func:`compress_map`'s output: the kept columns get
    their values, the rest mass is spread evenly over the row's other ``allowed`` columns
    (allowed: (Q, V) bool, e.g. causal)."""
    index = index.long()
    out = torch.zeros(allowed.shape, dtype=torch.float32, device=values.device)
    free = allowed.clone()
    free.scatter_(-1, index, False)
    count = free.sum(-1, keepdim=True)
    fill = torch.where(count > 0, rest.float()[:, None] / count.clamp_min(1), 0.0)
    out = torch.where(free, fill, out)
    return out.scatter(-1, index, values.float())
