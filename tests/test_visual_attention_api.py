"""The public visual-attention API on the chunked PyTorch path, against the reference."""
from __future__ import annotations

import pytest
import torch

import compodistill as cd
from compodistill.testing.accuracy import assert_accuracy, pad_maps
from compodistill.testing.visual_attention import ref_visual_allowed, ref_visual_loss, ref_visual_maps

# (name, B, Hq, Hkv, N, visual spans, left/right padding per sample, query mode, causal)
CASES = [
    ("tiny", 1, 2, 2, 1, [[(0, 1)]], None, "all", True),
    ("odd37_gqa_two_images_no_image", 2, 8, 2, 37, [[(3, 9), (20, 26)], []], None, "all", True),
    ("odd129_padding", 2, 4, 4, 129, [[(10, 40)], [(70, 100)]], [("right", 17), ("left", 30)],
     "all", True),
    ("visual_rows_mqa", 2, 4, 1, 45, [[(5, 20)], [(0, 8), (30, 44)]], None, "visual", True),
    ("text_rows_padding", 2, 4, 2, 33, [[(4, 12)], [(20, 31)]], [("left", 3), ("right", 2)],
     "text", True),
    ("non_causal", 2, 2, 1, 29, [[(25, 29)], [(0, 3)]], None, "all", False),
]

LOSS_OPTIONS = [
    dict(loss="cosine", cosine="flat"), dict(loss="cosine", cosine="row"),
    dict(loss="cosine", cosine="pooled"), dict(loss="kl", distribution="renorm"),
    dict(loss="kl", distribution="rest"), dict(loss="reverse_kl", distribution="renorm"),
    dict(loss="reverse_kl", distribution="rest"), dict(loss="jsd", beta=0.5),
    dict(loss="jsd", beta=0.2, distribution="rest"), dict(loss="mse"),
]


def make_case(case, dtype=torch.float32, seed=0, d=16):
    _, b, hq, hkv, n, spans, padding, query, causal = case
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, n, d, generator=gen).to(dtype).requires_grad_()
    k = torch.randn(b, hkv, n, d, generator=gen).to(dtype).requires_grad_()
    mask = None
    if padding is not None:
        mask = torch.ones(b, n, dtype=torch.bool)
        for i, (side, count) in enumerate(padding):
            if side == "right":
                mask[i, n - count:] = False
            else:
                mask[i, :count] = False
    vis = cd.spans_to_mask(spans, b, n)
    return q, k, vis, mask, query, causal


def reference_maps(q, k, vis, mask, query, causal, layout):
    maps = ref_visual_maps(q, k, vis, query, mask, causal)
    return pad_maps(maps, layout.query_count, layout.visual_count), maps


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_maps_and_gradients_match_reference(case):
    q, k, vis, mask, query, causal = make_case(case)
    layout = cd.visual_layout(vis, q.shape[0], q.shape[2], query=query, attention_mask=mask,
                              causal=causal)
    maps = cd.visual_attention_maps(q, k, vis, query=query, attention_mask=mask, causal=causal)
    ref, _ = reference_maps(q, k, vis, mask, query, causal, layout)
    assert_accuracy(maps, ref, atol=1e-6, name="maps")
    grad = torch.randn(maps.shape, generator=torch.Generator().manual_seed(1))
    dq, dk = torch.autograd.grad((maps * grad).sum(), (q, k))
    rq, rk = torch.autograd.grad((ref * grad).sum(), (q, k))
    assert_accuracy(dq, rq, atol=1e-5, name="dq")
    assert_accuracy(dk, rk, atol=1e-5, name="dk")


