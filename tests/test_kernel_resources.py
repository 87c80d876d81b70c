"""Every config the autotuner can choose compiles without register spills and within the
block's shared memory, for sm_80 and sm_90 (CPU only: Triton compiles for a GPUTarget
with the wheel's ptxas, no driver needed; see compodistill/kernels/report.py).

Default run: the fused student scenario and plain attention, fp16/bf16, d = 64 and 128,
the student scenario at d = 256 with and without the sliding window,
key mask on and off (the mask-free launch is training's common case), both backwards (the
default 5-matmul one with atomic dq and the deterministic split one), the logit-KD kernel
(bf16 and fp32 logits), both targets (the representative set, a few minutes on 2 cores);
the fused map-loss kernels (every variant) in their own test.
``-m slow``: the full sweep of compodistill/kernels/report.py. The coverage test ties that
sweep to the launchers: every constexpr a launcher passes must take all its values in it.
"""
import json
import os
import subprocess
import sys
import textwrap

import pytest

triton = pytest.importorskip("triton")
torch = pytest.importorskip("torch")

pytestmark = pytest.mark.skipif(
    not hasattr(triton, "knobs") or triton.__version__ < "3.6",
    reason="the resource report needs triton >= 3.6")


def _in_compiler_process(code: str):
    """Run ``code`` (which prints one JSON value) in a fresh interpreter without
    TRITON_INTERPRET: the other kernel tests import triton in interpreter mode, which
    cannot compile."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    prelude = "import json, torch\nfrom compodistill.kernels import report\n"
    done = subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code)], env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _failures(rows):
    return [r for r in rows if not r["fits"]]


def _describe(rows):
    return "\n".join(f"{r['target']} {r['kernel']} {r['scenario']} {r['dtype']} "
                     f"d={r['head_dim']} config {r['config']}: {r['registers']} regs, "
                     f"{r['spill_stores']} B spilled, {r['shared']} B shared "
                     f"(limit {r['smem_limit']})" for r in rows)


def test_representative_kernels_fit_sm80_and_sm90():
    rows = _in_compiler_process("""
        rows = report.sweep(report.default_cases(), kd_cases=report.default_kd_cases(),
                            progress=False)
        print(json.dumps(rows))
    """)
    kernels = {r["kernel"] for r in rows}
    assert {"fwd_kernel", "bwd_dkdv_kernel", "bwd_dq_kernel", "bwd_dkdvdq_kernel",
            "visual_maps_kernel", "visual_stats_kernel", "visual_row_terms_kernel",
            "kd_rows_kernel"} <= kernels
    assert {r["target"] for r in rows} == {"sm_80", "sm_90"}
    # every head-dim class, d = 256 (Gemma 3) with and without the sliding window
    assert {r["head_dim"] for r in rows if r["kernel"] == "bwd_dkdvdq_kernel"} == {64, 128, 256}
    assert {r["scenario"] for r in rows if r["head_dim"] == 256} == {"student", "student+window"}
    assert {r["mask"] for r in rows if r["kernel"] == "fwd_kernel"} == {True, False}
    assert {r["dtype"] for r in rows if r["kernel"] == "kd_rows_kernel"} == {"bfloat16",
                                                                              "float32"}
    bad = _failures(rows)
    assert not bad, "configs that spill or exceed shared memory:\n" + _describe(bad)


def test_map_loss_kernels_fit_sm80_and_sm90():
    """The fused map-loss passes (compodistill/kernels/map_loss.py): every variant, the
    rest distribution with both rests, the windowed mask; both targets."""
    rows = _in_compiler_process("""
        rows = report.sweep([], ml_cases=report.default_map_loss_cases(), progress=False)
        print(json.dumps(rows))
    """)
    assert {r["kernel"] for r in rows} == {"map_sums_kernel", "map_pool_kernel",
                                           "map_grad_kernel", "map_rows_kernel"}
    assert {r["target"] for r in rows} == {"sm_80", "sm_90"}
    bad = _failures(rows)
    assert not bad, "map-loss launches that spill or exceed shared memory:\n" + _describe(bad)


def test_a_planted_spill_is_caught():
    """A config far too large for the registers (256 x 256 tiles at d = 128 on 4 warps)
    must show up as a failure: the check is not vacuous."""
    row = _in_compiler_process("""
        case = report.Case("plain", torch.float16, 128)
        kernel, args, kwargs = next(r for r in report.record(case)
                                    if report.kernel_name(r[0]) == "fwd_kernel")
        huge = {**kwargs, "BLOCK_M": 256, "BLOCK_N": 256, "num_warps": 4, "num_stages": 2}
        compiled, log = report.compile_one(report.jit_function(kernel), args, huge, 90)
        row = dict(report.parse_ptxas(log), shared=int(compiled.metadata.shared),
                   smem_limit=report.SMEM_LIMIT[90])
        print(json.dumps(dict(row, fits=report.fits(row))))
    """)
    assert row["spill_stores"] > 0 and not row["fits"], row


def test_pruning_leaves_configs_for_every_head_dim_and_target():
    """The autotuner (and the deterministic mode's pin, the first survivor) always has a
    measured config left: the pruning never falls back to an unmeasured one."""
    from compodistill.kernels import attention as common  # its tables and pruning
    from compodistill.kernels import logit_kd  # noqa: F401  (registers the KD fit table)
    for name in ("_fwd_kernel", "_bwd_dkdv_kernel", "_bwd_dq_kernel", "_bwd_dkdvdq_kernel"):
        for table_name in (name, name + "+window", name + "+padded"):
            table = common.fit_table(table_name)
            for cap in (80, 90):
                for block_d, size in ((16, 64), (64, 64), (128, 128), (256, 256)):
                    if table_name == "_bwd_dkdvdq_kernel+window" and (cap, size) == (80, 128):
                        # Nothing fits: the launcher runs the split backward there.
                        assert not common.fits_target(table_name, block_d, cap)
                        continue
                    assert common.fits_target(table_name, block_d, cap), (table_name, cap)
                    kept = common.prune_configs(common.all_configs(name), table, block_d, cap)
                    for c in kept:
                        assert size in table[common.config_key(c)][cap], (table_name, cap, c)
    table = common.fit_table("_kd_rows_kernel")
    for cap in (80, 90):
        for dtype in ("float16", "bfloat16", "float32"):
            assert common.fits_class("_kd_rows_kernel", dtype, cap), (cap, dtype)
            kept = common.prune_class(common.all_configs("_kd_rows_kernel"), table, dtype, cap)
            assert kept and all(dtype in table[common.config_key(c)][cap] for c in kept)


def test_padded_head_dims_use_their_own_fits():
    """d = 80/96 run padded to BLOCK_D 128 with the head-dim mask, which costs registers:
    their launches prune with the "+padded" fits (the full sweep found the 128-class configs
    that spill only there), d = 128 and windowed or maps-only launches keep their tables."""
    from compodistill.kernels._common import table_variant
    name = "_bwd_dkdvdq_kernel"
    assert table_variant(name, {"HEAD_DIM": 80, "BLOCK_D": 128}) == name + "+padded"
    assert table_variant(name, {"HEAD_DIM": 128, "BLOCK_D": 128}) == name
    assert table_variant(name, {"HEAD_DIM": 96, "BLOCK_D": 128,
                                "HAS_WINDOW": True}) == name + "+window"
    assert table_variant(name, {"HEAD_DIM": 96, "BLOCK_D": 128,
                                "HAS_DO": False}) == name + "+maps"


def test_sweep_varies_every_constexpr_the_launchers_pass():
    """Over the full sweep's recorded launches (recording only, nothing compiles), every
    constexpr a launcher passes takes every value it can take: both booleans, or the
    values of ``report.CONSTEXPR_DOMAINS``; and no constexpr is left to its default."""
    got = _in_compiler_process("""
        seen, params = report.constexpr_values(report.full_cases(), report.full_kd_cases())
        print(json.dumps(dict(
            seen={k: {n: sorted(map(repr, v)) for n, v in d.items()} for k, d in seen.items()},
            params={k: sorted(v) for k, v in params.items()},
            domains={n: sorted(map(repr, v)) for n, v in report.CONSTEXPR_DOMAINS.items()})))
    """)
    problems = []
    for kernel, flags in got["seen"].items():
        missing = set(got["params"].get(kernel, ())) - flags.keys()
        if missing:
            problems.append(f"{kernel}: constexpr(s) {sorted(missing)} never passed")
        for name, values in flags.items():
            if set(values) <= {"True", "False"} and name not in got["domains"]:
                want = ["False", "True"]
            else:
                want = got["domains"].get(name)
            if want is None:
                problems.append(f"{kernel}: {name} {values} is not a sweep axis "
                                f"(add it to report.CONSTEXPR_DOMAINS and full_cases)")
            elif values != want:
                problems.append(f"{kernel}: {name} takes {values} in the sweep, not {want}")
    assert not problems, "\n".join(problems)


@pytest.mark.slow
def test_full_sweep_fits():
    rows = _in_compiler_process("""
        rows = report.sweep(report.full_cases(), kd_cases=report.full_kd_cases(),
                            ml_cases=report.full_map_loss_cases(), progress=False)
        print(json.dumps(rows))
    """)
    bad = _failures(rows)
    assert not bad, "configs that spill or exceed shared memory:\n" + _describe(bad)


def test_windowed_backward_falls_back_to_split_where_no_atomic_config_fits(monkeypatch):
    """sm_80 at d = 128 with a window: the 5-matmul backward has no spill-free config, so the
    default backward is the split one there (and only there)."""
    from compodistill.kernels import attention
    cuda = torch.device("cuda")
    for cap, head_dim, window, want in ((80, 128, 100, False), (80, 64, 100, True),
                                        (90, 128, 100, True), (80, 128, None, True)):
        monkeypatch.setattr(attention, "device_capability", lambda cap=cap: cap)
        assert attention.atomic_backward_fits(window, head_dim, cuda) is want, (cap, head_dim)
    assert attention.atomic_backward_fits(100, 128, torch.device("cpu"))


def test_compile_cache_key_follows_the_kernel_source(tmp_path):
    """The sweep's compile cache (``--cache``) is keyed by the kernel's source hash too: two
    kernels of the same name and arguments but different bodies (an edited kernel) get
    different keys, so an edit is recompiled, never read back stale."""
    body = "import triton\nimport triton.language as tl\n\n@triton.jit\ndef _k(X):\n    {}\n"
    for i, line in enumerate(("tl.store(X, 1.0)", "tl.store(X, 2.0)")):
        (tmp_path / f"kern{i}.py").write_text(body.format(line))
    keys = _in_compiler_process(f"""
        import sys
        sys.path.insert(0, {str(tmp_path)!r})
        import kern0, kern1
        args = (torch.empty(1),)
        print(json.dumps([list(map(str, report._compile_key(m._k, args, {{}}, 90)))
                          for m in (kern0, kern1)]))
    """)
    assert keys[0][0] == keys[1][0] == "_k"
    assert keys[0] != keys[1]
