"""Triton flash attention (compodistill/kernels/attention.py, compodistill/kernels/autograd.py) against the fp32 reference.

Runs on the CPU through the Triton interpreter (TRITON_INTERPRET=1, set before triton is
imported), so shapes are small. Accuracy rule: the kernel's error against the materialising
float32 reference is at most 2x the error of the same computation done in plain torch at
the input dtype, plus a small atol relative to the largest reference value.
The helpers are in tests/_helpers.py, shared with tests/test_kernels_visual.py.
"""
import os

os.environ["TRITON_INTERPRET"] = "1"

import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from compodistill import kernels as K  # noqa: E402

from compodistill.testing.visual_attention import ref_attention_output  # noqa: E402

from _helpers import (BACKWARD_KERNELS, BACKWARD_MODES, assert_close_rule,  # noqa: E402
                      launched_kernels, make_qkv, padding_mask, run_reference, use_backward)

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
@pytest.mark.parametrize("mode", BACKWARD_MODES)
def test_backward_vs_reference(n, hkv, dtype, pad, causal, mode, monkeypatch):
    use_backward(monkeypatch, mode)
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


@pytest.mark.parametrize("mode", BACKWARD_MODES)
def test_backward_head_dim_80_fully_masked_rows(mode, monkeypatch):
    use_backward(monkeypatch, mode)
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


@pytest.mark.parametrize("deterministic", ["env", "torch", None])
@pytest.mark.parametrize("visual", [False, True])
def test_backward_kernels_per_mode(deterministic, visual, monkeypatch):
    """The default backward is the 5-matmul one (one dk/dv/dq kernel, dq by atomics); the
    deterministic mode (either switch) runs the split dk/dv and dq kernels."""
    monkeypatch.setenv("COMPODISTILL_DETERMINISTIC", "1" if deterministic == "env" else "0")
    monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled",
                        lambda: deterministic == "torch")
    n = 24
    q, k, v = make_qkv(1, 2, 1, n, 16, torch.float32, seed=1)
    out, stats = K.flash_forward(q, k, v, None, True, None)
    extra = {}
    if visual:
        vcol = torch.full((1, n), -1, dtype=torch.int32)
        vcol[0, 4:8] = torch.arange(4, dtype=torch.int32)
        extra = dict(grad_maps=torch.zeros(1, n, 4), query_row=torch.arange(n)[None].int(),
                     visual_col=vcol, row_terms=torch.zeros(1, 2, n))
    names = launched_kernels(lambda: K.flash_backward(torch.ones_like(q), q, k, v, out, stats,
                                                      None, True, None, **extra))
    assert names == BACKWARD_KERNELS["atomic" if deterministic is None else "split"]
    for mode, atomic_dq in (("atomic", True), ("split", False)):  # the explicit switch
        names = launched_kernels(lambda: K.flash_backward(
            torch.ones_like(q), q, k, v, out, stats, None, True, None, atomic_dq=atomic_dq,
            **extra))
        assert names == BACKWARD_KERNELS[mode]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_atomic_and_split_backward_agree(dtype):
    """Same dS, so dk/dv are bitwise equal (same first config under the interpreter) and dq
    differs only by the order of its float32 additions."""
    n = 45
    q, k, v = make_qkv(2, 4, 2, n, 64, dtype, seed=4)
    mask = padding_mask(2, n, "left")
    out, stats = K.flash_forward(q, k, v, mask, True, None)
    do = torch.randn(q.shape, generator=torch.Generator().manual_seed(0)).to(dtype)
    atomic = K.flash_backward(do, q, k, v, out, stats, mask, True, None, atomic_dq=True)
    split = K.flash_backward(do, q, k, v, out, stats, mask, True, None, atomic_dq=False)
    assert torch.equal(atomic[1], split[1]) and torch.equal(atomic[2], split[2])
    assert atomic[0].dtype == dtype
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]
    torch.testing.assert_close(atomic[0].float(), split[0].float(), atol=tol, rtol=tol)


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
            "import compodistill.kernels as kernels; assert not kernels.HAS_TRITON; "
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
