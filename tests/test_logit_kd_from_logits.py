"""logit_distillation_loss / rdist_loss / shift_labels against the float32 references."""
import importlib.util
import os

import pytest
import torch

if not torch.cuda.is_available():  # run the Triton kernels in the interpreter on CPU
    os.environ.setdefault("TRITON_INTERPRET", "1")

from compodistill.logit_kd.from_logits import (logit_distillation_loss, rdist_loss,  # noqa: E402
                                        shift_labels)
from compodistill.testing.accuracy import assert_accuracy  # noqa: E402
from compodistill.testing.logit_kd import ref_logit_kd, ref_rdist  # noqa: E402

HAS_TRITON = importlib.util.find_spec("triton") is not None
BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.skipif(
    not HAS_TRITON, reason="triton not installed"))]


def _inputs(B, N, Vs, Vt, dtype=torch.float32, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    zs = (torch.randn(B, N, Vs, generator=g) * scale).to(dtype).requires_grad_(True)
    zt = (torch.randn(B, N, Vt, generator=g) * scale).to(dtype)
    labels = torch.randint(0, Vs, (B, N), generator=g)
    labels[torch.rand(B, N, generator=g) < 0.3] = -100
    am = (torch.rand(B, N, generator=g) > 0.2).long()
    vm = torch.rand(B, N, generator=g) < 0.5
    return zs, zt, labels, am, vm


def _check(zs, zt, labels, am, vm, backend, atol=2e-5, **kw):
    out = logit_distillation_loss(zs, zt, labels, attention_mask=am, visual_mask=vm,
                                  backend=backend, **kw)
    kw.pop("chunk_size", None)
    ref = ref_logit_kd(zs, zt, labels, attention_mask=am, visual_mask=vm, **kw)
    (g,) = torch.autograd.grad(out, zs)
    (gr,) = torch.autograd.grad(ref, zs)
    assert out.dtype == torch.float32 and out.dim() == 0
    torch.testing.assert_close(out, ref, atol=atol, rtol=1e-4)
    torch.testing.assert_close(g.float(), gr.float(), atol=atol, rtol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss,beta", [("kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.5),
                                       ("jsd", 0.1), ("jsd", 1.0)])
@pytest.mark.parametrize("temperature,zscore", [(1.0, False), (2.5, False), (1.0, True)])
def test_losses_match_reference(backend, loss, beta, temperature, zscore):
    zs, zt, labels, am, vm = _inputs(2, 19, 517, 600)
    _check(zs, zt, labels, am, vm, backend, loss=loss, beta=beta, temperature=temperature,
           zscore=zscore, chunk_size=7)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("positions", ["response", "all", "visual"])
@pytest.mark.parametrize("B,N,V,chunk", [(1, 1, 1000, None), (1, 37, 517, 5), (3, 43, 257, 16)])
def test_positions_shapes_chunks(backend, positions, B, N, V, chunk):
    zs, zt, labels, am, vm = _inputs(B, N, V, V + 13, seed=N)
    _check(zs, zt, labels, am, vm, backend, positions=positions, chunk_size=chunk)


def _plain_torch_loss(zs, zt, labels):
    """What a user would write at low precision: log_softmax and KL in the logits' dtype."""
    lp_s = torch.log_softmax(zs, -1)
    lp_t = torch.log_softmax(zt[..., :zs.shape[-1]], -1)
    per = (lp_t.exp() * (lp_t - lp_s)).sum(-1)
    sel = labels != -100
    return per[sel].float().sum() / sel.sum()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_accuracy(backend, dtype):
    zs, zt, labels, _, _ = _inputs(2, 33, 517, 517, dtype=dtype)
    z32 = zs.detach().float().requires_grad_(True)
    ref = ref_logit_kd(z32, zt.float(), labels)
    (gr,) = torch.autograd.grad(ref, z32)
    out = logit_distillation_loss(zs, zt, labels, chunk_size=9, backend=backend)
    (g,) = torch.autograd.grad(out, zs)
    plain = _plain_torch_loss(zs, zt, labels)
    (gp,) = torch.autograd.grad(plain, zs)
    assert g.dtype == dtype
    assert_accuracy(out, ref, plain.float(), atol=1e-5, name="loss")
    assert_accuracy(g.float(), gr, gp.float(), atol=1e-6, name="grad")


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_selected_token_is_zero(backend):
    zs, zt, _, _, _ = _inputs(2, 5, 64, 64)
    labels = torch.full((2, 5), -100)
    out = logit_distillation_loss(zs, zt, labels, backend=backend)
    assert out.item() == 0.0 and out.requires_grad
    (g,) = torch.autograd.grad(out * 3, zs)
    assert torch.equal(g, torch.zeros_like(zs))
    vm = torch.zeros(2, 5, dtype=torch.bool)
    assert logit_distillation_loss(zs, zt, positions="visual", visual_mask=vm,
                                   backend=backend).item() == 0.0


