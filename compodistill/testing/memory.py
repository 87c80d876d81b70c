"""Peak tensor memory of a block of code, on CPU as well as CUDA.

CUDA has an allocator counter. On CPU there is none, so a dispatch mode adds up the
bytes of every storage an op creates and subtracts them when the storage is freed;
the peak of that sum is the working memory the computation needed.
"""
from __future__ import annotations

import contextlib
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class _StorageTracker(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self._seen: set[int] = set()

    def _release(self, key: int, nbytes: int) -> None:
        self._seen.discard(key)
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if not isinstance(t, torch.Tensor) or t.device.type != "cpu":
                continue
            storage = t.untyped_storage()
            key = storage.data_ptr()
            if key in self._seen or storage.nbytes() == 0:
                continue
            self._seen.add(key)
            self.live += storage.nbytes()
            self.peak = max(self.peak, self.live)
            weakref.finalize(storage, self._release, key, storage.nbytes())
        return out


class PeakMemory:
    """Result holder: ``bytes`` is set when the ``with`` block ends."""

    bytes: int = 0

    @property
    def mib(self) -> float:
        return self.bytes / 2**20


@contextlib.contextmanager
def peak_memory(device: torch.device | str = "cpu"):
    """``with peak_memory(dev) as m: ...`` then ``m.mib``: extra memory the block peaked at."""
    device = torch.device(device)
    result = PeakMemory()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        yield result
        torch.cuda.synchronize(device)
        result.bytes = torch.cuda.max_memory_allocated(device) - base
        return
    tracker = _StorageTracker()
    with tracker:
        yield result
    result.bytes = tracker.peak
