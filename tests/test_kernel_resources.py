"""Every config the autotuner can choose compiles without register spills and within the
block's shared memory, for sm_80 and sm_90 (CPU only: Triton compiles for a GPUTarget
with the wheel's ptxas, no driver needed; see kernels/report.py).

Default run: the fused student scenario and plain attention, fp16/bf16, d = 64 and 128,
both targets (the representative set, a few minutes on 2 cores). ``-m slow``: the full
sweep of kernels/report.py (head dims 80/96, maps-only, no GQA, non-causal, logit KD).
"""
import os

import pytest

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    # Compiling needs the real code generator; the report module drops the variable itself,
    # but triton may already have been imported in interpreter mode by another test file.
    pass

triton = pytest.importorskip("triton")
torch = pytest.importorskip("torch")

from compodistill.kernels import report  # noqa: E402

pytestmark = pytest.mark.skipif(
    not hasattr(triton, "knobs") or triton.__version__ < "3.6",
    reason="the resource report needs triton >= 3.6")


def _failures(rows):
    return [r for r in rows if not r["fits"]]


def _describe(rows):
    return "\n".join(f"{r['target']} {r['kernel']} {r['scenario']} {r['dtype']} "
                     f"d={r['head_dim']} config {r['config']}: {r['registers']} regs, "
                     f"{r['spill_stores']} B spilled, {r['shared']} B shared "
                     f"(limit {r['smem_limit']})" for r in rows)


def test_representative_kernels_fit_sm80_and_sm90():
    rows = report.sweep(report.default_cases(), progress=False)
    kernels = {r["kernel"] for r in rows}
    assert {"fwd_kernel", "bwd_dkdv_kernel", "bwd_dq_kernel", "visual_maps_kernel",
            "visual_stats_kernel", "visual_row_terms_kernel"} <= kernels
    assert {r["target"] for r in rows} == {"sm_80", "sm_90"}
    bad = _failures(rows)
    assert not bad, "configs that spill or exceed shared memory:\n" + _describe(bad)


def test_a_planted_spill_is_caught():
    """A config far too large for the registers (256 x 256 tiles at d = 128 on 4 warps)
    must show up as a failure: the check is not vacuous."""
    case = report.Case("plain", torch.float16, 128)
    kernel, args, kwargs = next(r for r in report.record(case)
                                if report.kernel_name(r[0]) == "fwd_kernel")
    huge = {**kwargs, "BLOCK_M": 256, "BLOCK_N": 256, "num_warps": 4, "num_stages": 2}
    compiled, log = report.compile_one(report.jit_function(kernel), args, huge, 90)
    res = report.parse_ptxas(log)
    row = dict(spill_stores=res["spill_stores"], shared=int(compiled.metadata.shared),
               smem_limit=report.SMEM_LIMIT[90])
    assert not report.fits(row), f"no spill detected: {res}"


def test_pruning_keeps_a_fitting_first_config():
    """The deterministic mode pins the first config that survives pruning: it is the
    table's first entry at every supported head dim and target."""
    from compodistill.kernels import attention
    for kernel in (attention._fwd_kernel, attention._bwd_dkdv_kernel, attention._bwd_dq_kernel):
        for cap in (80, 90):
            for block_d in (16, 32, 64, 128):
                kept = attention.configs_for(kernel, cap, {"BLOCK_D": block_d})
                assert kept and kept[0] is kernel.configs[0]


@pytest.mark.slow
def test_full_sweep_fits():
    rows = report.sweep(report.full_cases(), with_linear_kd=True, progress=False)
    bad = _failures(rows)
    assert not bad, "configs that spill or exceed shared memory:\n" + _describe(bad)
