"""FusedLinearKDLoss and VisualAttentionLoss: equal to the functional API and the fp32
references, Liger's calls run as Liger's docs write them, and the trainer conventions
(unshifted labels, ignore_index, reduction, num_items_in_batch) hold."""
from __future__ import annotations

import pytest
import torch

import compodistill as cd
from compodistill.testing.accuracy import assert_accuracy
from compodistill.testing.logit_kd import ref_logit_kd
from compodistill.testing.visual_attention import (ref_visual_allowed, ref_visual_loss,
                                                    ref_visual_maps)

B, N, DS, DT, VS, VT = 2, 7, 12, 20, 33, 37  # teacher vocab padded past the student's


def _inputs(seed=0, ignore=-100):
    g = torch.Generator().manual_seed(seed)
    h_s = torch.randn(B, N, DS, generator=g, requires_grad=True)
    h_t = torch.randn(B, N, DT, generator=g)
    w_s = (torch.randn(VS, DS, generator=g) / 3).requires_grad_()
    w_t = torch.randn(VT, DT, generator=g) / 3
    labels = torch.randint(0, VS, (B, N), generator=g)
    labels[0, :3] = ignore  # a prompt
    labels[1, -1] = ignore  # padding
    return h_s, w_s, h_t, w_t, labels


def _reference(h_s, w_s, h_t, w_t, aligned, *, loss, beta, temperature, w_hard, w_soft, t2=True):
    zs, zt = h_s @ w_s.T, h_t @ w_t.T
    kd = ref_logit_kd(zs, zt, aligned, loss=loss, beta=beta, temperature=temperature)
    if not t2:
        kd = kd / temperature ** 2
    ce = torch.nn.functional.cross_entropy(zs.reshape(-1, VS), aligned.reshape(-1))
    return w_soft * kd + w_hard * ce


@pytest.mark.parametrize("loss,beta,ref_loss", [("jsd", 0.3, "jsd"), ("jsd", 0.0, "kl"),
                                                ("jsd", 1.0, "reverse_kl"), ("kl", 0.5, "kl"),
                                                ("reverse_kl", 0.5, "reverse_kl")])
def test_fused_module_equals_functional_and_reference(loss, beta, ref_loss):
    h_s, w_s, h_t, w_t, labels = _inputs()
    module = cd.FusedLinearKDLoss(weight_hard_loss=0.3, weight_soft_loss=0.7, beta=beta,
                                  temperature=2.0, loss=loss, backend="torch")
    out = module(h_s, w_s, h_t, w_t, labels)
    aligned = cd.shift_labels(labels)
    func = cd.linear_distillation_loss(h_s, w_s, h_t, w_t, aligned, loss=ref_loss, beta=beta,
                                       temperature=2.0, ce_weight=0.3, kd_weight=0.7,
                                       backend="torch")
    torch.testing.assert_close(out, func, rtol=0, atol=0)
    ref = _reference(h_s, w_s, h_t, w_t, aligned, loss=ref_loss, beta=beta, temperature=2.0,
                     w_hard=0.3, w_soft=0.7)
    assert_accuracy(out, ref, atol=1e-5, name="loss")
    g_out = torch.autograd.grad(out, (h_s, w_s))
    g_ref = torch.autograd.grad(ref, (h_s, w_s))
    for a, r in zip(g_out, g_ref):
        assert_accuracy(a, r, atol=1e-5, name="grad")


