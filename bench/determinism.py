"""Benchmark: the cost of ``COMPODISTILL_DETERMINISTIC=1`` on the fused Triton path.

The kernels use no atomics; the flag pins every autotuned kernel (flash forward, dk/dv and
dq backward, linear KD rows) to its first config instead of the autotuner's pick, so a
run reproduces the same bits in every process. The cost is whatever the tuned config
would have saved. Providers (x = N): ``tuned`` and ``pinned``, each the student
:func:`attention_with_visual_maps` fwd + bwd with a flat-cosine loss on the maps
(B=2, 16 heads, 4 kv heads, d=128, 576 image tokens from position 32, causal, bf16).

Usage: ``python bench/determinism.py [--sizes N ...] [--out CSV]`` (CUDA only; rows go to
``bench/results/determinism.csv``).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench._common import RESULTS_DIR, measure, provenance, write_rows  # noqa: E402


def step(n: int, device: torch.device):
    from compodistill import visual_layout
    from compodistill.kernels import autograd as kernels
    g = torch.Generator(device).manual_seed(0)
    shape_q, shape_kv = (2, 16, n, 128), (2, 4, n, 128)
    q = torch.randn(shape_q, device=device, generator=g, dtype=torch.bfloat16)
    k = torch.randn(shape_kv, device=device, generator=g, dtype=torch.bfloat16)
    v = torch.randn(shape_kv, device=device, generator=g, dtype=torch.bfloat16)
    layout = visual_layout([[(32, 32 + 576)]] * 2, 2, n, device=device)
    target = torch.rand(layout.map_shape, device=device)
    d_out = torch.randn_like(q)
    leaves = [t.requires_grad_() for t in (q, k, v)]

    def run():
        out, maps = kernels.attention_with_visual_maps(*leaves, layout)
        cos = torch.nn.functional.cosine_similarity(maps.flatten(1), target.flatten(1)).mean()
        ((out * d_out).sum() + 1 - cos).backward()
    return run


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 4096, 8192])
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "determinism.csv")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench/determinism.py needs a CUDA device (the flag only changes GPU launches)")
    device = torch.device("cuda")
    rows, info = [], provenance(device)
    for n in args.sizes:
        for provider, flag in (("tuned", "0"), ("pinned", "1")):
            os.environ["COMPODISTILL_DETERMINISTIC"] = flag
            ms, mib = measure(step(n, device), device)
            rows += [dict(benchmark="determinism", provider=provider, x_name="N", x=n,
                          metric="ms", value=f"{ms:.4f}", unit="ms", **info),
                     dict(benchmark="determinism", provider=provider, x_name="N", x=n,
                          metric="peak_mib", value=f"{mib:.1f}", unit="MiB", **info)]
            print(f"N={n:6d} {provider:7s} {ms:8.3f} ms")
    os.environ.pop("COMPODISTILL_DETERMINISTIC", None)
    print(write_rows(args.out, rows))


if __name__ == "__main__":
    main()
