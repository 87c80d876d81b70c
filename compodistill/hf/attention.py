"""A ``"compodistill"`` attention implementation for Hugging Face transformers (v5).

Registering it (done on import of :mod:`compodistill.hf`) adds one entry to transformers'
``AttentionInterface`` and one to ``AttentionMaskInterface``. The mask entry reuses sdpa's
mask builder: without it, transformers treats an unknown implementation as "builds its own
mask" and silently drops the padding mask.

Select it for the language model only, the vision tower keeps ``sdpa``::

    model.set_attn_implementation({"text_config": "compodistill", "vision_config": "sdpa"})
    # or, for any model (LLaVA or a plain causal LM):
    compodistill.hf.enable_attention(model)

Outside a capture (see :class:`compodistill.hf.AttentionDistiller`) every layer runs plain
SDPA, bit for bit what ``attn_implementation="sdpa"`` computes. Inside a capture, the layers
the capture asks for also return their head-mean visual map (docs/visual_attention.md): in one fused Triton
call on CUDA when the kernels are available (:func:`_fused_attention`, the only CUDA-specific
place), otherwise SDPA for the output plus the chunked visual-map path. Neither ever builds
the attention matrix, so ``output_attentions`` and eager attention are never needed.

Gradient checkpointing: the checkpoint recomputes a layer's forward during backward, when
the capture context has usually been left already. :func:`install_checkpoint_context` gives
every checkpointed layer a ``context_fn`` that restores the capture for the recomputation in
"replay" mode: the visual map is recomputed (so the saved tensors match the original forward)
and thrown away, never stored or counted twice.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import warnings
from typing import Callable, Protocol

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from .._backend import kernels_module, resolve_backend
from ..visual_attention.layout import VisualLayout
from ..visual_attention.api import visual_attention_maps

__all__ = ["ATTN_IMPLEMENTATION", "register", "enable_attention", "decoder_attention_modules",
           "compodistill_attention_forward", "activate", "install_checkpoint_context",
           "SiteCapture"]

ATTN_IMPLEMENTATION = "compodistill"

# The capture the current forward reports to (None: plain SDPA everywhere).
_ACTIVE: contextvars.ContextVar["CaptureSink | None"] = contextvars.ContextVar(
    "compodistill_capture", default=None)


class CaptureSink(Protocol):
    """What the attention function needs from a capture (implemented by the distiller)."""

    def site(self, module: nn.Module) -> tuple[str, int] | None:
        """``(role, layer)`` when this attention module's map is wanted, else None."""

    def layout_for(self, role: str) -> VisualLayout:
        """The visual layout of the batch the model of ``role`` is running on."""

    def store(self, role: str, layer: int, maps: torch.Tensor, accumulated: bool = False
              ) -> None:
        """Receive the (B, Qmax, Vmax) map of one captured layer (``accumulated``: already
        added into the buffer :meth:`window_target` gave)."""

    def window_target(self, role: str, layer: int, like: torch.Tensor) -> torch.Tensor | None:
        """Optional: a float32 buffer the kernel may add this layer's map into in place."""


class _Replay:
    """A capture seen from a checkpoint recomputation: same sites and layouts, no storing."""

    def __init__(self, sink: CaptureSink):
        self._sink = sink

    def site(self, module):
        return self._sink.site(module)

    def layout_for(self, role):
        return self._sink.layout_for(role)

    def store(self, role, layer, maps, accumulated=False):
        pass  # the original forward already stored this map

    def window_target(self, role, layer, like):
        return None  # recomputation never accumulates again


class SiteCapture:
    """The part of a capture sink every sink shares: a ``{module: (role, layer)}`` table of
    the attention modules it wants (``self.sites``), one batch layout (``self.layout``), no
    in-place window buffer, and a context that makes it the active capture. Subclasses add
    ``store`` and whatever they compute from the maps."""

    sites: dict
    layout: VisualLayout

    def site(self, module: nn.Module) -> tuple[str, int] | None:
        return self.sites.get(module)

    def layout_for(self, role: str) -> VisualLayout:
        return self.layout

    def window_target(self, role: str, layer: int, like: torch.Tensor) -> torch.Tensor | None:
        return None  # maps arrive one layer at a time through store()

    def __enter__(self):
        self._active = activate(self)
        self._active.__enter__()
        return self

    def __exit__(self, *exc):
        ctx, self._active = self._active, None
        return ctx.__exit__(*exc)


