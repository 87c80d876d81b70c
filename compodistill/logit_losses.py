"""Deprecated: logit KD from logits moved to :mod:`compodistill.logit_kd.from_logits`; this alias will be removed."""
import importlib
import sys
import warnings

warnings.warn("compodistill.logit_losses is deprecated; import compodistill.logit_kd.from_logits instead", DeprecationWarning, stacklevel=2)
# The old name is the new module itself, so every name (and identity) stays the same.
sys.modules[__name__] = importlib.import_module("compodistill.logit_kd.from_logits")
