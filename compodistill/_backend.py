"""Backend choice: Triton kernels for CUDA tensors, chunked PyTorch on CPU.

``backend="auto"`` picks Triton when the tensors live on a CUDA device and the kernel
module imports, otherwise the chunked PyTorch path. ``"triton"`` on CPU tensors is allowed
only under ``TRITON_INTERPRET=1`` (the test suite runs the kernels that way). The
environment variable ``COMPODISTILL_BACKEND`` overrides ``"auto"`` for a whole run.

Kernel modules are imported as ``compodistill.kernels.<name>``.
"""
from __future__ import annotations

import importlib
import os
import sys
from types import ModuleType

import torch

BACKENDS = ("auto", "triton", "torch")


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def load_kernel_module(name: str) -> ModuleType:
    """Import ``compodistill.kernels.<name>``; ImportError when it or triton is missing."""
    return importlib.import_module(f"compodistill.kernels.{name}")


def kernels_module(name: str) -> ModuleType | None:
    """:func:`load_kernel_module`, or None when Triton (or the module) is unavailable."""
    try:
        module = load_kernel_module(name)
    except ImportError:
        return None
    return module if getattr(sys.modules.get("compodistill.kernels"), "HAS_TRITON", True) else None


def resolve_backend(backend: str, device: torch.device, kernel: str) -> str:
    """Return "triton" or "torch" for tensors on ``device``; ``kernel`` names the module."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        backend = os.environ.get("COMPODISTILL_BACKEND", "auto")
        if backend not in BACKENDS:
            raise ValueError(f"COMPODISTILL_BACKEND must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        use_triton = device.type == "cuda" and kernels_module(kernel) is not None
        return "triton" if use_triton else "torch"
    if backend == "triton":
        if device.type != "cuda" and not interpreting():
            raise ValueError(f"backend='triton' needs CUDA tensors (got {device}) or "
                             f"TRITON_INTERPRET=1 set before triton is imported")
        if kernels_module(kernel) is None:
            raise ImportError(f"backend='triton' needs triton and compodistill.kernels.{kernel}")
    return backend


def use_triton(backend: str, device: torch.device, kernel: str) -> bool:
    """Whether to run the Triton kernel module ``kernel`` for tensors on ``device``."""
    return resolve_backend(backend, device, kernel) == "triton"
