"""The project's accuracy rule and layout helpers shared by the test suites.

Accuracy rule, the one every test uses: a fast path's error against the fp32 reference may
be at most twice the error of the same computation done in plain PyTorch at the input dtype,
plus a small absolute tolerance. Where float32 itself loses digits (huge scores,
ill-conditioned z-scoring), the yardstick is a float64 computation and the baseline is the
float32 reference's own error against it.
"""
from __future__ import annotations

from typing import Sequence

import torch


def pad_maps(maps: Sequence[torch.Tensor], query_count: torch.Tensor,
             visual_count: torch.Tensor) -> torch.Tensor:
    """Per-sample reference maps (|Q_b|, Nv_b) -> the dense (B, Qmax, Vmax) layout, 0-padded."""
    q_max = int(query_count.max()) if len(maps) else 0
    v_max = int(visual_count.max()) if len(maps) else 0
    out = maps[0].new_zeros(len(maps), q_max, v_max)
    for b, m in enumerate(maps):
        if tuple(m.shape) != (int(query_count[b]), int(visual_count[b])):
            raise ValueError(f"sample {b}: map {tuple(m.shape)} does not match counts "
                             f"({int(query_count[b])}, {int(visual_count[b])})")
        out[b, : m.shape[0], : m.shape[1]] = m
    return out


# Relative allowance for rounding one result to its dtype (a few units in the last place of
# the largest value); the absolute part of the rule when there is no lower-precision torch
# computation to compare with.
ROUNDING = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2,
            torch.float64: 1e-12}


def rounding_atol(reference: torch.Tensor, dtype: torch.dtype) -> float:
    """``ROUNDING[dtype] · max|reference|``: what rounding to ``dtype`` alone may cost."""
    if reference.numel() == 0:
        return 0.0
    return ROUNDING[dtype] * float(reference.detach().abs().max())


def max_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual.detach().double() - expected.detach().double()).abs().max()) if actual.numel() else 0.0


def assert_accuracy(actual: torch.Tensor, reference: torch.Tensor,
                    same_dtype_torch: torch.Tensor | None = None, *, atol: float = 1e-5,
                    name: str = "value") -> None:
    """|actual − reference| ≤ 2·|torch_at_dtype − reference| + atol (max norm).

    ``same_dtype_torch`` is the plain-PyTorch result at the low-precision dtype; leave it
    None for fp32 inputs, where the bound is ``atol`` alone.
    """
    if tuple(actual.shape) != tuple(reference.shape):
        raise AssertionError(f"{name}: shape {tuple(actual.shape)} != {tuple(reference.shape)}")
    if not bool(torch.isfinite(actual).all()):
        raise AssertionError(f"{name}: non-finite values")
    baseline = 0.0 if same_dtype_torch is None else max_error(same_dtype_torch, reference)
    err = max_error(actual, reference)
    bound = 2.0 * baseline + atol
    if err > bound:
        raise AssertionError(f"{name}: max error {err:.3g} > bound {bound:.3g} "
                             f"(2 x torch-at-dtype error {baseline:.3g} + atol {atol:.3g})")
