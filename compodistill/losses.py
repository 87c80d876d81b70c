"""Deprecated: the visual-attention API moved to :mod:`compodistill.visual_attention.api`; this alias will be removed."""
import importlib
import sys
import warnings

warnings.warn("compodistill.losses is deprecated; import compodistill.visual_attention.api instead", DeprecationWarning, stacklevel=2)
# The old name is the new module itself, so every name (and identity) stays the same.
sys.modules[__name__] = importlib.import_module("compodistill.visual_attention.api")