@contextlib.contextmanager
def activate(sink: CaptureSink | None):
    """Make ``sink`` the capture that attention calls in this context report to."""
    token = _ACTIVE.set(sink)
    try:
        yield sink
    finally:
        _ACTIVE.reset(token)


def register() -> None:
    """Register ``"compodistill"`` with transformers' attention and mask interfaces (idempotent)."""
    AttentionInterface.register(ATTN_IMPLEMENTATION, compodistill_attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)


def _decoder(model: nn.Module) -> nn.Module:
    return model.get_decoder() if hasattr(model, "get_decoder") else model


def decoder_attention_modules(model: nn.Module) -> list[nn.Module]:
    """The self-attention modules of the language model's decoder layers, in layer order.

    Works for causal LMs (Llama, Qwen2, ...), ``LlavaForConditionalGeneration`` (only the
    language model, never the vision tower) and PEFT wrappers of either.
    """
    decoder = _decoder(model)
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, nn.ModuleList) or not all(hasattr(l, "self_attn") for l in layers):
        raise ValueError(f"cannot find the decoder layers of {type(model).__name__}: expected "
                         f"get_decoder().layers to be a ModuleList of layers with .self_attn")
    return [layer.self_attn for layer in layers]


def enable_attention(model: nn.Module) -> nn.Module:
    """Switch the language model of ``model`` to the ``"compodistill"`` attention.

    Only the decoder's (text) config changes; a vision tower keeps its implementation.
    Equivalent to ``model.set_attn_implementation({"text_config": "compodistill"})`` for
    LLaVA and to ``model.set_attn_implementation("compodistill")`` for a causal LM.
    Returns ``model``.
    """
    register()
    top = model.get_base_model() if hasattr(model, "get_base_model") else model  # PEFT
    sub_configs = getattr(getattr(top, "config", None), "sub_configs", None) or {}
    if "text_config" in sub_configs and hasattr(top, "set_attn_implementation"):
        # per sub-config: each vision tower keeps its own attention (Qwen3-VL's varlen path)
        top.set_attn_implementation({"text_config": ATTN_IMPLEMENTATION})
        return model
    decoder = _decoder(model)
    if not hasattr(decoder, "set_attn_implementation"):
        raise ValueError(f"{type(decoder).__name__} is not a transformers PreTrainedModel")
    decoder.set_attn_implementation(ATTN_IMPLEMENTATION)
    return model


# --------------------------------------------------------------------------- attention

def _check_captured_call(module, query, key, layout: VisualLayout, role: str, attention_mask,
                         is_causal, kwargs) -> None:
    """Refuse calls whose attention pattern is not the layout's causal + padding pattern."""
    b, _, n, _ = query.shape
    if key.shape[2] != n:
        raise ValueError(f"{role} layer {module.layer_idx}: query length {n} != key length "
                         f"{key.shape[2]}; a capture needs a full forward without KV cache "
                         f"(use_cache=False, no generation)")
    if (layout.batch_size, layout.seq_len) != (b, n):
        raise ValueError(f"{role} forward runs on (B, N) = ({b}, {n}) but the capture was built "
                         f"for input_ids of shape ({layout.batch_size}, {layout.seq_len}); teacher "
                         f"and student must see the same batch (same tokenization and length)")
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    if not causal or not layout.causal:
        raise ValueError(f"{role} layer {module.layer_idx}: visual maps are defined for causal "
                         f"decoder attention only")
    if kwargs.get("softcap") is not None:
        raise ValueError(f"{role} layer {module.layer_idx}: attention softcapping is not supported")


