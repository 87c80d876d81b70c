"""Compiled Triton kernels on a real GPU (skipped without CUDA).

The other kernel tests force ``TRITON_INTERPRET=1``; these run the compiled kernels at
realistic sizes in bf16/fp16 against the fp32 reference, with the accuracy rule.
Run on a GPU machine with ``python -m pytest -m gpu tests/test_gpu.py`` in a fresh process
(without TRITON_INTERPRET set).
"""
from __future__ import annotations

import math
import os

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
              pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"),
                                 reason="GPU tests run the compiled kernels, not the interpreter")]

import compodistill as cd  # noqa: E402
from compodistill.testing.accuracy import assert_accuracy, pad_maps  # noqa: E402
from compodistill.testing.visual_attention import ref_attention_output, ref_visual_maps  # noqa: E402


class ops_seen(TorchDispatchMode):
    """Records the namespaces of the ops dispatched inside the block (custom ops included),
    so a test can assert that the Triton kernels ran and nothing fell back silently."""

    def __init__(self):
        super().__init__()
        self.names = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(func.name())
        return func(*args, **(kwargs or {}))

    def ran(self, op: str) -> bool:
        return any(n.startswith(op) for n in self.names)


def lowp_attention_and_maps(q, k, v, mask, layout):
    """Materialised causal (windowed, with ``layout.window``) attention and head-mean maps
    computed at q's dtype (the plain PyTorch yardstick of the accuracy rule), differentiable."""
    b, hq, n, d = q.shape
    rep = hq // k.shape[1]
    kk, vv = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    s = (q @ kk.transpose(-1, -2)) / math.sqrt(d)
    i = torch.arange(n, device=q.device)
    pairs = i[:, None] >= i[None, :]
    if layout.window is not None:
        pairs = pairs & (i[:, None] - i[None, :] < layout.window)
    allowed = mask[:, None, None, :] & pairs
    p = torch.softmax(s.masked_fill(~allowed, float("-inf")), -1)
    p = torch.nan_to_num(p)
    head_mean = p.mean(1)
    maps = torch.stack([head_mean[i][layout.query_index[i]][:, layout.visual_index[i]]
                        for i in range(b)]) * layout.allowed()
    return p @ vv, maps


def _inputs(b, hq, hkv, n, d, dtype, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    make = lambda h: torch.randn(b, h, n, d, device="cuda", generator=gen)  # noqa: E731
    return make(hq), make(hkv), make(hkv)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,d,hq,hkv,window,mode", [
    (1000, 128, 8, 2, None, "atomic"), (777, 64, 4, 4, None, "atomic"),
    (513, 80, 4, 1, None, "atomic"),
    # Sliding window (Gemma 3): the autotuned block shapes skip the blocks outside it.
    (1000, 128, 8, 2, 100, "atomic"), (777, 64, 4, 2, 45, "split")])
