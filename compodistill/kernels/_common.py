"""What every kernel module shares: the Triton import, the interpreter check, launching
(with config pinning and launch recording), the per-target autotune tables, constants.

Nothing here is a kernel of its own; :mod:`.attention`, :mod:`.visual_attention` and
:mod:`.logit_kd` import from here, and :mod:`.report` reads the same tables.
"""
from __future__ import annotations

import contextlib
import math
import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only without triton
    triton = None
    tl = None

LOG2E = 1.4426950408889634


# --------------------------------------------------------------------------- helpers

def interpreting() -> bool:
    """True when Triton runs its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def kernel_input(t: torch.Tensor) -> torch.Tensor:
    """The tensor a kernel reads: head dim made dense; bf16 upcast under the interpreter.

    The Triton interpreter computes bf16 ``tl.dot`` and bf16 arithmetic wrongly, so bf16
    inputs are upcast to float32 there. On a GPU the tensor passes through unchanged.
    """
    if t.dtype == torch.bfloat16 and interpreting():
        t = t.float()
    return t if t.stride(-1) == 1 else t.contiguous()


def map_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the visual maps (and so of their gradient G) for inputs of ``dtype``.

    bfloat16 inputs give bfloat16 maps, as eager attention's probabilities would be: half the
    bytes of every pass that writes or reads a map (the map loss, the row terms, the
    backward), and float32's exponent range, so no attention weight underflows. float16
    inputs keep float32 maps (float16 flushes weights below 6e-8, which the KL losses see);
    float32 inputs keep float32.
    """
    return torch.bfloat16 if dtype == torch.bfloat16 else torch.float32


def map_operand(t: torch.Tensor) -> torch.Tensor:
    """A map or map gradient as a kernel reads it: contiguous, float32 or bfloat16 (other
    dtypes upcast; bfloat16 upcast under the interpreter, as :func:`kernel_input`)."""
    if t.dtype not in (torch.float32, torch.bfloat16) or (
            t.dtype == torch.bfloat16 and interpreting()):
        t = t.float()
    return t.contiguous()


def map_buffer(shape, dtype: torch.dtype, device) -> torch.Tensor:
    """An uninitialised buffer a kernel writes every entry of, in ``dtype`` (float32 under
    the interpreter, which cannot store bfloat16: ``.to(dtype)`` after the kernel casts it;
    on a GPU that is a no-op)."""
    return torch.empty(shape, device=device,
                       dtype=torch.float32 if interpreting() else dtype)


