"""LLAVADI (docs/stages.md): z-scored logit KL on all tokens + MSE between ``proj(h_s)`` and ``h_t``.

``proj`` is an MLP d_s → ``llavadi.proj_hidden`` (default 5120) → d_t with GELU, trained with
the student. It lives inside the module the engine wraps (so DDP syncs it and accelerate's
checkpoints resume it), is saved as ``<stage_dir>/feature_projector.safetensors`` next to the
stage's ``model/``, and is never part of the exported student: ``model/`` is a plain
checkpoint of the student's family. Widths come from each model's text config.
A later stage with ``feat`` starts from the latest earlier stage's projector.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from ...logit_kd.linear import linear_distillation_loss
from ..stages import HiddenStates, lm_head, lm_loss
from .base import Recipe, StageParts
from .facts import LLAVADI as FACTS
from .family import RecipeLosses, text_hidden_size

__all__ = ["FeatureProjector", "ProjectedHiddenStates", "LlavaDILosses", "LlavaDIRecipe",
           "PROJECTOR_FILE", "feature_mse"]

PROJECTOR_FILE = "feature_projector.safetensors"


class FeatureProjector(nn.Module):
    """``Linear(d_s, hidden) → GELU → Linear(hidden, d_t)``: student features, teacher space."""

    def __init__(self, d_s: int, d_t: int, hidden: int = 5120):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d_s, hidden), nn.GELU(), nn.Linear(hidden, d_t))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.net(h)


class ProjectedHiddenStates(HiddenStates):
    """:class:`HiddenStates` plus the projector: ``forward -> (h_s, proj(h_s))``."""

    def __init__(self, model: nn.Module, projector: FeatureProjector):
        super().__init__(model)
        self.projector = projector

    def forward(self, input_ids, attention_mask, pixel_values=None, **family_inputs):
        h = super().forward(input_ids, attention_mask, pixel_values, **family_inputs)
        return h, self.projector(h)


def feature_mse(projected: torch.Tensor, h_t: torch.Tensor,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error over the real tokens and every feature (float32, no teacher grad)."""
    diff = (projected.float() - h_t.detach().float()) ** 2
    if attention_mask is None:
        return diff.mean()
    keep = attention_mask.to(diff.device).bool()
    if not bool(keep.any()):
        return diff.sum() * 0.0
    return diff[keep].mean()


class LlavaDILosses(RecipeLosses):
    """``{"lm", "kd", "feat"}``: CE, z-scored KL over all real tokens, projected-feature MSE.

    KD always uses ``zscore=True, positions="all"`` (LLAVADI's definition); loss, temperature
    and beta come from ``config.kd``.
    """

    TEACHER_TERMS = ("kd", "feat")

    def __call__(self, prepared: nn.Module, batch: dict) -> dict:
        w = self.stage.weights
        labels, h_t, out, _ = self.forwards(prepared, batch)
        h_s, projected = out if isinstance(out, tuple) else (out, None)
        head_s = lm_head(self.student)
        if not self.need_teacher:
            return {"lm": lm_loss(h_s, head_s, labels)}
        head_t = lm_head(self.teacher)
        common = self.kd_options(batch, head_s, head_t, positions="all", zscore=True)
        args = (h_s, head_s.weight, h_t, head_t.weight, labels)
        terms = {}
        if w.lm:
            terms["lm"] = linear_distillation_loss(*args, ce_weight=1.0, kd_weight=0.0, **common)
        if w.kd:
            terms["kd"] = linear_distillation_loss(*args, **common)
        if w.feat:
            terms["feat"] = feature_mse(projected, h_t, batch["attention_mask"])
        return terms


class LlavaDIRecipe(Recipe):
    """LLAVADI: :class:`LlavaDILosses`; stages with ``feat`` train a :class:`FeatureProjector`."""

    name = "llavadi"
    facts = FACTS

    def _previous_projector(self, trainer, stage) -> Path | None:
        names = [s.name for s in trainer.config.stages]
        for earlier in reversed(trainer.config.stages[:names.index(stage.name)]):
            path = trainer.stage_dir(earlier) / PROJECTOR_FILE
            if path.exists():
                return path
        return None

    def stage_parts(self, trainer, student, params, stage, stage_dir) -> StageParts:
        losses = LlavaDILosses(student, trainer.teacher, stage, trainer.config, trainer.acc)
        if not stage.weights.feat:
            return StageParts(HiddenStates(student), params, losses)
        d_s, d_t = text_hidden_size(student), text_hidden_size(trainer.teacher)
        projector = FeatureProjector(d_s, d_t, trainer.config.llavadi.proj_hidden)
        previous = self._previous_projector(trainer, stage)
        if previous is not None:
            from safetensors.torch import load_file

            projector.load_state_dict(load_file(str(previous)))
        projector.to(next(student.parameters()).device)
        return StageParts(ProjectedHiddenStates(student, projector),
                          params + list(projector.parameters()), losses,
                          extras={"projector": projector})

    def after_stage(self, trainer, parts, stage, stage_dir) -> None:
        projector = parts.extras.get("projector")
        if projector is None or not trainer.acc.is_main_process:
            return
        from safetensors.torch import save_file

        state = {k: v.detach().cpu().contiguous() for k, v in projector.state_dict().items()}
        tmp = Path(stage_dir) / (PROJECTOR_FILE + ".tmp")
        save_file(state, str(tmp))
        os.replace(tmp, Path(stage_dir) / PROJECTOR_FILE)  # atomic: whole file or none
