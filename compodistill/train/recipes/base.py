"""The recipe interface the trainer calls (see :mod:`compodistill.train.recipes`)."""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from torch import nn

from .facts import RecipeFacts  # noqa: F401  (part of the interface)

if TYPE_CHECKING:  # the trainer imports the recipes, not the other way round at import time
    from ..config import StageConfig
    from ..engine import StageResult
    from ..trainer import CompoDistillTrainer


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
