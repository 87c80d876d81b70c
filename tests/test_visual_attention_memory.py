"""The CPU path never allocates an N×N (or B·H·N·N) tensor, forward or backward."""
from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import compodistill as cd


class LargestAllocation(TorchDispatchMode):
    """Records the element count of every tensor any aten op produces."""

    def __init__(self):
        super().__init__()
        self.largest = 0
        self.op = None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.numel() > self.largest:
                self.largest, self.op = t.numel(), str(func)
        return out


def test_no_quadratic_tensor_at_n512():
    b, h, hkv, n, d = 2, 4, 2, 512, 32
    q = torch.randn(b, h, n, d, requires_grad=True)
    k = torch.randn(b, hkv, n, d, requires_grad=True)
    spans = [[(16, 80), (200, 264)], [(100, 196)]]
    target = cd.visual_attention_maps(q.detach(), k.detach(), spans)
    with LargestAllocation() as probe:
        loss = cd.visual_attention_loss(q, k, target, spans, loss="kl")
        loss.backward()
    limit = b * h * n * n // 4
    assert probe.largest < limit, f"{probe.op} produced {probe.largest} elements >= {limit}"
    # The probe itself works: the materialising way trips it.
    with LargestAllocation() as probe:
        torch.softmax(q @ k.repeat_interleave(2, 1).transpose(-1, -2), -1)
    assert probe.largest >= limit
