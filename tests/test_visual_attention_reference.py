"""Hand-checked tiny cases for compodistill.testing.visual_attention.

Every expected number is worked out by hand in the test (fractions, math.log, math.sqrt),
never by calling the formula under test: the reference is the yardstick for the fast
paths, so it must be pinned down independently.

Trick used for attention: with d = 1, scale = 1, q = 1 and k_j = log(w_j), the scores are
log(w_j), so softmax gives w_j / Σ w. With q = 0 every allowed key gets the same weight.
"""
import math

import pytest
import torch

from compodistill.visual_attention.layout import spans_to_mask
from compodistill.testing import visual_attention as R


def _qk(q_values, k_weights):
    """q (1, H, N, 1) from per-head constants, k (1, Hkv, N, 1) = log of per-head weights."""
    n = len(k_weights[0])
    q = torch.tensor([[[[float(c)]] * n for c in q_values]])
    k = torch.log(torch.tensor([[[[float(w)] for w in ws] for ws in k_weights]]))
    return q, k


def _t(rows):
    return torch.tensor(rows, dtype=torch.float32)


def close(actual, expected, tol=1e-6):
    torch.testing.assert_close(torch.as_tensor(actual, dtype=torch.float32),
                               torch.as_tensor(expected, dtype=torch.float32),
                               atol=tol, rtol=tol)


# ----------------------------------------------------------------------------- attention

def test_probs_causal_weights():
    q, k = _qk([1.0], [[1, 2, 3]])
    p = R.ref_attention_probs(q, k, scale=1.0)[0, 0]
    close(p, [[1, 0, 0], [1 / 3, 2 / 3, 0], [1 / 6, 2 / 6, 3 / 6]])


def test_probs_not_causal():
    q, k = _qk([1.0], [[1, 2, 3]])
    p = R.ref_attention_probs(q, k, causal=False, scale=1.0)[0, 0]
    close(p, [[1 / 6, 2 / 6, 3 / 6]] * 3)


def test_default_scale_is_inverse_sqrt_d():
    # d = 4, q = (1,1,1,1), k_j = (c_j,...): score = 4·c_j / 2 = 2·c_j.
    q = torch.ones(1, 1, 2, 4)
    k = torch.tensor([0.0, math.log(3) / 2])[None, None, :, None].expand(1, 1, 2, 4)
    p = R.ref_attention_probs(q, k, causal=False)[0, 0]
    close(p, [[1 / 4, 3 / 4]] * 2)


def test_gqa_head_mapping_is_repeat_interleave():
    # 4 query heads, 2 kv heads: heads 0,1 read kv head 0 (uniform), heads 2,3 kv head 1.
    q, k = _qk([1.0] * 4, [[1, 1, 1], [1, 2, 3]])
    p = R.ref_attention_probs(q, k, scale=1.0)[0]
    uniform = [[1, 0, 0], [1 / 2, 1 / 2, 0], [1 / 3, 1 / 3, 1 / 3]]
    weighted = [[1, 0, 0], [1 / 3, 2 / 3, 0], [1 / 6, 2 / 6, 3 / 6]]
    for h, expected in enumerate([uniform, uniform, weighted, weighted]):
        close(p[h], expected)


def test_gqa_bad_head_counts():
    with pytest.raises(ValueError, match="multiple"):
        R.ref_attention_probs(torch.zeros(1, 3, 2, 1), torch.zeros(1, 2, 2, 1))


def test_left_padding_row_is_zero_not_nan():
    q, k = _qk([0.0], [[1, 1, 1]])
    mask = torch.tensor([[0, 1, 1]])
    p = R.ref_attention_probs(q, k, attention_mask=mask)[0, 0]
    close(p, [[0, 0, 0], [0, 1, 0], [0, 1 / 2, 1 / 2]])


def test_padding_without_causal():
    q, k = _qk([0.0], [[1, 1, 1]])
    mask = torch.tensor([[1, 1, 0]])
    p = R.ref_attention_probs(q, k, attention_mask=mask, causal=False)[0, 0]
    close(p, [[1 / 2, 1 / 2, 0]] * 3)


def test_output_and_lse():
    q, k = _qk([0.0], [[1, 1, 1]])
    v = torch.tensor([2.0, 4.0, 8.0])[None, None, :, None]
    mask = torch.tensor([[0, 1, 1]])
    out, lse = R.ref_attention_output(q, k, v, attention_mask=mask)
    close(out[0, 0, :, 0], [0, 4, 6])
    # lse of scores 0: log(number of allowed keys); -inf when there is none.
    assert lse[0, 0, 0] == float("-inf")
    close(lse[0, 0, 1:], [0.0, math.log(2)])


