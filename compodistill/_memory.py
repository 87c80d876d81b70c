"""Deprecated: moved to :mod:`compodistill.testing.memory`; this alias will be removed."""
import importlib
import sys
import warnings

warnings.warn("compodistill._memory is deprecated; import compodistill.testing.memory instead",
              DeprecationWarning, stacklevel=2)
sys.modules[__name__] = importlib.import_module("compodistill.testing.memory")
