"""FLOP and byte ledger of one training step's attention launches, counted on paper.

``python -m compodistill.kernels.ledger [--out CSV]`` lists, per kernel launch of one step at
the reference shapes (B = 2, Hq = 16, Hkv = 8, Nv = 576 image tokens at positions
[32, 608), every position a query row, causal, no padding, bf16), for d = 80/96/128/256 and
N = 1k/4k/8k/16k:

- ``flops``: matmul FLOPs, 2·M·N·K per ``tl.dot`` tile the kernel computes (K = BLOCK_D: the
  padded head dim is computed too), over the tiles its loops visit;
- ``exp2``: exp2 evaluations (tile elements, plus the per-row rescales);
- ``hbm_read`` / ``hbm_written``: bytes of the tensors the launch reads / writes, each once
  (a lower bound of the DRAM traffic: re-reads of a K/V block by other programs are counted
  as L2 hits);
- ``atomics``: float32 atomic adds (the 5-matmul backward's dq);
- ``time_lb_us``: max(flops / 989 TFLOP/s, bytes / 3.35 TB/s), the H100 SXM dense bf16 and
  HBM3 peaks (datasheet figures, not measurements).

Grids and loop bounds follow the launchers and kernels of :mod:`.attention` and
:mod:`.visual_attention`; block shapes are the first config the sm_90 pruning keeps for the
head-dim class (what the deterministic mode pins). The fused step is the teacher's maps pass
(forward with the visual statistics, refine, maps) plus the student's fused forward and
backward (row terms, delta, 5-matmul backward with the map gradient); the plain step is the
same two models with FlashAttention-2-style attention (forward, delta, 5-matmul backward).
Small PyTorch-side ops (index maps, zero fills of outputs) are left out; the dq buffer's zero
fill and cast are in (``torch_dq``). ``tests/test_kernel_ledger.py`` checks the tile counts
against the kernels themselves under the interpreter.
"""
from __future__ import annotations

import argparse
import csv
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from ._common import all_configs, block_d, fit_table, prune_configs
from .visual_attention import visual_block_q, visual_block_v

PEAK_FLOPS = 989e12  # H100 SXM, dense bf16 tensor core (datasheet)
PEAK_BYTES = 3.35e12  # H100 SXM HBM3 bandwidth (datasheet)
ELT = 2  # bf16 bytes
HEAD_DIMS = (80, 96, 128, 256)
SEQ_LENS = (1024, 4096, 8192, 16384)


@dataclass(frozen=True)
class Shape:
    B: int = 2
    Hq: int = 16
    Hkv: int = 8
    N: int = 4096
    d: int = 128
    Nv: int = 576
    v0: int = 32  # first image position