def test_output_gqa_values():
    q, k = _qk([0.0, 0.0], [[1, 1]])  # 2 query heads share kv head 0
    v = torch.tensor([1.0, 3.0])[None, None, :, None]
    out, _ = R.ref_attention_output(q, k, v)
    close(out[0, :, :, 0], [[1, 2], [1, 2]])


def test_gradients_finite_with_empty_rows():
    q = torch.randn(1, 2, 3, 2, requires_grad=True)
    k = torch.randn(1, 1, 3, 2, requires_grad=True)
    v = torch.randn(1, 1, 3, 2, requires_grad=True)
    mask = torch.tensor([[0, 1, 1]])
    out, lse = R.ref_attention_output(q, k, v, attention_mask=mask)
    grads = torch.autograd.grad(out.sum() + lse[torch.isfinite(lse)].sum(), (q, k, v))
    assert all(torch.isfinite(g).all() for g in grads)
    assert torch.all(grads[0][0, :, 0] == 0)  # the empty row gets no gradient


# ----------------------------------------------------------------------------- query rows

def test_query_modes():
    vis = torch.tensor([[False, True, True, False, False]])
    am = torch.tensor([[1, 1, 1, 1, 0]])
    assert R.ref_query_rows("all", vis, am).tolist() == [[True, True, True, True, False]]
    assert R.ref_query_rows("visual", vis, am).tolist() == [[False, True, True, False, False]]
    assert R.ref_query_rows("text", vis, am).tolist() == [[True, False, False, True, False]]
    explicit = torch.tensor([[False, False, True, True, True]])
    assert R.ref_query_rows(explicit, vis, am).tolist() == [[False, False, True, True, False]]
    assert R.ref_query_rows("all", vis).tolist() == [[True] * 5]
    with pytest.raises(ValueError, match="query"):
        R.ref_query_rows("image", vis, am)


# ----------------------------------------------------------------------------- visual maps

# Sequence: text, img, img, text. Head 0 is uniform (q = 0); head 1 has weights 1, 2, 1, 4.
# Head 0 rows: 1; 1/2 1/2; 1/3 ×3; 1/4 ×4.  Head 1 rows: 1; 1/3 2/3; 1/4 2/4 1/4;
# 1/8 2/8 1/8 4/8.  Head mean on the image columns (1, 2):
_MAP_ALL = [[0, 0],
            [(1 / 2 + 2 / 3) / 2, 0],
            [(1 / 3 + 2 / 4) / 2, (1 / 3 + 1 / 4) / 2],
            [(1 / 4 + 2 / 8) / 2, (1 / 4 + 1 / 8) / 2]]


def _map_inputs():
    q, k = _qk([0.0, 1.0], [[1, 1, 1, 1], [1, 2, 1, 4]])
    vis = spans_to_mask([[(1, 3)]], 1, 4)
    return q, k, vis


def test_visual_maps_all_rows():
    q, k, vis = _map_inputs()
    (a,) = R.ref_visual_maps(q, k, vis, scale=1.0)
    close(a, _MAP_ALL)
    close(_MAP_ALL[1][0], 7 / 12)  # sanity of the table itself


def test_visual_maps_query_modes():
    q, k, vis = _map_inputs()
    (a,) = R.ref_visual_maps(q, k, vis, query="visual", scale=1.0)
    close(a, _MAP_ALL[1:3])
    (a,) = R.ref_visual_maps(q, k, vis, query="text", scale=1.0)
    close(a, [_MAP_ALL[0], _MAP_ALL[3]])
    (allowed,) = R.ref_visual_allowed(vis, query="text")
    assert allowed.tolist() == [[False, False], [True, True]]


def test_visual_allowed_causal_and_padding():
    vis = spans_to_mask([[(1, 3)], []], 2, 4)
    am = torch.tensor([[1, 1, 1, 1], [0, 1, 1, 1]])
    allowed = R.ref_visual_allowed(vis, attention_mask=am)
    assert allowed[0].tolist() == [[False, False], [True, False], [True, True], [True, True]]
    assert tuple(allowed[1].shape) == (3, 0)  # padding row dropped, no image
    assert R.ref_visual_allowed(vis, causal=False)[0].all()


def test_visual_maps_two_images_and_padding():
    # Sample 0: img at 0 and 2 (two spans). Sample 1: left padding at 0, no image. q = 0.
    q = torch.zeros(2, 1, 4, 1)
    k = torch.zeros(2, 1, 4, 1)
    vis = spans_to_mask([[(0, 1), (2, 3)], []], 2, 4)
    am = torch.tensor([[1, 1, 1, 1], [0, 1, 1, 1]])
    a0, a1 = R.ref_visual_maps(q, k, vis, attention_mask=am)
    close(a0, [[1, 0], [1 / 2, 0], [1 / 3, 1 / 3], [1 / 4, 1 / 4]])
    assert tuple(a1.shape) == (3, 0)


