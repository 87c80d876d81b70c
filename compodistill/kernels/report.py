"""Resource report: registers, spills, shared memory and tensor-core use of every kernel.

``python -m compodistill.kernels.report [--quick] [--head-dim D ...] [--out CSV]`` needs no
GPU and no driver:
each launcher of this package runs on small CPU tensors inside
:func:`kernels.attention.recording_launches`, which records the exact arguments it would
pass; every recorded kernel is then compiled by Triton for sm_80 and sm_90, once per
autotune config that the config pruning keeps for that target, with the wheel's own
ptxas. Registers and spill bytes come from ptxas's ``-v`` log, shared memory from the
compiled metadata, ``wgmma``/``mma`` from the PTX.

The full sweep (default; ``full_cases()``, ``full_kd_cases()``) varies every constexpr
the launchers pass: scenario (plain / student / maps-only), key mask on and off, causal /
non-causal / windowed, GQA group 1 and 2, head dims 64/80/96/128/256, fp16/bf16, the int64
map-gradient index, both backwards, and the logit-KD kernel over logit dtype, loss and CE
(docs/KERNELS.md says which products are compiled). ``--quick`` is the representative set
that CI checks (tests/test_kernel_resources.py); ``--fp32`` the float32-attention gap;
``--head-dim 256`` keeps only the cases of that head dim (of the sweep, or with ``--quick``
of the CI set). Head dims above 256 are rejected by the API
(compodistill/kernels/autograd.py), so they are not compiled.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import datetime
import io
import os
import pickle
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

# Compiling needs no driver; the launchers must not run under the interpreter here.
os.environ.pop("TRITON_INTERPRET", None)

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.jit import create_function_from_signature  # noqa: E402

from . import attention, logit_kd  # noqa: E402
from ._common import block_d, head_dim_class, map_dtype  # noqa: E402
from .visual_attention import inverse_index, visual_maps_from_lse, visual_row_terms  # noqa: E402

# Shared memory one block may use (bytes, opt-in maximum per block).
SMEM_LIMIT = {80: 166_912, 90: 232_448}
TARGETS = (80, 90)
SCENARIOS = ("plain", "student", "maps")  # flash_attention / with visual maps / maps only
FIELDS = ["triton", "date", "commit", "target", "kernel", "scenario", "dtype", "head_dim",
          "group", "causal", "mask", "vocab", "config", "num_warps", "num_stages", "registers", "spill_stores",
          "spill_loads", "shared", "smem_limit", "tensor_cores", "fits"]


@dataclass(frozen=True)
class Case:
    scenario: str
    dtype: torch.dtype
    head_dim: int
    group: int = 2  # query heads per kv head (GQA); 1 specialises the loop away
    causal: bool = True
    window: int | None = None  # sliding window (Gemma 3's local layers): HAS_WINDOW kernels
    mask: bool = True  # a key mask (padding) or None: HAS_MASK
    g_int64: bool = False  # a map gradient of >= 2**31 entries (G_INT64; recorded on "meta")


@dataclass(frozen=True)
class KdCase:
    """One launch of the logit-KD kernel: student/teacher logit dtypes, loss, CE term."""
    dtype: torch.dtype
    loss: str = "kl"
    ce: bool = True
    teacher: torch.dtype | None = None  # None: the student's dtype
    vocab: int = 151_936  # Qwen2's; 32_000 (Llama) specialises the same (both % 16 == 0)


# The axes of the sweep: every constexpr a launcher passes comes from one of these (the
# launchers derive the flags from them; tests/test_kernel_resources.py checks that every
# constexpr of every recorded launch takes all its values over ``full_cases()``).
DTYPES = (torch.float16, torch.bfloat16)
# float32 attention (DOT_PREC "ieee": no tensor cores) spills in 61 of the 73 kept
# (config, kernel, target) rows, up to 85 kB (docs/KERNELS.md,
# bench/results/kernel_resources_fp32_triton3.8.csv):
# it is a known gap, recorded by ``fp32_cases()`` and left out of the invariant.
FP32_GAP = {"DOT_PREC": {"ieee"}}
HEAD_DIMS = (64, 80, 96, 128, 256)  # BLOCK_D 64 / 128 / 256; 80 and 96 keep the HEAD_DIM mask
MODES = ((True, None), (False, None), (True, 100))  # (causal, window)
# The values each constexpr can take (booleans: both); a constexpr missing here and not
# boolean makes the coverage test fail until the sweep varies it.
CONSTEXPR_DOMAINS = {"HEAD_DIM": set(HEAD_DIMS), "BLOCK_D": {64, 128, 256},
                     "DOT_PREC": {"tf32"}, "LOSS": set(logit_kd.LOSS_CODES.values()),
                     # Fixed by the launchers (one value each), not by a config.
                     "BLOCK_Q": {64}, "BLOCK_V": {64, 32}, "BLOCK_M": {64}}


def default_cases() -> list[Case]:
    """CI set: the fused student scenario (every kernel of the visual path) and plain
    attention, each at d = 64 and 128, alternating fp16/bf16 and key mask on/off (the
    mask-free launch is the common one in training: no padding, packed sequences); at
    d = 256 (Gemma 3) the student scenario, global (fp16, key mask) and windowed (bf16,
    mask-free: Gemma 3's local layers)."""
    f16, bf16 = torch.float16, torch.bfloat16
    return [Case("student", f16, 128), Case("student", bf16, 64, mask=False),
            Case("plain", bf16, 128, mask=False), Case("plain", f16, 64, mask=False),
            Case("plain", f16, 64), Case("student", f16, 256),
            Case("student", bf16, 256, window=100, mask=False)]


def default_kd_cases() -> list[KdCase]:
    """CI set of the logit-KD kernel: bf16 logits with CE, fp32 without (the two configs
    families that spilled before the fit table)."""
    return [KdCase(torch.bfloat16), KdCase(torch.float32, ce=False)]


def full_cases() -> list[Case]:
    """The full sweep. Every flag combination (scenario: HAS_V/HAS_VIS/HAS_DO/HAS_G; key
    mask on/off; causal, non-causal, causal + window) at every head-dim class (bf16 d = 64,
    fp16 d = 128, bf16 d = 256); GQA group 1 against 2 in every scenario and mask state; every head dim
    and dtype (float32 included) in the plain and student scenarios, mask on and off; the
    int64 map-gradient indexing. Every constexpr value every launcher can pass appears
    (tests/test_kernel_resources.py checks it); not every product of them (see
    docs/KERNELS.md for why the head dims and dtypes are not crossed with every flag)."""
    pairs = ((torch.bfloat16, 64), (torch.float16, 128), (torch.bfloat16, 256))
    cases = [Case(s, dt, d, 2, causal, window, mask) for dt, d in pairs for s in SCENARIOS
             for mask in (True, False) for causal, window in MODES]
    cases += [Case(s, dt, d, 1, mask=mask) for dt, d in pairs for s in SCENARIOS
              for mask in (True, False)]
    cases += [Case(s, dt, d, mask=mask) for s in ("plain", "student") for dt in DTYPES
              for d in HEAD_DIMS for mask in (True, False)]
    cases += [Case("maps", dt, d, mask=False) for dt in DTYPES for d in (80, 96)]
    cases += [Case(s, torch.float16, d, g_int64=True) for s in ("student", "maps")
              for d in (64, 128, 256)]
    return list(dict.fromkeys(cases))


def head_dim_cases(cases, head_dims) -> list[Case]:
    """The cases of ``cases`` whose head dim is one of ``head_dims`` (``--head-dim``)."""
    return [c for c in cases if c.head_dim in set(head_dims)]


def fp32_cases() -> list[Case]:
    """Float32 attention (the known gap above): the student scenario at both classes."""
    return [Case("student", torch.float32, d, mask=False) for d in (128, 64)]


def full_kd_cases() -> list[KdCase]:
    cases = [KdCase(dt, loss, ce) for dt in DTYPES + (torch.float32,)
             for loss in logit_kd.LOSS_CODES for ce in (True, False)]
    cases += [KdCase(dt, "kl", True, teacher=torch.float32)
              for dt in (torch.float16, torch.bfloat16)]
    return cases


# --------------------------------------------------------------------------- recording

def _layout(B: int, N: int):
    """Query rows = every position, image tokens at [16, 80)."""
    qi = torch.arange(N).expand(B, N).contiguous()
    qc = torch.full((B,), N, dtype=torch.int64)
    vi = torch.arange(16, 80).expand(B, 64).contiguous()
    vc = torch.full((B,), 64, dtype=torch.int64)
    return qi, qc, vi, vc


def record(case: Case) -> list[tuple]:
    """(kernel, args, kwargs) of every launch the scenario makes, forward and backward."""
    B, Hkv, N, D = 1, 2, 256, case.head_dim
    Hq = Hkv * case.group
    q = torch.empty(B, Hq, N, D, dtype=case.dtype)
    k = torch.empty(B, Hkv, N, D, dtype=case.dtype)
    v = torch.empty_like(k) if case.scenario != "maps" else None
    mask = torch.ones(B, N, dtype=torch.bool) if case.mask else None
    qi, qc, vi, vc = _layout(B, N)
    with attention.recording_launches() as log:
        vcol = None if case.scenario == "plain" else inverse_index(vi, vc, N)
        out, stats = attention.flash_forward(q, k, v, mask, case.causal, None, vcol,
                                             window=case.window)
        stats.zero_()
        visual = {}
        if vcol is not None:
            # The forward's second phase (HAS_MAPS): a teacher window's float32 buffer,
            # added into in place; the maps-only scenario keeps the non-visual plane (the
            # rest bucket's launch).
            attention.flash_forward(q, k, v, mask, case.causal, None, vcol, window=case.window,
                                    maps=torch.zeros(B, N, 64),
                                    query_row=inverse_index(qi, qc, N),
                                    text_sum=case.scenario == "maps")
            # The gathered maps pass: every fresh map, in the maps' dtype (bf16 for bf16);
            # maps-only accumulates into a float32 buffer (ACCUMULATE).
            acc = torch.zeros(B, N, 64) if case.scenario == "maps" else None
            visual_maps_from_lse(q, k, stats, qi, qc, vi, vc, case.causal, None,
                                 window=case.window, out=acc)
            g = torch.zeros(B, N, 64, dtype=map_dtype(case.dtype))
            visual = dict(grad_maps=g, query_row=inverse_index(qi, qc, N),
                          visual_col=vcol,
                          row_terms=visual_row_terms(q, k, stats, qi, qc, vi, vc, g,
                                                     case.causal, None, window=case.window))
            if case.g_int64:  # only its shape is read: no 8 GiB buffer
                visual["grad_maps"] = torch.empty(B, 65_536, 32_768, device="meta",
                                                  dtype=map_dtype(case.dtype))
        do = torch.empty_like(q) if v is not None else None
        # Both backwards: the 5-matmul one (dq by atomics, the default) and the split one
        # of the deterministic mode.
        for atomic_dq in (True, False):
            attention.flash_backward(do, q, k, v, out if v is not None else None, stats,
                                     mask, case.causal, None, atomic_dq=atomic_dq,
                                     window=case.window, **visual)
    return [(kern, args, kwargs) for kern, _grid, args, kwargs in log]


def record_kd(case: KdCase) -> list[tuple]:
    """The logit-KD launch of ``case`` (the gradient written in the student's dtype)."""
    zs = torch.empty(4, case.vocab, dtype=case.dtype)
    zt = torch.empty(4, case.vocab, dtype=case.teacher or case.dtype)
    kd = torch.empty(4)
    ce = dict(labels=torch.zeros(4, dtype=torch.int64), ce_scale=kd) if case.ce else {}
    with attention.recording_launches() as log:
        logit_kd.kd_rows(zs, zt, kd, loss=case.loss, **ce)
    return [(kern, args, kwargs) for kern, _grid, args, kwargs in log]


def constexpr_values(cases, kd_cases, ml_cases=None
                     ) -> tuple[dict[str, dict[str, set]], dict[str, set]]:
    """Over every launch the cases record: ``{kernel: {constexpr: values}}`` of what the
    launchers pass, and ``{kernel: constexpr names}`` of the kernel's constexprs that no
    autotune config sets (the ones a launcher must pass or leave to their default).
    ``ml_cases``: the map-loss cases (default: all of ``full_map_loss_cases()``)."""
    seen: dict[str, dict[str, set]] = {}
    params: dict[str, set] = {}
    launches = [r for c in cases for r in record(c)] + [r for c in kd_cases
                                                          for r in record_kd(c)]
    ml_cases = full_map_loss_cases() if ml_cases is None else ml_cases
    launches += [r for c in ml_cases for r in record_map_loss(c)]
    for kernel, _args, kwargs in launches:
        fn = jit_function(kernel)
        tuned = set().union(*(c.kwargs for c in getattr(kernel, "configs", ())))
        names = {p.name for p in fn.params if p.is_constexpr} - tuned
        params[fn.__name__] = names
        per = seen.setdefault(fn.__name__, {})
        for name in names & kwargs.keys():
            per.setdefault(name, set()).add(kwargs[name])
    return seen, params


# --------------------------------------------------------------------------- compiling

def candidate_configs(kernel, args: tuple, kwargs: dict,
                      capability: int) -> list[tuple[str, dict]]:
    """(name, launch kwargs) per config the autotuner may pick on this target."""
    if not isinstance(kernel, triton.runtime.Autotuner):
        return [("fixed", kwargs)]
    table, klass = attention.launch_table(kernel, args, kwargs)
    if not attention.fits_class(table, klass, capability):
        return []  # the launchers never run it there (the windowed 5-matmul backward on sm_80)
    pruned = attention.configs_for(kernel, capability, kwargs, args)
    return [(_config_name(kernel.configs.index(c), c), {**kwargs, **c.all_kwargs()})
            for c in pruned]


def _config_name(i: int, config) -> str:
    blocks = "x".join(str(v) for v in config.kwargs.values())
    return f"{i}:{blocks}"


def compile_one(fn, args: tuple, kwargs: dict, capability: int):
    """Compile ``fn`` as the JIT would for these arguments; (compiled kernel, ptxas log)."""
    target = GPUTarget("cuda", capability, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    opts = {k: kwargs[k] for k in ("num_warps", "num_stages", "num_ctas", "maxnreg")
            if kwargs.get(k) is not None}
    call_kwargs = {k: v for k, v in kwargs.items() if k not in opts}
    bound, specialization, options = binder(*args, **call_kwargs, **opts)
    _, signature, constexprs, attrs = fn._pack_args(backend, opts, bound, specialization,
                                                    options)
    src = ASTSource(fn, signature, constexprs, attrs)
    log = io.StringIO()
    knobs = triton.knobs
    saved = knobs.nvidia.dump_ptxas_log, knobs.compilation.always_compile
    # A cached kernel would skip ptxas and so its log: always compile here.
    knobs.nvidia.dump_ptxas_log, knobs.compilation.always_compile = True, True
    try:
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(src, target=target, options=opts)
    finally:
        knobs.nvidia.dump_ptxas_log, knobs.compilation.always_compile = saved
    return compiled, log.getvalue()


def parse_ptxas(log: str) -> dict:
    """Registers and spill bytes of the (single) kernel in a ``ptxas -v`` log."""
    regs = re.search(r"Used (\d+) registers", log)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    if regs is None or spill is None:
        raise RuntimeError(f"no resource line in the ptxas log:\n{log}")
    return dict(registers=int(regs.group(1)), spill_stores=int(spill.group(1)),
                spill_loads=int(spill.group(2)))


def tensor_cores(ptx: str) -> str:
    if "wgmma" in ptx:
        return "wgmma"
    if re.search(r"\bmma\.sync", ptx):
        return "mma"
    return "none"


def jit_function(kernel):
    """The JITFunction under an autotuner (or the kernel itself)."""
    return kernel.fn if isinstance(kernel, triton.runtime.Autotuner) else kernel


def kernel_name(kernel) -> str:
    return jit_function(kernel).__name__.strip("_")


def fits(row: dict) -> bool:
    """No spill bytes and shared memory within the block limit."""
    return row["spill_stores"] == 0 and row["shared"] <= row["smem_limit"]


def _compile_key(kernel, args, kw, capability: int) -> tuple:
    """What decides a compile: the kernel and its source (Triton's ``cache_key`` hashes the
    body and the jit functions it calls, so an edited kernel recompiles), target, argument
    dtypes/ints and launch kwargs (picklable, so a cache file can hold it)."""
    fn = jit_function(kernel)
    return (fn.__name__, fn.cache_key, capability, _args_key(args),
            tuple(sorted(map(str, kw.items()))))


def _resources(kernel, args, kw, capability: int) -> dict:
    compiled, log = compile_one(jit_function(kernel), args, kw, capability)
    res = parse_ptxas(log)
    res["shared"] = int(compiled.metadata.shared)
    res["tensor_cores"] = tensor_cores(compiled.asm["ptx"])
    return res


def measure(kernel, args, kwargs, capability: int, cache: dict) -> list[dict]:
    fn = jit_function(kernel)
    rows = []
    for name, kw in candidate_configs(kernel, args, kwargs, capability):
        key = _compile_key(kernel, args, kw, capability)
        if key not in cache:
            cache[key] = _resources(kernel, args, kw, capability)
        # The forward with its maps phase is a specialisation of its own (its own rows).
        label = fn.__name__.strip("_") + ("+maps" if kw.get("HAS_MAPS") else "")
        rows.append(dict(kernel=label, config=name,
                         num_warps=kw.get("num_warps", 4), num_stages=kw.get("num_stages", 3),
                         target=f"sm_{capability}", smem_limit=SMEM_LIMIT[capability],
                         **cache[key]))
    return rows


def _args_key(args) -> tuple:
    """What of the arguments the specialisation sees: dtypes and int values."""
    return tuple(str(a.dtype) if isinstance(a, torch.Tensor) else a for a in args)


# The pending compiles of a parallel sweep, inherited by forked workers (launch arguments
# hold CPU tensors and kernel objects, which are cheaper to inherit than to pickle).
_PENDING: list = []


def sweep(cases, targets=TARGETS, kd_cases=(), progress=True,
          cache: dict | None = None, jobs: int = 1, cache_file: Path | None = None,
          ml_cases=()) -> list[dict]:
    """Rows of every (launch, kept config, target) of the cases; ``cache`` (a dict) may be
    shared between calls, so a launch two calls make compiles once. ``jobs`` > 1 compiles
    in that many forked processes; ``cache_file`` (a pickle, per Triton version) keeps what
    was compiled across runs, so an interrupted sweep resumes and a sweep after a fit-table
    change compiles only the new (config, launch) pairs."""
    global _PENDING
    launches = [(_case_fields(case), rec) for case in cases for rec in record(case)]
    launches += [(_kd_fields(case), rec) for case in kd_cases for rec in record_kd(case)]
    launches += [(map_loss_fields(c), rec) for c in ml_cases for rec in record_map_loss(c)]
    work = [(fields, rec, cap) for fields, rec in launches for cap in targets]
    cache = {} if cache is None else cache
    if cache_file is not None and cache_file.exists():
        with open(cache_file, "rb") as f:
            stored = pickle.load(f)
        if stored.get("triton") == triton.__version__:
            cache.update(stored["results"])
    pending: dict[tuple, tuple] = {}
    for _fields, (kernel, args, kwargs), cap in work:
        for _name, kw in candidate_configs(kernel, args, kwargs, cap):
            key = _compile_key(kernel, args, kw, cap)
            if key not in cache and key not in pending:
                pending[key] = (kernel, args, kw, cap)
    bar = _progress(len(pending), progress)
    keys, _PENDING = list(pending), list(pending.values())
    try:
        results = _map_compiles(len(keys), jobs)
        for n, (i, res) in enumerate(results, 1):
            cache[keys[i]] = res
            bar.update(1)
            if cache_file is not None and (n % 50 == 0 or n == len(keys)):
                _save_cache(cache, cache_file)
    finally:
        _PENDING = []
        bar.close()
        if cache_file is not None and keys:
            _save_cache(cache, cache_file)
    rows = []
    for fields, (kernel, args, kwargs), cap in work:
        for row in measure(kernel, args, kwargs, cap, cache):
            row.update(fields)
            row["fits"] = fits(row)
            rows.append(row)
    return _dedupe(rows)


def _map_compiles(n: int, jobs: int):
    """(index, resources) of each pending compile, in completion order."""
    if jobs <= 1 or n <= 1:
        yield from map(_compile_pending, range(n))
        return
    import multiprocessing
    with multiprocessing.get_context("fork").Pool(jobs) as pool:
        yield from pool.imap_unordered(_compile_pending, range(n))


def _compile_pending(i: int) -> tuple[int, dict]:
    kernel, args, kw, cap = _PENDING[i]
    return i, _resources(kernel, args, kw, cap)


def _save_cache(cache: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "wb") as f:
        pickle.dump({"triton": triton.__version__, "results": cache}, f)
    os.replace(tmp, path)


def _case_fields(case: Case) -> dict:
    scenario = case.scenario + ("+window" if case.window else "") + \
        ("+int64" if case.g_int64 else "")
    return dict(scenario=scenario, dtype=str(case.dtype).replace("torch.", ""),
                head_dim=case.head_dim, group=case.group, causal=case.causal, mask=case.mask,
                vocab="")


def _kd_fields(case: KdCase) -> dict:
    teacher = "" if case.teacher is None else "+t_" + str(case.teacher).replace("torch.", "")
    return dict(scenario=f"kd:{case.loss}" + ("+ce" if case.ce else "") + teacher,
                dtype=str(case.dtype).replace("torch.", ""), head_dim="", group="",
                causal="", mask="", vocab=case.vocab)


def _dedupe(rows: list[dict]) -> list[dict]:
    """One row per (target, kernel, case, config): the backward of two scenarios may launch
    the same specialisation."""
    seen, out = set(), []
    for r in rows:
        key = tuple(r[f] for f in ("target", "kernel", "scenario", "dtype", "head_dim", "group",
                                   "causal", "mask", "config"))
        if key not in seen:
            seen.add(key)
            out.append(r)
    return out


def _progress(total: int, enabled: bool):
    try:
        from tqdm import tqdm
        return tqdm(total=total, desc="compiling", unit="launch", disable=not enabled,
                    file=sys.stderr)
    except ImportError:  # pragma: no cover - tqdm is in the train extra
        class _Quiet:
            def update(self, n):
                pass

            def close(self):
                pass
        return _Quiet()


# --------------------------------------------------------------------------- output

def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, cwd=Path(__file__).resolve().parent,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def write_csv(rows: list[dict], path: Path, commit: str | None = None) -> None:
    """Rows with the triton version, date and ``commit`` (default: the checkout's HEAD)."""
    stamp = dict(triton=triton.__version__, date=datetime.date.today().isoformat(),
                 commit=commit or git_commit())
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        w.writeheader()
        for r in rows:
            w.writerow({**stamp, **r})


def summary(rows: list[dict]) -> str:
    bad = [r for r in rows if not r["fits"]]
    lines = [f"{len(rows)} kernel x config x target rows, {len(bad)} that spill or exceed "
             f"shared memory"]
    for r in bad:
        lines.append(f"  {r['target']} {r['kernel']} {r['scenario']} {r['dtype']} "
                     f"d={r['head_dim']} g={r['group']} causal={r['causal']} "
                     f"mask={r['mask']} cfg {r['config']}: {r['registers']} regs, "
                     f"{r['spill_stores']} B spill, {r['shared']} B smem")
    return "\n".join(lines)


def markdown(rows: list[dict]) -> str:
    """Per kernel, target and class (head-dim class 64/128, or the KD kernel's logit dtype):
    row count, maximum registers / spill / shared memory, misfits, tensor-core use."""
    groups: dict[tuple, list] = {}
    for r in rows:
        cls = r["dtype"] if r["kernel"] == "kd_rows_kernel" or r["head_dim"] == "" else \
            head_dim_class(block_d(int(r["head_dim"])))
        groups.setdefault((r["kernel"], r["target"], str(cls)), []).append(r)
    out = ["| kernel | target | class | rows | max regs | max spill B | max smem B | misfits "
           "| tensor cores |", "|---|---|---|---|---|---|---|---|---|"]
    for (kernel, target, cls), rs in sorted(groups.items()):
        tc = "/".join(sorted({str(r["tensor_cores"]) for r in rs}))
        out.append(f"| {kernel} | {target} | {cls} | {len(rs)} | "
                   f"{max(int(r['registers']) for r in rs)} | "
                   f"{max(int(r['spill_stores']) for r in rs)} | "
                   f"{max(int(r['shared']) for r in rs)} | "
                   f"{sum(not _truthy(r['fits']) for r in rs)} | {tc} |")
    return "\n".join(out)


def _truthy(v) -> bool:
    return v is True or v == "True"


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true",
                    help="only the CI set (tests/test_kernel_resources.py)")
    ap.add_argument("--out", type=Path, default=None,
                    help="CSV path (default bench/results/kernel_resources.csv)")
    ap.add_argument("--markdown", type=Path, default=None, metavar="CSV",
                    help="print the per-kernel summary table of an existing CSV and exit")
    ap.add_argument("--fp32", action="store_true",
                    help="only the float32 attention cases (a known gap: they spill)")
    ap.add_argument("--jobs", type=int, default=1, metavar="N",
                    help="compile in N processes (default 1)")
    ap.add_argument("--cache", type=Path, default=None, metavar="PICKLE",
                    help="keep compiled results here across runs (resume; recompile only "
                         "what a fit-table change adds)")
    ap.add_argument("--head-dim", type=int, nargs="+", default=None, metavar="D",
                    help="only the attention cases of these head dims (no logit-KD cases)")
    opts = ap.parse_args(argv)
    if opts.markdown is not None:
        print(markdown(read_csv(opts.markdown)))
        return 0
    root = Path(__file__).resolve().parents[2]  # the repository root
    out = opts.out or root / "bench" / "results" / "kernel_resources.csv"
    if opts.fp32:
        cases, kd_cases, ml_cases = fp32_cases(), [], []
    elif opts.quick:
        cases, kd_cases = default_cases(), default_kd_cases()
        ml_cases = default_map_loss_cases()
    else:
        cases, kd_cases = full_cases(), full_kd_cases()
        ml_cases = full_map_loss_cases()
    if opts.head_dim is not None:
        cases, kd_cases, ml_cases = head_dim_cases(cases, opts.head_dim), [], []
        if not cases:
            ap.error(f"no case has head dim {opts.head_dim}")
    if opts.jobs < 1:
        ap.error(f"--jobs must be >= 1, got {opts.jobs}")
    rows = sweep(cases, kd_cases=kd_cases, jobs=opts.jobs, cache_file=opts.cache,
                 ml_cases=ml_cases)
    write_csv(rows, out)
    print(summary(rows))
    print(f"wrote {out}")
    return 0



# --------------------------------------------------------------------------- map loss
# The fused map-loss passes of kernels/map_loss.py (issue #37): float32 or bfloat16 maps,
# no autotune (one fixed tile per kernel), so one row per (launch, target).

from . import map_loss  # noqa: E402

CONSTEXPR_DOMAINS.update({"SUM_MODE": {0, 1, 2}, "GRAD_MODE": {0, 1},
                          "ROW_LOSS": set(map_loss.ROW_LOSS.values()),
                          "BLOCK_ROWS": {map_loss.BLOCK_ROWS},
                          "BLOCK_COLS": {map_loss.BLOCK_COLS}})


@dataclass(frozen=True)
class MapLossCase:
    """One map-loss call: variant (``map_loss.VARIANTS``), distribution, which rests are
    given (student, target), causal / windowed allowed mask."""
    variant: str
    distribution: str = "renorm"
    rests: tuple[bool, bool] = (False, False)
    causal: bool = True
    window: int | None = None
    dtype: torch.dtype = torch.bfloat16  # the maps' (bf16 models give bf16 maps)


def default_map_loss_cases() -> list[MapLossCase]:
    """CI set: every variant once (causal) on bf16 maps and on float32 ones, the rest
    distribution with both rests given, and the windowed mask on the heaviest kernel (JSD
    rows)."""
    cases = [MapLossCase(v, dtype=dt) for dt in (torch.bfloat16, torch.float32)
             for v in map_loss.VARIANTS]
    cases += [MapLossCase("jsd", "rest", (True, True)),
              MapLossCase("jsd", "renorm", window=100)]
    return cases


def full_map_loss_cases() -> list[MapLossCase]:
    """Every variant under every allowed mask (causal, bidirectional, windowed); the KL
    family also with the rest distribution under each (student, target) rest pair."""
    modes = ((True, None), (False, None), (True, 100))
    cases = [MapLossCase(v, causal=c, window=w, dtype=dt) for v in map_loss.VARIANTS
             for c, w in modes for dt in (torch.bfloat16, torch.float32)]
    cases += [MapLossCase(v, "rest", rests, c, w) for v in ("kl", "reverse_kl", "jsd")
              for rests in ((False, False), (True, False), (False, True), (True, True))
              for c, w in modes]
    return cases


def record_map_loss(case: MapLossCase) -> list[tuple]:
    """(kernel, args, kwargs) of every launch of the map-loss forward of ``case``, and of
    the flat cosine's backward (it writes G there)."""
    B, N = 2, 256
    qi, qc, vi, vc = _layout(B, N)
    a_s, a_t = (torch.rand(B, N, 64).to(case.dtype) for _ in range(2))
    s_rest, t_rest = (torch.rand(B, N) if given else None for given in case.rests)
    with attention.recording_launches() as log:
        *_, coef = map_loss._forward(a_s, a_t, s_rest, t_rest, qi, qc, vi, vc, case.causal,
                                     case.window or 0, case.variant,
                                     case.distribution == "renorm", 0.5)
        if coef.numel():
            map_loss.map_grad(a_s, a_t, coef, None, (qi, qc, vi, vc), case.causal,
                              case.window or 0, 0)
    return [(kern, args, kwargs) for kern, _grid, args, kwargs in log]


def map_loss_fields(case: MapLossCase) -> dict:
    rests = "".join(f"+{side}_rest" for side, given in zip("st", case.rests) if given)
    scenario = f"map_loss:{case.variant}" + \
        (f"+{case.distribution}" if case.variant in ("kl", "reverse_kl", "jsd") else "") + \
        rests + ("+window" if case.window else "")
    return dict(scenario=scenario, dtype=str(case.dtype).replace("torch.", ""), head_dim="",
                group="",
                causal=case.causal, mask="", vocab="")


if __name__ == "__main__":
    sys.exit(main())
