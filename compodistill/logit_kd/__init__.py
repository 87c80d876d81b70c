"""Logit distillation (definitions: docs/logit_kd.md).

- :mod:`.from_logits`: :func:`logit_distillation_loss` and :func:`rdist_loss` on logits you have.
- :mod:`.linear`: :func:`linear_distillation_loss` from hidden states and lm_head weights, so
  neither model's (tokens × vocab) logits exist.
- :mod:`.module`: :class:`FusedLinearKDLoss`, the same with Liger-Kernel's names and the
  Hugging Face / TRL label conventions.
"""
from .from_logits import (IGNORE_INDEX, LOSSES, POSITIONS, logit_distillation_loss, rdist_loss,
                          shift_labels)
from .linear import LinearDistillationLoss, linear_distillation_loss
from .module import FusedLinearKDLoss

__all__ = ["logit_distillation_loss", "rdist_loss", "shift_labels", "linear_distillation_loss",
           "LinearDistillationLoss", "FusedLinearKDLoss", "IGNORE_INDEX", "LOSSES", "POSITIONS"]