# ----------------------------------------------------------------------------- distributions

def test_renormalized_and_rest_bucket():
    a = _t([[0.1, 0.3], [0.0, 0.0], [0.6, 0.6]])
    close(R.ref_renormalized(a), [[1 / 4, 3 / 4], [0, 0], [1 / 2, 1 / 2]])
    # rest = 1 − row sum, clamped at 0 (the third row sums to 1.2).
    close(R.ref_rest_bucket(a), [[0.1, 0.3, 0.6], [0, 0, 1], [0.6, 0.6, 0]])


# ----------------------------------------------------------------------------- losses

def _loss(a_s, a_t, allowed=None, **kw):
    a_s, a_t = _t(a_s), _t(a_t)
    ok = torch.ones_like(a_s, dtype=torch.bool) if allowed is None else torch.tensor(allowed)
    return R.ref_visual_loss([a_s], [a_t], [ok], **kw)


S2 = [[0.2, 0.0], [0.1, 0.1]]
T2 = [[0.1, 0.0], [0.1, 0.3]]
OK2 = [[True, False], [True, True]]


def test_cosine_flat():
    expected = 1 - 0.06 / math.sqrt(0.06 * 0.11)
    close(_loss(S2, T2, OK2, cosine="flat"), expected)
    # Identical direction -> 0.
    close(_loss(S2, [[0.4, 0.0], [0.2, 0.2]], OK2), 0.0)


def test_cosine_row_skips_rows_without_allowed_key():
    row1 = 1 - 0.04 / math.sqrt(0.02 * 0.1)  # row 0 is parallel: 0
    expected = (0 + row1) / 2
    close(_loss(S2, T2, OK2, cosine="row"), expected)
    # An extra real row with no allowed visual key changes nothing.
    close(_loss(S2 + [[0, 0]], T2 + [[0, 0]], OK2 + [[False, False]], cosine="row"), expected)


def test_cosine_pooled_filter_drops_spikes():
    a_s = [[0.9, 0.1], [0.1, 0.2], [0.2, 0.1]]  # sink spike at (0, 0)
    a_t = [[0.2, 0.2], [0.1, 0.6], [0.0, 0.1]]  # spike at (1, 1), a zero at (2, 0)
    # Student: mean 1.6/6, unbiased var = (0.9²+3·0.1²+2·0.2² − 6·mean²)/5.
    mu_s = 1.6 / 6
    sd_s = math.sqrt((0.81 + 0.03 + 0.08 - 6 * mu_s ** 2) / 5)
    assert 0.2 < mu_s + sd_s < 0.9  # only the spike is above the threshold
    # Teacher: mean 0.2, deviations 0, 0, -0.1, 0.4, -0.2, -0.1.
    mu_t, sd_t = 0.2, math.sqrt((0.01 + 0.16 + 0.04 + 0.01) / 5)
    assert 0.2 < mu_t + sd_t < 0.6
    # mask = [[F, T], [T, F], [F, T]]: column 0 keeps row 1, column 1 keeps rows 0 and 2.
    pooled_s = [0.1, (0.1 + 0.1) / 2]
    pooled_t = [0.1, (0.2 + 0.1) / 2]
    dot = pooled_s[0] * pooled_t[0] + pooled_s[1] * pooled_t[1]
    expected = 1 - dot / math.sqrt((0.01 + 0.01) * (0.01 + 0.0225))
    close(_loss(a_s, a_t, cosine="pooled"), expected)
    # Without the μ+σ filter (teacher-zero rule only) the pooled vectors would be
    # s = (0.5, 0.4/3), t = (0.15, 0.3): a clearly different value, so the test sees the filter.
    unfiltered = 1 - (0.075 + 0.04) / math.sqrt((0.25 + 0.16 / 9) * (0.0225 + 0.09))
    assert abs(expected - unfiltered) > 0.1


