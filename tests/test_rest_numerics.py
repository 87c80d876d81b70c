"""Issue #36: the rest bucket from exp(lse_text − lse_all), and non-finite input."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

from compodistill.testing.accuracy import assert_accuracy, rounding_atol
from compodistill.testing.rest_bucket import ref_maps_rest_fp64, ref_rest_loss_fp64
from compodistill.visual_attention import visual_attention_loss, visual_attention_maps

BACKENDS = ["torch", "triton"]


def _case(seed, teacher_lift=2.0):
    g = torch.Generator().manual_seed(seed)
    n, d = 40, 16
    q = torch.randn(1, 1, n, d, generator=g)
    k = torch.randn(1, 1, n, d, generator=g)
    qt = torch.randn(1, 1, n, d, generator=g)
    kt = torch.randn(1, 1, n, d, generator=g)
    visual = torch.zeros(n, dtype=torch.bool)
    visual[4:40] = True
    # A shared direction lifts every visual score by ~12 and the text keys are 0: the student's
    # true rest mass is below 1e-6 on every row (checked against fp64 below).
    # The teacher's rest is larger (~1e-3 at lift 2, ~0.2 at lift 0.8): the student's tiny
    # rest then carries the KL, and at lift 0.8 its gradient is a material part of dq.
    for a, b, c in ((q, k, 3.5), (qt, kt, teacher_lift)):
        a[..., 0] = c
        b[:, :, 4:, 0] = c
        b[:, :, :4] = 0.0
    return q, k, qt, kt, visual


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss", ["kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("teacher_lift", [2.0, 0.8])
def test_rest_loss_matches_fp64(backend, loss, teacher_lift):
    q, k, qt, kt, visual = _case(0, teacher_lift)
    mask = visual[None].expand(1, -1)
    kw = dict(causal=False, scale=1.0, backend=backend)
    _, r64 = ref_maps_rest_fp64(q, k, visual, causal=False, scale=1.0)
    assert float(r64.max()) < 1e-6
    target = visual_attention_maps(qt, kt, mask, with_rest=True, **kw)
    q64, k64 = q.double().requires_grad_(), k.double().requires_grad_()
    a_s, r_s = ref_maps_rest_fp64(q64, k64, visual, causal=False, scale=1.0)
    a_t, r_t = ref_maps_rest_fp64(qt, kt, visual, causal=False, scale=1.0)
    allowed = torch.ones_like(a_s, dtype=torch.bool)
    ref = ref_rest_loss_fp64(a_s, r_s, a_t, r_t, allowed, loss)
    ref_grads = torch.autograd.grad(ref, (q64, k64))
    qq, kk = q.clone().requires_grad_(), k.clone().requires_grad_()
    got = visual_attention_loss(qq, kk, target, mask, loss=loss, distribution="rest", **kw)
    grads = torch.autograd.grad(got, (qq, kk))
    assert abs(float(got.detach()) - float(ref)) <= 1e-4 * abs(float(ref))
    # dk too: the text keys are 0 here, so the rest term's share of dq vanishes, not of dk.
    for name, grad, ref_grad in zip("qk", grads, ref_grads):
        rel = float((grad.double() - ref_grad).norm() / ref_grad.norm())
        assert rel <= 1e-3, (name, rel)


@pytest.mark.parametrize("backend", BACKENDS)
def test_rest_mass_is_relative_exact(backend):
    q, k, _, _, visual = _case(1)
    _, rest = visual_attention_maps(q, k, visual[None], with_rest=True, causal=False,
                                    scale=1.0, backend=backend)
    _, r64 = ref_maps_rest_fp64(q, k, visual, causal=False, scale=1.0)
    assert float(((rest.double() - r64).abs() / r64).max()) < 1e-4


def _corrupt(which, q, k, target):
    q, k, target = q.clone(), k.clone(), target.clone()
    t = {"q": q, "k": k, "target": target}[which]
    t.view(-1)[t.numel() // 2] = float("nan")
    return q, k, target


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("which", ["q", "k", "target"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_input(backend, which, bad):
    g = torch.Generator().manual_seed(2)
    q, k = torch.randn(2, 4, 12, 16, generator=g), torch.randn(2, 2, 12, 16, generator=g)
    mask = torch.zeros(2, 12, dtype=torch.bool)
    mask[:, 2:8] = True
    target = visual_attention_maps(q + 0.1, k, mask, backend=backend)
    q, k, target = q.clone(), k.clone(), target.clone()
    t = {"q": q, "k": k, "target": target}[which]
    t.view(-1)[3] = bad if which == "target" else t.view(-1)[3]
    if which != "target":
        t[0, 1, 3, 0] = bad
    with pytest.raises(ValueError, match=which):
        visual_attention_loss(q, k, target, mask, backend=backend)
    if which != "target":
        maps = visual_attention_maps(q, k, mask, backend=backend, check_finite=False)
        assert not bool(torch.isfinite(maps[0]).all())
    for loss, dist in (("cosine", "renorm"), ("kl", "renorm"), ("kl", "rest"),
                       ("reverse_kl", "rest"), ("jsd", "renorm"), ("mse", "renorm")):
        value = visual_attention_loss(q, k, target, mask, backend=backend, loss=loss,
                                      distribution=dist, check_finite=False)
        assert not bool(torch.isfinite(value)), (loss, dist, float(value))
    pooled = visual_attention_loss(q, k, target, mask, backend=backend, cosine="pooled",
                                   check_finite=False)
    assert not bool(torch.isfinite(pooled))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_rest_gradient_half_precision(dtype):
    """fp16/bf16 inputs: the Triton rest gradient meets the accuracy rule against fp64 (torch
    at the same dtype as the baseline); at fp16 the rest gradient g ~ 1e5 passes the
    do/v split that keeps it inside fp16's range."""
    q, k, qt, kt, visual = _case(0, 0.8)
    q, k = q.to(dtype), k.to(dtype)
    mask = visual[None].expand(1, -1)
    target = visual_attention_maps(qt, kt, mask, with_rest=True, causal=False, scale=1.0)
    q64, k64 = q.double().requires_grad_(), k.double().requires_grad_()
    a_s, r_s = ref_maps_rest_fp64(q64, k64, visual, causal=False, scale=1.0)
    a_t, r_t = ref_maps_rest_fp64(qt, kt, visual, causal=False, scale=1.0)
    ref = ref_rest_loss_fp64(a_s, r_s, a_t, r_t, torch.ones_like(a_s, dtype=torch.bool), "kl")
    ref_grads = torch.autograd.grad(ref, (q64, k64))
    out = {}
    for backend in BACKENDS:
        qq, kk = q.clone().requires_grad_(), k.clone().requires_grad_()
        loss = visual_attention_loss(qq, kk, target, mask, loss="kl", distribution="rest",
                                     causal=False, scale=1.0, backend=backend)
        out[backend] = torch.autograd.grad(loss, (qq, kk))
    for i, name in enumerate("qk"):
        assert_accuracy(out["triton"][i], ref_grads[i], out["torch"][i],
                        atol=rounding_atol(ref_grads[i], dtype), name=f"d{name}")
