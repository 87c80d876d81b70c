"""Fused linear distillation (linear_distillation_loss) against the float32 references."""
import importlib.util
import os

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

if not torch.cuda.is_available():  # run the Triton kernels in the interpreter on CPU
    os.environ.setdefault("TRITON_INTERPRET", "1")

from compodistill.logit_kd.linear import LinearDistillationLoss, linear_distillation_loss  # noqa: E402
from compodistill.testing.accuracy import assert_accuracy  # noqa: E402
from compodistill.testing.logit_kd import ref_logit_kd  # noqa: E402

HAS_TRITON = importlib.util.find_spec("triton") is not None
BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.skipif(
    not HAS_TRITON, reason="triton not installed"))]


def _inputs(B, N, Vs, Vt, ds=16, dt=24, dtype=torch.float32, seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(dtype)

    t = dict(h_s=rnd(B, N, ds).requires_grad_(True),
             W_s=rnd(Vs, ds, scale=0.5).requires_grad_(True),
             h_t=rnd(B, N, dt), W_t=rnd(Vt, dt, scale=0.5))
    t["b_s"] = rnd(Vs, scale=0.1).requires_grad_(True) if bias else None
    t["b_t"] = rnd(Vt, scale=0.1) if bias else None
    labels = torch.randint(0, Vs, (B, N), generator=g)
    labels[torch.rand(B, N, generator=g) < 0.3] = -100
    t["labels"] = labels
    t["am"] = (torch.rand(B, N, generator=g) > 0.2).long()
    t["vm"] = torch.rand(B, N, generator=g) < 0.5
    return t


def _params(t):
    return [p for p in (t["h_s"], t["W_s"], t["b_s"]) if p is not None]


def _logits(t, dtype=None):
    cast = (lambda x: x) if dtype is None else (lambda x: None if x is None else x.to(dtype))
    zs = cast(t["h_s"]) @ cast(t["W_s"]).T
    zt = cast(t["h_t"]) @ cast(t["W_t"]).T
    if t["b_s"] is not None:
        zs, zt = zs + cast(t["b_s"]), zt + cast(t["b_t"])
    return zs, zt


def _reference(t, ce_weight=0.0, kd_weight=1.0, **kw):
    zs, zt = _logits(t, torch.float32)
    out = kd_weight * ref_logit_kd(zs, zt, t["labels"], attention_mask=t["am"],
                                   visual_mask=t["vm"], **kw)
    if ce_weight:
        out = out + ce_weight * F.cross_entropy(zs.flatten(0, -2), t["labels"].flatten())
    return out


def _fused(t, backend, **kw):
    return linear_distillation_loss(t["h_s"], t["W_s"], t["h_t"], t["W_t"], t["labels"],
                                    b_s=t["b_s"], b_t=t["b_t"], attention_mask=t["am"],
                                    visual_mask=t["vm"], backend=backend, **kw)


def _compare(t, backend, atol=3e-5, **kw):
    out = _fused(t, backend, **kw)
    for k in ("chunk_size", "memory_budget_bytes"):
        kw.pop(k, None)
    ref = _reference(t, **kw)
    grads = torch.autograd.grad(out, _params(t))
    refs = torch.autograd.grad(ref, _params(t))
    assert out.dtype == torch.float32 and out.dim() == 0
    torch.testing.assert_close(out, ref, atol=atol, rtol=1e-4)
    for g, r in zip(grads, refs):
        torch.testing.assert_close(g, r, atol=atol, rtol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss,beta", [("kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.3)])
