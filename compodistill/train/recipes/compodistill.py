"""CompoDistill (docs/stages.md): LM + fused logit KD + visual-attention alignment, TAF student."""
from __future__ import annotations

from .base import Recipe, StageParts
from .facts import COMPODISTILL as FACTS


class CompoDistillRecipe(Recipe):
    """The trainer's original behaviour: :class:`StageLosses` on :class:`HiddenStates`."""

    name = "compodistill"
    facts = FACTS

    def stage_parts(self, trainer, student, params, stage, stage_dir) -> StageParts:
        from ..stages import HiddenStates, StageLosses

        cache = getattr(trainer, "teacher_cache", None)
        needs_teacher = stage.weights.kd or stage.weights.vat
        if cache is not None and needs_teacher:  # the targets come from the teacher cache
            losses = cache.stage_losses(student, stage, trainer.config, trainer.acc)
        else:
            losses = StageLosses(student, trainer.teacher, stage, trainer.config, trainer.acc)
        return StageParts(HiddenStates(student), params, losses)
