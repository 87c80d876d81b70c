"""Deprecated: the logit-KD reference moved to :mod:`compodistill.testing.logit_kd`; this alias will be removed."""
import importlib
import sys
import warnings

warnings.warn("compodistill.testing.reference_logits is deprecated; import compodistill.testing.logit_kd instead", DeprecationWarning, stacklevel=2)
# The old name is the new module itself, so every name (and identity) stays the same.
sys.modules[__name__] = importlib.import_module("compodistill.testing.logit_kd")