@dataclass
class Launch:
    step: str  # "fused" or "plain"
    model: str  # "teacher" or "student"
    kernel: str
    blocks: str
    flops: int = 0
    exp2: int = 0
    hbm_read: int = 0
    hbm_written: int = 0
    atomics: int = 0

    @property
    def time_lb_us(self) -> float:
        return 1e6 * max(self.flops / PEAK_FLOPS,
                         (self.hbm_read + self.hbm_written) / PEAK_BYTES)


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def blocks(kernel: str, d: int) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_N) of the first config the sm_90 pruning keeps at this head dim."""
    config = prune_configs(all_configs(kernel), fit_table(kernel), block_d(d), 90)[0]
    return config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"]


# --------------------------------------------------------------------------- tile counts

def fwd_tiles(N: int, bm: int, bn: int) -> int:
    """Key blocks the causal forward visits, summed over its query-block programs (one head):
    the blocks below the diagonal, then the diagonal span ``_fwd_inner`` walks."""
    total = 0
    for pid in range(cdiv(N, bm)):
        start = pid * bm
        total += cdiv(start, bn) + cdiv(min(start + bm, N) - start, bn)
    return total


def bwd_tiles(N: int, bm: int, bn: int) -> tuple[int, int]:
    """(query-block steps, query rows over those steps) of the causal dk/dv programs (one
    query head): program ``pid`` walks the query blocks from the one holding its first key."""
    steps = rows = 0
    for pid in range(cdiv(N, bn)):
        for start in range(pid * bn // bm * bm, N, bm):
            steps += 1
            rows += min(bm, N - start)
    return steps, rows


def visual_tiles(s: Shape, bq: int, bv: int, skip: bool) -> int:
    """(row block, column chunk) tiles of the gathered passes (one head); with ``skip`` only
    the tiles holding an allowed (causal) pair, as the maps and row-terms kernels do."""
    total = 0
    for r in range(cdiv(s.N, bq)):
        last_row = min((r + 1) * bq, s.N) - 1
        for c in range(cdiv(s.Nv, bv)):
            total += (not skip) or s.v0 + c * bv <= last_row
    return total


# --------------------------------------------------------------------------- launches

def _fwd(s: Shape, step, model, has_vis: bool) -> Launch:
    bm, bn = blocks("_fwd_kernel", s.d)
    bd, bh = block_d(s.d), s.B * s.Hq
    t = fwd_tiles(s.N, bm, bn) * bh
    return Launch(step, model, "fwd_kernel", f"{bm}x{bn}", flops=t * 2 * 2 * bm * bn * bd,
                  exp2=t * (bm * bn + bm),
                  hbm_read=(bh + 2 * s.B * s.Hkv) * s.N * s.d * ELT + has_vis * s.B * s.N * 4,
                  hbm_written=bh * s.N * (s.d * ELT + (3 if has_vis else 2) * 4))


def _gathered(s: Shape, step, model, kernel: str, skip: bool, extra_read: int,
              written: int, exp_rows: int) -> Launch:
    bq, bv = visual_block_q(), visual_block_v(s.d)
    t = visual_tiles(s, bq, bv, skip) * s.B * s.Hq
    reads = s.B * s.Hq * s.N * s.d * ELT + s.B * s.Hkv * s.Nv * s.d * ELT
    return Launch(step, model, kernel, f"{bq}x{bv}", flops=t * 2 * bq * bv * block_d(s.d),
                  exp2=t * (bq * bv + exp_rows * bq), hbm_read=reads + extra_read,
                  hbm_written=written)


def _stats(s, step, model):
    planes = s.B * s.Hq * s.N * 4
    return _gathered(s, step, model, "visual_stats_kernel", False, 2 * planes, 2 * planes, 1)


def _maps(s, step, model):
    maps = s.B * s.N * s.Nv * 4
    return _gathered(s, step, model, "visual_maps_kernel", True, 2 * s.B * s.Hq * s.N * 4,
                     maps, 0)


def _row_terms(s, step, model):
    planes = s.B * s.Hq * s.N * 4
    return _gathered(s, step, model, "visual_row_terms_kernel", True,
                     2 * planes + s.B * s.N * s.Nv * 4, planes, 0)


def _delta(s, step, model):
    bh = s.B * s.Hq
    return Launch(step, model, "bwd_delta_kernel", "64", hbm_read=2 * bh * s.N * s.d * ELT,
                  hbm_written=bh * s.N * 4)


def _bwd(s: Shape, step, model, has_g: bool) -> Launch:
    bm, bn = blocks("_bwd_dkdvdq_kernel", s.d)
    bd, bh = block_d(s.d), s.B * s.Hq
    steps, rows = bwd_tiles(s.N, bm, bn)
    steps, rows = steps * bh, rows * bh  # every query head of every kv head's group
    kv = s.B * s.Hkv * s.N * s.d * ELT
    reads = 2 * bh * s.N * s.d * ELT + 2 * kv + 3 * bh * s.N * 4  # q, dO, k, v, m, l, delta
    if has_g:
        reads += s.B * s.N * s.Nv * 4 + 2 * s.B * s.N * 4  # G, query_row, visual_col
    dq = bh * s.N * s.d * 4
    return Launch(step, model, "bwd_dkdvdq_kernel", f"{bm}x{bn}",
                  flops=steps * 5 * 2 * bm * bn * bd, exp2=steps * bm * bn,
                  hbm_read=reads + dq, hbm_written=2 * kv + dq, atomics=rows * s.d)


def _torch_dq(s, step, model):
    elts = s.B * s.Hq * s.N * s.d
    return Launch(step, model, "torch_dq", "", hbm_read=elts * 4,
                  hbm_written=elts * 4 + elts * ELT)  # zero fill, then the cast


def step_launches(s: Shape) -> list[Launch]:
    """Every launch of one fused and one plain step at shape ``s``."""
    fused = [_fwd(s, "fused", "teacher", True), _stats(s, "fused", "teacher"),
             _maps(s, "fused", "teacher"),
             _fwd(s, "fused", "student", True), _stats(s, "fused", "student"),
             _maps(s, "fused", "student"), _row_terms(s, "fused", "student"),
             _delta(s, "fused", "student"), _bwd(s, "fused", "student", True),
             _torch_dq(s, "fused", "student")]
    plain = [_fwd(s, "plain", "teacher", False),
             _fwd(s, "plain", "student", False), _delta(s, "plain", "student"),
             _bwd(s, "plain", "student", False), _torch_dq(s, "plain", "student")]
    return fused + plain


def totals(launches: list[Launch], step: str) -> dict:
    rows = [x for x in launches if x.step == step]
    return dict(flops=sum(x.flops for x in rows), exp2=sum(x.exp2 for x in rows),
                bytes=sum(x.hbm_read + x.hbm_written for x in rows),
                atomics=sum(x.atomics for x in rows),
                time_lb_us=sum(x.time_lb_us for x in rows))


FIELDS = ["head_dim", "seq_len", "step", "model", "kernel", "blocks", "flops", "exp2",
          "hbm_read", "hbm_written", "atomics", "time_lb_us"]


def ledger_rows(head_dims=HEAD_DIMS, seq_lens=SEQ_LENS) -> list[dict]:
    out = []
    for d in head_dims:
        for n in seq_lens:
            launches = step_launches(Shape(N=n, d=d))
            for x in launches:
                out.append(dict(head_dim=d, seq_len=n, **asdict(x),
                                time_lb_us=round(x.time_lb_us, 3)))
            for step in ("fused", "plain"):
                t = totals(launches, step)
                out.append(dict(head_dim=d, seq_len=n, step=step, model="all", kernel="total",
                                blocks="", flops=t["flops"], exp2=t["exp2"],
                                hbm_read="", hbm_written=t["bytes"], atomics=t["atomics"],
                                time_lb_us=round(t["time_lb_us"], 3)))
    return out


def ratio_table(head_dims=HEAD_DIMS, seq_lens=SEQ_LENS) -> str:
    """Markdown: fused / plain per head dim and N, in FLOPs, bytes and lower-bound time."""
    lines = ["| d | N | fused GFLOP | plain GFLOP | FLOP ratio | byte ratio | "
             "time ratio (lower bounds) |", "|---|---|---|---|---|---|---|"]
    for d in head_dims:
        for n in seq_lens:
            launches = step_launches(Shape(N=n, d=d))
            f, p = totals(launches, "fused"), totals(launches, "plain")
            lines.append(f"| {d} | {n} | {f['flops'] / 1e9:.1f} | {p['flops'] / 1e9:.1f} | "
                         f"{f['flops'] / p['flops']:.3f} | {f['bytes'] / p['bytes']:.3f} | "
                         f"{f['time_lb_us'] / p['time_lb_us']:.3f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None,
                    help="CSV path (default bench/results/kernel_ledger.csv)")
    opts = ap.parse_args(argv)
    out = opts.out or Path(__file__).resolve().parents[2] / "bench" / "results" / \
        "kernel_ledger.csv"
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        w.writeheader()
        w.writerows(ledger_rows())
    print(ratio_table())
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
