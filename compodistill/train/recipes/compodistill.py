"""CompoDistill (docs/stages.md): LM + fused logit KD + visual-attention alignment, TAF student."""
from __future__ import annotations

from .base import Recipe, RecipeFacts, StageParts

# DPT trains the TAF post-connector with LM + KD; DFT adds LoRA and VAT; SFT trains a fresh
# LoRA on the LM loss alone (every stage's LoRA is merged when it ends).
FACTS = RecipeFacts(
    terms=("lm", "kd", "vat"),
    stage_defaults={
        "dpt": dict(trainable="post_connector", weights=dict(lm=1.0, kd=1.0), batch_size=256),
        "dft": dict(trainable="lora+post_connector", weights=dict(lm=1.0, kd=1.0, vat=1.0),
                    batch_size=128),
        "sft": dict(trainable="lora", weights=dict(lm=1.0), batch_size=192),
    },
    default_stages=("dpt", "dft", "sft"),
    taf=True)


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
