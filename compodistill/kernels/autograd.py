"""Differentiable entry points over the Triton kernels, as ``torch.library`` custom ops.

Public functions (argument checks happen here, at the Python boundary):

- :func:`flash_attention` ``(q, k, v, key_mask, causal, scale) -> out``
- :func:`attention_with_visual_maps` ``(q, k, v, layout, scale, want_maps) -> (out, A or
  None)``: the student layer; ``A`` (B, Qmax, Vmax) (bfloat16 for bfloat16 inputs, else
  float32: :func:`kernels._common.map_dtype`) carries gradient to q and k,
  folded into the flash backward.
- :func:`visual_maps` ``(q, k, layout, scale) -> A``: maps only (no v); its backward is the
  flash backward without dO (only the visual terms).
- :func:`visual_maps_with_rest` ``(q, k, layout, scale) -> (A, rest)``: plus the head-mean
  mass on the non-visual keys (the KL losses' ``rest`` bucket), both differentiable.
- :func:`teacher_attention_with_visual_maps` / :func:`teacher_visual_maps`: no gradient;
  optionally accumulate ``maps_out += weight * A`` in place (group-matching windows).

Each is one ``compodistill::...`` custom op with a fake (meta) implementation and a
registered autograd formula, so ``torch.compile`` sees a single node per call. ``layout``
is a ``compodistill.visual_attention.layout.VisualLayout`` (duck-typed: its ``query_index``, ``query_count``,
``visual_index``, ``visual_count``, ``key_mask`` and ``causal`` are read); every function
taking a layout also accepts it spelled out as ``query_index, query_count, visual_index,
visual_count[, key_mask[, causal]]`` in its place.
"""
from __future__ import annotations

import functools
import math
from types import SimpleNamespace
from typing import Optional

import torch
from torch import Tensor

from ._common import (MAX_HEAD_DIM, block_d, check_window, deterministic, device_capability,
                      fits_target, kernel_input, map_dtype, map_operand)
from .attention import (default_scale, flash_backward, flash_forward, interpreting,
                        stats_from_lse)
from .visual_attention import (inverse_index, refine_visual_stats, visual_maps_from_lse,
                               visual_rest_heads, visual_rest_mass, visual_row_terms)

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MAX_HEAD_DIM = MAX_HEAD_DIM  # the configs are sized (spill-free) up to BLOCK_D = 256


# --------------------------------------------------------------------------- custom ops

