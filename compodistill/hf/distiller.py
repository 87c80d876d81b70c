"""Visual-attention distillation (VAT) between two Hugging Face models.

Definitions: docs/layer_matching.md and docs/visual_attention.md.

>>> distiller = AttentionDistiller(student, teacher, image_token_id=cfg.image_token_id)
>>> with distiller.capture(input_ids, attention_mask=mask) as cap:
...     with torch.no_grad():
...         teacher(input_ids=input_ids, pixel_values=pixels, attention_mask=mask)
...     out = student(input_ids=input_ids, pixel_values=pixels, attention_mask=mask,
...                   labels=labels)
>>> loss = out.loss + cap.loss()

The distiller switches both language models to the ``"compodistill"`` attention
(:mod:`compodistill.hf.attention`). During the teacher forward only the teacher layers some
target needs are captured, and group targets are accumulated as running window sums, so
at most one (B, |Q|, Nv) buffer per student layer is kept, never one per teacher layer
(adaptive matching keeps each candidate: it has to compare them). During the student
forward the chosen student layers return differentiable maps; :meth:`Capture.loss` turns
them into the VAT loss.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ..visual_attention.layout import QueryArg, VisualLayout, visual_layout
from ..visual_attention.map_losses import check_map_loss_options, visual_map_loss
from ..matching import LayerMatch, adaptive_select, match_layers
from .families import check_supported, visual_token_ids
from .attention import (ATTN_IMPLEMENTATION, SiteCapture, decoder_attention_modules,
                        enable_attention, install_checkpoint_context)

__all__ = ["AttentionDistiller", "Capture"]

LAYER_REDUCTIONS = ("mean", "sum")


def _visual_token_ids(model: nn.Module, given) -> tuple[int, ...]:
    """``image_token_id=`` when given (an id or a sequence of ids), else the image and video
    placeholder ids of the model's own config (docs/families.md)."""
    if given is not None:
        return tuple(int(t) for t in given) if isinstance(given, (list, tuple)) else (int(given),)
    return visual_token_ids(model)