def block_d(head_dim: int) -> int:
    """Head dim padded to a power of two, at least 16 (the smallest ``tl.dot`` size)."""
    return max(16, 1 << (head_dim - 1).bit_length())


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot`` input precision: exact for float32 inputs (no TF32), native otherwise."""
    return "ieee" if dtype == torch.float32 else "tf32"


def deterministic() -> bool:
    """Whether autotuned kernels run pinned to their first config and the attention
    backward avoids atomics.

    True under ``COMPODISTILL_DETERMINISTIC=1`` or ``torch.use_deterministic_algorithms(True)``.
    The default attention backward accumulates dq with float32 atomics (5 matmuls; the order
    of the additions varies); in this mode it runs the split dk/dv + dq kernels instead
    (7 matmuls, no atomics), so every launch is bitwise reproducible for a given config.
    What can still differ from one process to the next is the config the autotuner picks
    (block sizes set the reduction order of dk, dv, dq and the softmax). Pinning fixes it,
    so a resumed run or another machine reproduces the same bits, at the cost of the tuning.
    """
    flag = os.environ.get("COMPODISTILL_DETERMINISTIC", "0")
    if flag not in ("", "0", "1"):
        raise ValueError(f"COMPODISTILL_DETERMINISTIC must be 0 or 1, got {flag!r}")
    return flag == "1" or torch.are_deterministic_algorithms_enabled()


_recorders: list[list] = []


@contextlib.contextmanager
def recording_launches():
    """Record launches instead of running them: yields a list that fills with
    ``(kernel, grid, args, kwargs)`` for every :func:`launch` inside the block (no kernel
    runs; outputs stay uninitialised). :mod:`kernels.report` compiles exactly these."""
    log: list = []
    _recorders.append(log)
    try:
        yield log
    finally:
        _recorders.remove(log)


def launch(kernel, grid, *args, **kwargs) -> None:
    """``kernel[grid](*args, **kwargs)``; an autotuned kernel is pinned to its first config
    when :func:`deterministic` says so. Every kernel of this package launches through here."""
    if _recorders:
        _recorders[-1].append((kernel, grid, args, kwargs))
        return
    if deterministic() and hasattr(kernel, "configs") and hasattr(kernel, "fn"):
        # The first config that fits this GPU and head dim: spill-free by the table.
        configs = kernel.configs
        if not interpreting():
            configs = configs_for(kernel, device_capability(), kwargs, args)
        _launch_pinned(kernel.fn, grid, configs, args, kwargs)
        return
    kernel[grid](*args, **kwargs)


def _launch_pinned(fn, grid, configs: list, args: tuple, kwargs: dict) -> None:
    """Launch with the first of ``configs`` this GPU can load. The fit tables hold per
    target class (sm_80 stands for 8.x), but sm_86/89 give a block 99 KB of shared memory
    against sm_80's 163 KB, so a table config may not load there (the 64x64 forward at
    d = 256 needs 104 KB): Triton raises OutOfResources before anything runs, and the next
    config is tried. The choice depends only on the device, so runs stay reproducible."""
    from triton.runtime.errors import OutOfResources

    for i, config in enumerate(configs):
        try:
            fn[grid](*args, **{**kwargs, **config.all_kwargs()})
            return
        except OutOfResources:
            if i == len(configs) - 1:
                raise


# The head-dim classes (BLOCK_D <= 64, = 128, = 256) each config fits per target: measured
# by compodistill/kernels/report.py (zero spill bytes, shared memory within the block limit)
# with Triton 3.8, and with 3.6 where that differs; tests/test_kernel_resources.py keeps the
# tables honest under the installed version. BLOCK_D 16/32 use the 64 class.
_FIT_TABLES: dict[str, dict[tuple, dict[int, tuple]]] = {}
_ALL_CONFIGS: dict[str, list] = {}


def config_key(config) -> tuple:
    """A hashable identity of a ``triton.Config`` (its kwargs, warps and stages)."""
    return tuple(sorted(config.kwargs.items())), config.num_warps, config.num_stages


def triton_version() -> str:
    """``"major.minor"`` of the installed Triton (the fit tables may differ per version)."""
    return ".".join(triton.__version__.split(".")[:2])


def fitted_configs(kernel_name: str, rows) -> list:
    """``triton.Config`` list from rows ``(BLOCK_M, BLOCK_N, warps, stages, fits_sm80,
    fits_sm90[, per_version])``, where ``fits_*`` are the head-dim classes (64, 128, 256) the
    config fits with Triton 3.8, and the optional ``per_version`` maps another Triton
    version (``"3.6"``) to its own ``(fits_sm80, fits_sm90)``, measured with that version
    (its compiler allocates registers differently: a config at the edge may spill there).
    ``per_version`` may also hold ``"window"``: the fits with the sliding window on
    (``HAS_WINDOW``, whose mask costs registers), where they are smaller, and ``"maps"``:
    the fits of a backward without an output gradient (``HAS_DO`` off: the maps-only
    gradient, with or without a window), where ptxas allocates registers differently (at
    d = 256 it caps 8-warp programs at 128 registers there), and ``"padded"``: the fits of
    a head dim below its ``BLOCK_D`` (80/96: the head-dim mask costs registers), without a
    window or maps-only, and ``"fwdmaps"``: the forward with its maps phase (``HAS_MAPS``),
    by default the configs that fit the plain, window and padded tables alike.
    ``"3.6 window"``, ``"3.6 maps"``, ``"3.6 padded"`` and ``"3.6 fwdmaps"`` give those
    variants' fits under another version."""
    table, window_table, maps_table, padded_table, configs = {}, {}, {}, {}, []
    fwdmaps_table = {}
    version = triton_version()
    for row in rows:
        block_m, block_n, warps, stages, fits80, fits90 = row[:6]
        extra = row[6] if len(row) > 6 else {}
        fits80, fits90 = extra.get(version, (fits80, fits90))
        config = triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=warps,
                               num_stages=stages)
        table[config_key(config)] = {80: fits80, 90: fits90}
        # "<version> window" / "<version> maps": that compiler's own fits of the variant.
        w80, w90 = extra.get(f"{version} window", extra.get("window", (fits80, fits90)))
        window_table[config_key(config)] = {80: w80, 90: w90}
        # Without its own maps fits, a config must fit both the plain and the window table.
        both = (tuple(c for c in fits80 if c in w80), tuple(c for c in fits90 if c in w90))
        m80, m90 = extra.get(f"{version} maps", extra.get("maps", both))
        maps_table[config_key(config)] = {80: m80, 90: m90}
        # A head dim below its BLOCK_D (80/96 in the 128 class) keeps the HEAD_DIM mask,
        # which costs registers: "padded" narrows the plain fits for those launches.
        p80, p90 = extra.get(f"{version} padded", extra.get("padded", (fits80, fits90)))
        padded_table[config_key(config)] = {80: p80, 90: p90}
        every = (tuple(c for c in both[0] if c in p80), tuple(c for c in both[1] if c in p90))
        f80, f90 = extra.get(f"{version} fwdmaps", extra.get("fwdmaps", every))
        fwdmaps_table[config_key(config)] = {80: f80, 90: f90}
        configs.append(config)
    _FIT_TABLES[kernel_name] = table
    _FIT_TABLES[kernel_name + "+window"] = window_table
    _FIT_TABLES[kernel_name + "+maps"] = maps_table
    _FIT_TABLES[kernel_name + "+padded"] = padded_table
    _FIT_TABLES[kernel_name + "+fwdmaps"] = fwdmaps_table
    _ALL_CONFIGS[kernel_name] = configs
    return configs