@pytest.mark.parametrize("options", LOSS_OPTIONS, ids=lambda o: "-".join(map(str, o.values())))
@pytest.mark.parametrize("case", CASES[1:], ids=[c[0] for c in CASES[1:]])
def test_loss_and_gradients_match_reference(case, options):
    q, k, vis, mask, query, causal = make_case(case)
    b, _, n, d = q.shape
    # Teacher: more heads than the student, its own q/k, same tokens.
    gen = torch.Generator().manual_seed(7)
    q_t = torch.randn(b, 2 * q.shape[1], n, d, generator=gen)
    k_t = torch.randn(b, k.shape[1], n, d, generator=gen)
    layout = cd.visual_layout(vis, b, n, query=query, attention_mask=mask, causal=causal)
    target = cd.visual_attention_maps(q_t, k_t, layout)
    ours = cd.visual_attention_loss(q, k, target, vis, query=query, attention_mask=mask,
                                    causal=causal, **options)
    ref_s = ref_visual_maps(q, k, vis, query, mask, causal)
    ref_t = ref_visual_maps(q_t, k_t, vis, query, mask, causal)
    allowed = ref_visual_allowed(vis, query, mask, causal)
    ref = ref_visual_loss(ref_s, ref_t, allowed, **options)
    assert torch.isfinite(ours)
    assert_accuracy(ours.detach(), ref.detach(), atol=1e-5, name="loss")
    dq, dk = torch.autograd.grad(ours, (q, k))
    rq, rk = torch.autograd.grad(ref, (q, k))
    assert_accuracy(dq, rq, atol=1e-5, name="dq")
    assert_accuracy(dk, rk, atol=1e-5, name="dk")


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_reductions_skip_samples_without_images(reduction):
    case = CASES[1]  # sample 1 has no image
    q, k, vis, mask, query, causal = make_case(case)
    layout = cd.visual_layout(vis, q.shape[0], q.shape[2])
    target = torch.rand(layout.map_shape) * layout.allowed()
    ours = cd.visual_attention_loss(q, k, target, vis, reduction=reduction)
    ref = ref_visual_loss(ref_visual_maps(q, k, vis), [target[0][:, :6 * 2], target[1][:, :0]],
                          ref_visual_allowed(vis), reduction=reduction)
    assert_accuracy(ours.detach(), ref.detach(), atol=1e-6, name=reduction)
    if reduction == "none":
        assert ours[1] == 0


def test_batch_without_images_gives_zero_loss_and_zero_grads():
    q = torch.randn(2, 2, 9, 8, requires_grad=True)
    k = torch.randn(2, 2, 9, 8, requires_grad=True)
    loss = cd.visual_attention_loss(q, k, torch.zeros(2, 9, 0), [[], []])
    assert float(loss) == 0.0
    loss.backward()
    assert torch.count_nonzero(q.grad) == 0 and torch.count_nonzero(k.grad) == 0


def test_rows_before_the_image_contribute_nothing():
    # Causal, query="text" with the image at the very end: no text row sees it.
    q = torch.randn(1, 2, 10, 8, requires_grad=True)
    k = torch.randn(1, 2, 10, 8, requires_grad=True)
    layout = cd.visual_layout([[(7, 10)]], 1, 10, query="text")
    maps = cd.visual_attention_maps(q, k, layout)
    assert torch.count_nonzero(maps) == 0
    for loss in ("cosine", "kl", "mse"):
        value = cd.visual_attention_loss(q, k, maps.detach(), layout, loss=loss)
        assert float(value) == 0.0 and torch.isfinite(value)


