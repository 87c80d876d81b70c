"""Triton flash attention (kernels/attention.py, kernels/autograd.py) against the fp32 reference.

Runs on the CPU through the Triton interpreter (TRITON_INTERPRET=1, set before triton is
imported), so shapes are small. Accuracy rule: the kernel's error against the materialising
float32 reference is at most 2x the error of the same computation done in plain torch at
the input dtype, plus a small atol relative to the largest reference value.
The helpers here are shared with tests/test_kernels_visual.py.
"""
import os

os.environ["TRITON_INTERPRET"] = "1"

import math  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

try:  # installed layout: kernels/ is compodistill.kernels
    from compodistill import kernels as K  # noqa: E402
except ImportError:  # source checkout without installation
    import kernels as K  # noqa: E402

from compodistill.layout import visual_layout  # noqa: E402
from compodistill.testing.reference import ref_attention_output, ref_visual_maps  # noqa: E402

# relative to the largest reference value
ATOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


# --------------------------------------------------------------------------- helpers

def padding_mask(batch: int, n: int, pad: str | None) -> torch.Tensor | None:
    """None, or a (B, N) bool mask with padding on the given side (a different amount per
    sample; sample 0 of a left-padded batch of length > 1 gets a row with no allowed key)."""
    if pad is None:
        return None
    mask = torch.ones(batch, n, dtype=torch.bool)
    for b in range(batch):
        amount = min(n - 1, (n // 4) + 2 * b)
        if amount <= 0:
            continue
        if pad == "left":
            mask[b, :amount] = False
        else:
            mask[b, n - amount:] = False
    return mask


def image_spans(lo: int, hi: int, kind: str) -> list[tuple[int, int]]:
    """Image spans inside the real region [lo, hi): 'none', 'one' or 'two' images."""
    length = hi - lo
    if kind == "none" or length <= 0:
        return []
    a = lo + length // 4
    b = min(hi, a + max(1, length // 3))
    spans = [(a, b)]
    if kind == "two" and hi - b >= 2:
        c = b + max(1, (hi - b) // 3)
        d = min(hi, c + max(1, length // 6))
        if c < d:
            spans.append((c, d))
    return spans


def make_layout(batch, n, mask, kinds, query="all", causal=True):
    """Layout with per-sample image kinds, e.g. ('two', 'none'); also returns the visual mask."""
    spans = []
    for b in range(batch):
        real = torch.arange(n) if mask is None else mask[b].nonzero().flatten()
        lo, hi = (int(real.min()), int(real.max()) + 1) if len(real) else (0, 0)
        spans.append(image_spans(lo, hi, kinds[b % len(kinds)]))
    layout = visual_layout(spans, batch, n, query=query, attention_mask=mask, causal=causal)
    vis = torch.zeros(batch, n, dtype=torch.bool)
    for b, sample in enumerate(spans):
        for s, e in sample:
            vis[b, s:e] = True
    return layout, vis


def layout_index(layout):
    return layout.query_index, layout.query_count, layout.visual_index, layout.visual_count


def make_qkv(batch, hq, hkv, n, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, hq, n, d, generator=g).to(dtype)
    k = torch.randn(batch, hkv, n, d, generator=g).to(dtype)
    v = torch.randn(batch, hkv, n, d, generator=g).to(dtype)
    return q, k, v


def lowp_attention(q, k, v, mask, causal, scale=None):
    """Materialised attention computed entirely at the input dtype (the 'plain torch' yardstick).

    Returns (out, probs (B, Hq, N, N)), both differentiable, at q's dtype.
    """
    batch, hq, n, d = q.shape
    rep = hq // k.shape[1]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    k = k.repeat_interleave(rep, 1)
    s = (q @ k.transpose(-1, -2)) * scale
    allowed = torch.ones(batch, 1, n, n, dtype=torch.bool)
    if mask is not None:
        allowed = allowed & mask[:, None, None, :]
    if causal:
        allowed = allowed & torch.ones(n, n, dtype=torch.bool).tril()
    has = allowed.any(-1, keepdim=True)
    s = torch.where(allowed & has, s, torch.where(has, float("-inf"), 0.0)).to(q.dtype)
    p = torch.softmax(s, -1) * has
    out = p @ v.repeat_interleave(rep, 1) if v is not None else None
    return out, p


def lowp_maps(probs, layout):
    """Dense (B, Qmax, Vmax) maps from materialised probs (at their dtype)."""
    head_mean = probs.mean(1)
    rows = [head_mean[b][layout.query_index[b]][:, layout.visual_index[b]]
            for b in range(head_mean.shape[0])]
    return torch.stack(rows) * layout.allowed()


def dense_ref_maps(maps, layout):
    """Pad the reference's ragged per-sample maps into the kernel layout (differentiable)."""
    _, qmax, vmax = layout.map_shape
    return torch.stack([torch.nn.functional.pad(m, (0, vmax - m.shape[1], 0, qmax - m.shape[0]))
                        for m in maps])


def max_err(a, b):
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def assert_close_rule(name, got, ref, lowp, dtype):
    """|got - ref| <= 2 |lowp - ref| + atol * max|ref| + 1e-6 (max-abs errors)."""
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    scale = ref.abs().max().item() if ref.numel() else 0.0
    err, base = max_err(got, ref), max_err(lowp, ref)
    tol = 2 * base + ATOL[dtype] * scale + 1e-6
    assert err <= tol, f"{name}: error {err:.3g} > tol {tol:.3g} (plain torch error {base:.3g})"


def run_reference(q, k, v, mask, causal, layout=None, vis=None, query="all", d_out=None, g=None):
    """fp32 reference (out, lse, maps, grads) and the low-precision torch yardstick.

    loss = (out * dO).sum() + (A * G).sum() (each term only when given).
    """
    results = {}
    for kind in ("ref", "lowp"):
        if kind == "ref":
            leaves = [t.detach().float().requires_grad_() for t in (q, k, v)]
            out, lse = ref_attention_output(*leaves, mask, causal, None)
            maps = None
            if layout is not None:
                maps = dense_ref_maps(ref_visual_maps(leaves[0], leaves[1], vis, query, mask,
                                                      causal, None), layout)
        else:
            leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
            out, probs = lowp_attention(*leaves, mask, causal)
            lse = None
            maps = lowp_maps(probs, layout) if layout is not None else None
        loss = 0.0
        if d_out is not None:
            loss = loss + (out.float() * d_out.float()).sum()
        if g is not None:
            loss = loss + (maps.float() * g).sum()
        grads = None
        if d_out is not None or g is not None:
            wrt = leaves if d_out is not None else leaves[:2]
            grads = torch.autograd.grad(loss, wrt, allow_unused=True)
            grads = [torch.zeros_like(w) if gr is None else gr for gr, w in zip(grads, wrt)]
        results[kind] = dict(out=out.detach(), lse=None if lse is None else lse.detach(),
                             maps=None if maps is None else maps.detach(), grads=grads)
    return results["ref"], results["lowp"]


# --------------------------------------------------------------------------- forward

@pytest.mark.parametrize("n", [1, 7, 37, 129, 200])
@pytest.mark.parametrize("causal", [True, False])
def test_forward_odd_lengths(n, causal):
    q, k, v = make_qkv(2, 2, 2, n, 64, torch.float32, seed=n)
    out, stats = K.flash_forward(q, k, v, None, causal, None)
    lse = K.lse_from_stats(stats)
    ref_out, ref_lse = ref_attention_output(q, k, v, None, causal, None)
    torch.testing.assert_close(out, ref_out, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(lse, ref_lse, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("hkv", [4, 2, 1])
def test_forward_dtypes_gqa_vs_reference_and_sdpa(dtype, hkv):
    q, k, v = make_qkv(2, 4, hkv, 37, 64, dtype, seed=hkv)
    out = K.flash_attention(q, k, v, causal=True)
    assert out.dtype == dtype and out.shape == q.shape
    ref, lowp = run_reference(q, k, v, None, True)
    assert_close_rule("out", out, ref["out"], lowp["out"], dtype)
    sdpa = torch.nn.functional.scaled_dot_product_attention(
        q.float(), k.float().repeat_interleave(4 // hkv, 1),
        v.float().repeat_interleave(4 // hkv, 1), is_causal=True)
    assert_close_rule("out vs sdpa", out, sdpa, lowp["out"], dtype)


@pytest.mark.parametrize("pad", ["left", "right"])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("d", [64, 80])
def test_forward_padding_and_head_dims(pad, causal, d):
    n = 45
    q, k, v = make_qkv(2, 2, 1, n, d, torch.float32, seed=d)
    mask = padding_mask(2, n, pad)
    out, stats = K.flash_forward(q, k, v, mask, causal, None)
    lse = K.lse_from_stats(stats)
    ref_out, ref_lse = ref_attention_output(q, k, v, mask, causal, None)
    assert not out.isnan().any() and not lse.isnan().any()
    torch.testing.assert_close(out, ref_out, atol=2e-5, rtol=1e-5)
    assert torch.equal(lse.isneginf(), ref_lse.isneginf())
    finite = ref_lse.isfinite()
    torch.testing.assert_close(lse[finite], ref_lse[finite], atol=2e-5, rtol=1e-5)
    if pad == "left" and causal:  # rows before the first real token see no key at all
        assert lse[0, :, 0].isneginf().all() and (out[0, :, 0] == 0).all()
    sdpa_mask = torch.ones(2, 1, n, n, dtype=torch.bool) & mask[:, None, None, :]
    if causal:
        sdpa_mask = sdpa_mask & torch.ones(n, n, dtype=torch.bool).tril()
    has = sdpa_mask.any(-1, keepdim=True)
    sdpa = torch.nn.functional.scaled_dot_product_attention(
        q, k.expand(-1, 2, -1, -1), v.expand(-1, 2, -1, -1), attn_mask=sdpa_mask | ~has)
    torch.testing.assert_close(out, sdpa * has, atol=2e-5, rtol=1e-5)


def test_forward_strided_inputs():
    """q/k/v as transposed views of (B, N, H, d) (what a model hands over): no copy needed."""
    base = torch.randn(2, 33, 3, 64)
    q = base.transpose(1, 2)
    kv = torch.randn(2, 33, 3, 64).transpose(1, 2)
    out = K.flash_attention(q, kv, kv, causal=True)
    ref, _ = ref_attention_output(q, kv, kv, None, True, None)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-5)


# --------------------------------------------------------------------------- backward

@pytest.mark.parametrize("n,hkv,dtype,pad,causal", [
    (7, 2, torch.float32, None, True),
    (37, 1, torch.float32, "left", True),
    (37, 2, torch.float16, "right", True),
    (37, 4, torch.bfloat16, None, False),
    (129, 2, torch.float32, "right", False),
    (70, 2, torch.float16, "left", True),
])
def test_backward_vs_reference(n, hkv, dtype, pad, causal):
    q, k, v = make_qkv(2, 4, hkv, n, 64, dtype, seed=n)
    mask = padding_mask(2, n, pad)
    d_out = torch.randn(q.shape).to(dtype)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = K.flash_attention(*leaves, key_mask=mask, causal=causal)
    grads = torch.autograd.grad(out, leaves, d_out)
    ref, lowp = run_reference(q, k, v, mask, causal, d_out=d_out)
    assert_close_rule("out", out.detach(), ref["out"], lowp["out"], dtype)
    for name, got, r, lo in zip("qkv", grads, ref["grads"], lowp["grads"]):
        assert got.dtype == dtype
        assert_close_rule(f"d{name}", got, r, lo, dtype)


def test_backward_head_dim_80_fully_masked_rows():
    q, k, v = make_qkv(1, 2, 2, 20, 80, torch.float32, seed=3)
    mask = torch.ones(1, 20, dtype=torch.bool)
    mask[0, :6] = False
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = K.flash_attention(*leaves, key_mask=mask, causal=True)
    d_out = torch.randn(q.shape)
    grads = torch.autograd.grad(out, leaves, d_out)
    ref, _ = run_reference(q, k, v, mask, True, d_out=d_out)
    for got, r in zip(grads, ref["grads"]):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, r, atol=5e-5, rtol=1e-4)
    assert (grads[0][0, :, :6] == 0).all()  # rows with no key get no gradient


def test_backward_broadcast_grad_output():
    """out.sum() hands the backward a stride-0 dO."""
    q, k, v = make_qkv(1, 2, 1, 21, 64, torch.float32, seed=8)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    grads = torch.autograd.grad(K.flash_attention(*leaves, causal=True).sum(), leaves)
    ref, _ = run_reference(q, k, v, None, True, d_out=torch.ones(q.shape))
    for got, r in zip(grads, ref["grads"]):
        torch.testing.assert_close(got, r, atol=2e-5, rtol=1e-4)


# --------------------------------------------------------------------------- API surface

def test_compile_sees_custom_op():
    q, k, v = make_qkv(1, 2, 1, 19, 64, torch.float32, seed=5)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]

    def f(q, k, v):
        return (K.flash_attention(q, k, v, causal=True) ** 2).sum()

    eager = torch.autograd.grad(f(*leaves), leaves)
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    got = torch.autograd.grad(compiled(*leaves), leaves)
    for a, b in zip(eager, got):
        torch.testing.assert_close(a, b)


def test_argument_errors():
    q, k, v = make_qkv(1, 4, 2, 8, 16, torch.float32)
    with pytest.raises(ValueError, match="multiple"):
        K.flash_attention(q, torch.randn(1, 3, 8, 16), torch.randn(1, 3, 8, 16))
    with pytest.raises(ValueError, match="4-D"):
        K.flash_attention(q[0], k, v)
    with pytest.raises(TypeError, match="same dtype"):
        K.flash_attention(q, k.half(), v)
    with pytest.raises(ValueError, match="v must have the shape of k"):
        K.flash_attention(q, k, v[:, :, :5])
    with pytest.raises(ValueError, match=r"key_mask must have shape \(B, N\)"):
        K.flash_attention(q, k, v, key_mask=torch.ones(1, 9, dtype=torch.bool))
    with pytest.raises(TypeError, match="key_mask must be bool"):
        K.flash_attention(q, k, v, key_mask=torch.ones(1, 8))
    with pytest.raises(TypeError, match="float16, bfloat16 or float32"):
        K.flash_attention(q.double(), k.double(), v.double())


def test_package_imports_without_triton():
    code = ("import sys; sys.modules['triton'] = None; sys.path.insert(0, %r); "
            "import kernels; assert not kernels.HAS_TRITON; "
            "import pytest\n"
            "try:\n    kernels.flash_forward(None, None, None, None, True, None)\n"
            "except RuntimeError as e:\n    assert 'triton' in str(e)\n"
            "else:\n    raise SystemExit('no error')\n") % str(ROOT)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "TRITON_INTERPRET": "0"}, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]


@pytest.mark.slow
@pytest.mark.parametrize("causal", [True, False])
def test_backward_longer_sequence(causal):
    n = 384
    q, k, v = make_qkv(1, 2, 1, n, 64, torch.float16, seed=11)
    mask = padding_mask(1, n, "left")
    d_out = torch.randn(q.shape).half()
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = K.flash_attention(*leaves, key_mask=mask, causal=causal)
    grads = torch.autograd.grad(out, leaves, d_out)
    ref, lowp = run_reference(q, k, v, mask, causal, d_out=d_out)
    assert_close_rule("out", out.detach(), ref["out"], lowp["out"], torch.float16)
    for name, got, r, lo in zip("qkv", grads, ref["grads"], lowp["grads"]):
        assert_close_rule(f"d{name}", got, r, lo, torch.float16)