def test_fused_attention_and_maps_match_reference(monkeypatch, dtype, n, d, hq, hkv, window,
                                                  mode):
    from compodistill.kernels import attention_with_visual_maps

    monkeypatch.setenv("COMPODISTILL_DETERMINISTIC", "1" if mode == "split" else "0")
    q32, k32, v32 = _inputs(2, hq, hkv, n, d, dtype)
    mask = torch.ones(2, n, dtype=torch.bool, device="cuda")
    mask[1, n - 37:] = False
    spans = [[(5, 5 + n // 8), (n // 2, n // 2 + 40)], []]
    layout = cd.visual_layout(spans, 2, n, attention_mask=mask, window=window, device="cuda")
    q, k, v = (t.to(dtype).requires_grad_() for t in (q32, k32, v32))
    with ops_seen() as seen:
        out, maps = attention_with_visual_maps(q, k, v, layout)
    assert seen.ran("compodistill::attention_fwd"), "the Triton forward did not run"
    leaves32 = [t.detach().clone().requires_grad_() for t in (q32, k32, v32)]
    ref_out, _ = ref_attention_output(*leaves32, mask, window=window)
    vis = cd.spans_to_mask(spans, 2, n, "cuda")
    ref_maps = pad_maps(ref_visual_maps(leaves32[0], leaves32[1], vis, attention_mask=mask,
                                        window=window),
                        layout.query_count, layout.visual_count)
    leaves_lp = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    lp_out, lp_maps = lowp_attention_and_maps(*leaves_lp, mask, layout)
    real = mask[:, None, :, None]
    assert_accuracy(out.float() * real, ref_out * real, lp_out.float() * real, atol=1e-3,
                    name="out")
    assert_accuracy(maps, ref_maps, lp_maps.float(), atol=1e-4, name="maps")

    # Gradients of one loss through out and maps, against the fp32 reference.
    gen = torch.Generator(device="cuda").manual_seed(1)
    d_out = torch.randn(out.shape, device="cuda", generator=gen) * real
    g = torch.randn(maps.shape, device="cuda", generator=gen)

    def loss(o, m):
        return (o.float() * d_out).sum() + (m.float() * g).sum()

    with ops_seen() as seen:
        grads = torch.autograd.grad(loss(out, maps), (q, k, v))
    assert seen.ran("compodistill::attention_bwd"), "the Triton backward did not run"
    ref_grads = torch.autograd.grad(loss(ref_out, ref_maps), leaves32)
    lp_grads = torch.autograd.grad(loss(lp_out, lp_maps), leaves_lp)
    for name, got, ref, lp in zip("qkv", grads, ref_grads, lp_grads):
        scale = float(ref.abs().max())
        assert_accuracy(got.float(), ref, lp.float(), atol=1e-3 * scale, name=f"d{name}")


def test_visual_attention_loss_dispatches_to_triton_and_matches_reference():
    q32, k32, _ = _inputs(2, 8, 2, 1500, 128, torch.bfloat16)
    spans = [[(32, 608)], [(10, 300), (700, 990)]]
    target = cd.visual_attention_maps(q32, k32, spans, backend="torch")
    q, k = q32.bfloat16().requires_grad_(), k32.bfloat16().requires_grad_()
    with ops_seen() as seen:
        fused = cd.visual_attention_loss(q, k, target, spans)  # auto -> triton on CUDA
        dq_fused, dk_fused = torch.autograd.grad(fused, (q, k))
    assert seen.ran("compodistill::attention_fwd") and seen.ran("compodistill::attention_bwd"), \
        "backend='auto' on CUDA did not run the Triton kernels"
    # fp32 reference (chunked PyTorch path on fp32 inputs) and PyTorch at bf16.
    q_ref, k_ref = q32.clone().requires_grad_(), k32.clone().requires_grad_()
    ref = cd.visual_attention_loss(q_ref, k_ref, target, spans, backend="torch")
    dq_ref, dk_ref = torch.autograd.grad(ref, (q_ref, k_ref))
    q_lp, k_lp = q.detach().clone().requires_grad_(), k.detach().clone().requires_grad_()
    lowp = cd.visual_attention_loss(q_lp, k_lp, target, spans, backend="torch")
    dq_lp, dk_lp = torch.autograd.grad(lowp, (q_lp, k_lp))
    assert_accuracy(fused.float(), ref, lowp.float(), atol=1e-4, name="loss")
    for name, got, r, lp in (("dq", dq_fused, dq_ref, dq_lp), ("dk", dk_fused, dk_ref, dk_lp)):
        assert_accuracy(got.float(), r, lp.float(), atol=1e-3 * float(r.abs().max()), name=name)


def test_fused_linear_kd_on_cuda_matches_reference():
    from compodistill.testing.logit_kd import ref_logit_kd

    gen = torch.Generator(device="cuda").manual_seed(0)
    h_s = torch.randn(2, 300, 256, device="cuda", generator=gen)
    h_t = torch.randn(2, 300, 384, device="cuda", generator=gen)
    w_s = torch.randn(32000, 256, device="cuda", generator=gen) / 16
    w_t = torch.randn(32050, 384, device="cuda", generator=gen) / 20
    labels = torch.randint(0, 32000, (2, 300), device="cuda", generator=gen)
    labels[:, :100] = -100
    h = h_s.bfloat16().requires_grad_()
    ours = cd.linear_distillation_loss(h, w_s.bfloat16(), h_t.bfloat16(), w_t.bfloat16(), labels)
    ref = ref_logit_kd(h_s @ w_s.T, h_t @ w_t.T, labels)
    torch.testing.assert_close(ours.float(), ref, atol=2e-2, rtol=2e-2)
    ours.backward()
    assert torch.isfinite(h.grad).all()