def test_liger_call_as_liger_documents_it():
    # liger_kernel.chunked_loss.LigerFusedLinearJSDLoss, its test's call: flattened (BT, H)
    # inputs, labels aligned by the caller, weights and biases positional; only the class
    # name differs. Liger does not multiply by T², hence temperature_squared=False.
    h_s, w_s, h_t, w_t, labels = _inputs(1)
    b_s, b_t = torch.randn(VS) / 5, torch.randn(VT) / 5
    student_input = h_s.reshape(-1, DS)
    teacher_input = h_t.reshape(-1, DT)
    true_labels = cd.shift_labels(labels).reshape(-1)
    loss_fn = cd.FusedLinearKDLoss(weight_hard_loss=0.5, weight_soft_loss=0.5, beta=0.5,
                                   ignore_index=-100, temperature=2.0,
                                   temperature_squared=False)
    loss = loss_fn(student_input, w_s, teacher_input, w_t, true_labels, b_s, b_t)
    loss.backward()
    assert h_s.grad is not None and w_s.grad is not None
    # Liger's arithmetic in plain torch: logits / T, JSD summed over the vocab, mean over
    # the labelled rows; the teacher's padded vocab truncated (see docs/integrations.md).
    zs = (student_input @ w_s.T + b_s).detach()
    zt = (teacher_input @ w_t.T + b_t)[:, :VS]
    lp_s, lp_t = (zs / 2).log_softmax(-1), (zt / 2).log_softmax(-1)
    lm = torch.logsumexp(torch.stack([lp_s + torch.tensor(0.5).log(),
                                      lp_t + torch.tensor(0.5).log()]), 0)
    jsd = (0.5 * (lp_t.exp() * (lp_t - lm)) + 0.5 * (lp_s.exp() * (lp_s - lm))).sum(-1)
    valid = true_labels != -100
    ce = torch.nn.functional.cross_entropy(zs, true_labels, reduction="sum") / valid.sum()
    expected = 0.5 * ce + 0.5 * jsd[valid].sum() / valid.sum()
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-5, atol=1e-6)


def test_unshifted_labels_and_ignore_index():
    h_s, w_s, h_t, w_t, labels = _inputs(2, ignore=-1)
    module = cd.FusedLinearKDLoss(ignore_index=-1, backend="torch")
    out = module(h_s, w_s, h_t, w_t, labels)
    hf_labels = labels.masked_fill(labels == -1, -100)
    func = cd.linear_distillation_loss(h_s, w_s, h_t, w_t, cd.shift_labels(hf_labels),
                                       loss="jsd", ce_weight=0.5, kd_weight=0.5)
    torch.testing.assert_close(out, func)
    aligned = cd.FusedLinearKDLoss(ignore_index=-1, shift_labels=False, backend="torch")
    assert not torch.allclose(aligned(h_s, w_s, h_t, w_t, labels), out)


def test_label_length_mismatch_is_an_error():
    h_s, w_s, h_t, w_t, labels = _inputs(3)
    module = cd.FusedLinearKDLoss()
    with pytest.raises(ValueError, match=r"true_labels has shape \(2, 6\), expected \(2, 7\)"):
        module(h_s, w_s, h_t, w_t, labels[:, 1:])
    with pytest.raises(ValueError, match="weight_hard_loss > 0 needs true_labels"):
        module(h_s, w_s, h_t, w_t, None)


@pytest.mark.parametrize("kwargs,match", [
    (dict(beta=1.5), "beta"), (dict(temperature=0.0), "temperature"),
    (dict(loss="ce"), "loss must be one of"), (dict(reduction="none"), "reduction"),
    (dict(weight_hard_loss=-1), "weight_hard_loss"), (dict(chunk_size=0), "chunk_size"),
    (dict(positions="prompt"), "positions"), (dict(backend="cuda"), "backend")])
def test_fused_module_rejects_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        cd.FusedLinearKDLoss(**kwargs)


