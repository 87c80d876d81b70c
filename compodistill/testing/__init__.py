"""Test helpers for compodistill, shipped with the package so users and tests share them.

- :mod:`compodistill.testing.visual_attention`: plain float32 PyTorch references of every
  visual-attention quantity (attention probabilities, visual maps, losses, layer matching).
  They materialise attention and import nothing else from the library.
- :mod:`compodistill.testing.logit_kd`: the same for logit distillation.
- :mod:`compodistill.testing.teacher_cache`: the cache's top-k targets and top-k KD loss.
- :mod:`compodistill.testing.accuracy`: the project's accuracy rule.
"""
from .visual_attention import *  # noqa: F401,F403
from .visual_attention import __all__ as _attention_all
from .logit_kd import *  # noqa: F401,F403
from .logit_kd import __all__ as _logit_all

from .teacher_cache import *  # noqa: F401,F403
from .teacher_cache import __all__ as _cache_all

__all__ = [*_attention_all, *_logit_all, *_cache_all]