class AttentionDistiller:
    """Aligns the student's visual attention with the teacher's (docs/layer_matching.md).

    Args:
        student, teacher: Hugging Face models (causal LM, ``LlavaForConditionalGeneration``
            or PEFT wrappers). Their language models are switched to the ``"compodistill"``
            attention (``enable=False`` to leave that to the caller).
        image_token_id: token id (or ids) of visual placeholders in ``input_ids``; by
            default each model's image and video token ids from its config
            (docs/families.md). Not needed when :meth:`capture` gets a
            ``visual_mask``.
        student_layers, teacher_layers: explicit 0-based layer lists; else ``preset``.
        preset: ``"intermediate"`` (paper default), ``"early"``, ``"late"`` or ``"all"``,
            resolved from each model's depth (:func:`compodistill.matching.layer_preset`).
        matching: ``"group"``, ``"simple"`` or ``"adaptive"`` (:func:`match_layers`).
        query: rows entering the loss, ``"all"`` (paper), ``"visual"`` (official code),
            ``"text"``; a per-batch (B, N) mask can be given to :meth:`capture` instead.
        loss, cosine, distribution, beta: see :func:`compodistill.visual_map_loss`.
        layer_reduction: ``"mean"`` over matched layers (paper) or ``"sum"`` (official code).
        sample_reduction: ``"mean"`` or ``"sum"`` over contributing samples of each layer.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, *,
                 image_token_id: int | Sequence[int] | None = None,
                 student_layers: Sequence[int] | None = None,
                 teacher_layers: Sequence[int] | None = None, preset: str = "intermediate",
                 matching: str = "group", query: QueryArg = "all", loss: str = "cosine",
                 cosine: str = "flat", distribution: str = "renorm", beta: float = 0.5,
                 layer_reduction: str = "mean", sample_reduction: str = "mean",
                 enable: bool = True):
        if sample_reduction not in ("mean", "sum"):
            raise ValueError(f"sample_reduction must be 'mean' or 'sum', got {sample_reduction!r}")
        check_map_loss_options(loss, cosine, distribution, beta, sample_reduction)
        if layer_reduction not in LAYER_REDUCTIONS:
            raise ValueError(f"layer_reduction must be one of {LAYER_REDUCTIONS}, "
                             f"got {layer_reduction!r}")
        self.student, self.teacher = student, teacher
        self.student_attention = decoder_attention_modules(student)
        self.teacher_attention = decoder_attention_modules(teacher)
        self.matches: list[LayerMatch] = match_layers(
            len(self.student_attention), len(self.teacher_attention), mode=matching,
            preset=preset, student_layers=student_layers, teacher_layers=teacher_layers)
        self.matching, self.query = matching, query
        self.loss_options = dict(loss=loss, cosine=cosine, distribution=distribution, beta=beta,
                                 reduction=sample_reduction)
        self.layer_reduction = layer_reduction
        check_supported(student, "student")
        check_supported(teacher, "teacher")
        self.student_visual_ids = _visual_token_ids(student, image_token_id)
        self.teacher_visual_ids = _visual_token_ids(teacher, image_token_id)
        # Sites: which attention module reports which (role, layer).
        self._sites: dict[nn.Module, tuple[str, int]] = {}
        for m in self.matches:
            self._sites[self.student_attention[m.student_layer]] = ("student", m.student_layer)
            for t in m.teacher_layers:
                self._sites[self.teacher_attention[t]] = ("teacher", t)
        if enable:
            enable_attention(student)
            enable_attention(teacher)

    @property
    def student_layers(self) -> list[int]:
        return [m.student_layer for m in self.matches]

    @property
    def teacher_layers(self) -> list[int]:
        """Every teacher layer some target needs (the only ones captured)."""
        return sorted({t for m in self.matches for t in m.teacher_layers})

    def _visual_mask(self, role: str, input_ids, visual_mask) -> torch.Tensor:
        if visual_mask is not None:
            return visual_mask
        if input_ids is None:
            raise ValueError(f"capture needs input_ids (to find image tokens) or visual_mask "
                             f"for the {role}")
        tokens = self.student_visual_ids if role == "student" else self.teacher_visual_ids
        if not tokens:
            raise ValueError(f"no image_token_id for the {role}: pass image_token_id= to the "
                             f"distiller or visual_mask= to capture()")
        return torch.isin(input_ids, torch.tensor(tokens, device=input_ids.device))

    def capture(self, input_ids: torch.Tensor | None = None, *,
                attention_mask: torch.Tensor | None = None,
                visual_mask: torch.Tensor | None = None, query: QueryArg | None = None,
                teacher_input_ids: torch.Tensor | None = None,
                teacher_attention_mask: torch.Tensor | None = None,
                teacher_visual_mask: torch.Tensor | None = None) -> "Capture":
        """A context in which one teacher forward and one student forward are captured.

        Args:
            input_ids: (B, N) token ids the student (and, by default, the teacher) runs on;
                image positions are the visual placeholder ids (several images per
                sample and samples without images are fine).
            attention_mask: (B, N) padding mask passed to the models (1 = real token).
            visual_mask: (B, N) bool image positions, instead of looking up the token id.
            query: overrides the distiller's ``query`` for this batch (e.g. a (B, N) mask).
            teacher_input_ids, teacher_attention_mask, teacher_visual_mask: when the
                teacher is fed different tensors (another tokenizer); they must line up
                with the student's: same (B, N), same image positions, same padding.

        Raises:
            ValueError: inputs that do not line up, naming the shapes or the first sample
                that differs.
        """
        if input_ids is None and visual_mask is None:
            raise ValueError("capture needs input_ids or visual_mask")
        ref = input_ids if input_ids is not None else visual_mask
        if ref.dim() != 2:
            raise ValueError(f"input_ids / visual_mask must be (B, N), got {tuple(ref.shape)}")
        b, n = ref.shape
        vis_s = self._visual_mask("student", input_ids, visual_mask)
        t_ids = input_ids if teacher_input_ids is None else teacher_input_ids
        if teacher_visual_mask is None and teacher_input_ids is None and \
                self.teacher_visual_ids == self.student_visual_ids:
            vis_t = vis_s
        else:
            vis_t = self._visual_mask("teacher", t_ids, teacher_visual_mask)
        t_mask = attention_mask if teacher_attention_mask is None else teacher_attention_mask
        _check_lineup(vis_s, vis_t, attention_mask, t_mask)
        layout = visual_layout(vis_s, b, n, query=self.query if query is None else query,
                               attention_mask=attention_mask, causal=True, device=ref.device)
        return Capture(self, layout)


def _check_lineup(vis_s, vis_t, mask_s, mask_t) -> None:
    if tuple(vis_s.shape) != tuple(vis_t.shape):
        raise ValueError(f"teacher inputs have shape (B, N) = {tuple(vis_t.shape)} but the "
                         f"student's have {tuple(vis_s.shape)}: teacher and student must see "
                         f"the same sequence length")
    diff = (vis_s.bool() != vis_t.bool()).any(dim=1)
    if bool(diff.any()):
        b = int(diff.nonzero()[0])
        raise ValueError(f"teacher and student image-token positions differ in sample {b} "
                         f"({int(vis_t[b].sum())} vs {int(vis_s[b].sum())} image tokens): "
                         f"different tokenizers or image_token_ids?")
    if (mask_s is None) != (mask_t is None) or (
            mask_s is not None and not torch.equal(mask_s.bool(), mask_t.bool())):
        raise ValueError("teacher and student attention masks differ; they must pad the same "
                         "positions")


class Capture(SiteCapture):
    """One step's captured maps; a context manager made by :meth:`AttentionDistiller.capture`.

    Attributes:
        layout: the :class:`~compodistill.visual_attention.layout.VisualLayout` of the batch.
        choices: for adaptive matching, after :meth:`loss`, the chosen teacher layer per
            student layer.
        layer_losses: after :meth:`loss`, ``{student_layer: per-layer map loss}``, detached
            (the terms :meth:`loss` reduces; empty before). Logging them costs nothing.
    """

    def __init__(self, distiller: AttentionDistiller, layout: VisualLayout):
        self.distiller = distiller
        self._layout = layout
        self.choices: dict[int, int] = {}
        self._student: dict[int, torch.Tensor] = {}
        self._teacher_seen: set[int] = set()
        self._teacher_maps: dict[int, torch.Tensor] = {}   # simple / adaptive
        matches = distiller.matches
        self._group = distiller.matching == "group"
        self._windows: list[torch.Tensor | None] = [None] * len(matches)
        self._windows_of: dict[int, list[int]] = {}
        for j, m in enumerate(matches):
            for t in m.teacher_layers:
                self._windows_of.setdefault(t, []).append(j)
        self._loss: torch.Tensor | None = None
        self._layer_losses: dict[int, torch.Tensor] = {}
        self.checked_masks: list = []  # model masks already compared with the layout

    @property
    def layout(self) -> VisualLayout:
        return self._layout

    @property
    def layer_losses(self) -> dict[int, torch.Tensor]:
        """``{student_layer: detached per-layer map loss}`` once :meth:`loss` ran, else ``{}``."""
        return dict(self._layer_losses)

    # -- CaptureSink protocol (called from the attention function) ------------------------
    def site(self, module: nn.Module):
        return self.distiller._sites.get(module)

    def layout_for(self, role: str) -> VisualLayout:
        return self._layout

    def window_target(self, role: str, layer: int, like: torch.Tensor) -> torch.Tensor | None:
        """The running window sum a teacher layer's map can be added into in place (the
        kernel's ``maps_out``), or None. Only for group matching, and only for a layer in
        exactly one window: a layer shared by several windows is computed once and added to
        each by :meth:`store`."""
        if role != "teacher" or not self._group or layer in self._teacher_seen:
            return None
        windows = self._windows_of.get(layer, [])
        if len(windows) != 1:
            return None
        j = windows[0]
        if self._windows[j] is None:
            self._windows[j] = torch.zeros(self._layout.map_shape, dtype=torch.float32,
                                           device=like.device)
        return self._windows[j]

    def store(self, role: str, layer: int, maps: torch.Tensor, accumulated: bool = False
              ) -> None:
        """Keep a layer's map; ``accumulated``: the kernel already added it into the buffer
        :meth:`window_target` gave."""
        if role == "student":
            self._student[layer] = maps  # a re-run overwrites: never counted twice
            return
        if layer in self._teacher_seen:
            raise ValueError(f"teacher layer {layer} ran twice inside one capture; run the "
                             f"teacher forward once per capture")
        self._teacher_seen.add(layer)
        if accumulated:
            return
        if not self._group:
            # Kept in its own dtype (a bf16 model's Triton maps are bf16): the map loss reads
            # it as it is, and a float32 copy would double the bytes it moves.
            self._teacher_maps[layer] = maps
            return
        # Running window sums (float32), no per-layer storage.
        for j in self._windows_of[layer]:
            acc = self._windows[j]
            self._windows[j] = (maps.to(torch.float32, copy=True) if acc is None
                                else acc.add_(maps))

    def held_targets(self) -> dict[str, int]:
        """What the capture holds for the teacher right now, before :meth:`loss` frees it.

        ``{"windows": running window sums, "layers": per-layer teacher maps, "bytes": total}``.
        Group matching keeps one window sum per student layer and no per-layer map; simple and
        adaptive keep one map per teacher layer.
        """
        windows = [w for w in self._windows if w is not None]
        layers = list(self._teacher_maps.values())
        return {"windows": len(windows), "layers": len(layers),
                "bytes": sum(t.numel() * t.element_size() for t in windows + layers)}

    # -- context manager -------------------------------------------------------------------
    def __enter__(self) -> "Capture":
        d = self.distiller
        for role, mods in (("student", d.student_attention), ("teacher", d.teacher_attention)):
            impl = getattr(getattr(mods[0], "config", None), "_attn_implementation", None)
            if impl != ATTN_IMPLEMENTATION:
                raise ValueError(f"the {role}'s language model uses attn_implementation="
                                 f"{impl!r}; call compodistill.hf.enable_attention(model) (or "
                                 f"build the distiller with enable=True)")
        install_checkpoint_context(d.student)
        install_checkpoint_context(d.teacher)
        return super().__enter__()

    # -- loss ------------------------------------------------------------------------------
    def _target(self, j: int, match: LayerMatch, student_map: torch.Tensor) -> torch.Tensor:
        if self._group:
            return self._windows[j] / len(match.teacher_layers)
        candidates = [self._teacher_maps[t] for t in match.teacher_layers]
        if len(candidates) == 1:
            return candidates[0]
        pick = adaptive_select(student_map, candidates)
        self.choices[match.student_layer] = match.teacher_layers[pick]
        return candidates[pick]

    def _check_complete(self) -> None:
        d = self.distiller
        hint = (" inside the capture (with attn_implementation='compodistill' and the "
                "capture's input_ids)")
        if not self._teacher_seen:
            raise ValueError("the teacher forward did not run" + hint)
        if not self._student:
            raise ValueError("the student forward did not run" + hint)
        missing_t = sorted(set(d.teacher_layers) - self._teacher_seen)
        if missing_t:
            raise ValueError(f"teacher layers {missing_t} were not captured" + hint)
        missing_s = sorted(set(d.student_layers) - set(self._student))
        if missing_s:
            raise ValueError(f"student layers {missing_s} were not captured" + hint)

    def layer_maps(self) -> list[tuple[LayerMatch, torch.Tensor, torch.Tensor]]:
        """``(match, student_map, target_map)`` per matched layer, before :meth:`loss` frees the
        targets: the (B, Qmax, Vmax) maps the loss compares (for inspection, e.g.
        ``compodistill inspect``). The student map keeps its graph; the target is detached.
        """
        if self._loss is not None:
            raise ValueError("layer_maps() must be called before loss(), which frees the "
                             "teacher targets")
        self._check_complete()
        out = []
        for j, match in enumerate(self.distiller.matches):
            student_map = self._student[match.student_layer]
            out.append((match, student_map, self._target(j, match, student_map).detach()))
        return out

    def loss(self) -> torch.Tensor:
        """The VAT loss: mean (or sum) over matched layers of the per-layer map loss.

        Differentiable w.r.t. the student; the teacher targets carry no gradient and the
        adaptive choice is made without gradient. Computed once; later calls return the
        same tensor.
        """
        if self._loss is not None:
            return self._loss
        self._check_complete()
        d = self.distiller
        terms = []
        for j, match in enumerate(d.matches):
            student_map = self._student[match.student_layer]
            target = self._target(j, match, student_map)
            terms.append(visual_map_loss(student_map, target, self._layout, **d.loss_options))
        self._layer_losses = {m.student_layer: t.detach() for m, t in zip(d.matches, terms)}
        total = torch.stack(terms).sum()
        self._loss = total / len(terms) if d.layer_reduction == "mean" else total
        # The targets are no longer needed; the student maps stay referenced by the graph.
        self._windows = [None] * len(self._windows)
        self._teacher_maps.clear()
        self.checked_masks.clear()
        return self._loss
