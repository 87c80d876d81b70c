"""pytest-benchmark entry for bench/visual_attention.py, tiny CPU shapes.

``pytest bench/test_bench_attention.py`` times the torch providers (and the Triton ones under
TRITON_INTERPRET=1) on N=64; the full sweep is ``python bench/visual_attention.py``.
"""
import pytest
import torch

from bench.visual_attention import K, make_inputs, providers
from compodistill.visual_attention.layout import visual_layout

pytest.importorskip("pytest_benchmark")

N, BATCH = 64, 1
USE_TRITON = K is not None and K.HAS_TRITON and K.interpreting()
PROVIDERS = (["flash", "fused"] if USE_TRITON else []) + ["sdpa", "chunked", "eager"]


@pytest.mark.parametrize("provider", PROVIDERS)
def test_visual_attention_cpu(benchmark, provider):
    device = torch.device("cpu")
    layout = visual_layout([[(8, 24)]] * BATCH, BATCH, N, query="all", causal=True)
    inputs = make_inputs(N, BATCH, hs=2, ht=4, d=32, hkv_s=1, hkv_t=2, dtype=torch.float32,
                     device=device)
    fn = providers(*inputs, layout, device, USE_TRITON)[provider]
    grads = benchmark(fn)
    assert all(torch.isfinite(g).all() for g in grads)