def fit_table(kernel_name: str) -> dict:
    """``{config_key: {80: classes, 90: classes}}`` of an autotuned kernel (a copy)."""
    return {k: dict(v) for k, v in _FIT_TABLES[kernel_name].items()}


def all_configs(kernel_name: str) -> list:
    """Every config of the kernel's table, before pruning (the interpreter keeps only the
    first in the autotuner itself)."""
    return list(_ALL_CONFIGS[kernel_name])


def target_class(capability: int) -> int:
    """The profiled target a compute capability (major * 10 + minor) is held to."""
    return 90 if capability >= 90 else 80


def device_capability() -> int:
    major, minor = torch.cuda.get_device_capability()
    return major * 10 + minor


# The largest head dim the kernels serve: BLOCK_D 256 (Gemma 3) is the largest fitted class.
MAX_HEAD_DIM = 256
HEAD_DIM_CLASSES = (64, 128, 256)


def head_dim_class(block_d: int) -> int:
    """The fit tables' head-dim class of a ``BLOCK_D``: 64 (16, 32, 64), 128 or 256."""
    return 64 if block_d <= 64 else (128 if block_d <= 128 else 256)


def prune_configs(configs: list, table: dict, block_d: int, capability: int) -> list:
    """The configs that fit ``block_d`` on this target, in table order (the first one is
    what the deterministic mode pins)."""
    return prune_class(configs, table, head_dim_class(block_d), capability)


def prune_class(configs: list, table: dict, klass, capability: int) -> list:
    """The configs whose fits on this target include ``klass`` (a head-dim class, or a
    logit dtype name for the logit-KD kernel), in table order; a config missing from the
    table is kept; the first config when none fits (launchers ask :func:`fits_class`)."""
    target = target_class(capability)
    keep = [c for c in configs
            if config_key(c) not in table or klass in table[config_key(c)].get(target, ())]
    return keep or list(configs[:1])


def fits_target(kernel_name: str, block_d: int, capability: int) -> bool:
    """Whether some config of the fit table ``kernel_name`` (``"+window"`` for the sliding
    window's) fits this head-dim class on this target; :func:`prune_configs` falls back to
    an unmeasured first config when none does, so a launcher asks this first."""
    return fits_class(kernel_name, head_dim_class(block_d), capability)


def fits_class(table_name: str, klass, capability: int) -> bool:
    target = target_class(capability)
    return any(klass in fits.get(target, ()) for fits in _FIT_TABLES[table_name].values())


def launch_table(kernel, args: tuple, kwargs: dict) -> tuple[str, object]:
    """(fit-table name, class) of a launch of an autotuned kernel of this package: the
    head-dim class (and ``"+window"`` table with ``HAS_WINDOW``), or for the logit-KD
    kernel the student logits' dtype name."""
    fn = kernel.fn
    named = {**dict(zip(fn.arg_names, args)), **kwargs}
    name = fn.__name__
    if name in _DTYPE_CLASSED:
        return name, str(named[_DTYPE_CLASSED[name]].dtype).replace("torch.", "")
    return table_variant(name, named), head_dim_class(named.get("BLOCK_D", 16))


def table_variant(name: str, named: dict) -> str:
    """The fit table of a launch: ``"+maps"`` for a backward without an output gradient
    (``HAS_DO`` passed and off), else ``"+window"`` with ``HAS_WINDOW``, else ``"+padded"``
    for a head dim below its ``BLOCK_D`` (80, 96), else the plain one; ``"+fwdmaps"`` for
    the forward with its maps phase (``HAS_MAPS``)."""
    if named.get("HAS_MAPS"):
        return name + "+fwdmaps"
    if named.get("HAS_DO", True) is False:
        return name + "+maps"
    if named.get("HAS_WINDOW"):
        return name + "+window"
    if named.get("HEAD_DIM", named.get("BLOCK_D")) != named.get("BLOCK_D"):
        return name + "+padded"
    return name


