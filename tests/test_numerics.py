"""Numerical safety: huge scores, fp16 overflow-prone inputs, all-equal scores, fully masked
rows and fully padded samples, no image at all, tiny sequences; for the chunked PyTorch path,
the Triton kernels (interpreter) and the logit losses; and the trainer's non-finite guard.

Where fp32 itself loses digits (scores of 1e3 and up), the yardstick is a float64 dense
softmax and the accuracy rule's baseline is the fp32 reference's own error against it.
"""
import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

import math  # noqa: E402
import warnings  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from compodistill import (linear_distillation_loss, logit_distillation_loss,  # noqa: E402
                          rdist_loss, visual_attention_loss, visual_attention_maps,
                          visual_layout)
from compodistill.testing.accuracy import assert_accuracy, max_error, pad_maps  # noqa: E402
from compodistill.testing.visual_attention import ref_visual_maps  # noqa: E402
from compodistill.testing.logit_kd import ref_logit_kd, ref_rdist  # noqa: E402

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
LOSSES = [dict(loss="cosine", cosine="flat"), dict(loss="cosine", cosine="row"),
          dict(loss="cosine", cosine="pooled"), dict(loss="kl"),
          dict(loss="kl", distribution="rest"), dict(loss="reverse_kl"), dict(loss="jsd"),
          dict(loss="mse")]


def backends():
    out = ["torch"]
    try:
        import triton  # noqa: F401
        out.append("triton")
    except ImportError:
        pass
    return out


BACKENDS = backends()