def test_fully_masked_rows_are_finite():
    # A custom query mask that also marks padding rows, non-causal attention and a fully
    # padded tail: the padding rows are dropped from the query set, every real row is exact
    # against the reference, and the gradients are too.
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, 2, 12, 8, generator=g, requires_grad=True)
    k = torch.randn(2, 2, 12, 8, generator=g, requires_grad=True)
    mask = torch.ones(2, 12, dtype=torch.bool)
    mask[1, 6:] = False
    query = torch.zeros(2, 12, dtype=torch.bool)
    query[0, ::2] = True
    query[1, 4:10] = True  # rows 6..9 are padding: they must not enter the query set
    spans = [[(2, 5)], [(0, 3)]]
    layout = cd.visual_layout(spans, 2, 12, query=query, attention_mask=mask, causal=False)
    assert layout.query_count.tolist() == [6, 2]
    maps = cd.visual_attention_maps(q, k, spans, query=query, attention_mask=mask, causal=False)
    assert torch.isfinite(maps).all()
    vis = cd.spans_to_mask(spans, 2, 12)
    ref = ref_visual_maps(q, k, vis, query, mask, causal=False)
    assert_accuracy(maps, pad_maps(ref, layout.query_count, layout.visual_count), name="maps")
    # Non-causal: the first query row of sample 0 sees the image after it.
    assert float(maps[0, 0, :3].detach().sum()) > 0
    weights = torch.randn(maps.shape, generator=g)
    dq, dk = torch.autograd.grad((maps * weights).sum(), (q, k))
    ref_dq, ref_dk = torch.autograd.grad(
        (pad_maps(ref, layout.query_count, layout.visual_count) * weights).sum(), (q, k))
    assert_accuracy(dq, ref_dq, name="dq")
    assert_accuracy(dk, ref_dk, name="dk")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_inputs_follow_accuracy_rule(dtype):
    case = CASES[2]
    q32, k32, vis, mask, query, causal = make_case(case, torch.float32)
    q, k = q32.detach().to(dtype).requires_grad_(), k32.detach().to(dtype).requires_grad_()
    layout = cd.visual_layout(vis, q.shape[0], q.shape[2], attention_mask=mask)
    ours = cd.visual_attention_maps(q, k, layout)
    assert ours.dtype == torch.float32
    ref, _ = reference_maps(q32, k32, vis, mask, query, causal, layout)
    # Plain PyTorch at the low dtype: materialised scores and softmax in that dtype.
    kk = k.detach().repeat_interleave(q.shape[1] // k.shape[1], 1)
    s = torch.einsum("bhid,bhjd->bhij", q.detach(), kk) / q.shape[-1] ** 0.5
    allowed = mask[:, None, None, :] & torch.ones(s.shape[-1], s.shape[-1]).tril().bool()
    p = torch.softmax(s.masked_fill(~allowed, float("-inf")), -1).nan_to_num(0).mean(1)
    lowp = pad_maps([p[b][layout.query_index[b, :layout.query_count[b]]][
        :, layout.visual_index[b, :layout.visual_count[b]]] for b in range(q.shape[0])],
        layout.query_count, layout.visual_count)
    assert_accuracy(ours, ref, lowp, atol=1e-6, name=f"maps {dtype}")
    dq, = torch.autograd.grad(ours.sum(), q)
    assert dq.dtype == dtype and torch.isfinite(dq).all()


def test_float64_gradcheck():
    q = torch.randn(2, 4, 11, 8, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 2, 11, 8, dtype=torch.float64, requires_grad=True)
    mask = torch.ones(2, 11, dtype=torch.bool)
    mask[1, :2] = False
    layout = cd.visual_layout([[(2, 4), (6, 8)], [(3, 7)]], 2, 11, attention_mask=mask)
    assert torch.autograd.gradcheck(lambda a, b: cd.visual_attention_maps(a, b, layout), (q, k),
                                    fast_mode=True)


def test_layout_gathers_rows_and_columns_in_order():
    mask = torch.tensor([[1, 1, 1, 1, 1, 0], [0, 1, 1, 1, 1, 1]], dtype=torch.bool)
    layout = cd.visual_layout([[(1, 3)], [(4, 6)]], 2, 6, query="text", attention_mask=mask)
    assert layout.visual_index.tolist() == [[1, 2], [4, 5]]
    assert layout.query_index.tolist() == [[0, 3, 4], [1, 2, 3]]
    assert layout.query_count.tolist() == [3, 3]
    assert layout.allowed()[1].tolist() == [[False, False]] * 3
    assert layout.allowed()[0].tolist() == [[False, False], [True, True], [True, True]]
