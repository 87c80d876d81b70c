"""Sliding-window visual maps (Gemma 3's local layers): the chunked path vs the fp32 reference."""
import pytest
import torch

from compodistill import visual_attention_maps
from compodistill.testing.accuracy import assert_accuracy, pad_maps, rounding_atol
from compodistill.testing.visual_attention import ref_visual_maps
from compodistill.visual_attention.layout import visual_layout


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    b, n, d = 3, 40, 16
    q = (3 * torch.randn(b, 4, n, d, generator=g, dtype=torch.float32)).requires_grad_()
    k = (3 * torch.randn(b, 2, n, d, generator=g, dtype=torch.float32)).requires_grad_()
    vis = torch.zeros(b, n, dtype=torch.bool)
    vis[0, 2:10] = True                     # early image: far outside the window late on
    vis[1, 5:9] = True
    vis[1, 20:30] = True
    mask = torch.ones(b, n, dtype=torch.long)
    mask[1, :3] = 0                         # left padding
    mask[2, -6:] = 0                        # right padding, no image
    return q, k, vis, mask


@pytest.mark.parametrize("window", [1, 7, 16])
@pytest.mark.parametrize("query", ["all", "text"])
def test_window_maps_and_grads_match_reference(window, query):
    q, k, vis, mask = _inputs()
    got = visual_attention_maps(q, k, vis, query=query, attention_mask=mask, window=window,
                                backend="torch")
    want = ref_visual_maps(q, k, vis, query=query, attention_mask=mask, window=window)
    layout = visual_layout(vis, 3, 40, query=query, attention_mask=mask, window=window)
    want = pad_maps(want, layout.query_count, layout.visual_count)
    assert_accuracy(got, want, atol=rounding_atol(want, torch.float32), name="maps")
    if window > 1:  # (window 1 with text rows: no row sees an image, all zeros)
        assert float(want.detach().abs().max()) > 0.05  # sharp maps, not all near zero
    # the window really cuts: sample 0's last query row sees none of the early image
    last = int(layout.query_count[0]) - 1
    assert float(got.detach()[0, last].abs().sum()) == 0.0
    weights = torch.randn(got.shape, generator=torch.Generator().manual_seed(1))
    got_grads = torch.autograd.grad((got * weights).sum(), (q, k))
    want_grads = torch.autograd.grad((want * weights).sum(), (q, k))
    for a, w, name in zip(got_grads, want_grads, ("dq", "dk")):
        assert_accuracy(a, w, atol=rounding_atol(w, torch.float32) * 10, name=name)


def test_window_is_checked():
    with pytest.raises(ValueError, match="window must be a positive int"):
        visual_layout(torch.zeros(1, 8, dtype=torch.bool), 1, 8, window=0)
    with pytest.raises(ValueError, match="sliding window needs a causal layout"):
        visual_layout(torch.zeros(1, 8, dtype=torch.bool), 1, 8, causal=False, window=4)
    assert visual_layout(torch.zeros(1, 8, dtype=torch.bool), 1, 8, window=8).window is None