def test_cosine_pooled_respects_allowed_and_no_grad_through_mask():
    a_s = _t([[0.9, 0.1], [0.1, 0.2], [0.2, 0.1]]).requires_grad_()
    a_t = _t([[0.2, 0.2], [0.1, 0.6], [0.0, 0.1]])
    ok = torch.ones(3, 2, dtype=torch.bool)
    loss = R.ref_visual_loss([a_s], [a_t], [ok], cosine="pooled")
    (grad,) = torch.autograd.grad(loss, a_s)
    # Masked-out entries (spike, teacher spike, teacher zero) get exactly zero gradient.
    assert grad[0, 0] == 0 and grad[1, 1] == 0 and grad[2, 0] == 0
    # Forbidding pair (2, 1) leaves column 1 with row 0 only: pooled s = (0.1, 0.1),
    # t = (0.1, 0.2).
    ok[2, 1] = False
    expected = 1 - (0.01 + 0.02) / math.sqrt(0.02 * 0.05)
    close(R.ref_visual_loss([a_s], [a_t], [ok], cosine="pooled"), expected)


def test_cosine_pooled_single_entry_has_zero_std():
    close(_loss([[0.3]], [[0.5]], cosine="pooled"), 0.0)


# kl family: row 0 p_s = (1/4, 3/4), p_t = (1/2, 1/2); row 1 has only column 0 allowed
# (renorm: both (1, 0)); row 2 has no allowed key and is skipped.
KS = [[0.1, 0.3], [0.5, 0.0], [0.0, 0.0]]
KT = [[0.2, 0.2], [0.25, 0.0], [0.0, 0.0]]
KOK = [[True, True], [True, False], [False, False]]


def test_kl_renorm():
    row0 = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    close(_loss(KS, KT, KOK, loss="kl"), (row0 + 0) / 2)


def test_reverse_kl_renorm():
    row0 = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    close(_loss(KS, KT, KOK, loss="reverse_kl"), (row0 + 0) / 2)


def test_jsd_renorm():
    m = (3 / 8, 5 / 8)
    kl_t = 0.5 * math.log(0.5 / m[0]) + 0.5 * math.log(0.5 / m[1])
    kl_s = 0.25 * math.log(0.25 / m[0]) + 0.75 * math.log(0.75 / m[1])
    close(_loss(KS, KT, KOK, loss="jsd"), (0.5 * kl_t + 0.5 * kl_s) / 2)
    # beta = 0.25: m = 0.25·p_t + 0.75·p_s.
    m = (0.25 * 0.5 + 0.75 * 0.25, 0.25 * 0.5 + 0.75 * 0.75)
    kl_t = 0.5 * math.log(0.5 / m[0]) + 0.5 * math.log(0.5 / m[1])
    kl_s = 0.25 * math.log(0.25 / m[0]) + 0.75 * math.log(0.75 / m[1])
    close(_loss(KS, KT, KOK, loss="jsd", beta=0.25), (0.25 * kl_t + 0.75 * kl_s) / 2)


def test_kl_rest_bucket():
    # Row 0: p_s = (0.1, 0.3, 0.6), p_t = (0.2, 0.2, 0.6). Row 1: p_s = (0.5, 0, 0.5),
    # p_t = (0.25, 0, 0.75).
    row0 = 0.2 * math.log(0.2 / 0.1) + 0.2 * math.log(0.2 / 0.3)
    row1 = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    close(_loss(KS, KT, KOK, loss="kl", distribution="rest"), (row0 + row1) / 2)
    rrow0 = 0.1 * math.log(0.1 / 0.2) + 0.3 * math.log(0.3 / 0.2)
    rrow1 = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    close(_loss(KS, KT, KOK, loss="reverse_kl", distribution="rest"), (rrow0 + rrow1) / 2)


def test_kl_zero_probabilities():
    # p_t = (1, 0), p_s = (1/2, 1/2): kl skips the p_t = 0 term; reverse_kl uses log(1e-30).
    close(_loss([[0.1, 0.1]], [[0.2, 0.0]], loss="kl"), math.log(2))
    expected = 0.5 * math.log(0.5) + 0.5 * (math.log(0.5) - math.log(1e-30))
    close(_loss([[0.1, 0.1]], [[0.2, 0.0]], loss="reverse_kl"), expected, tol=1e-5)


def test_mse():
    close(_loss(S2, T2, OK2, loss="mse"), (0.1 ** 2 + 0.2 ** 2) / 4)
    # Rows without allowed keys still count in |Q|·Nv (causal zeros included).
    close(_loss(S2 + [[0, 0]], T2 + [[0, 0]], OK2 + [[False, False]], loss="mse"),
          (0.1 ** 2 + 0.2 ** 2) / 6)


