"""The recipe interface the trainer calls (see :mod:`compodistill.train.recipes`)."""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from torch import nn

if TYPE_CHECKING:  # the trainer imports the recipes, not the other way round at import time
    from ..config import StageConfig
    from ..engine import StageResult
    from ..trainer import CompoDistillTrainer


@dataclass(frozen=True)
class RecipeFacts:
    """What a recipe is, as the config sees it (read before any model loads).

    Attributes:
        terms: the loss terms it computes; a stage giving another term a weight is an error.
        stage_defaults: per stage kind (``dpt``/``dft``/``sft``), the :class:`StageConfig`
            fields it sets (``trainable``, ``weights``, ``lr``, ``batch_size``...); a kind it
            leaves out falls back to ``{"trainable": "lora", "weights": {"lm": 1.0}}``.
        default_stages: the stage chain when the config names none.
        taf: whether the student gets TAF when the config does not say.
        families: the trainer families (``compodistill.hf.families``) it runs on; None: every
            one. A LLaVA-only recipe sets ``("llava",)`` and is refused for another family
            with a ``ConfigError`` naming ``recipe`` and the family.
    """

    terms: tuple
    stage_defaults: dict
    default_stages: tuple
    taf: bool = False
    families: tuple | None = None

    def stage_default(self, kind: str) -> dict:
        base = self.stage_defaults.get(kind, {"trainable": "lora", "weights": {"lm": 1.0}})
        return {**base, "weights": dict(base.get("weights", {"lm": 1.0}))}


@dataclass
class StageParts:
    """What one stage hands the engine.

    Attributes:
        module: wrapped by accelerate and called as ``module(input_ids, attention_mask,
            pixel_values)``; every trainable parameter must live inside it (DDP/FSDP sync).
        params: the parameters the optimiser updates.
        losses: ``loss_terms(prepared_module, batch) -> {name: scalar}``; the engine weighs each
            term by the stage weight of the same name.
        extras: recipe-private objects kept for :meth:`Recipe.after_stage` (e.g. a projector).
    """

    module: nn.Module
    params: list
    losses: Callable[[nn.Module, dict], dict]
    extras: dict = field(default_factory=dict)


class Recipe(ABC):
    """One distillation method as a variant of :class:`CompoDistillTrainer`.

    Subclasses override :meth:`stage_parts` (losses, extra trainable modules),
    :meth:`after_stage` (save what is not part of the student) and, for methods that are not
    a chain of stages (CoMD), :meth:`run`.
    """

    name = "base"
    facts: RecipeFacts  # every concrete recipe sets it (the config reads it by name)

    @abstractmethod
    def stage_parts(self, trainer: "CompoDistillTrainer", student: nn.Module, params: list,
                    stage: "StageConfig", stage_dir: Path) -> StageParts:
        """Build the module, parameters and loss function of one stage.

        ``student`` is the model after ``prepare_trainable`` (a peft model when LoRA is on) and
        ``params`` its trainable parameters.
        """

    def after_stage(self, trainer: "CompoDistillTrainer", parts: StageParts,
                    stage: "StageConfig", stage_dir: Path) -> None:
        """Called after the loop, before the stage's ``model/`` is written (marks it done)."""

    def run(self, trainer: "CompoDistillTrainer", stages: list[str] | None
            ) -> list["StageResult"]:
        """The whole run; default: the trainer's stage chain."""
        return trainer.run_chain(stages)
