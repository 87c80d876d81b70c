"""Deprecated: the visual layout moved to :mod:`compodistill.visual_attention.layout`; this alias will be removed."""
import importlib
import sys
import warnings

warnings.warn("compodistill.layout is deprecated; import compodistill.visual_attention.layout instead", DeprecationWarning, stacklevel=2)
# The old name is the new module itself, so every name (and identity) stays the same.
sys.modules[__name__] = importlib.import_module("compodistill.visual_attention.layout")