@pytest.mark.parametrize("temperature,zscore", [(1.0, False), (2.0, False), (1.0, True)])
def test_losses_match_reference(backend, loss, beta, temperature, zscore):
    t = _inputs(2, 17, 517, 530)
    _compare(t, backend, loss=loss, beta=beta, temperature=temperature, zscore=zscore,
             chunk_size=5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("positions", ["response", "all", "visual"])
@pytest.mark.parametrize("B,N,V,chunk,bias", [(1, 1, 1000, None, True), (1, 37, 517, 8, False),
                                              (1, 129, 300, 50, True)])
def test_positions_shapes_chunks(backend, positions, B, N, V, chunk, bias):
    t = _inputs(B, N, V, V + 7, seed=N, bias=bias)
    _compare(t, backend, positions=positions, chunk_size=chunk)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss,temperature", [("kl", 1.0), ("jsd", 2.0)])
def test_ce_term(backend, loss, temperature):
    t = _inputs(2, 23, 301, 301)
    _compare(t, backend, loss=loss, temperature=temperature, positions="all", ce_weight=0.7,
             kd_weight=0.5, chunk_size=6)


def test_ce_only():
    t = _inputs(1, 9, 64, 64)
    _compare(t, "torch", ce_weight=1.0, kd_weight=0.0, chunk_size=4)


def test_flat_inputs_and_module():
    t = _inputs(1, 13, 100, 120)
    mod = LinearDistillationLoss(loss="reverse_kl", temperature=1.5, chunk_size=4,
                                 backend="torch")
    out = mod(t["h_s"][0], t["W_s"], t["h_t"][0], t["W_t"], t["labels"][0], b_s=t["b_s"],
              b_t=t["b_t"])
    zs, zt = _logits(t)
    torch.testing.assert_close(out, ref_logit_kd(zs, zt, t["labels"], loss="reverse_kl",
                                                 temperature=1.5))
    assert "reverse_kl" in repr(mod)


def _plain(t, dtype):
    """What a user would write at low precision: logits, log_softmax and KL in the dtype."""
    zs, zt = _logits(t)
    lp_s, lp_t = torch.log_softmax(zs, -1), torch.log_softmax(zt[..., :zs.shape[-1]], -1)
    sel = t["labels"] != -100
    return (lp_t.exp() * (lp_t - lp_s)).sum(-1)[sel].float().sum() / sel.sum()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_accuracy(backend, dtype):
    t = _inputs(2, 37, 517, 600, ds=32, dt=48, dtype=dtype)
    t32 = {k: (v.detach().float().requires_grad_(v.requires_grad)
               if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
           for k, v in t.items()}
    ref = _reference(t32)
    grads_ref = torch.autograd.grad(ref, _params(t32))
    out = _fused(t, backend, chunk_size=9)  # several chunks: float32 weight-grad accumulation
    grads = torch.autograd.grad(out, _params(t))
    plain = _plain(t, dtype)
    grads_plain = torch.autograd.grad(plain, _params(t))
    assert_accuracy(out, ref, plain.float(), atol=1e-4, name="loss")
    for name, g, gp, gr in zip(("dh_s", "dW_s", "db_s"), grads, grads_plain, grads_ref):
        assert g.dtype == dtype
        assert_accuracy(g.float(), gr, gp.float(), atol=1e-5, name=name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_selected_token_is_zero(backend):
    t = _inputs(2, 6, 50, 50)
    t["labels"][:] = -100
    out = _fused(t, backend)
    assert out.item() == 0.0 and out.requires_grad
    for g in torch.autograd.grad(out, _params(t)):
        assert not torch.isnan(g).any() and not g.any()


def test_teacher_gets_no_gradient_and_grad_output_scales():
    t = _inputs(1, 8, 40, 40)
    t["h_t"].requires_grad_(True)
    t["W_t"].requires_grad_(True)
    out = _fused(t, "torch", chunk_size=3)
    grads = torch.autograd.grad(2.5 * out, _params(t) + [t["h_t"], t["W_t"]], allow_unused=True)
    assert grads[-1] is None and grads[-2] is None
    refs = torch.autograd.grad(2.5 * _reference(t), _params(t))
    for g, r in zip(grads, refs):
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-4)


class _LargestTensor(TorchDispatchMode):
    """Records the largest tensor any op produces."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for o in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(o, torch.Tensor):
                self.largest = max(self.largest, o.numel())
        return out


def test_fused_path_never_builds_tokens_by_vocab():
    N, V, d = 256, 384, 16
    t = _inputs(1, N, V, V, ds=d, dt=d, bias=False)
    t["labels"][:] = 1  # every token selected
    with _LargestTensor() as rec:
        out = _fused(t, "torch", chunk_size=32)
        out.backward()
    assert rec.largest < N * V // 4, rec.largest  # chunk x vocab at most (32 x 384 x a few)
    with _LargestTensor() as naive:  # the recorder does see a materialised (N, V) tensor
        zs, zt = _logits(t)
        ref_logit_kd(zs, zt, t["labels"]).backward()
    assert naive.largest >= N * V


def test_memory_budget_sets_chunk():
    t = _inputs(1, 64, 200, 200, bias=False)
    _compare(t, "torch", memory_budget_bytes=50_000)


def test_validation():
    t = _inputs(1, 4, 20, 30)
    h_s, W_s, h_t, W_t = t["h_s"], t["W_s"], t["h_t"], t["W_t"]
    with pytest.raises(ValueError, match="token dims"):
        linear_distillation_loss(h_s, W_s, h_t[:, :3], W_t, t["labels"])
    with pytest.raises(ValueError, match="teacher vocab"):
        linear_distillation_loss(h_s, W_s, h_t, W_t[:10], t["labels"])
    with pytest.raises(ValueError, match="hidden sizes"):
        linear_distillation_loss(h_s, W_s[:, :5], h_t, W_t, t["labels"])
    with pytest.raises(ValueError, match="b_s"):
        linear_distillation_loss(h_s, W_s, h_t, W_t, t["labels"], b_s=torch.zeros(3))
    with pytest.raises(ValueError, match="labels"):
        linear_distillation_loss(h_s, W_s, h_t, W_t, None)
    with pytest.raises(ValueError, match="ce_weight"):
        linear_distillation_loss(h_s, W_s, h_t, W_t, None, positions="all", ce_weight=1.0)
    with pytest.raises(TypeError, match="dtype"):
        linear_distillation_loss(h_s, W_s.detach().double(), h_t, W_t, t["labels"])
    with pytest.raises(ValueError, match="temperature"):
        linear_distillation_loss(h_s, W_s, h_t, W_t, t["labels"], temperature=-1.0)
    bad = t["labels"].clone()
    bad[0, 0] = 25
    with pytest.raises(ValueError, match="labels"):
        linear_distillation_loss(h_s, W_s, h_t, W_t, bad, ce_weight=1.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_call_gives_both_terms_and_their_gradients(backend):
    # LM + KD in one pass over each lm_head equals the two separate calls, terms and grads.
    t = _inputs(2, 9, 70, 75)
    total, terms = _fused(t, backend, ce_weight=0.7, kd_weight=1.3, chunk_size=5,
                          return_terms=True)
    ce = _fused(t, backend, ce_weight=1.0, kd_weight=0.0)
    kd = _fused(t, backend, ce_weight=0.0, kd_weight=1.0)
    torch.testing.assert_close(terms["ce"], ce.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(terms["kd"], kd.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(total.detach(), 0.7 * ce.detach() + 1.3 * kd.detach(),
                               rtol=1e-5, atol=1e-6)
    together = torch.autograd.grad(total, _params(t))
    apart = torch.autograd.grad(0.7 * ce + 1.3 * kd, _params(t))
    for g1, g2 in zip(together, apart):
        torch.testing.assert_close(g1, g2, rtol=1e-4, atol=1e-6)
    assert not terms["ce"].requires_grad and not terms["kd"].requires_grad


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_kd_weight_never_reads_the_teacher_lm_head(backend):
    t = _inputs(2, 7, 40, 40)
    clean = _fused(t, backend, ce_weight=1.0, kd_weight=0.0)
    t["W_t"] = torch.full_like(t["W_t"], float("nan"))  # any read would poison the loss
    t["b_t"] = torch.full_like(t["b_t"], float("nan"))
    poisoned, terms = _fused(t, backend, ce_weight=1.0, kd_weight=0.0, return_terms=True)
    assert torch.equal(clean, poisoned) and float(terms["kd"]) == 0.0
    (grad,) = torch.autograd.grad(poisoned, [t["h_s"]])
    assert torch.isfinite(grad).all()