def prune_hook(kernel_name: str) -> dict:
    """``prune_configs_by`` of an autotuned kernel (runs on the launching GPU)."""
    def prune(configs, named_args, **kwargs):
        named = {**named_args, **kwargs}
        if kernel_name in _DTYPE_CLASSED:
            table = _FIT_TABLES[kernel_name]
            klass = str(named[_DTYPE_CLASSED[kernel_name]].dtype).replace("torch.", "")
        else:
            table = _FIT_TABLES[table_variant(kernel_name, named)]
            klass = head_dim_class(named.get("BLOCK_D", 16))
        return prune_class(configs, table, klass, device_capability())
    return {"early_config_prune": prune}


def configs_for(kernel, capability: int, kwargs: dict, args: tuple = ()) -> list:
    """The autotune configs ``kernel`` may run on a GPU of this compute capability with
    these launch arguments (the constexprs; the positional ``args`` where the class is a
    tensor's dtype), after the per-target pruning."""
    name, klass = launch_table(kernel, args, kwargs)
    return prune_class(kernel.configs, _FIT_TABLES.get(name, {}), klass, capability)


# Kernels whose fit table is per dtype of one tensor argument (kernel name -> argument).
_DTYPE_CLASSED: dict[str, str] = {}


def fitted_dtype_configs(kernel_name: str, arg: str, rows) -> list:
    """``triton.Config`` list of a kernel with one block size, from rows ``(BLOCK, warps,
    fits_sm80, fits_sm90[, per_version])``: ``fits_*`` are the dtype names of argument
    ``arg`` with which the config fits (Triton 3.8); ``per_version`` maps another Triton
    version to its own ``(fits_sm80, fits_sm90)``."""
    table, configs = {}, []
    for row in rows:
        block, warps, fits80, fits90 = row[:4]
        if len(row) > 4 and triton_version() in row[4]:
            fits80, fits90 = row[4][triton_version()]
        config = triton.Config({"BLOCK": block}, num_warps=warps)
        table[config_key(config)] = {80: tuple(fits80), 90: tuple(fits90)}
        configs.append(config)
    _FIT_TABLES[kernel_name] = table
    _ALL_CONFIGS[kernel_name] = configs
    _DTYPE_CLASSED[kernel_name] = arg
    return configs


def check_window(window: int | None, causal: bool) -> None:
    """A sliding window (query i sees keys j with i - j < window) is a positive int, causal."""
    if window is None:
        return
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"window must be a positive int or None, got {window!r}")
    if not causal:
        raise ValueError("a sliding window needs causal attention")


def window_arg(window: int | None, n: int) -> int:
    """The kernels' WINDOW argument: the window, or N + 1 (never binding) without one."""
    return int(window) if window is not None else n + 1


def default_scale(head_dim: int, scale: float | None) -> float:
    return 1.0 / math.sqrt(head_dim) if scale is None else float(scale)


def autotune_configs(configs):
    """All configs on a GPU; the first only under the interpreter (no benchmarking there)."""
    return configs[:1] if interpreting() else configs


def require_triton() -> None:
    if triton is None:
        raise RuntimeError("compodistill.kernels needs triton (pip install 'triton>=3.6')")


if triton is not None:

    @triton.jit
    def log2_scale(scale):
        """The softmax scale in log2 units: kernels use exp2, so scores are scaled by log2(e).
        (Jit code cannot read the host constant LOG2E: triton globals must be constexpr.)"""
        return tl.cast(scale, tl.float32) * 1.4426950408889634

    @triton.jit
    def load_row_stats(RowMax_row, RowLog2Sum_row, offs_m, m_ok):
        """(m, log2 l) of a block of rows, log2 units; m = +inf where a row has no key, so
        ``exp2((s - m) - log2 l)`` is 0 there."""
        m = tl.load(RowMax_row + offs_m, mask=m_ok, other=float("inf"))
        m = tl.where(m == float("-inf"), float("inf"), m)
        l2 = tl.load(RowLog2Sum_row + offs_m, mask=m_ok, other=0.0)
        return m, l2

    @triton.jit
    def window_key_start(q_start, WINDOW, BLOCK_N: tl.constexpr):
        """First key block (its start, a multiple of BLOCK_N) that a causal sliding window
        lets some row of the query block starting at ``q_start`` see: the block holding key
        ``q_start - WINDOW + 1``. Every earlier block is outside every row's window."""
        return tl.maximum(q_start - WINDOW + 1, 0) // BLOCK_N * BLOCK_N

    @triton.jit
    def window_query_end(k_start, N, WINDOW, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr):
        """End (exclusive, a multiple of BLOCK_M or N) of the query blocks that see some key of
        the key block starting at ``k_start`` under a causal sliding window: the last such
        query is ``k_start + BLOCK_N - 1 + WINDOW - 1``; later query blocks see none of it."""
        return tl.minimum(tl.cdiv(k_start + BLOCK_N - 1 + WINDOW, BLOCK_M) * BLOCK_M, N)