def truth_maps(q, k, vis, mask=None, causal=True):
    """float64 dense head-mean maps (per sample, query='all'), the exact yardstick."""
    b, hq, n, d = q.shape
    kk = k.double().repeat_interleave(hq // k.shape[1], 1)
    s = torch.einsum("bhid,bhjd->bhij", q.double(), kk) / math.sqrt(d)
    allowed = torch.ones(b, 1, n, n, dtype=torch.bool)
    if causal:
        allowed = allowed & torch.ones(n, n, dtype=torch.bool).tril()
    if mask is not None:
        allowed = allowed & mask[:, None, None, :]
    has = allowed.any(-1, keepdim=True)
    s = torch.where(allowed, s, float("-inf")).masked_fill(~has, 0.0)
    p = (torch.softmax(s, -1) * has).mean(1)
    rows = torch.ones(b, n, dtype=torch.bool) if mask is None else mask
    return [p[i][rows[i]][:, vis[i]] for i in range(b)]


def check_against_truth(maps, q, k, vis, layout, mask=None, causal=True, atol=1e-5):
    truth = pad_maps(truth_maps(q, k, vis, mask, causal), layout.query_count,
                     layout.visual_count)
    ref = pad_maps(ref_visual_maps(q, k, vis, "all", mask, causal), layout.query_count,
                   layout.visual_count)
    assert torch.isfinite(maps).all()
    assert float(maps.max()) <= 1.0 + 1e-6, "a probability above 1"
    # The fp32 reference's own error sets the baseline (the accuracy rule, with fp64 truth).
    assert_accuracy(maps.double(), truth, ref.double(), atol=atol, name="maps")


def loss_and_grads(q, k, target, vis, backend, **kw):
    qs, ks = q.clone().requires_grad_(), k.clone().requires_grad_()
    loss = visual_attention_loss(qs, ks, target, vis, backend=backend, **kw)
    loss.sum().backward()
    return loss.detach(), qs.grad, ks.grad


def image(b, n, start, end):
    vis = torch.zeros(b, n, dtype=torch.bool)
    vis[:, start:end] = True
    return vis


# --------------------------------------------------------------------------- large scores

def scaled_qk(b, hq, hkv, n, d, max_score, dtype=F32, seed=0):
    """q, k whose largest |q·k|/sqrt(d) is about ``max_score``."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, n, d, generator=g)
    k = torch.randn(b, hkv, n, d, generator=g)
    base = (q @ k.repeat_interleave(hq // hkv, 1).transpose(-1, -2)).abs().max() / math.sqrt(d)
    factor = math.sqrt(max_score / float(base))
    return (q * factor).to(dtype), (k * factor).to(dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("max_score", [1e2, 1e3, 1e4])
def test_large_scores_maps_are_accurate(backend, max_score):
    # Regression: the chunked path scored visual keys twice (once per key chunk for the lse,
    # once through the gathered keys for P), which round differently, and folded the lse into
    # one fp32 number; at |s| ~ 1e4 its maps were off by 5.3e-5 (bound 1.3e-5 here).
    n = 40 if backend == "torch" else 24
    vis = image(2, n, 5, 17)
    for seed in range(3):
        q, k = scaled_qk(2, 4, 2, n, 16, max_score, seed=seed)
        layout = visual_layout(vis, 2, n)
        maps = visual_attention_maps(q, k, vis, backend=backend)
        check_against_truth(maps, q, k, vis, layout)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("max_score", [1e2, 1e3, 1e4])
def test_large_scores_gradients_are_accurate(backend, max_score):
    """dq, dk of sum(A · G) at |s| up to 1e4 against float64 autograd; the baseline is the
    float32 reference's own gradient error. On Triton the maps come from the forward's
    second phase and the backward rebuilds P from the same statistics."""
    n = 40 if backend == "torch" else 24
    vis = image(2, n, 5, 17)
    for seed in range(2):
        q, k = scaled_qk(2, 4, 2, n, 16, max_score, seed=seed)
        layout = visual_layout(vis, 2, n)
        g = torch.randn(layout.map_shape, generator=torch.Generator().manual_seed(seed))
        grads = {}
        for name, dtype in (("fast", F32), ("ref", F32), ("truth", torch.float64)):
            qs = q.detach().to(dtype).clone().requires_grad_()
            ks = k.detach().to(dtype).clone().requires_grad_()
            if name == "fast":
                maps = visual_attention_maps(qs, ks, vis, backend=backend)
            elif name == "ref":
                maps = pad_maps(ref_visual_maps(qs, ks, vis, "all"), layout.query_count,
                                layout.visual_count)
            else:
                maps = pad_maps(truth_maps(qs, ks, vis), layout.query_count,
                                layout.visual_count)
            (maps * g.to(maps.dtype)).sum().backward()
            grads[name] = (qs.grad, ks.grad)
        for i, what in enumerate(("dq", "dk")):
            truth = grads["truth"][i]
            assert_accuracy(grads["fast"][i].double(), truth, grads["ref"][i].double(),
                            atol=1e-5 * float(truth.abs().max()), name=what)


@pytest.mark.skipif("triton" not in BACKENDS, reason="needs triton")
@pytest.mark.parametrize("power", [2, 3])
def test_large_scores_tied_visual_keys(power):
    # Five image tokens share the top score (P = 1/5 each, not a power of two): the row
    # statistics must keep the max and log2(l) apart; folded into one fp32 number of size
    # ~1e4 they put a relative error of ~3e-4 on every P (Triton path; regression).
    # q and the tied keys are small integers times 2**power, so every score is exact in
    # fp32 whatever the summation order: 576 * 4**power / 4 = 2304 or 9216.
    n, hq = 16, 2
    vis = image(1, n, 3, 13)
    u = torch.full((16,), 6.0 * 2.0 ** power)
    q = u.expand(1, hq, n, 16).clone()
    k = torch.zeros(1, 1, n, 16)
    k[0, 0, :, :8] = 1.0  # text keys score 24 * 2**power, far below the ties
    k[0, 0, 3:13] = -u
    k[0, 0, 4:13:2] = u
    layout = visual_layout(vis, 1, n)
    maps = visual_attention_maps(q, k, vis, backend="triton")
    check_against_truth(maps, q, k, vis, layout)


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_scores_losses_and_gradients_are_finite(backend):
    n = 24
    vis = image(2, n, 3, 11)
    q, k = scaled_qk(2, 2, 1, n, 16, 1e4, seed=1)
    q_t, k_t = scaled_qk(2, 2, 1, n, 16, 1e4, seed=2)
    target = visual_attention_maps(q_t, k_t, vis, backend="torch")
    for options in LOSSES:
        loss, dq, dk = loss_and_grads(q, k, target, vis, backend, **options)
        assert torch.isfinite(loss).all(), options
        assert torch.isfinite(dq).all() and torch.isfinite(dk).all(), options


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [F16, BF16])
def test_overflow_prone_half_inputs_stay_finite_and_exact(backend, dtype):
    # |q|, |k| up to 6e4 (fp16's range ends at 65504): q·k ~ 1e10 only fits the fp32
    # accumulation. Regression for the chunked path, which returned inf for these inputs.
    n = 8
    vis = image(1, n, 2, 5)
    g = torch.Generator().manual_seed(0)
    q = ((torch.rand(1, 2, n, 16, generator=g) * 2 - 1) * 6e4).to(dtype)
    k = ((torch.rand(1, 2, n, 16, generator=g) * 2 - 1) * 6e4).to(dtype)
    assert torch.isfinite(q).all() and torch.isfinite(k).all()
    layout = visual_layout(vis, 1, n)
    maps = visual_attention_maps(q, k, vis, backend=backend)
    check_against_truth(maps, q.float(), k.float(), vis, layout, atol=1e-6)
    target = visual_attention_maps(q.flip(2), k, vis, backend="torch")
    for options in LOSSES:
        loss, dq, dk = loss_and_grads(q, k, target, vis, backend, **options)
        assert torch.isfinite(loss).all(), options
        assert torch.isfinite(dq).all() and torch.isfinite(dk).all(), options


# --------------------------------------------------------------------------- degenerate inputs

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal", [True, False])
def test_all_equal_scores_give_uniform_attention(backend, causal):
    n, start, end = 12, 4, 9
    vis = image(2, n, start, end)
    q = torch.zeros(2, 4, n, 16)
    k = torch.randn(2, 2, n, 16)  # q = 0: every score is 0
    mask = torch.ones(2, n, dtype=torch.bool)
    mask[1, :2] = False  # left padding on sample 1
    maps = visual_attention_maps(q, k, vis, attention_mask=mask, causal=causal, backend=backend)
    layout = visual_layout(vis, 2, n, attention_mask=mask, causal=causal)
    for b in range(2):
        for r in range(int(layout.query_count[b])):
            i = int(layout.query_index[b, r])
            keys = (mask[b, : i + 1] if causal else mask[b]).sum().item()
            allowed = [(j <= i or not causal) for j in range(start, end)]
            expected = torch.tensor([1.0 / keys if a else 0.0 for a in allowed])
            torch.testing.assert_close(maps[b, r, : end - start], expected, atol=1e-7, rtol=0)
    for options in LOSSES:
        loss, dq, dk = loss_and_grads(q, k, maps.detach(), vis, backend, attention_mask=mask,
                                      causal=causal, **options)
        assert abs(float(loss)) < 1e-6, options  # student equals target
        assert torch.isfinite(dq).all() and torch.isfinite(dk).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_fully_padded_sample_contributes_nothing(backend):
    n = 10
    mask = torch.ones(3, n, dtype=torch.bool)
    mask[1] = False  # sample 1: nothing but padding
    mask[2, 7:] = False
    spans = [[(2, 5)], [], [(0, 3)]]
    q, k = torch.randn(3, 2, n, 16), torch.randn(3, 2, n, 16)
    target = visual_attention_maps(torch.randn(3, 2, n, 16), k, spans, attention_mask=mask,
                                   backend="torch")
    for options in LOSSES:
        per_sample, dq, dk = loss_and_grads(q, k, target, spans, backend, attention_mask=mask,
                                            reduction="none", **options)
        assert torch.isfinite(per_sample).all() and per_sample[1] == 0
        assert (dq[1] == 0).all() and (dk[1] == 0).all()
        assert torch.isfinite(dq).all() and torch.isfinite(dk).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_sample_padded_or_without_rows(backend):
    n = 6
    mask = torch.zeros(2, n, dtype=torch.bool)
    q, k = torch.randn(2, 2, n, 16), torch.randn(2, 1, n, 16)
    maps = visual_attention_maps(q, k, [[], []], attention_mask=mask, backend=backend)
    assert maps.shape == (2, 0, 0)
    for options in LOSSES:
        loss, dq, dk = loss_and_grads(q, k, maps, [[], []], backend, attention_mask=mask,
                                      **options)
        assert float(loss) == 0.0 and (dq == 0).all() and (dk == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_rows_before_the_image_and_no_image_at_all(backend):
    n = 9
    q, k = torch.randn(2, 2, n, 16), torch.randn(2, 2, n, 16)
    # Every query row before the image: causal rows see no visual key.
    rows = torch.zeros(2, n, dtype=torch.bool)
    rows[:, :3] = True
    spans = [[(5, 8)], [(6, 9)]]
    target = visual_attention_maps(q, k, spans, query=rows, backend="torch")
    assert (target == 0).all()
    for options in LOSSES:
        loss, dq, dk = loss_and_grads(q, k, target, spans, backend, query=rows, **options)
        assert float(loss) == 0.0 and (dq == 0).all() and (dk == 0).all()
    # Nv = 0 in the whole batch.
    empty = visual_attention_maps(q, k, [[], []], backend=backend)
    assert empty.shape == (2, n, 0)
    for options in LOSSES:
        loss, dq, dk = loss_and_grads(q, k, empty, [[], []], backend, **options)
        assert float(loss) == 0.0 and (dq == 0).all() and (dk == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n", [1, 2])
def test_tiny_sequences(backend, n):
    q, k = torch.randn(2, 2, n, 8), torch.randn(2, 2, n, 8)
    spans = [[(0, n)], [(n - 1, n)]]
    maps = visual_attention_maps(q, k, spans, backend=backend)
    vis = torch.zeros(2, n, dtype=torch.bool)
    vis[0, :], vis[1, n - 1] = True, True
    layout = visual_layout(spans, 2, n)
    ref = pad_maps(ref_visual_maps(q, k, vis), layout.query_count, layout.visual_count)
    assert_accuracy(maps, ref, atol=1e-6)
    target = visual_attention_maps(torch.randn(2, 2, n, 8), k, spans, backend="torch")
    for options in LOSSES:
        loss, dq, dk = loss_and_grads(q, k, target, spans, backend, **options)
        assert torch.isfinite(loss).all() and torch.isfinite(dq).all() and torch.isfinite(dk).all()


# --------------------------------------------------------------------------- logit losses

LOGIT_BACKENDS = BACKENDS


@pytest.mark.parametrize("backend", LOGIT_BACKENDS)
@pytest.mark.parametrize("loss", ["kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("case", ["huge", "half_max", "equal", "one_hot"])
def test_logit_kd_extreme_logits(backend, loss, case):
    g = torch.Generator().manual_seed(3)
    shape = (2, 5, 33)
    dtype = F16 if case == "half_max" else F32
    if case == "huge":  # logits of ±1e4 (fp32)
        zs, zt = (torch.rand(shape, generator=g) * 2 - 1) * 1e4, \
            (torch.rand(shape, generator=g) * 2 - 1) * 1e4
    elif case == "half_max":  # fp16 logits near the top of its range
        zs = ((torch.rand(shape, generator=g) * 2 - 1) * 6e4).to(F16)
        zt = ((torch.rand(shape, generator=g) * 2 - 1) * 6e4).to(F16)
    elif case == "equal":  # all-equal logits: uniform distributions, zero divergence
        zs, zt = torch.full(shape, 7.0), torch.full(shape, -3.0)
    else:  # one-hot-like: one enormous logit per row
        zs, zt = torch.zeros(shape), torch.zeros(shape)
        zs[..., 0], zt[..., 1] = 1e4, 1e4
    labels = torch.randint(0, 33, shape[:2], generator=g)
    labels[:, 0] = -100
    for zscore in (False, True):
        s = zs.clone().requires_grad_()
        value = logit_distillation_loss(s, zt, labels, loss=loss, zscore=zscore,
                                        backend=backend)
        value.backward()
        assert torch.isfinite(value) and torch.isfinite(s.grad).all()
        r = zs.detach().clone().requires_grad_()
        ref = ref_logit_kd(r, zt, labels, loss=loss, zscore=zscore)
        (ref_grad,) = torch.autograd.grad(ref, r)
        tol = 1e-4 * max(1.0, abs(float(ref)))
        assert abs(float(value) - float(ref)) <= tol, (float(value), float(ref))
        assert max_error(s.grad.float(), ref_grad.float()) <= 1e-3 * max(
            1.0, float(ref_grad.abs().max())) + (1e-3 if dtype == F16 else 1e-6)
        if case == "equal":
            assert abs(float(value)) < 1e-6


def test_logit_kd_without_selected_tokens_is_zero_and_attached():
    zs = torch.randn(2, 4, 9, requires_grad=True)
    labels = torch.full((2, 4), -100)
    value = logit_distillation_loss(zs, torch.randn(2, 4, 9), labels, backend="torch")
    value.backward()
    assert float(value) == 0.0 and (zs.grad == 0).all()


def test_linear_kd_huge_hidden_states_finite():
    g = torch.Generator().manual_seed(0)
    h_s = torch.randn(2, 6, 8, generator=g) * 1e3
    h_t = torch.randn(2, 6, 8, generator=g) * 1e3
    w_s, w_t = torch.randn(40, 8, generator=g), torch.randn(40, 8, generator=g)
    leaves = [t.clone().requires_grad_() for t in (h_s, w_s)]
    value = linear_distillation_loss(leaves[0], leaves[1], h_t, w_t, positions="all",
                                     ce_weight=0.5, labels=torch.randint(0, 40, (2, 6)),
                                     chunk_size=5, backend="torch")
    value.backward()
    assert torch.isfinite(value)
    assert all(torch.isfinite(t.grad).all() for t in leaves)


def test_rdist_huge_logits_finite():
    g = torch.Generator().manual_seed(0)
    zs = ((torch.rand(2, 7, 300, generator=g) * 2 - 1) * 6e4).to(F16).requires_grad_()
    zt = ((torch.rand(2, 7, 300, generator=g) * 2 - 1) * 6e4).to(F16)
    vis = torch.zeros(2, 7, dtype=torch.bool)
    vis[0, 1:5], vis[1, 3:7] = True, True
    value = rdist_loss(zs, zt, vis)
    value.backward()
    assert torch.isfinite(value)
    assert abs(float(value) - float(ref_rdist(zs.detach(), zt, vis))) < 1e-4


# --------------------------------------------------------------------------- trainer guard

def test_trainer_skips_non_finite_gradient_with_finite_loss(tmp_path, monkeypatch):
    """A finite loss whose gradient is NaN (an overflow in backward) is skipped too."""
    pytest.importorskip("accelerate")
    from _helpers import run_loop

    class NanGrad(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, g):
            return g * float("nan")

    original = torch.nn.functional.mse_loss
    calls = {"n": 0}

    def poisoned(a, b):
        calls["n"] += 1
        out = original(a, b)
        return NanGrad.apply(out) if calls["n"] in (2, 4) else out

    monkeypatch.setattr(torch.nn.functional, "mse_loss", poisoned)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result, weight = run_loop(tmp_path, 6)
    assert result.skipped_steps == 2 and result.steps == 6
    assert sum("non-finite" in str(w.message) for w in caught) == 2
    assert torch.isfinite(weight).all()