def test_reductions_over_contributing_samples():
    x = 1 - 0.06 / math.sqrt(0.06 * 0.11)
    y = 0.0
    maps_s = [_t(S2), torch.zeros(3, 0), _t([[0.0, 0.0]]), _t(S2)]
    maps_t = [_t(T2), torch.zeros(3, 0), _t([[0.0, 0.0]]), _t([[0.4, 0.0], [0.2, 0.2]])]
    # Sample 1 has no image; sample 2 has one real row before its image (nothing allowed).
    allowed = [torch.tensor(OK2), torch.zeros(3, 0, dtype=torch.bool),
               torch.tensor([[False, False]]), torch.tensor(OK2)]
    close(R.ref_visual_loss(maps_s, maps_t, allowed, reduction="none"), [x, 0, 0, y])
    close(R.ref_visual_loss(maps_s, maps_t, allowed, reduction="sum"), x + y)
    close(R.ref_visual_loss(maps_s, maps_t, allowed, reduction="mean"), (x + y) / 2)


def test_mean_with_no_contributing_sample_is_attached_zero():
    a_s = torch.zeros(2, 0, requires_grad=True)
    loss = R.ref_visual_loss([a_s], [torch.zeros(2, 0)], [torch.zeros(2, 0, dtype=torch.bool)])
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()


@pytest.mark.parametrize("loss,cosine,dist", [
    ("cosine", "flat", "renorm"), ("cosine", "row", "renorm"), ("cosine", "pooled", "renorm"),
    ("kl", "flat", "renorm"), ("kl", "flat", "rest"), ("reverse_kl", "flat", "rest"),
    ("jsd", "flat", "renorm"), ("mse", "flat", "renorm"),
])
def test_gradients_reach_q_k_not_teacher(loss, cosine, dist):
    torch.manual_seed(0)
    q = torch.randn(2, 4, 6, 3, requires_grad=True)
    k = torch.randn(2, 2, 6, 3, requires_grad=True)
    vis = spans_to_mask([[(1, 3), (4, 5)], []], 2, 6)
    am = torch.tensor([[1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1]])
    maps_s = R.ref_visual_maps(q, k, vis, attention_mask=am)
    t_in = torch.randn(2, 4, 6, 3, requires_grad=True)
    maps_t = R.ref_visual_maps(t_in, k.detach(), vis, attention_mask=am)
    allowed = R.ref_visual_allowed(vis, attention_mask=am)
    value = R.ref_visual_loss(maps_s, maps_t, allowed, loss=loss, cosine=cosine,
                              distribution=dist)
    dq, dk, dt = torch.autograd.grad(value, (q, k, t_in), allow_unused=True)
    assert dt is None  # the teacher target is detached
    assert torch.isfinite(dq).all() and torch.isfinite(dk).all()
    assert dq[0].abs().sum() > 0
    assert torch.all(dq[1] == 0)  # the sample without an image contributes nothing


def test_bad_options():
    with pytest.raises(ValueError, match="loss"):
        _loss(S2, T2, loss="l1")
    with pytest.raises(ValueError, match="cosine"):
        _loss(S2, T2, cosine="mean")
    with pytest.raises(ValueError, match="distribution"):
        _loss(S2, T2, loss="kl", distribution="softmax")
    with pytest.raises(ValueError, match="reduction"):
        _loss(S2, T2, reduction="avg")


# ----------------------------------------------------------------------------- matching refs

def test_group_targets():
    maps = [torch.tensor(float(x)) for x in (1, 2, 3, 4, 5)]  # m = 5, k = 3 -> n = 3
    close(torch.stack(R.ref_group_targets(maps, 3)), [2, 3, 4])
    close(torch.stack(R.ref_group_targets(maps, 5)), [1, 2, 3, 4, 5])  # n = 1
    close(torch.stack(R.ref_group_targets(maps, 1)), [3])  # one window over all
    with pytest.raises(ValueError):
        R.ref_group_targets(maps, 6)


def test_simple_teacher_layer():
    # 24 -> 40: (l+1)·5/3.
    assert R.ref_simple_teacher_layer(0, 24, 40) == 1  # round(1.67) − 1
    assert R.ref_simple_teacher_layer(8, 24, 40) == 14  # round(15) − 1
    assert R.ref_simple_teacher_layer(23, 24, 40) == 39
    # 24 -> 28, l = 8: 9·28/24 = 10.5 rounds up to 11.
    assert R.ref_simple_teacher_layer(8, 24, 28) == 10
    assert R.ref_simple_teacher_layer(0, 10, 3) == 0  # clamped


def test_adaptive_choice():
    s = torch.tensor([[1.0, 0.0]])
    cands = [torch.tensor([[0.0, 1.0]]), torch.tensor([[1.0, 1.0]]), torch.tensor([[2.0, 0.0]])]
    assert R.ref_adaptive_choice(s, cands) == 2
    assert R.ref_adaptive_choice(s, [torch.tensor([[1.0, 0.0]]), torch.tensor([[3.0, 0.0]])]) == 0
