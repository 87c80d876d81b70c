"""Sliding-window attention in the Triton kernels (Gemma 3's local layers): attention output,
visual maps and the fused backward (both backwards) against the fp32 reference with the same
window. Runs through the Triton interpreter."""
import os

os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from compodistill import kernels as K  # noqa: E402
from compodistill.kernels._common import window_key_start, window_query_end  # noqa: E402
from compodistill.testing.accuracy import assert_accuracy, pad_maps, rounding_atol  # noqa: E402
from compodistill.testing.visual_attention import (ref_attention_output,  # noqa: E402
                                                   ref_visual_maps)
from compodistill.visual_attention.layout import visual_layout  # noqa: E402

from _helpers import BACKWARD_MODES, use_backward  # noqa: E402

B, HQ, HKV, N, D = 2, 4, 2, 150, 16


def _inputs():
    g = torch.Generator().manual_seed(0)
    q, k, v = (2 * torch.randn(B, h, N, D, generator=g) for h in (HQ, HKV, HKV))
    mask = torch.ones(B, N, dtype=torch.bool)
    mask[1, :7] = False                                      # left padding
    vis = torch.zeros(B, N, dtype=torch.bool)
    vis[0, 3:20] = True                                      # early: outside late windows
    vis[0, 100:130] = True
    vis[1, 60:90] = True
    return q, k, v, mask, vis


def _close(name, got, want):
    assert_accuracy(got, want, atol=10 * rounding_atol(want, torch.float32) + 1e-5, name=name)


# 34 = 2 (mod 32): with the interpreter's blocks (dk/dv 32x64, dq 64x32) the window of key
# 64p+63 ends on the first row of a query block (query 64p+96) and the window of query 64p
# starts on the last key of a key block (key 64p-33): a bound one block short drops them.
@pytest.mark.parametrize("mode", BACKWARD_MODES)
@pytest.mark.parametrize("window", [1, 9, 34, 70])
def test_window_attention_maps_and_gradients(monkeypatch, mode, window):
    use_backward(monkeypatch, mode)
    q, k, v, mask, vis = _inputs()
    layout = visual_layout(vis, B, N, attention_mask=mask, window=window)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out, maps = K.attention_with_visual_maps(*leaves, layout)
    ref = [t.clone().requires_grad_() for t in (q, k, v)]
    out_ref, _ = ref_attention_output(*ref, mask, True, None, window=window)
    maps_ref = pad_maps(ref_visual_maps(ref[0], ref[1], vis, "all", mask, True, None,
                                        window=window), layout.query_count, layout.visual_count)
    real = mask[:, None, :, None]
    _close("out", out * real, out_ref * real)
    _close("maps", maps, maps_ref)
    last = int(layout.query_count[0]) - 1                    # row N-1 of sample 0
    assert float(maps.detach()[0, last, :17].abs().max()) == 0.0  # the early image: cut
    g = torch.Generator().manual_seed(1)
    d_out, d_maps = torch.randn(out.shape, generator=g), torch.randn(maps.shape, generator=g)
    grads = torch.autograd.grad(((out * real) * d_out).sum() + (maps * d_maps).sum(), leaves)
    want = torch.autograd.grad(((out_ref * real) * d_out).sum() + (maps_ref * d_maps).sum(),
                               ref)
    for name, a, w in zip(("dq", "dk", "dv"), grads, want):
        _close(name, a, w)


def test_window_teacher_maps_and_checks():
    q, k, v, mask, vis = _inputs()
    layout = visual_layout(vis, B, N, attention_mask=mask, window=9)
    acc = torch.zeros(layout.map_shape)
    K.teacher_attention_with_visual_maps(q, k, v, layout, maps_out=acc, weight=0.5)
    want = pad_maps(ref_visual_maps(q, k, vis, "all", mask, True, None, window=9),
                    layout.query_count, layout.visual_count)
    _close("teacher maps", acc, 0.5 * want)
    _close("maps only", K.visual_maps(q, k, layout), want)
    with pytest.raises(ValueError, match="window must be a positive int"):
        K.flash_attention(q, k, v, window=0)
    with pytest.raises(ValueError, match="sliding window needs causal"):
        K.flash_attention(q, k, v, causal=False, window=4)


@triton.jit
def _window_bounds_kernel(KeyStart, QueryEnd, N, WINDOW, BLOCK_M: tl.constexpr,
                          BLOCK_N: tl.constexpr):
    pid = tl.program_id(0)
    tl.store(KeyStart + pid, window_key_start(pid * BLOCK_M, WINDOW, BLOCK_N))
    tl.store(QueryEnd + pid, window_query_end(pid * BLOCK_N, N, WINDOW, BLOCK_N, BLOCK_M))


def _first_last_blocks(allowed, rows, cols):
    """(first column block, last column block) holding an allowed pair of each row block."""
    tiles = torch.stack([torch.stack([t.any() for t in r.split(cols, 1)])
                         for r in allowed.split(rows, 0)])
    idx = torch.arange(tiles.shape[1])
    first = torch.where(tiles, idx, tiles.shape[1]).min(1).values
    last = torch.where(tiles, idx, -1).max(1).values
    return first, last


@pytest.mark.parametrize("n", [150, 256])
def test_window_block_bounds_are_tight(n):
    """The loop bounds every windowed kernel uses: the dq/forward programs start at the first
    key block with an allowed (causal, in-window) pair, the dk/dv programs end after the last
    query block with one; no block with a pair is left out, none without one is visited at
    the ends."""
    i = torch.arange(n)
    for window in (1, 2, 9, 33, 34, 70, 200):
        allowed = (i[:, None] >= i[None, :]) & (i[:, None] - i[None, :] < window)
        for block_m, block_n in ((16, 32), (32, 64), (64, 32), (64, 64), (128, 32)):
            programs = triton.cdiv(n, min(block_m, block_n))
            key_start = torch.zeros(programs, dtype=torch.int32)
            query_end = torch.zeros(programs, dtype=torch.int32)
            _window_bounds_kernel[(programs,)](key_start, query_end, n, window,
                                               BLOCK_M=block_m, BLOCK_N=block_n)
            first_key, _ = _first_last_blocks(allowed, block_m, block_n)
            _, last_query = _first_last_blocks(allowed.T, block_n, block_m)
            case = f"N={n} window={window} blocks {block_m}x{block_n}"
            assert key_start[:triton.cdiv(n, block_m)].tolist() == (first_key * block_n).tolist(), case
            want_end = torch.clamp((last_query + 1) * block_m, max=n)
            assert query_end[:triton.cdiv(n, block_n)].tolist() == want_end.tolist(), case
