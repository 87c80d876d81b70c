"""Deprecated: the visual-attention reference moved to :mod:`compodistill.testing.visual_attention`; this alias will be removed."""
import importlib
import sys
import warnings

warnings.warn("compodistill.testing.reference is deprecated; import compodistill.testing.visual_attention instead", DeprecationWarning, stacklevel=2)
# The old name is the new module itself, so every name (and identity) stays the same.
sys.modules[__name__] = importlib.import_module("compodistill.testing.visual_attention")