def _check_mask(attention_mask, layout: VisualLayout, role: str, layer: int,
                window: int | None = None) -> None:
    """The model's mask must be the layout's on every query row: causal (within ``window``)
    plus the capture's padding mask.

    The fused layers rebuild exactly that pattern, so any other mask the model builds would
    give a wrong loss: a different ``attention_mask`` than the capture's, or a non-causal
    span such as Gemma 3's bidirectional attention among the tokens of one image (its
    ``token_type_ids``) or a prefix-LM. Compared on the gathered query rows only, so
    ``query="text"`` can still be served when the non-causal span lies on image rows.
    """
    b, n = layout.batch_size, layout.seq_len
    key_mask = layout.key_mask
    if attention_mask is None:
        if key_mask is not None and not bool(key_mask.all()):
            raise ValueError(f"{role} forward ran without padding mask but the capture's "
                             f"attention_mask has padding; pass the same attention_mask to both")
        return
    if attention_mask.dtype != torch.bool or attention_mask.dim() != 4:
        return  # not sdpa's boolean mask: nothing cheap to compare with
    device = attention_mask.device
    qi = layout.query_index.to(device)
    rows = attention_mask[:, 0].expand(b, n, n).gather(1, qi[:, :, None].expand(-1, -1, n))
    keys = torch.arange(n, device=device)
    expected = keys[None, None, :] <= qi[:, :, None]
    if window is not None:
        expected = expected & (qi[:, :, None] - keys[None, None, :] < window)
    if key_mask is not None:
        expected = expected & key_mask.to(device)[:, None, :]
    bad = (rows != expected) & layout.query_valid.to(device)[:, :, None]
    if not bool(bad.any()):
        return
    s, r, k = (int(x) for x in bad.nonzero()[0])
    q = int(qi[s, r])
    if bool(key_mask is None or key_mask[s, k]) and k > q and bool(rows[s, r, k]):
        raise ValueError(
            f"{role} layer {layer}: the model's attention mask lets query {q} of sample {s} "
            f"see the later key {k} (a non-causal span, e.g. bidirectional attention among "
            f"image tokens from Gemma 3's token_type_ids, or a prefix-LM); the fused layers "
            f"are causal and would give a wrong loss. Use query='text' when only image rows "
            f"attend bidirectionally, or run the models without token_type_ids")
    raise ValueError(f"{role} layer {layer}: the forward's attention mask differs from the "
                     f"capture's attention_mask (B, N) = ({b}, {n}) at sample {s}, query {q}, "
                     f"key {k}; pass the same mask to the model and to capture()")


# (role, layer, shape, reason) already warned about: each fallback warns once per process.
_WARNED: set = set()


def _served_backend(query: torch.Tensor, role: str, layer: int) -> str:
    """"triton", or "torch" (warned once) where the kernels cannot serve this layer's shape:
    a model never stops on a kernel limit, its layer runs the chunked PyTorch path."""
    # A kernel module without the check (a test's stand-in) serves every shape.
    check = getattr(kernels_module("autograd"), "unsupported_reason", None)
    reason = check(query) if check is not None else None
    if reason is None:
        return "triton"
    key = (role, layer, tuple(query.shape), str(query.dtype), reason)
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(f"{role} layer {layer}: the Triton kernels cannot serve q of shape "
                      f"{tuple(query.shape)} ({str(query.dtype).replace('torch.', '')}): "
                      f"{reason}; this layer runs the chunked PyTorch path", stacklevel=3)
    return "torch"


def _fused_attention(query, key, value, layout: VisualLayout, scale: float, role: str,
                     maps_out: torch.Tensor | None = None):
    """THE CUDA place: one Triton call for the attention output and the visual map.

    Returns ``(out (B, N, Hq, d), maps)``, or None when the kernel module lacks the entry
    point (the caller then falls back to SDPA plus the visual maps). Called only after the
    backend resolved to Triton.
    """
    autograd = kernels_module("autograd")
    # The layout object itself (the captured layout is causal: _check_captured_call).
    if role == "teacher" and hasattr(autograd, "teacher_attention_with_visual_maps"):
        # maps_out: the group window's running sum, added into in place by the kernel.
        extra = {} if maps_out is None else {"maps_out": maps_out}
        out, maps = autograd.teacher_attention_with_visual_maps(query, key, value, layout,
                                                                scale=scale, **extra)
    elif hasattr(autograd, "attention_with_visual_maps"):
        out, maps = autograd.attention_with_visual_maps(query, key, value, layout, scale=scale)
    else:
        return None
    return out.transpose(1, 2).contiguous(), maps


