"""The FLOP ledger (compodistill/kernels/ledger.py) against a direct count: the kernels run
under the Triton interpreter (TRITON_INTERPRET=1, set before triton is imported) with the
block shapes the ledger assumes, and every ``tl.dot``, exp2 and atomic add they execute is
counted from the interpreter's own operations."""
import os

os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from triton.runtime import interpreter  # noqa: E402

from compodistill.kernels import attention as A  # noqa: E402
from compodistill.kernels import ledger  # noqa: E402


@pytest.fixture
def counted(monkeypatch):
    """Counts of the interpreter's dot FLOPs, exp2 elements and unmasked atomic adds."""
    counts = dict(flops=0, exp2=0, atomics=0)
    builder = interpreter.InterpreterBuilder
    dot, exp2, rmw = builder.create_dot, builder.create_exp2, builder.create_atomic_rmw

    def create_dot(self, a, b, d, *args):
        m, k = a.data.shape[-2:]
        counts["flops"] += 2 * m * k * b.data.shape[-1]
        return dot(self, a, b, d, *args)

    def create_exp2(self, arg):
        counts["exp2"] += arg.data.size
        return exp2(self, arg)

    def create_atomic_rmw(self, op, ptr, val, mask, *args):
        counts["atomics"] += int(mask.data.sum())
        return rmw(self, op, ptr, val, mask, *args)

    monkeypatch.setattr(builder, "create_dot", create_dot)
    monkeypatch.setattr(builder, "create_exp2", create_exp2)
    monkeypatch.setattr(builder, "create_atomic_rmw", create_atomic_rmw)
    return counts


def _use_ledger_blocks(monkeypatch, d):
    for name in ("_fwd_kernel", "_bwd_dkdvdq_kernel"):
        bm, bn = ledger.blocks(name, d)
        config = next(c for c in A.all_configs(name)
                      if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) == (bm, bn))
        monkeypatch.setattr(getattr(A, name), "configs", [config])


@pytest.mark.parametrize("n,d", [(150, 64), (97, 80)])
def test_ledger_counts_match_the_kernels(n, d, counted, monkeypatch):
    """Plain attention, causal: forward then the 5-matmul backward; d = 80 runs padded."""
    _use_ledger_blocks(monkeypatch, d)
    shape = ledger.Shape(B=1, Hq=4, Hkv=2, N=n, d=d)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 4, n, d, generator=g)
    k, v = (torch.randn(1, 2, n, d, generator=g) for _ in range(2))
    out, stats = A.flash_forward(q, k, v, None, True, None)
    fwd = ledger.step_launches(shape)[-4]  # the plain student forward
    assert fwd.kernel == "fwd_kernel" and fwd.step == "plain"
    assert (counted["flops"], counted["exp2"]) == (fwd.flops, fwd.exp2)
    before = dict(counted)
    A.flash_backward(torch.randn(q.shape, generator=g), q, k, v, out, stats, None, True, None,
                     atomic_dq=True)
    bwd = ledger.step_launches(shape)[-2]
    assert bwd.kernel == "bwd_dkdvdq_kernel"
    assert counted["flops"] - before["flops"] == bwd.flops
    assert counted["exp2"] - before["exp2"] == bwd.exp2
    assert counted["atomics"] == bwd.atomics


def test_ledger_csv_and_ratios():
    rows = ledger.ledger_rows(head_dims=(128,), seq_lens=(1024,))
    totals = {r["step"]: r for r in rows if r["kernel"] == "total"}
    assert totals["fused"]["flops"] > totals["plain"]["flops"] > 0
    # the plain step: two causal forwards (4 N^2/2 d each per head) and a 5-matmul backward
    n, d, heads = 1024, 128, 2 * 16
    approx = heads * (2 * 4 * n * n / 2 * d + 10 * n * n / 2 * d)
    assert 1.0 < totals["plain"]["flops"] / approx < 1.1  # the diagonal blocks on top