def test_num_items_in_batch_matches_trainer_token_weighting():
    # Two accumulated micro-batches: Trainer divides each micro-batch's summed loss by the
    # token count of both, so the sum of the two equals one mean over all tokens.
    h_s, w_s, h_t, w_t, labels = _inputs(4)
    labels[1, :5] = -100  # the two halves have different token counts
    module = cd.FusedLinearKDLoss(weight_hard_loss=1.0, weight_soft_loss=1.0, loss="kl",
                                  backend="torch")
    aligned = cd.shift_labels(labels)
    n_items = int((aligned != -100).sum())
    parts = [module(h_s[i:i + 1], w_s, h_t[i:i + 1], w_t, labels[i:i + 1],
                    num_items_in_batch=torch.tensor(n_items)) for i in range(B)]
    whole = module(h_s, w_s, h_t, w_t, labels)
    torch.testing.assert_close(parts[0] + parts[1], whole, rtol=1e-6, atol=1e-7)
    # and the means of the halves do not: the weighting matters for this batch
    means = [module(h_s[i:i + 1], w_s, h_t[i:i + 1], w_t, labels[i:i + 1]) for i in range(B)]
    assert abs(float(((means[0] + means[1]) / 2 - whole).detach())) > 1e-3
    summed = cd.FusedLinearKDLoss(weight_hard_loss=1.0, weight_soft_loss=1.0, loss="kl",
                                  reduction="sum", backend="torch")
    torch.testing.assert_close(summed(h_s, w_s, h_t, w_t, labels), whole * n_items, rtol=1e-5,
                               atol=1e-5)


def test_return_soft_hard_loss():
    h_s, w_s, h_t, w_t, labels = _inputs(5)
    module = cd.FusedLinearKDLoss(weight_hard_loss=0.25, weight_soft_loss=0.75,
                                  return_soft_hard_loss=True, backend="torch")
    total, soft, hard = module(h_s, w_s, h_t, w_t, labels, num_items_in_batch=9)
    torch.testing.assert_close(total.detach(), 0.75 * soft + 0.25 * hard)
    assert not soft.requires_grad and not hard.requires_grad


# ------------------------------------------------------------------ VisualAttentionLoss
@pytest.mark.parametrize("options", [dict(), dict(query="visual", cosine="pooled"),
                                     dict(loss="kl", distribution="rest"),
                                     dict(loss="mse", reduction="sum")])
def test_visual_attention_module_equals_functional_and_reference(options):
    g = torch.Generator().manual_seed(0)
    b, h, n, d = 2, 4, 21, 8
    q_s = torch.randn(b, h, n, d, generator=g, requires_grad=True)
    k_s = torch.randn(b, 2, n, d, generator=g, requires_grad=True)
    q_t, k_t = torch.randn(b, h, n, d, generator=g), torch.randn(b, h, n, d, generator=g)
    visual = torch.zeros(b, n, dtype=torch.bool)
    visual[0, 3:9] = True
    visual[1, 10:18] = True
    module = cd.VisualAttentionLoss(backend="torch", **options)
    target = module.target(q_t, k_t, visual)
    assert not target.requires_grad
    out = module(q_s, k_s, target, visual)
    func_keys = {k: v for k, v in options.items() if k != "query"}
    func = cd.visual_attention_loss(q_s, k_s, target, visual,
                                    query=options.get("query", "all"), backend="torch",
                                    **func_keys)
    torch.testing.assert_close(out, func, rtol=0, atol=0)
    query = options.get("query", "all")
    maps_s = ref_visual_maps(q_s, k_s, visual, query=query)
    maps_t = ref_visual_maps(q_t, k_t, visual, query=query)
    allowed = ref_visual_allowed(visual, query=query)
    ref = ref_visual_loss(maps_s, maps_t, allowed, **func_keys)
    assert_accuracy(out, ref, atol=1e-5, name="vat")
    for a, r in zip(torch.autograd.grad(out, (q_s, k_s)), torch.autograd.grad(ref, (q_s, k_s))):
        assert_accuracy(a, r, atol=1e-5, name="vat grad")


@pytest.mark.parametrize("kwargs,match", [
    (dict(loss="l1"), "loss"), (dict(query="image"), "query"), (dict(scale=-1.0), "scale"),
    (dict(window=0), "window"), (dict(backend="gpu"), "backend"), (dict(beta=2.0), "beta")])
def test_visual_attention_module_rejects_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        cd.VisualAttentionLoss(**kwargs)