def compodistill_attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor,
                                   value: torch.Tensor, attention_mask: torch.Tensor | None,
                                   dropout: float = 0.0, scaling: float | None = None,
                                   is_causal: bool | None = None, **kwargs):
    """Attention function with transformers' ``AttentionInterface`` signature.

    ``query`` (B, Hq, N, d), ``key``/``value`` (B, Hkv, N, d) (GQA: never repeated here),
    ``attention_mask`` as built by sdpa's mask function. Returns ``(out (B, N, Hq, d), None)``.
    Layers the active capture does not ask for run :func:`sdpa_attention_forward` unchanged.
    """
    sink = _ACTIVE.get()
    site = sink.site(module) if sink is not None else None
    if site is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, is_causal=is_causal, **kwargs)
    role, layer = site
    layout = sink.layout_for(role)
    _check_captured_call(module, query, key, layout, role, attention_mask, is_causal, kwargs)
    # A sliding-window layer (Gemma 3's local layers): the same layout, windowed.
    layout = layout.with_window(kwargs.get("sliding_window"))
    checked = getattr(sink, "checked_masks", None)  # one mask per forward: check it once
    if checked is not None and not any(m is attention_mask for m in checked):
        _check_mask(attention_mask, layout, role, layer, layout.window)
        checked.append(attention_mask)
    scale = float(scaling) if scaling is not None else query.shape[-1] ** -0.5
    layout = layout.to(query.device)
    backend = resolve_backend("auto", query.device, "autograd")  # once per call
    if backend == "triton":
        backend = _served_backend(query, role, layer)
    target = None
    if backend == "triton" and dropout == 0.0:
        target = sink.window_target(role, layer, query)
    fused = (_fused_attention(query, key, value, layout, scale, role, target)
             if backend == "triton" and dropout == 0.0 else None)
    if fused is not None:
        out, maps = fused
    else:
        out, _ = sdpa_attention_forward(module, query, key, value, attention_mask,
                                        dropout=dropout, scaling=scaling, is_causal=is_causal,
                                        **kwargs)
        # The teacher gives targets only: never build a graph for them.
        with torch.no_grad() if role == "teacher" else contextlib.nullcontext():
            maps = visual_attention_maps(query, key, layout, scale=scale, backend=backend)
    if target is not None and fused is not None:
        sink.store(role, layer, maps, accumulated=True)
    else:
        sink.store(role, layer, maps if role == "student" else maps.detach())
    return out, None


# --------------------------------------------------------------------------- checkpointing

def _capture_contexts(sink: CaptureSink, inner: Callable | None):
    """``context_fn`` for torch.utils.checkpoint: forward as is, recompute in replay mode."""
    replay = activate(_Replay(sink))
    if inner is None:
        return contextlib.nullcontext(), replay
    forward_ctx, recompute_ctx = inner()  # the user's own context_fn, kept
    return forward_ctx, _Both(recompute_ctx, replay)


class _Both(contextlib.AbstractContextManager):
    """Enter two context managers as one (the user's recompute context, then ours)."""

    def __init__(self, first, second):
        self._stack = contextlib.ExitStack()
        self._first, self._second = first, second

    def __enter__(self):
        self._stack.enter_context(self._first)
        self._stack.enter_context(self._second)
        return self

    def __exit__(self, *exc):
        return self._stack.__exit__(*exc)


def _wrap_checkpoint_func(func: Callable) -> Callable:
    if getattr(func, "_compodistill_wrapped", False):
        return func
    keywords = getattr(func, "keywords", {}) or {}
    if keywords.get("use_reentrant", False):
        raise ValueError("gradient checkpointing with use_reentrant=True drops the gradient of "
                         "the captured attention maps; enable it with "
                         "activation_checkpointing_kwargs={'use_reentrant': False} (the "
                         "transformers default)")
    user_context_fn = keywords.get("context_fn")

    @functools.wraps(func)
    def checkpoint_with_capture(function, *args, **kwargs):
        sink = _ACTIVE.get()
        if sink is None or isinstance(sink, _Replay):
            return func(function, *args, **kwargs)
        kwargs["context_fn"] = functools.partial(_capture_contexts, sink, user_context_fn)
        return func(function, *args, **kwargs)

    checkpoint_with_capture._compodistill_wrapped = True
    return checkpoint_with_capture


def install_checkpoint_context(model: nn.Module) -> None:
    """Let checkpointed layers of ``model`` replay an active capture when recomputed.

    Call again after (re-)enabling gradient checkpointing (the distiller does it on every
    capture). A no-op for layers without checkpointing. Raises ValueError for reentrant
    checkpointing, under which the maps would get no gradient.
    """
    for module in model.modules():
        if getattr(module, "gradient_checkpointing", False) and \
                hasattr(module, "_gradient_checkpointing_func"):
            module._gradient_checkpointing_func = _wrap_checkpoint_func(
                module._gradient_checkpointing_func)


register()
