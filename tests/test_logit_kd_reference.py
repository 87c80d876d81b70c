"""Hand-checked values for the float32 logit-distillation references."""
import math

import torch

from compodistill.testing.logit_kd import (ref_llavadi_feature_mse, ref_logit_kd,
                                                   ref_rdist)

LN3 = math.log(3.0)


def _kl(p, q):
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))


def _one(s, t):  # one token, (1, 1, V) logits
    return torch.tensor([[s]]), torch.tensor([[t]])


def test_kl_reverse_jsd_two_words():
    s, t = _one([0.0, 0.0], [0.0, LN3])  # p_s = (1/2, 1/2), p_t = (1/4, 3/4)
    ps, pt = [0.5, 0.5], [0.25, 0.75]
    kw = dict(positions="all")
    assert math.isclose(float(ref_logit_kd(s, t, loss="kl", **kw)), _kl(pt, ps), rel_tol=1e-5)
    assert math.isclose(float(ref_logit_kd(s, t, loss="reverse_kl", **kw)), _kl(ps, pt),
                        rel_tol=1e-5)
    m = [0.5 * 0.25 + 0.5 * 0.5, 0.5 * 0.75 + 0.5 * 0.5]
    assert math.isclose(float(ref_logit_kd(s, t, loss="jsd", **kw)),
                        0.5 * _kl(pt, m) + 0.5 * _kl(ps, m), rel_tol=1e-5)
    b = 0.2  # m = β p_t + (1 − β) p_s
    m = [b * 0.25 + (1 - b) * 0.5, b * 0.75 + (1 - b) * 0.5]
    assert math.isclose(float(ref_logit_kd(s, t, loss="jsd", beta=b, **kw)),
                        b * _kl(pt, m) + (1 - b) * _kl(ps, m), rel_tol=1e-5)
    assert abs(float(ref_logit_kd(s, t, loss="jsd", beta=0.0, **kw))) < 1e-7


def test_temperature_scales_by_t_squared():
    s, t = _one([0.0, 0.0], [0.0, 2 * LN3])  # at T = 2: same p_t = (1/4, 3/4)
    out = ref_logit_kd(s, t, loss="kl", temperature=2.0, positions="all")
    assert math.isclose(float(out), 4 * _kl([0.25, 0.75], [0.5, 0.5]), rel_tol=1e-5)


def test_response_positions_and_truncated_teacher():
    s = torch.tensor([[[0.0, 0.0], [0.0, 0.0], [5.0, 1.0]]])
    # the teacher's third column is dropped (truncated to the student's vocab)
    t = torch.tensor([[[0.0, LN3, 9.0], [LN3, 0.0, 9.0], [0.0, 0.0, 9.0]]])
    labels = torch.tensor([[1, 0, -100]])
    want = (_kl([0.25, 0.75], [0.5, 0.5]) + _kl([0.75, 0.25], [0.5, 0.5])) / 2
    assert math.isclose(float(ref_logit_kd(s, t, labels)), want, rel_tol=1e-5)
    # all positions with the attention mask hiding the last token gives the same two tokens
    am = torch.tensor([[1, 1, 0]])
    assert math.isclose(float(ref_logit_kd(s, t, positions="all", attention_mask=am)), want,
                        rel_tol=1e-5)
    vm = torch.tensor([[False, True, True]])
    assert math.isclose(float(ref_logit_kd(s, t, positions="visual", visual_mask=vm,
                                           attention_mask=am)),
                        _kl([0.75, 0.25], [0.5, 0.5]), rel_tol=1e-5)


def test_no_selected_token_is_zero_and_attached():
    s = torch.zeros(1, 2, 3, requires_grad=True)
    out = ref_logit_kd(s, torch.randn(1, 2, 3), torch.full((1, 2), -100))
    assert out.item() == 0.0
    out.backward()
    assert torch.equal(s.grad, torch.zeros_like(s))


def test_zscore():
    s, t = _one([0.0, 1.0, 2.0], [0.0, 0.0, 3.0])
    # (z − mean) / (population std + 1e-6): student mean 1, std √(2/3); teacher mean 1, std √2
    sd_s, sd_t = math.sqrt(2 / 3) + 1e-6, math.sqrt(2) + 1e-6
    a = [-1 / sd_s, 0.0, 1 / sd_s]
    b = [-1 / sd_t, -1 / sd_t, 2 / sd_t]

    def softmax(x):
        e = [math.exp(v) for v in x]
        return [v / sum(e) for v in e]

    want = _kl(softmax(b), softmax(a))
    got = float(ref_logit_kd(s, t, positions="all", zscore=True))
    assert math.isclose(got, want, rel_tol=1e-4)


def test_rdist_by_hand():
    zs = torch.zeros(2, 3, 2)
    zt = torch.zeros(2, 3, 3)
    zs[0, 0], zs[0, 2] = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])  # R_s = I
    zt[0, 0], zt[0, 2] = torch.tensor([1.0, 1.0, 7.0]), torch.tensor([0.0, 1.0, 7.0])
    vm = torch.tensor([[True, False, True], [False, False, False]])  # sample 1: no visual
    # R_t = [[2, 1], [1, 1]] (third teacher column truncated); cos = 3 / (√2 · √7)
    want = 1 - 3 / (math.sqrt(2) * math.sqrt(7))
    assert math.isclose(float(ref_rdist(zs, zt, vm)), want, rel_tol=1e-5)
    assert float(ref_rdist(zs, zt, torch.zeros(2, 3, dtype=torch.bool))) == 0.0


def test_feature_mse():
    assert math.isclose(float(ref_llavadi_feature_mse(torch.tensor([[1.0, 2.0]]),
                                                      torch.zeros(1, 2))), 2.5)
