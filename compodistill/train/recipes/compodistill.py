"""CompoDistill (docs/stages.md): LM + fused logit KD + visual-attention alignment, TAF student."""
from __future__ import annotations

from ..stages import HiddenStates, StageLosses
from .base import Recipe, StageParts


class CompoDistillRecipe(Recipe):
    """The trainer's original behaviour: :class:`StageLosses` on :class:`HiddenStates`."""

    name = "compodistill"

    def stage_parts(self, trainer, student, params, stage, stage_dir) -> StageParts:
        losses = StageLosses(student, trainer.teacher, stage, trainer.config, trainer.acc)
        return StageParts(HiddenStates(student), params, losses)
