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
- ``atomics``: float32 atomic adds (the 5-matmul backward's dq; the maps phase's map in the
  ``maps-phase`` step);
- ``time_lb_us``: max(flops / 989 TFLOP/s, bytes / 3.35 TB/s), the H100 SXM dense bf16 and
  HBM3 peaks (datasheet figures, not measurements);
- ``time_pred_us``: the same with FlashAttention-2-class matmul efficiencies instead of the
  peak, 335 TFLOP/s for forward-type launches and 251 for the backward (stated
  assumptions, not measurements; bytes still at the peak).

Grids and loop bounds follow the launchers and kernels of :mod:`.attention` and
:mod:`.visual_attention`; block shapes are the first config the sm_90 pruning keeps for the
head-dim class (what the deterministic mode pins). The steps are those of :data:`STEPS`
(:func:`step_launches`). Small PyTorch-side ops (index maps) are left out; the zero fills
that kernels accumulate into are in (``torch_zero_maps`` of the ``maps-phase`` step, and
``torch_dq``: the dq buffer's fill and cast). ``tests/test_kernel_ledger.py`` checks the
tile counts against the kernels themselves under the interpreter. ``--out`` also writes
``<name>_ratios.csv``: per head dim, N and step, ``fused_over_plain_flops``,
``fused_over_plain_bytes`` and the time ratios.
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
FWD_FLOPS, BWD_FLOPS = 335e12, 251e12  # FlashAttention-2-class efficiencies (assumed)
ELT = 2  # bf16 bytes
MAP_ELT = 2  # the maps (and G) of a bf16 model are bf16 (kernels._common.map_dtype)
F32 = 4
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

    @property
    def time_pred_us(self) -> float:
        rate = BWD_FLOPS if self.kernel.startswith("bwd_") else FWD_FLOPS
        return 1e6 * max(self.flops / rate, (self.hbm_read + self.hbm_written) / PEAK_BYTES)


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


def maps_phase_tiles(s: Shape, bm: int, bn: int) -> int:
    """Key blocks the forward's maps phase visits, summed over its query-block programs (one
    head): the blocks of the image span, from the one holding its first token, inside the
    causal range the first phase walked."""
    total = 0
    for pid in range(cdiv(s.N, bm)):
        end = min((pid + 1) * bm, s.N)
        lo, hi = s.v0 // bn * bn, min(end, s.v0 + s.Nv)
        total += cdiv(hi - lo, bn) if hi > lo else 0
    return total


def visual_pairs(s: Shape) -> int:
    """Allowed (query row, image key) pairs of one head: every position is a query row and
    sees the image tokens at or before it (causal)."""
    return sum(min(max(i - s.v0 + 1, 0), s.Nv) for i in range(s.N))


def _fwd_maps(s: Shape, step, model) -> Launch:
    """The forward with its maps phase (the ``maps-phase`` step): the first phase as
    :func:`_fwd` (no non-visual plane), then the image key blocks rescored and ``P / Hq``
    added into a float32 map by float32 atomics (the map's bytes counted once: the atomics
    meet in L2)."""
    x = _fwd(s, step, model, False)
    bm, bn = blocks("_fwd_kernel", s.d)
    t = maps_phase_tiles(s, bm, bn) * s.B * s.Hq
    x.kernel, x.flops, x.exp2 = "fwd_kernel+maps", x.flops + t * 2 * bm * bn * block_d(s.d), \
        x.exp2 + t * bm * bn
    x.hbm_read += 2 * s.B * s.N * 4 + s.B * s.N * s.Nv * F32  # query_row, visual_col; the map
    x.hbm_written += s.B * s.N * s.Nv * F32
    x.atomics = visual_pairs(s) * s.B * s.Hq
    return x


def _zero_maps(s, step, model):
    """The float32 maps buffer's zero fill (the maps phase's atomics accumulate into it)."""
    return Launch(step, model, "torch_zero_maps", "", hbm_written=s.B * s.N * s.Nv * F32)


def _stats(s, step, model, refine: bool = True):
    """The refine pass; ``refine=False``: at moderate scores its gate (|row max| < 64 on
    every row) reads the row maxima and the statistics copy, and scores nothing."""
    planes = s.B * s.Hq * s.N * 4
    if not refine:
        return Launch(step, model, "visual_stats_kernel (gate)", "",
                      hbm_read=3 * planes, hbm_written=2 * planes)
    return _gathered(s, step, model, "visual_stats_kernel", False, 2 * planes, 2 * planes, 1)


def _map_loss(s, step, model) -> list[Launch]:
    """The fused map loss (kernels/map_loss.py) of the default loss, cosine flat, on maps of
    ``MAP_ELT`` bytes: the forward walks both maps once (the sample sums); the backward
    walks them again and writes G = dL/dA with the upstream gradient folded in."""
    elts = s.B * s.N * s.Nv
    return [Launch(step, model, "map_loss_fwd", "", hbm_read=elts * 2 * MAP_ELT),
            Launch(step, model, "map_loss_bwd", "", hbm_read=elts * 2 * MAP_ELT,
                   hbm_written=elts * MAP_ELT)]


# Bytes per map element of the maps-phase step's map loss (float32 maps): the forward
# walked both maps twice (sample sums, then G) and wrote G; the backward read G and wrote
# it scaled by the upstream gradient.
PHASE_MAP_LOSS_READ, PHASE_MAP_LOSS_WRITTEN = 20, 8


def _phase_map_loss(s, step, model):
    elts = s.B * s.N * s.Nv
    return Launch(step, model, "map_loss", "", hbm_read=elts * PHASE_MAP_LOSS_READ,
                  hbm_written=elts * PHASE_MAP_LOSS_WRITTEN)


def _maps(s, step, model, elt: int = MAP_ELT):
    """The gathered maps pass: every entry of the map written once (no zero fill)."""
    maps = s.B * s.N * s.Nv * elt
    return _gathered(s, step, model, "visual_maps_kernel", True, 2 * s.B * s.Hq * s.N * 4,
                     maps, 0)


def _row_terms(s, step, model, elt: int = MAP_ELT):
    planes = s.B * s.Hq * s.N * 4
    return _gathered(s, step, model, "visual_row_terms_kernel", True,
                     2 * planes + s.B * s.N * s.Nv * elt, planes, 0)


def _delta(s, step, model):
    bh = s.B * s.Hq
    return Launch(step, model, "bwd_delta_kernel", "64", hbm_read=2 * bh * s.N * s.d * ELT,
                  hbm_written=bh * s.N * 4)


def _bwd(s: Shape, step, model, has_g: bool, elt: int = MAP_ELT) -> Launch:
    bm, bn = blocks("_bwd_dkdvdq_kernel", s.d)
    bd, bh = block_d(s.d), s.B * s.Hq
    steps, rows = bwd_tiles(s.N, bm, bn)
    steps, rows = steps * bh, rows * bh  # every query head of every kv head's group
    kv = s.B * s.Hkv * s.N * s.d * ELT
    reads = 2 * bh * s.N * s.d * ELT + 2 * kv + 3 * bh * s.N * 4  # q, dO, k, v, m, l, delta
    if has_g:
        reads += s.B * s.N * s.Nv * elt + 2 * s.B * s.N * 4  # G, query_row, visual_col
    dq = bh * s.N * s.d * 4
    return Launch(step, model, "bwd_dkdvdq_kernel", f"{bm}x{bn}",
                  flops=steps * 5 * 2 * bm * bn * bd, exp2=steps * bm * bn,
                  hbm_read=reads + dq, hbm_written=2 * kv + dq, atomics=rows * s.d)


def _torch_dq(s, step, model):
    elts = s.B * s.Hq * s.N * s.d
    return Launch(step, model, "torch_dq", "", hbm_read=elts * 4,
                  hbm_written=elts * 4 + elts * ELT)  # zero fill, then the cast


STEPS = ("fused", "maps-phase", "five-pass", "plain")


def step_launches(s: Shape) -> list[Launch]:
    """Every launch of one step at shape ``s``, for each of :data:`STEPS`:

    - ``fused``: the default VAT step (the deterministic mode runs the same passes, with
      the split backward): each model's forward, the refine gate (moderate scores: it
      scores nothing), the gathered maps pass writing a bf16 map once; the map loss's
      forward and backward, the row terms, delta, the 5-matmul backward with a bf16 G;
    - ``maps-phase``: the default before it: each model's forward with its maps phase
      (float32 atomics into a zeroed float32 buffer), the float32 map loss with G from
      its forward, the row terms and the backward reading a float32 G;
    - ``five-pass``: the sequence before the maps phase (refine always, five gathered
      passes; its map loss ran as PyTorch ops and is not counted);
    - ``plain``: the same two models with FlashAttention-2-style attention, no loss.
    """
    out = []
    for model in ("teacher", "student"):
        out += [_fwd(s, "fused", model, True), _stats(s, "fused", model, refine=False),
                _maps(s, "fused", model)]
    out += _map_loss(s, "fused", "student") + _student_backward(s, "fused")
    for model in ("teacher", "student"):
        out += [_zero_maps(s, "maps-phase", model), _fwd_maps(s, "maps-phase", model)]
    out += [_phase_map_loss(s, "maps-phase", "student")] + \
        _student_backward(s, "maps-phase", F32)
    for model in ("teacher", "student"):
        out += [_fwd(s, "five-pass", model, True), _stats(s, "five-pass", model),
                _maps(s, "five-pass", model, F32)]
    out += _student_backward(s, "five-pass", F32)
    out += [_fwd(s, "plain", "teacher", False),
            _fwd(s, "plain", "student", False), _delta(s, "plain", "student"),
            _bwd(s, "plain", "student", False), _torch_dq(s, "plain", "student")]
    return out


def _student_backward(s: Shape, step: str, elt: int = MAP_ELT) -> list[Launch]:
    return [_row_terms(s, step, "student", elt), _delta(s, step, "student"),
            _bwd(s, step, "student", True, elt), _torch_dq(s, step, "student")]


def totals(launches: list[Launch], step: str) -> dict:
    rows = [x for x in launches if x.step == step]
    return dict(flops=sum(x.flops for x in rows), exp2=sum(x.exp2 for x in rows),
                bytes=sum(x.hbm_read + x.hbm_written for x in rows),
                atomics=sum(x.atomics for x in rows),
                time_lb_us=sum(x.time_lb_us for x in rows),
                time_pred_us=sum(x.time_pred_us for x in rows))


FIELDS = ["head_dim", "seq_len", "step", "model", "kernel", "blocks", "flops", "exp2",
          "hbm_read", "hbm_written", "atomics", "time_lb_us", "time_pred_us"]
RATIO_FIELDS = ["head_dim", "seq_len", "step", "fused_over_plain_flops",
                "fused_over_plain_bytes", "fused_over_plain_time_lb",
                "fused_over_plain_time_pred"]


def ledger_rows(head_dims=HEAD_DIMS, seq_lens=SEQ_LENS) -> list[dict]:
    out = []
    for d in head_dims:
        for n in seq_lens:
            launches = step_launches(Shape(N=n, d=d))
            for x in launches:
                out.append(dict(head_dim=d, seq_len=n, **asdict(x),
                                time_lb_us=round(x.time_lb_us, 3),
                                time_pred_us=round(x.time_pred_us, 3)))
            for step in STEPS:
                t = totals(launches, step)
                out.append(dict(head_dim=d, seq_len=n, step=step, model="all", kernel="total",
                                blocks="", flops=t["flops"], exp2=t["exp2"],
                                hbm_read="", hbm_written=t["bytes"], atomics=t["atomics"],
                                time_lb_us=round(t["time_lb_us"], 3),
                                time_pred_us=round(t["time_pred_us"], 3)))
    return out


def ratio_rows(head_dims=HEAD_DIMS, seq_lens=SEQ_LENS) -> list[dict]:
    """Per head dim, N and step (every step but plain): the step over the plain one."""
    out = []
    for d in head_dims:
        for n in seq_lens:
            launches = step_launches(Shape(N=n, d=d))
            p = totals(launches, "plain")
            for step in STEPS[:-1]:
                f = totals(launches, step)
                out.append(dict(head_dim=d, seq_len=n, step=step,
                                fused_over_plain_flops=round(f["flops"] / p["flops"], 4),
                                fused_over_plain_bytes=round(f["bytes"] / p["bytes"], 4),
                                fused_over_plain_time_lb=round(
                                    f["time_lb_us"] / p["time_lb_us"], 4),
                                fused_over_plain_time_pred=round(
                                    f["time_pred_us"] / p["time_pred_us"], 4)))
    return out


def ratio_table(head_dims=HEAD_DIMS, seq_lens=SEQ_LENS,
                steps=("fused", "maps-phase", "five-pass")) -> str:
    """Markdown: each step over the plain one per head dim and N, in FLOPs, bytes and time."""
    lines = ["| d | N | step | FLOP ratio | byte ratio | time ratio (peaks) | "
             "time ratio (FA2-class) |", "|---|---|---|---|---|---|---|"]
    for r in ratio_rows(head_dims, seq_lens):
        if r["step"] in steps:
            lines.append(f"| {r['head_dim']} | {r['seq_len']} | {r['step']} | "
                         f"{r['fused_over_plain_flops']:.3f} | "
                         f"{r['fused_over_plain_bytes']:.3f} | "
                         f"{r['fused_over_plain_time_lb']:.3f} | "
                         f"{r['fused_over_plain_time_pred']:.3f} |")
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
    ratios = out.with_name(out.stem + "_ratios.csv")
    with open(ratios, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=RATIO_FIELDS)
        w.writeheader()
        w.writerows(ratio_rows())
    print(ratio_table())
    print(f"wrote {out} and {ratios}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
