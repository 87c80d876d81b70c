"""Compiled Triton kernels on a real GPU (skipped without CUDA).

The other kernel tests force ``TRITON_INTERPRET=1``; these run the compiled kernels at
realistic sizes in bf16/fp16 against the fp32 reference, with the accuracy rule.
Run on a GPU machine with ``python -m pytest -m gpu tests/test_gpu.py`` in a fresh process
(without TRITON_INTERPRET set).
"""
from __future__ import annotations

import os

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
              pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"),
                                 reason="GPU tests run the compiled kernels, not the interpreter")]

import compodistill as cd  # noqa: E402
from compodistill.testing.accuracy import assert_accuracy, pad_maps  # noqa: E402
from compodistill.testing.reference import ref_attention_output, ref_visual_maps  # noqa: E402


def _inputs(b, hq, hkv, n, d, dtype, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    make = lambda h: torch.randn(b, h, n, d, device="cuda", generator=gen)  # noqa: E731
    return make(hq), make(hkv), make(hkv)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,d,hq,hkv", [(1000, 128, 8, 2), (777, 64, 4, 4), (513, 80, 4, 1)])
def test_fused_attention_and_maps_match_reference(dtype, n, d, hq, hkv):
    from compodistill.kernels import attention_with_visual_maps

    q32, k32, v32 = _inputs(2, hq, hkv, n, d, dtype)
    mask = torch.ones(2, n, dtype=torch.bool, device="cuda")
    mask[1, n - 37:] = False
    spans = [[(5, 5 + n // 8), (n // 2, n // 2 + 40)], []]
    layout = cd.visual_layout(spans, 2, n, attention_mask=mask, device="cuda")
    q, k, v = (t.to(dtype).requires_grad_() for t in (q32, k32, v32))
    out, maps = attention_with_visual_maps(q, k, v, layout)
    ref_out, _ = ref_attention_output(q32, k32, v32, mask)
    vis = cd.spans_to_mask(spans, 2, n, "cuda")
    ref_maps = pad_maps(ref_visual_maps(q32, k32, vis, attention_mask=mask),
                        layout.query_count, layout.visual_count)
    sdpa = torch.nn.functional.scaled_dot_product_attention(
        q.detach(), k.detach().repeat_interleave(hq // hkv, 1),
        v.detach().repeat_interleave(hq // hkv, 1),
        attn_mask=mask[:, None, None, :] & torch.ones(n, n, dtype=torch.bool,
                                                      device="cuda").tril())
    real = mask[:, None, :, None]
    assert_accuracy(out.float() * real, ref_out * real, sdpa.float() * real, atol=1e-3,
                    name="out")
    assert_accuracy(maps, ref_maps, atol=1e-4, name="maps")
    (out.float().square().mean() + maps.sum()).backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


def test_visual_attention_loss_dispatches_to_triton_and_matches_torch():
    q, k, _ = _inputs(2, 8, 2, 1500, 128, torch.bfloat16)
    q, k = q.bfloat16().requires_grad_(), k.bfloat16().requires_grad_()
    spans = [[(32, 608)], [(10, 300), (700, 990)]]
    target = cd.visual_attention_maps(q.detach(), k.detach(), spans, backend="torch")
    fused = cd.visual_attention_loss(q, k, target, spans)  # auto -> triton on CUDA
    dq_fused, = torch.autograd.grad(fused, q)
    torch_loss = cd.visual_attention_loss(q, k, target, spans, backend="torch")
    dq_torch, = torch.autograd.grad(torch_loss, q)
    torch.testing.assert_close(fused, torch_loss, atol=1e-4, rtol=1e-3)
    torch.testing.assert_close(dq_fused.float(), dq_torch.float(), atol=2e-3, rtol=2e-2)


def test_fused_linear_kd_on_cuda_matches_reference():
    from compodistill.testing.reference_logits import ref_logit_kd

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
