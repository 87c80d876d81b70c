"""`compodistill demo-losses`: every visual-loss variant, ours vs the materialising reference.

Builds random student/teacher queries and keys for a LLaVA-like sequence (two images in
one sample, none in another, right padding, GQA), computes each loss on the library's
default backend and with the reference that materialises attention, and prints their
values, gradient agreement, time and peak tensor memory side by side.
"""
from __future__ import annotations

import time

import torch

from ..visual_attention import visual_attention_loss, visual_attention_maps, visual_layout
from ..testing.memory import peak_memory
from ..testing.accuracy import pad_maps
from ..testing.visual_attention import ref_visual_allowed, ref_visual_loss, ref_visual_maps

VARIANTS = [
    ("cosine flat (paper)", dict(loss="cosine", cosine="flat")),
    ("cosine row", dict(loss="cosine", cosine="row")),
    ("cosine pooled (official)", dict(loss="cosine", cosine="pooled")),
    ("kl renorm", dict(loss="kl", distribution="renorm")),
    ("kl rest bucket", dict(loss="kl", distribution="rest")),
    ("reverse kl", dict(loss="reverse_kl")),
    ("jsd beta=0.5", dict(loss="jsd", beta=0.5)),
    ("mse", dict(loss="mse")),
]


def _inputs(batch: int, seq_len: int, head_dim: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    shapes = dict(student=(8, 2), teacher=(16, 4))  # (query heads, kv heads)
    tensors = {
        role: (torch.randn(batch, hq, seq_len, head_dim, generator=gen),
               torch.randn(batch, hkv, seq_len, head_dim, generator=gen))
        for role, (hq, hkv) in shapes.items()
    }
    image = max(1, seq_len // 8)
    spans = [[(4, 4 + image), (seq_len // 2, seq_len // 2 + image)]] + [[] for _ in range(batch - 1)]
    if batch > 2:
        spans[2] = [(seq_len // 4, seq_len // 4 + 2 * image)]
    mask = torch.ones(batch, seq_len, dtype=torch.bool)
    mask[-1, seq_len - seq_len // 10:] = False  # right padding on the last sample
    return tensors, spans, mask


def _timed(fn):
    start = time.perf_counter()
    with peak_memory("cpu") as mem:
        value, dq = fn()
    return value, dq, (time.perf_counter() - start) * 1e3, mem.mib


def run(batch: int = 3, seq_len: int = 512, head_dim: int = 64, seed: int = 0) -> list[dict]:
    """Compute every variant both ways; return one row per variant."""
    tensors, spans, mask = _inputs(batch, seq_len, head_dim, seed)
    (q_s, k_s), (q_t, k_t) = tensors["student"], tensors["teacher"]
    layout = visual_layout(spans, batch, seq_len, attention_mask=mask)
    vis = torch.zeros(batch, seq_len, dtype=torch.bool)
    for b, sample in enumerate(spans):
        for start, end in sample:
            vis[b, start:end] = True
    target = visual_attention_maps(q_t, k_t, layout)
    ref_target = ref_visual_maps(q_t, k_t, vis, attention_mask=mask)
    allowed = ref_visual_allowed(vis, attention_mask=mask)
    check = pad_maps(ref_target, layout.query_count, layout.visual_count)
    target_error = float((target - check).abs().max())
    rows = []
    for name, options in VARIANTS:
        def ours():
            q = q_s.clone().requires_grad_()
            value = visual_attention_loss(q, k_s, target, layout, **options)
            value.backward()
            return float(value.detach()), q.grad

        def reference():
            q = q_s.clone().requires_grad_()
            value = ref_visual_loss(ref_visual_maps(q, k_s, vis, attention_mask=mask),
                                    ref_target, allowed, **options)
            value.backward()
            return float(value.detach()), q.grad

        v_ours, g_ours, t_ours, m_ours = _timed(ours)
        v_ref, g_ref, t_ref, m_ref = _timed(reference)
        rows.append(dict(variant=name, ours=v_ours, reference=v_ref,
                         loss_diff=abs(v_ours - v_ref),
                         grad_diff=float((g_ours - g_ref).abs().max()),
                         ms_ours=t_ours, ms_ref=t_ref, mib_ours=m_ours, mib_ref=m_ref,
                         target_diff=target_error))
    return rows


def format_table(rows: list[dict]) -> str:
    head = (f"{'variant':<26}{'ours':>11}{'reference':>11}{'|Δloss|':>10}{'|Δgrad|':>10}"
            f"{'ms ours':>9}{'ms ref':>9}{'MiB ours':>10}{'MiB ref':>9}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['variant']:<26}{r['ours']:>11.6f}{r['reference']:>11.6f}"
                     f"{r['loss_diff']:>10.1e}{r['grad_diff']:>10.1e}{r['ms_ours']:>9.0f}"
                     f"{r['ms_ref']:>9.0f}{r['mib_ours']:>10.1f}{r['mib_ref']:>9.1f}")
    return "\n".join(lines)
