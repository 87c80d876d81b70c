"""The teacher cache's pieces against their float32 references: top-k targets, the chunked
top-k KD loss (values and gradients), and the top-k map storage."""
from __future__ import annotations

import pytest
import torch

from compodistill.teacher_cache.loss import topk_distillation_loss
from compodistill.teacher_cache.targets import compress_map, expand_map, logit_targets
from compodistill.testing import (ref_logit_kd, ref_map_from_topk, ref_map_topk, ref_topk_kd,
                                  ref_topk_targets)
from compodistill.testing.accuracy import assert_accuracy, rounding_atol


def assert_close(actual, reference, _unused=None):
    # float32 against the float32 reference: the accuracy rule's rounding allowance.
    assert_accuracy(actual, reference, atol=1e-6 + rounding_atol(reference, torch.float32))


def _problem(seed=0, B=2, N=9, d=8, V=37):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, N, d, generator=g, requires_grad=True)
    w = torch.randn(V, d, generator=g, requires_grad=True)
    z_t = torch.randn(B, N, V + 5, generator=g) * 2  # teacher vocab larger: truncated
    labels = torch.randint(0, V, (B, N), generator=g)
    labels[0, :3] = -100
    labels[1, -2:] = -100
    return h, w, z_t, labels


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_logit_targets_match_reference(temperature):
    _, _, z_t, _ = _problem()
    V = 37
    logits = z_t.reshape(-1, V + 5)
    for k in (5, V):
        # Hidden states = the logits, lm_head = identity: the targets of these logits.
        lp, ix, rest = logit_targets(logits, torch.eye(V + 5), None, V, k, temperature,
                                     chunk=7)
        r_lp, r_ix, r_rest = ref_topk_targets(logits[:, :V], k, temperature)
        assert torch.equal(ix.long(), r_ix)
        torch.testing.assert_close(lp, r_lp, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(rest, r_rest, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("loss", ["kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("positions", ["response", "all"])
def test_topk_loss_matches_reference(loss, positions):
    h, w, z_t, labels = _problem()
    V, T = w.shape[0], 2.0
    from compodistill.logit_kd.from_logits import selected_rows

    sel = selected_rows(tuple(labels.shape), labels, positions, None, None, h.device)
    rows = z_t.reshape(-1, z_t.shape[-1])[sel]
    lp, ix, rest = ref_topk_targets(rows[:, :V], 6, T)
    got = topk_distillation_loss(h, w, labels, lp, ix, rest, loss=loss, temperature=T,
                                 positions=positions, chunk_size=5)
    g_h, g_w = torch.autograd.grad(got, (h, w))
    ref = ref_topk_kd(h @ w.T, lp, ix, rest, labels, loss=loss, temperature=T,
                      positions=positions)
    r_h, r_w = torch.autograd.grad(ref, (h, w))
    assert_close(got, ref, ref)
    assert_close(g_h, r_h, r_h)
    assert_close(g_w, r_w, r_w)


def test_full_vocabulary_topk_is_online_kd_plus_ce():
    """k = V: no rest bucket, the loss is the online KD (and CE) on the full logits."""
    h, w, z_t, labels = _problem(seed=1)
    V = w.shape[0]
    sel = labels.reshape(-1) != -100
    lp, ix, rest = ref_topk_targets(z_t.reshape(-1, V + 5)[sel][:, :V], V, 1.0)
    got, parts = topk_distillation_loss(h, w, labels, lp, ix, rest, ce_weight=0.5,
                                        kd_weight=2.0, chunk_size=4, return_terms=True)
    z_s = h @ w.T
    kd = ref_logit_kd(z_s, z_t, labels)
    ce = torch.nn.functional.cross_entropy(z_s.reshape(-1, V), labels.reshape(-1))
    ref = 2.0 * kd + 0.5 * ce
    assert_close(got, ref, ref)
    assert_close(parts["kd"], kd.detach(), kd.detach())
    g = torch.autograd.grad(got, (h, w))
    r = torch.autograd.grad(ref, (h, w))
    for a, b in zip(g, r):
        assert_close(a, b, b)


def test_topk_loss_rejects_targets_that_do_not_fit():
    h, w, _, labels = _problem()
    n = int((labels != -100).sum())
    lp, ix, rest = torch.zeros(n - 1, 3), torch.zeros(n - 1, 3, dtype=torch.int32), torch.zeros(n - 1)
    with pytest.raises(ValueError, match=f"{n - 1} rows but the batch has {n} KD positions"):
        topk_distillation_loss(h, w, labels, lp, ix, rest)
    with pytest.raises(ValueError, match="teacher_index must be in"):
        topk_distillation_loss(h, w, labels, torch.zeros(n, 3),
                               torch.full((n, 3), 99, dtype=torch.int32), torch.zeros(n))


def test_map_topk_storage_matches_reference():
    g = torch.Generator().manual_seed(3)
    maps = torch.rand(7, 11, generator=g) / 11
    allowed = torch.rand(7, 11, generator=g) > 0.2
    maps = maps * allowed
    for k in (3, 11, 20):
        val, ix, rest = compress_map(maps, k)
        r_val, r_ix, r_rest = ref_map_topk(maps, k)
        torch.testing.assert_close(val, r_val)
        torch.testing.assert_close(rest, r_rest, atol=1e-7, rtol=1e-5)
        dense = expand_map(val, ix, rest, allowed)
        torch.testing.assert_close(dense, ref_map_from_topk(r_val, r_ix, r_rest, allowed),
                                   atol=1e-7, rtol=1e-5)
        # Each row keeps its mass; k >= the row length is exact.
        torch.testing.assert_close(dense.sum(-1), maps.sum(-1), atol=1e-6, rtol=1e-5)
        if k >= 11:
            torch.testing.assert_close(dense, maps)
