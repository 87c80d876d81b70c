"""Test helpers for compodistill.

:mod:`compodistill.testing.reference` holds the plain float32 PyTorch reference of every
visual-attention quantity (attention probabilities, visual maps, losses, layer matching).
It materialises attention and is independent of the rest of the library; the fast paths
are tested against it.
"""
from .reference import *  # noqa: F401,F403
from .reference import __all__  # noqa: F401