@torch.library.custom_op("compodistill::attention_fwd", mutates_args=())
def _attention_fwd(q: Tensor, k: Tensor, v: Optional[Tensor], key_mask: Optional[Tensor],
                   query_index: Optional[Tensor], query_count: Optional[Tensor],
                   visual_index: Optional[Tensor], visual_count: Optional[Tensor],
                   causal: bool, scale: float,
                   want_maps: bool = True, window: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """(out or empty, row stats (2, B, Hq, N), maps or empty).

    With the index tensors and ``want_maps`` the maps come fresh, in
    :func:`kernels._common.map_dtype` (:func:`forward_with_maps`); ``window``: the sliding
    window (0: none), as in every op below.
    """
    if query_index is None or not want_maps:
        out, stats = flash_forward(q, k, v, key_mask, causal, scale, window=window or None)
        maps = q.new_empty(0, dtype=map_dtype(q.dtype))
    else:
        # The backward rebuilds P from the statistics the maps were built from.
        out, _, maps, stats = forward_with_maps(q, k, v, key_mask, query_index, query_count,
                                                visual_index, visual_count, causal, scale,
                                                None, 1.0, window)
    return (q.new_empty(0) if out is None else out), stats, maps


def forward_with_maps(q: Tensor, k: Tensor, v: Optional[Tensor], key_mask: Optional[Tensor],
                      query_index: Tensor, query_count: Tensor, visual_index: Tensor,
                      visual_count: Tensor, causal: bool, scale: float,
                      maps: Optional[Tensor], weight: float, window: int,
                      text_sum: bool = False, maps_dtype: Optional[torch.dtype] = None):
    """``(out, stats, maps, used)``: the forward, ``weight · A`` and the row statistics
    (2, B, Hq, N) the map was built from.

    ``maps`` None (every fresh map): the forward (its statistics with the non-visual plane,
    P = 3), then the gated refine and the gathered maps pass
    (:func:`kernels.visual_attention.visual_maps_from_lse`), which writes every entry once
    in the maps' dtype: no zero fill, no atomics, deterministic. A float32 ``maps`` buffer
    is added into in place (``maps += weight · A``, a teacher window): by the forward
    kernel's second phase, one launch whose float32 atomics add each head's ``P / Hq`` on
    the image key blocks (the buffer is read and written anyway), or by the gathered pass
    in the deterministic mode (atomics sum the heads in a varying order). ``stats`` has
    P = 3 on the gathered path and when ``text_sum``; ``used`` is the refined ``stats`` there
    (the gate rescored the rows past it) and ``stats[:2]`` on the maps phase. ``maps_dtype``:
    a fresh map's dtype (default :func:`kernels._common.map_dtype`).
    """
    n = q.shape[2]
    visual_col = inverse_index(visual_index, visual_count, n)
    if maps is None or deterministic():
        out, stats = flash_forward(q, k, v, key_mask, causal, scale, visual_col,
                                   window=window or None)
        used = refine_visual_stats(q, k, stats, query_index, query_count, visual_index,
                                   visual_count, causal, scale, window or None)
        maps = visual_maps_from_lse(q, k, used, query_index, query_count, visual_index,
                                    visual_count, causal, scale, out=maps, weight=weight,
                                    window=window or None, dtype=maps_dtype)
        return out, stats, maps, used
    out, stats = flash_forward(q, k, v, key_mask, causal, scale, visual_col,
                               window=window or None, maps=maps,
                               query_row=inverse_index(query_index, query_count, n),
                               map_weight=weight / q.shape[1], text_sum=text_sum)
    return out, stats, maps, stats[:2]


@_attention_fwd.register_fake
def _attention_fwd_fake(q, k, v, key_mask, query_index, query_count, visual_index,
                        visual_count, causal, scale, want_maps=True, window=0):
    B, Hq, N, _ = q.shape
    out = q.new_empty(q.shape) if v is not None else q.new_empty(0)
    stats = q.new_empty((2, B, Hq, N), dtype=torch.float32)
    if query_index is None or not want_maps:
        maps = q.new_empty(0, dtype=map_dtype(q.dtype))
    else:
        maps = q.new_empty((B, query_index.shape[1], visual_index.shape[1]),
                           dtype=map_dtype(q.dtype))
    return out, stats, maps


@torch.library.custom_op("compodistill::attention_bwd", mutates_args=())
def _attention_bwd(dout: Optional[Tensor], dmaps: Optional[Tensor], q: Tensor, k: Tensor,
                   v: Optional[Tensor], out: Optional[Tensor], stats: Tensor,
                   key_mask: Optional[Tensor], query_index: Optional[Tensor],
                   query_count: Optional[Tensor], visual_index: Optional[Tensor],
                   visual_count: Optional[Tensor], causal: bool,
                   scale: float, window: int = 0,
                   extra_row_terms: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv or empty); ``dout``/``dmaps`` None when that output has no gradient.

    ``extra_row_terms`` (B, Hq, N) float32 is added to the row terms ``c`` (used by the rest
    bucket's backward, whose ``Σ_j P·g`` is known exactly from the statistics)."""
    if dout is None and dmaps is None:
        return torch.zeros_like(q), torch.zeros_like(k), q.new_empty(0)
    visual = {}
    if dmaps is not None:
        dmaps = map_operand(dmaps)  # float32 or bfloat16, as the maps
        n = q.shape[2]
        row_terms = visual_row_terms(q, k, stats, query_index, query_count, visual_index,
                                     visual_count, dmaps, causal, scale, window=window or None)
        if extra_row_terms is not None:
            row_terms = row_terms + extra_row_terms
        visual = dict(
            grad_maps=dmaps,
            row_terms=row_terms,
            query_row=inverse_index(query_index, query_count, n),
            visual_col=inverse_index(visual_index, visual_count, n),
        )
    dq, dk, dv = flash_backward(dout, q, k, v if dout is not None else None, out, stats,
                                key_mask, causal, scale, window=window or None, **visual)
    return dq, dk, dv if dv is not None else q.new_empty(0)


@_attention_bwd.register_fake
def _attention_bwd_fake(dout, dmaps, q, k, v, out, stats, key_mask, query_index, query_count,
                        visual_index, visual_count, causal, scale, window=0,
                        extra_row_terms=None):
    dv = torch.empty_like(k, dtype=v.dtype) if (dout is not None and v is not None) \
        else q.new_empty(0)
    return torch.empty_like(q), torch.empty_like(k), dv


def _fwd_setup_context(ctx, inputs, output):
    q, k, v, key_mask, qi, qc, vi, vc, causal, scale = inputs[:10]
    out, stats, maps = output
    ctx.has_v = v is not None
    ctx.has_maps = qi is not None and (inputs[10] if len(inputs) > 10 else True)
    ctx.causal, ctx.scale = causal, scale
    ctx.window = inputs[11] if len(inputs) > 11 else 0
    ctx.n_inputs = len(inputs)
    ctx.save_for_backward(q, k, v, out if ctx.has_v else None, stats, key_mask, qi, qc, vi, vc)
    ctx.mark_non_differentiable(stats)


def _fwd_backward(ctx, dout, dlse, dmaps):
    q, k, v, out, stats, key_mask, qi, qc, vi, vc = ctx.saved_tensors
    dout = dout if ctx.has_v else None
    dmaps = dmaps if ctx.has_maps else None
    dq, dk, dv = torch.ops.compodistill.attention_bwd(
        dout, dmaps, q, k, v, out, stats, key_mask, qi, qc, vi, vc, ctx.causal, ctx.scale,
        ctx.window)
    return (dq, dk, (dv if ctx.has_v else None)) + (None,) * (ctx.n_inputs - 3)


_attention_fwd.register_autograd(_fwd_backward, setup_context=_fwd_setup_context)


@torch.library.custom_op("compodistill::maps_from_stats", mutates_args=())
def _maps_from_stats(q: Tensor, k: Tensor, stats: Tensor, key_mask: Optional[Tensor],
                     query_index: Tensor, query_count: Tensor, visual_index: Tensor,
                     visual_count: Tensor, causal: bool, scale: float,
                     window: int = 0) -> Tensor:
    """Maps from row statistics the caller already has (no lse-only forward)."""
    return visual_maps_from_lse(q, k, stats, query_index, query_count, visual_index,
                                visual_count, causal, scale, window=window or None)


@_maps_from_stats.register_fake
def _maps_from_stats_fake(q, k, stats, key_mask, query_index, query_count, visual_index,
                          visual_count, causal, scale, window=0):
    return q.new_empty((q.shape[0], query_index.shape[1], visual_index.shape[1]),
                       dtype=map_dtype(q.dtype))


def _stats_setup_context(ctx, inputs, output):
    q, k, stats, key_mask, qi, qc, vi, vc, causal, scale = inputs[:10]
    ctx.causal, ctx.scale = causal, scale
    ctx.window = inputs[10] if len(inputs) > 10 else 0
    ctx.n_inputs = len(inputs)
    ctx.save_for_backward(q, k, stats, key_mask, qi, qc, vi, vc)


def _stats_backward(ctx, dmaps):
    q, k, stats, key_mask, qi, qc, vi, vc = ctx.saved_tensors
    dq, dk, _ = torch.ops.compodistill.attention_bwd(
        None, dmaps, q, k, None, None, stats, key_mask, qi, qc, vi, vc, ctx.causal, ctx.scale,
        ctx.window)
    return (dq, dk) + (None,) * (ctx.n_inputs - 2)


_maps_from_stats.register_autograd(_stats_backward, setup_context=_stats_setup_context)


@torch.library.custom_op("compodistill::maps_rest_fwd", mutates_args=())
def _maps_rest_fwd(q: Tensor, k: Tensor, key_mask: Optional[Tensor], query_index: Tensor,
                   query_count: Tensor, visual_index: Tensor, visual_count: Tensor,
                   causal: bool, scale: float, window: int = 0
                   ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(row stats (3, B, Hq, N), maps, rest (B, Qmax), per-head rest (B, Hq, N)).

    The maps are float32 whatever the input: the KL losses' rest bucket pairs them with a
    float32 rest from the statistics, and a bf16 map would put their sum off 1 by its
    rounding (which the rest distribution's losses see)."""
    _, stats, maps, refined = forward_with_maps(q, k, None, key_mask, query_index,
                                                query_count, visual_index, visual_count,
                                                causal, scale, None, 1.0, window,
                                                text_sum=True, maps_dtype=torch.float32)
    # The rest is the same softmax's as the maps (the refined statistics), and so is the P
    # the backward rebuilds.
    rest_heads = visual_rest_heads(stats, refined)
    rest = visual_rest_mass(rest_heads, query_index, query_count)
    return torch.cat([refined, stats[2:]]), maps, rest, rest_heads


@_maps_rest_fwd.register_fake
def _maps_rest_fwd_fake(q, k, key_mask, query_index, query_count, visual_index, visual_count,
                        causal, scale, window=0):
    B, Hq, N, _ = q.shape
    return (q.new_empty((3, B, Hq, N), dtype=torch.float32),
            q.new_empty((B, query_index.shape[1], visual_index.shape[1]),
                        dtype=torch.float32),
            q.new_empty((B, query_index.shape[1]), dtype=torch.float32),
            q.new_empty((B, Hq, N), dtype=torch.float32))


def _rest_setup_context(ctx, inputs, output):
    q, k, key_mask, qi, qc, vi, vc, causal, scale = inputs[:9]
    ctx.causal, ctx.scale = causal, scale
    ctx.window = inputs[9] if len(inputs) > 9 else 0
    ctx.n_inputs = len(inputs)
    ctx.save_for_backward(q, k, output[0], output[3], key_mask, qi, qc, vi, vc)
    ctx.mark_non_differentiable(output[0], output[3])


def _rest_grad_inputs(q: Tensor, k: Tensor, drest: Tensor, rest_heads: Tensor, qi: Tensor,
                      qc: Tensor, vi: Tensor, vc: Tensor):
    """The rest bucket's gradient as the flash backward's ``dO·Vᵀ`` term (no kernel change).

    rest_h[i] = Σ_{j∉V} P_h[i, j], so dL/dS_h[i, j] = P·(g_i·[j∉V] − g_i·rest_h[i]) with
    g_i = drest[r(i)] / Hq. A one-hot value column ``v[j, 0] = [j∉V]`` and ``do[i, 0] = g_i``
    give that first term; the second, known exactly from the statistics, goes in as a row
    term. (Folding g into G − g instead is exact in algebra but cancels in float32 when g is
    ~1e5, which forward KL gives when the student's rest is ~1e-6.)
    """
    B, Hq, N, D = q.shape
    slot = inverse_index(qi, qc, N).to(torch.int64)  # the query row of each position, or -1
    # A zero column past the last row serves the positions that are not query rows (and
    # keeps the gather valid when there is no query row at all).
    rows = torch.nn.functional.pad(drest.float(), (0, 1))
    g = rows.gather(1, torch.where(slot >= 0, slot, qi.shape[1])) / Hq
    text = inverse_index(vi, vc, N) < 0
    dtype = kernel_input(q).dtype
    # float16 cannot hold g ~ 1e5: a power-of-two split between do and v keeps dO·Vᵀ exact.
    shift = 1.0
    if dtype == torch.float16:
        top = float(g.abs().max())
        if top > 2.0 ** 14:
            shift = 2.0 ** math.ceil(math.log2(top / 2.0 ** 14))
    do = torch.zeros((B, Hq, N, D), device=q.device, dtype=dtype)
    do[..., 0] = (g / shift)[:, None, :]
    v = torch.zeros((B, k.shape[1], N, D), device=q.device, dtype=dtype)
    v[..., 0] = (text.to(torch.float32) * shift)[:, None, :]
    return do, v, torch.zeros_like(do), g[:, None, :] * rest_heads


def _rest_backward(ctx, dstats, dmaps, drest, drest_heads):
    q, k, stats, rest_heads, key_mask, qi, qc, vi, vc = ctx.saved_tensors
    if dmaps is None:
        dmaps = torch.zeros((q.shape[0], qi.shape[1], vi.shape[1]), device=q.device,
                            dtype=torch.float32)
    do = v = out = extra = None
    if drest is not None:
        do, v, out, extra = _rest_grad_inputs(q, k, drest, rest_heads, qi, qc, vi, vc)
    dq, dk, _ = torch.ops.compodistill.attention_bwd(
        do, dmaps, q, k, v, out, stats, key_mask, qi, qc, vi, vc, ctx.causal, ctx.scale,
        ctx.window, extra)
    return (dq, dk) + (None,) * (ctx.n_inputs - 2)


_maps_rest_fwd.register_autograd(_rest_backward, setup_context=_rest_setup_context)


@torch.library.custom_op("compodistill::teacher_attention_maps_", mutates_args=("maps_out",))
def _teacher_attention_maps_(maps_out: Tensor, q: Tensor, k: Tensor, v: Optional[Tensor],
                             key_mask: Optional[Tensor], query_index: Tensor,
                             query_count: Tensor, visual_index: Tensor, visual_count: Tensor,
                             causal: bool, scale: float, weight: float,
                             window: int = 0) -> Tensor:
    """The teacher layer's output (or empty) and ``maps_out += weight * A`` in place, in
    one forward launch (no gradient: teacher targets)."""
    out, *_ = forward_with_maps(q, k, v, key_mask, query_index, query_count, visual_index,
                                visual_count, causal, scale, maps_out, weight, window)
    return q.new_empty(0) if out is None else out


@_teacher_attention_maps_.register_fake
def _teacher_attention_maps_fake(maps_out, q, k, v, key_mask, query_index, query_count,
                                 visual_index, visual_count, causal, scale, weight, window=0):
    return q.new_empty(q.shape) if v is not None else q.new_empty(0)


# --------------------------------------------------------------------------- argument checks

def _shape(t) -> str:
    return str(tuple(t.shape)) if isinstance(t, Tensor) else type(t).__name__


def _check_qkv(q: Tensor, k: Tensor, v: Tensor | None) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t is None and name == "v":
            continue
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D (B, H, N, d), got shape {_shape(t)}")
        if t.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{name} must be float16, bfloat16 or float32, got {t.dtype}")
        if t.dtype != q.dtype:
            raise TypeError(f"q and {name} must have the same dtype, got {q.dtype} and {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"q and {name} must be on the same device, got {q.device} and "
                             f"{t.device}")
    B, Hq, N, D = q.shape
    if k.shape[0] != B or k.shape[2] != N or k.shape[3] != D:
        raise ValueError(f"k must have shape (B, Hkv, N, d) = ({B}, Hkv, {N}, {D}) to match "
                         f"q {_shape(q)}, got {_shape(k)}")
    if k.shape[1] == 0 or Hq % k.shape[1] != 0:
        raise ValueError(f"the number of query heads ({Hq}, q {_shape(q)}) must be a multiple "
                         f"of the number of kv heads ({k.shape[1]}, k {_shape(k)})")
    if v is not None and v.shape != k.shape:
        raise ValueError(f"v must have the shape of k {_shape(k)}, got {_shape(v)}")
    if not 0 < D <= _MAX_HEAD_DIM:
        raise ValueError(f"head dim (q.shape[-1]) must be in [1, {_MAX_HEAD_DIM}] for the Triton "
                         f"kernels, got {D} (q {_shape(q)}); use backend='torch' beyond that")
    if q.device.type == "cpu" and not interpreting():
        raise ValueError("the Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 for the "
                         "slow CPU interpreter); got tensors on the CPU")


def _check_key_mask(key_mask: Tensor | None, q: Tensor) -> Tensor | None:
    if key_mask is None:
        return None
    B, _, N, _ = q.shape
    if not isinstance(key_mask, Tensor):
        raise TypeError(f"key_mask must be a torch.Tensor or None, got {type(key_mask).__name__}")
    if tuple(key_mask.shape) != (B, N):
        raise ValueError(f"key_mask must have shape (B, N) = ({B}, {N}) to match q "
                         f"{_shape(q)}, got {_shape(key_mask)}")
    if key_mask.dtype.is_floating_point or key_mask.dtype.is_complex:
        raise TypeError(f"key_mask must be bool or integer (1 = real token), got {key_mask.dtype}")
    return key_mask.to(device=q.device, dtype=torch.bool).contiguous()


_LAYOUT_FIELDS = ("query_index", "query_count", "visual_index", "visual_count", "key_mask",
                  "causal")


def _check_layout(q: Tensor, layout):
    """Index tensors, key mask and causal flag of a ``compodistill.visual_attention.layout.VisualLayout``.

    Duck-typed (this package imports nothing from compodistill): any object with the
    attributes ``query_index`` (B, Qmax), ``query_count`` (B,), ``visual_index`` (B, Vmax),
    ``visual_count`` (B,), ``key_mask`` ((B, N) bool or None) and ``causal`` works.
    """
    missing = [f for f in _LAYOUT_FIELDS if not hasattr(layout, f)]
    if missing:
        raise TypeError(f"layout must be a compodistill.visual_attention.layout.VisualLayout (missing "
                        f"{', '.join(missing)}), got {type(layout).__name__}")
    B, _, N, _ = q.shape
    seq_len = getattr(layout, "seq_len", N)
    if seq_len != N:
        raise ValueError(f"layout is for sequence length {seq_len} but q has shape {_shape(q)}")
    checked = []
    for name, dim in (("query_index", 2), ("query_count", 1), ("visual_index", 2),
                      ("visual_count", 1)):
        t = getattr(layout, name)
        if not isinstance(t, Tensor):
            raise TypeError(f"layout.{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != dim or t.shape[0] != B:
            want = "(B, width)" if dim == 2 else "(B,)"
            raise ValueError(f"layout.{name} must have shape {want} with B = {B} "
                             f"(q {_shape(q)}), got {_shape(t)}")
        if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
            raise TypeError(f"layout.{name} must be an integer tensor, got {t.dtype}")
        checked.append(t.to(device=q.device, dtype=torch.int64).contiguous())
    key_mask = _check_key_mask(layout.key_mask, q)
    return checked, key_mask, bool(layout.causal)


def _window(layout, causal: bool) -> int:
    """The layout's sliding window as the ops' int (0: none); read when the layout has one."""
    window = getattr(layout, "window", None)
    if window is None:
        return 0
    check_window(window, causal)
    return int(window)


def _layout_args(fn: str, layout, args: tuple, kwargs: dict) -> tuple[object, dict]:
    """Accept ``layout`` as a VisualLayout or as explicit tensors spread over the positionals.

    Layout form: ``f(q, k[, v], layout, *rest)``. Tensor form: ``f(q, k[, v], query_index,
    query_count, visual_index, visual_count[, key_mask[, causal]], *rest)``. ``rest`` are the
    trailing parameters named by ``kwargs`` (in order), which also holds their defaults.
    """
    if isinstance(layout, Tensor):
        if len(args) < 3:
            raise TypeError(f"{fn}: with index tensors pass query_index, query_count, "
                            f"visual_index, visual_count (then key_mask, causal), got "
                            f"{1 + len(args)} of them")
        fields = dict(query_index=layout, query_count=args[0], visual_index=args[1],
                      visual_count=args[2], key_mask=args[3] if len(args) > 3 else None,
                      causal=args[4] if len(args) > 4 else True)
        layout, args = SimpleNamespace(**fields), args[5:]
    if len(args) > len(kwargs):
        raise TypeError(f"{fn}: too many positional arguments after the layout "
                        f"(expected at most {', '.join(kwargs)})")
    return layout, {**kwargs, **dict(zip(kwargs, args))}


def _scale(q: Tensor, scale: float | None) -> float:
    if scale is not None and not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
    return default_scale(q.shape[-1], scale)


# --------------------------------------------------------------------------- public API

def unsupported_reason(q: Tensor) -> str | None:
    """Why the kernels cannot serve attention on tensors shaped and placed like ``q``, or
    None when they can. A model's attention hook asks this before a fused call and runs the
    PyTorch path instead (:mod:`compodistill.hf.attention`); the functional API raises.

    Reasons: a head dim outside [1, MAX_HEAD_DIM]; bf16 on a GPU below sm_80 (no bf16 tensor
    core instruction there); a GPU where some kernel of the path has no spill-free config
    for this head dim in its fit table.
    """
    return _unsupported_reason(q.shape[-1], q.dtype, q.device)


@functools.lru_cache(maxsize=None)
def _unsupported_reason(D: int, dtype: torch.dtype, device: torch.device) -> str | None:
    # Asked once per attention layer and step: the answer depends only on these three.
    if not 0 < D <= _MAX_HEAD_DIM:
        return f"head dim {D} is outside [1, {_MAX_HEAD_DIM}], the largest the kernels serve"
    if device.type != "cuda":
        return None
    capability = device_capability()
    if dtype == torch.bfloat16 and capability < 80:
        return f"bfloat16 needs sm_80 or newer, this GPU is sm_{capability}"
    for name in ("_fwd_kernel", "_bwd_dkdv_kernel", "_bwd_dq_kernel"):
        if not fits_target(name, block_d(D), capability):
            return (f"{name} has no spill-free config for head dim {D} on sm_{capability}")
    return None


def flash_attention(q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor | None = None,
                    causal: bool = True, scale: float | None = None,
                    window: int | None = None) -> Tensor:
    """Flash attention ``softmax(q kᵀ · scale) v`` (GQA by head mapping), differentiable.

    Args:
        q: (B, Hq, N, d); k, v: (B, Hkv, N, d), ``Hq % Hkv == 0``; fp16, bf16 or fp32.
        key_mask: (B, N) bool/int, True = real token; None = no padding.
        causal: key j allowed for query i only if ``j <= i``.
        scale: default ``1 / sqrt(d)``.
        window: sliding window (causal only): query i sees keys j with ``i - j < window``.

    Returns: (B, Hq, N, d) in q's dtype; rows with no allowed key are 0.
    """
    _check_qkv(q, k, v)
    key_mask = _check_key_mask(key_mask, q)
    check_window(window, bool(causal))
    out, _, _ = torch.ops.compodistill.attention_fwd(q, k, v, key_mask, None, None, None, None,
                                                     bool(causal), _scale(q, scale), True,
                                                     int(window or 0))
    return out


def attention_with_visual_maps(q: Tensor, k: Tensor, v: Tensor, layout, *args,
                               scale: float | None = None, want_maps: bool = True,
                               ) -> tuple[Tensor, Tensor | None]:
    """Flash attention plus the head-mean visual map of this layer, both differentiable.

    Call as ``(q, k, v, layout, scale=None, want_maps=True)`` or with the layout spelled
    out: ``(q, k, v, query_index, query_count, visual_index, visual_count, key_mask=None,
    causal=True, scale=None, want_maps=True)``.

    Args:
        q, k, v: as :func:`flash_attention`.
        layout: a ``compodistill.visual_attention.layout.VisualLayout`` (its index tensors, ``key_mask`` and
            ``causal`` are used; the padding and causal masks of the attention are the
            layout's).
        scale: default ``1 / sqrt(d)``.
        want_maps: False skips the visual pass (then this is :func:`flash_attention`).

    Returns: ``(out, A)``: ``A`` (B, Qmax, Vmax) in the maps' dtype, bfloat16 for bfloat16
    inputs and float32 otherwise (docs/CONVENTIONS.md), whose
        gradient flows to q and k through the fused backward; ``A`` is None without maps.
    """
    layout, opts = _layout_args("attention_with_visual_maps", layout, args,
                                dict(scale=scale, want_maps=want_maps))
    _check_qkv(q, k, v)
    index, key_mask, causal = _check_layout(q, layout)
    window = _window(layout, causal)
    if not opts["want_maps"]:
        return flash_attention(q, k, v, key_mask, causal, opts["scale"], window or None), None
    out, _, maps = torch.ops.compodistill.attention_fwd(q, k, v, key_mask, *index, causal,
                                                        _scale(q, opts["scale"]), True, window)
    return out, maps


def visual_maps(q: Tensor, k: Tensor, layout, *args, scale: float | None = None,
                lse: Tensor | None = None) -> Tensor:
    """The head-mean visual map ``A`` (B, Qmax, Vmax) alone (no v), differentiable, in the
    maps' dtype (as :func:`attention_with_visual_maps`).

    ``(q, k, layout, scale=None)`` or ``(q, k, query_index, query_count, visual_index,
    visual_count, key_mask=None, causal=True, scale=None)``. The forward computes the row
    statistics with a flash pass that skips the value product, unless ``lse`` is given:
    the (B, Hq, N) natural-log log-sum-exp of these q, k under the layout's masks and this
    scale (e.g. returned by the layer's own attention kernel), which saves that pass
    (4·B·Hq·N²·d/2 FLOP causal). One fp32 lse limits P to ~3e-4 relative accuracy at
    |s| ~ 1e4; without it the maps are exact there. The backward is the flash backward with
    only the visual terms; ``lse`` gets no gradient.
    """
    layout, opts = _layout_args("visual_maps", layout, args, dict(scale=scale))
    _check_qkv(q, k, None)
    index, key_mask, causal = _check_layout(q, layout)
    window = _window(layout, causal)
    scale = _scale(q, opts["scale"])
    if lse is not None:
        stats = stats_from_lse(_check_lse(lse, q))
        return torch.ops.compodistill.maps_from_stats(q, k, stats, key_mask, *index, causal,
                                                      scale, window)
    _, _, maps = torch.ops.compodistill.attention_fwd(q, k, None, key_mask, *index, causal,
                                                      scale, True, window)
    return maps


def visual_maps_with_rest(q: Tensor, k: Tensor, layout, *args,
                          scale: float | None = None) -> tuple[Tensor, Tensor]:
    """:func:`visual_maps` (here float32 whatever the input) plus ``rest`` (B, Qmax)
    float32, the head-mean attention mass on the non-visual keys, ``exp(lse_text −
    lse_all)`` per head from the forward's third statistics plane (no ``1 − Σ_v A``
    cancellation). Both are differentiable."""
    layout, opts = _layout_args("visual_maps_with_rest", layout, args, dict(scale=scale))
    _check_qkv(q, k, None)
    index, key_mask, causal = _check_layout(q, layout)
    window = _window(layout, causal)
    _, maps, rest, _ = torch.ops.compodistill.maps_rest_fwd(q, k, key_mask, *index, causal,
                                                         _scale(q, opts["scale"]), window)
    return maps, rest


def _check_lse(lse, q: Tensor) -> Tensor:
    B, Hq, N, _ = q.shape
    if not isinstance(lse, Tensor):
        raise TypeError(f"lse must be a torch.Tensor or None, got {type(lse).__name__}")
    if tuple(lse.shape) != (B, Hq, N):
        raise ValueError(f"lse must have shape (B, Hq, N) = ({B}, {Hq}, {N}) to match q "
                         f"{_shape(q)}, got {_shape(lse)}")
    if not lse.dtype.is_floating_point or lse.device != q.device:
        raise ValueError(f"lse must be a floating tensor on {q.device}, got {lse.dtype} on "
                         f"{lse.device}")
    return lse.detach()


def _check_maps_out(maps_out: Tensor, q: Tensor, query_index: Tensor, visual_index: Tensor):
    shape = (q.shape[0], query_index.shape[1], visual_index.shape[1])
    if not isinstance(maps_out, Tensor):
        raise TypeError(f"maps_out must be a torch.Tensor, got {type(maps_out).__name__}")
    if tuple(maps_out.shape) != shape or maps_out.dtype != torch.float32:
        raise ValueError(f"maps_out must be a float32 tensor of shape (B, Qmax, Vmax) = {shape}, "
                         f"got {maps_out.dtype} {_shape(maps_out)}")
    if not maps_out.is_contiguous() or maps_out.device != q.device:
        raise ValueError(f"maps_out must be contiguous and on {q.device}")


@torch.no_grad()
def teacher_attention_with_visual_maps(q: Tensor, k: Tensor, v: Tensor, layout, *args,
                                       scale: float | None = None,
                                       maps_out: Tensor | None = None, weight: float = 1.0,
                                       ) -> tuple[Tensor, Tensor]:
    """Teacher layer: attention output and visual map without gradient.

    Layout arguments as :func:`attention_with_visual_maps` (``scale`` may follow them
    positionally). Without ``maps_out`` returns ``(out, weight * A)`` (a fresh buffer); with
    ``maps_out`` (float32, contiguous, (B, Qmax, Vmax)) adds ``weight * A`` into it in place
    and returns ``(out, maps_out)``, so a window of teacher layers is averaged without
    extra buffers.
    """
    layout, opts = _layout_args("teacher_attention_with_visual_maps", layout, args,
                                dict(scale=scale))
    _check_qkv(q, k, v)
    return _teacher(q, k, v, layout, opts["scale"], maps_out, weight)


@torch.no_grad()
def teacher_visual_maps(q: Tensor, k: Tensor, layout, *args, scale: float | None = None,
                        maps_out: Tensor | None = None, weight: float = 1.0) -> Tensor:
    """:func:`teacher_attention_with_visual_maps` without v: only the (accumulated) map."""
    layout, opts = _layout_args("teacher_visual_maps", layout, args, dict(scale=scale))
    _check_qkv(q, k, None)
    return _teacher(q, k, None, layout, opts["scale"], maps_out, weight)[1]


def _teacher(q, k, v, layout, scale, maps_out, weight):
    index, key_mask, causal = _check_layout(q, layout)
    window = _window(layout, causal)
    scale = _scale(q, scale)
    if not isinstance(weight, (int, float)):
        raise TypeError(f"weight must be a float, got {type(weight).__name__}")
    if maps_out is None:
        # A fresh map: the gathered pass writes it once, in the maps' dtype (no zero fill).
        out, _, maps = torch.ops.compodistill.attention_fwd(q, k, v, key_mask, *index, causal,
                                                            scale, True, window)
        return out, (maps if weight == 1.0 else maps * weight)
    _check_maps_out(maps_out, q, index[0], index[2])
    out = torch.ops.compodistill.teacher_attention_maps_(maps_out, q, k, v, key_mask, *index,
                                                         causal, scale, float(weight), window)
    return out, maps_out