def test_grad_output_scales_and_teacher_gets_nothing():
    zs, zt, labels, _, _ = _inputs(2, 9, 100, 120)
    zt.requires_grad_(True)
    out = logit_distillation_loss(zs, zt, labels, chunk_size=4, backend="torch")
    g, gt = torch.autograd.grad(3.0 * out, [zs, zt], allow_unused=True)
    (gr,) = torch.autograd.grad(3.0 * ref_logit_kd(zs, zt, labels), zs)
    torch.testing.assert_close(g, gr, atol=1e-5, rtol=1e-4)
    assert gt is None


def test_two_dim_logits():
    zs, zt, labels, _, _ = _inputs(1, 11, 50, 50)
    out = logit_distillation_loss(zs[0], zt[0], labels[0], backend="torch")
    torch.testing.assert_close(out, ref_logit_kd(zs, zt, labels))


def test_shift_labels():
    labels = torch.tensor([[5, 6, 7], [-100, 1, 2]])
    assert shift_labels(labels).tolist() == [[6, 7, -100], [1, 2, -100]]


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(loss="kld"), ValueError, "loss"),
    (dict(temperature=0.0), ValueError, "temperature"),
    (dict(beta=1.5), ValueError, "beta"),
    (dict(positions="text"), ValueError, "positions"),
    (dict(labels=None), ValueError, "labels"),
    (dict(positions="visual"), ValueError, "visual_mask"),
    (dict(labels=torch.zeros(2, 4, dtype=torch.long)), ValueError, "labels"),
    (dict(labels=torch.zeros(2, 5)), TypeError, "labels"),
])
def test_validation(kwargs, exc, match):
    zs, zt, labels, _, _ = _inputs(2, 5, 10, 12)
    kw = dict(labels=labels)
    kw.update(kwargs)
    with pytest.raises(exc, match=match):
        logit_distillation_loss(zs, zt, **kw)


def test_validation_shapes():
    zs, zt, labels, _, _ = _inputs(2, 5, 10, 12)
    with pytest.raises(ValueError, match="token dims"):
        logit_distillation_loss(zs, zt[:, :4], labels)
    with pytest.raises(ValueError, match="teacher vocab"):
        logit_distillation_loss(zs, zt[..., :9], labels)
    with pytest.raises(TypeError, match="student_logits"):
        logit_distillation_loss(zs.detach().long(), zt, labels)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rdist_matches_reference(dtype):
    zs, zt, _, _, vm = _inputs(3, 13, 101, 130, dtype=dtype)
    vm[2] = False  # a sample without visual tokens is skipped
    out = rdist_loss(zs, zt, vm, vocab_chunk=17)
    ref = ref_rdist(zs, zt, vm)
    (g,) = torch.autograd.grad(out, zs)
    (gr,) = torch.autograd.grad(ref, zs)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
    tol = 1e-6 if dtype == torch.float32 else 1e-3 * gr.float().abs().max().item()
    torch.testing.assert_close(g.float(), gr.float(), atol=tol, rtol=1e-2)
    assert g.dtype == dtype


def test_rdist_without_visual_tokens_is_zero():
    zs, zt, _, _, _ = _inputs(2, 4, 20, 20)
    out = rdist_loss(zs, zt, torch.zeros(2, 4, dtype=torch.bool))
    assert out.item() == 0.0 and out.requires_grad
    (g,) = torch.autograd.grad(out, zs)
    assert not torch.isnan(g).any() and not g.any()
