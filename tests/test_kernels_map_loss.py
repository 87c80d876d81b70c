"""The fused map-loss kernels (compodistill/kernels/map_loss.py) against the float64
reference of compodistill/testing/map_loss.py, under the accuracy rule of
compodistill/testing/accuracy.py: every variant, value and gradient (maps and student
rest), with padding rows and columns, causal / windowed / non-causal allowed masks, several
images per sample, a sample without images, non-finite input and extreme magnitudes."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from compodistill.testing.accuracy import assert_accuracy, rounding_atol  # noqa: E402
from compodistill.testing.map_loss import ref_map_loss  # noqa: E402
from compodistill.visual_attention.layout import visual_layout  # noqa: E402
from compodistill.visual_attention.map_losses import (per_sample_map_loss,  # noqa: E402
                                                      visual_map_loss)

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="the kernels run on CPU tensors under the interpreter")

VARIANTS = [("cosine", "flat", "renorm"), ("cosine", "row", "renorm"),
            ("cosine", "pooled", "renorm"), ("mse", "flat", "renorm")] + \
           [(loss, "flat", dist) for loss in ("kl", "reverse_kl", "jsd")
            for dist in ("renorm", "rest")]
IDS = [f"{loss}-{cos}" if loss == "cosine" else f"{loss}-{dist}"
       for loss, cos, dist in VARIANTS]


def _layout(mode="causal", n=48):
    """B = 4: two images + right padding; one image; no image; one late image (its
    early rows see no image when causal). Vmax = 14, so sample 1 has padding columns."""
    spans = [[(3, 9), (20, 28)], [(10, 22)], [], [(40, 46)]]
    mask = torch.ones(4, n, dtype=torch.bool)
    mask[0, 42:] = False
    mask[1, 30:] = False
    causal = mode != "bidirectional"
    return visual_layout(spans, 4, n, attention_mask=mask, causal=causal,
                         window=9 if mode == "window" else None)


def _maps(layout, seed, peaked=1.0, padding_garbage=True):
    """Row-normalised-looking maps with causal zeros; padding holds garbage (must be
    ignored); the rest ~ the missing mass."""
    g = torch.Generator().manual_seed(seed)
    shape = layout.map_shape
    a = torch.rand(shape, generator=g) ** (3 * peaked)
    a = a / a.sum(-1, keepdim=True).clamp_min(1e-6) * (0.4 + 0.5 * torch.rand(shape[:2], generator=g))[..., None]
    a = torch.where(layout.allowed(), a, 0.0)
    if padding_garbage:
        real = layout.query_valid[:, :, None] & layout.visual_valid[:, None, :]
        a = torch.where(real, a, torch.rand(shape, generator=g))
    rest = (1.0 - a.sum(-1)).clamp_min(0.0) * (0.8 + 0.4 * torch.rand(shape[:2], generator=g))
    return a, rest


def _run(backend, a_s, a_t, layout, weights, s_rest=None, **kw):
    a_s = a_s.clone().requires_grad_()
    s_rest = None if s_rest is None else s_rest.clone().requires_grad_()
    values, contributing = per_sample_map_loss(a_s, a_t, layout, student_rest=s_rest,
                                               backend=backend, **kw)
    wanted = [a_s] + ([s_rest] if s_rest is not None else [])
    grads = torch.autograd.grad((values * weights).sum(), wanted, allow_unused=True)
    grads = [torch.zeros_like(x) if gr is None else gr for x, gr in zip(wanted, grads)]
    return values.detach(), contributing, grads


def _check(layout, a_s, a_t, s_rest=None, t_rest=None, **kw):
    weights = torch.tensor([1.0, -2.0, 3.0, 0.5])[: layout.batch_size]
    opts = dict(kw, target_rest=t_rest)
    got, contrib, got_g = _run("triton", a_s, a_t, layout, weights, s_rest, **opts)
    base, base_contrib, base_g = _run("torch", a_s, a_t, layout, weights, s_rest, **opts)
    ref, ref_g, ref_r = ref_map_loss(a_s, a_t, layout.query_count, layout.visual_count,
                                     layout.allowed(), student_rest=s_rest, weights=weights,
                                     **opts)
    assert torch.equal(contrib, base_contrib)
    assert_accuracy(got, ref, base, atol=rounding_atol(ref, torch.float32), name="value")
    assert_accuracy(got_g[0], ref_g, base_g[0], atol=rounding_atol(ref_g, torch.float32),
                    name="grad maps")
    if ref_r is not None:
        assert_accuracy(got_g[1], ref_r, base_g[1], atol=rounding_atol(ref_r, torch.float32),
                        name="grad rest")
    return got, got_g


@pytest.mark.parametrize("loss,cosine,distribution", VARIANTS, ids=IDS)
def test_every_variant_matches_the_fp64_reference(loss, cosine, distribution):
    layout = _layout()
    a_s, r_s = _maps(layout, 1)
    a_t, r_t = _maps(layout, 2)
    kw = dict(loss=loss, cosine=cosine, distribution=distribution, beta=0.3)
    values, _ = _check(layout, a_s, a_t, **kw)
    assert values[2] == 0  # no image
    assert bool((values[[0, 1, 3]] != 0).all())
    if distribution == "rest":  # a given rest on either side, or on both
        _check(layout, a_s, a_t, s_rest=r_s, t_rest=r_t, **kw)
        _check(layout, a_s, a_t, s_rest=r_s, **kw)
        _check(layout, a_s, a_t, t_rest=r_t, **kw)


@pytest.mark.parametrize("mode", ["bidirectional", "window"])
@pytest.mark.parametrize("loss,cosine,distribution",
                         [("cosine", "row", "renorm"), ("cosine", "pooled", "renorm"),
                          ("kl", "flat", "renorm"), ("jsd", "flat", "rest")])
def test_allowed_masks(mode, loss, cosine, distribution):
    layout = _layout(mode)
    a_s, r_s = _maps(layout, 3)
    a_t, _ = _maps(layout, 4)
    _check(layout, a_s, a_t, s_rest=r_s if distribution == "rest" else None, loss=loss,
           cosine=cosine, distribution=distribution, beta=0.5)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy's NaN warnings (interpreter)
@pytest.mark.parametrize("loss,cosine,distribution", VARIANTS, ids=IDS)
def test_non_finite_input_gives_nan_for_that_sample_only(loss, cosine, distribution):
    layout = _layout()
    a_s, r_s = _maps(layout, 5)
    a_t, r_t = _maps(layout, 6)
    kw = dict(loss=loss, cosine=cosine, distribution=distribution)
    clean = per_sample_map_loss(a_s, a_t, layout, backend="triton", **kw)[0]
    bad_s, bad_t = a_s.clone(), a_t.clone()
    bad_s[0, 5, 13] = float("nan")  # a causal zero of sample 0: real, not allowed
    bad_t[3, 44, 2] = float("inf")
    bad_s[1, 30, 3] = float("nan")  # padding row of sample 1: ignored
    values = per_sample_map_loss(bad_s, bad_t, layout, backend="triton", **kw)[0]
    assert torch.isnan(values[0]) and torch.isnan(values[3]), values
    assert values[1] == clean[1] and values[2] == 0
    if distribution == "rest":
        r = r_s.clone()
        r[1, 2] = float("nan")
        r[0, 45] = float("nan")  # a padding row of sample 0: ignored
        values = per_sample_map_loss(a_s, a_t, layout, backend="triton", student_rest=r,
                                     target_rest=r_t, **kw)[0]
        assert torch.isnan(values[1]) and not bool(torch.isnan(values[[0, 2, 3]]).any())


@pytest.mark.parametrize("loss", ["kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("distribution", ["renorm", "rest"])
def test_extreme_magnitudes_and_the_subnormal_cut(loss, distribution):
    """Peaked rows (entries down to ~1e-35 next to ~1), subnormal entries (cut to 0: their
    gradient is 0, never inf) and a row of 1e-36 total (below the 1e-30 clamp)."""
    layout = _layout()
    a_s, r_s = _maps(layout, 7, peaked=25.0)
    a_t, r_t = _maps(layout, 8, peaked=25.0)
    a_s[0, 20, 1], a_t[0, 21, 2] = 1e-39, 1e-40  # subnormal
    a_s[1, 15, :] = torch.where(layout.allowed()[1, 15], 1e-36, 0.0)
    a_t[3, 45, :] = torch.where(layout.allowed()[3, 45], 3e-37, 0.0)
    r_s[0, 7], r_t[1, 9] = 1e-39, 2e-7
    assert float(a_s[layout.allowed() & (a_s > 0)].min()) < 1e-30
    values, grads = _check(layout, a_s, a_t, s_rest=r_s if distribution == "rest" else None,
                           t_rest=r_t if distribution == "rest" else None, loss=loss,
                           distribution=distribution, beta=0.5)
    assert bool(torch.isfinite(values).all()) and bool(torch.isfinite(grads[0]).all())
    assert grads[0][0, 20, 1] == 0


@pytest.mark.parametrize("loss,cosine", [("cosine", "flat"), ("cosine", "row"),
                                         ("cosine", "pooled"), ("mse", "flat")])
def test_large_and_tiny_scales(loss, cosine):
    """Cosine and MSE with maps scaled by 1e-20 (norm products below the 1e-12 clamp) and
    up to 1e8 (squared-norm products near float32's top: 1e15 overflows them in the
    PyTorch formula as well)."""
    layout = _layout()
    a_s, _ = _maps(layout, 9)
    a_t, _ = _maps(layout, 10)
    for scale in (1e-20, 1e-6, 1e8) if loss == "cosine" else (1e-15, 1e12):
        _check(layout, a_s * scale, a_t * scale, loss=loss, cosine=cosine)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_visual_map_loss_reductions_and_fp64(reduction):
    layout = _layout()
    a_s, _ = _maps(layout, 11)
    a_t, _ = _maps(layout, 12)
    out = {}
    for backend in ("triton", "torch"):
        x = a_s.clone().requires_grad_()
        loss = visual_map_loss(x, a_t, layout, loss="jsd", reduction=reduction,
                               backend=backend)
        (loss.sum() if reduction == "none" else loss).backward()
        out[backend] = loss.detach(), x.grad
    torch.testing.assert_close(out["triton"][0], out["torch"][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["triton"][1], out["torch"][1], rtol=1e-4, atol=1e-6)
    # float64 maps keep float64 math: the PyTorch path
    v64 = visual_map_loss(a_s.double(), a_t.double(), layout, loss="jsd", reduction=reduction,
                          backend="triton")
    assert v64.dtype == torch.float64


def test_no_contributing_sample_gives_zero_and_zero_grad():
    layout = visual_layout([[], [(30, 40)]], 2, 44, causal=True,
                           query=torch.arange(44).expand(2, 44) < 20)
    a_s = torch.rand(layout.map_shape, requires_grad=True)
    loss = visual_map_loss(a_s, torch.rand(layout.map_shape), layout, loss="kl",
                           backend="triton")
    loss.backward()
    assert loss == 0 and bool((a_s.grad == 0).all())


def test_deterministic():
    layout = _layout()
    a_s, _ = _maps(layout, 13)
    a_t, _ = _maps(layout, 14)
    runs = [_run("triton", a_s, a_t, layout, torch.ones(4), loss="cosine", cosine="pooled")
            for _ in range(2)]
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][2][0], runs[1][2][0])
