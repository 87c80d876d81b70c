"""Test helpers for compodistill, shipped with the package so users and tests share them.

- :mod:`compodistill.testing.reference`: plain float32 PyTorch references of every
  visual-attention quantity (attention probabilities, visual maps, losses, layer matching).
  They materialise attention and import nothing else from the library.
- :mod:`compodistill.testing.reference_logits`: the same for logit distillation.
- :mod:`compodistill.testing.accuracy`: the project's accuracy rule.
"""
from .reference import *  # noqa: F401,F403
from .reference import __all__ as _attention_all
from .reference_logits import *  # noqa: F401,F403
from .reference_logits import __all__ as _logit_all

__all__ = [*_attention_all, *_logit_all]
