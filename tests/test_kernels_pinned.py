"""The deterministic mode pins an autotuned kernel to the first config this GPU can load.

The fit tables hold per target class (sm_80 stands for every 8.x), and sm_86/89 give a block
99 KB of shared memory against sm_80's 163 KB: a table config that does not load there
(Triton raises OutOfResources before the kernel runs) must give way to the next one, and the
same device must always get the same config. A stand-in kernel plays the GPU here.
"""
from __future__ import annotations

import pytest

triton = pytest.importorskip("triton")
from triton.runtime.errors import OutOfResources  # noqa: E402

from compodistill.kernels import _common  # noqa: E402


class _FakeFn:
    """``fn[grid](...)`` that refuses configs needing more shared memory than ``limit``."""

    def __init__(self, shared: dict[int, int], limit: int):
        self.shared, self.limit, self.ran = shared, limit, []

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            need = self.shared[kwargs["BLOCK_N"]]
            if need > self.limit:
                raise OutOfResources(need, self.limit, "shared memory")
            self.ran.append(kwargs["BLOCK_N"])
        return run


class _FakeKernel:
    def __init__(self, fn):
        self.fn = fn
        self.configs = [triton.Config({"BLOCK_N": n}, num_warps=8, num_stages=2)
                        for n in (64, 32)]


@pytest.fixture
def pinned(monkeypatch):
    monkeypatch.setenv("COMPODISTILL_DETERMINISTIC", "1")
    monkeypatch.setattr(_common, "interpreting", lambda: True)  # no device capability asked


@pytest.mark.parametrize("limit, expected", [(166_912, 64), (101_376, 32)])
def test_pinned_launch_takes_the_first_config_that_loads(pinned, limit, expected):
    fn = _FakeFn({64: 106_496, 32: 69_632}, limit)  # the d = 256 forward's, sm_80 vs sm_86
    for _ in range(2):  # the same device: the same config every time
        _common.launch(_FakeKernel(fn), (1,), x=1)
    assert fn.ran == [expected, expected]


def test_pinned_launch_reraises_when_no_config_loads(pinned):
    fn = _FakeFn({64: 106_496, 32: 69_632}, 48_000)
    with pytest.raises(OutOfResources):
        _common.launch(_FakeKernel(fn), (1,), x=1)
    assert fn.ran == []
