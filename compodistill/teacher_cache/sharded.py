"""Lockstep forwards of a teacher sharded over the cache run's processes (``teacher.shard``,
docs/teacher_cache.md).

The cache run (``writer.py``, which sits above the trainer) shards the teacher with the
trainer's own ``shard_teacher`` (inference mode: no optimizer, no gradients; one group per
decoder / vision layer, the root holding the rest, an untied ``lm_head`` a group of its
own). Every process still writes its own shards of samples.

A sharded forward is a sequence of collectives (one all-gather per group), so every process
must run the same number of teacher forwards, of the same kind: :class:`Lockstep`. Each
"slot" starts with one all-reduce of (has a batch, its batch has images); a process whose
work is done, or whose batch is of the other kind, runs a dummy forward instead, whose
output is dropped. A slot where some batches have images and some do not is run in two
passes (the image batches, then the text-only ones), because a forward without images never
runs the vision tower's groups.
"""
from __future__ import annotations

import torch

__all__ = ["Lockstep", "has_images"]


def has_images(batch: dict) -> bool:
    """Whether the teacher's forward on ``batch`` runs its vision tower."""
    return batch.get("pixel_values") is not None


class Lockstep:
    """Run a sharded teacher's forwards in step on every process (module docstring).

    ``dummy(kind)`` returns a collated batch of that kind (``"images"`` or ``"text"``);
    ``forward(batch)`` runs the teacher on it. ``run(fn, batch)`` returns ``fn(batch)``,
    ``fn`` running exactly one teacher forward; ``finish()`` runs dummies until every
    process is done. Each forward, real or dummy, runs inside ``gathered(fn, batch)``, which
    calls ``fn(batch)`` with the teacher's ``lm_head`` gathered (one all-gather, which the
    targets read). ``forwards`` counts this process's forwards, ``dummies`` the dummy ones
    among them.
    """

    def __init__(self, accelerator, forward, dummy, gathered):
        self.acc, self.forward, self.dummy = accelerator, forward, dummy
        self._gathered = gathered
        self.forwards = 0
        self.dummies = 0

    def _kinds(self, batch: dict | None) -> list[str]:
        import torch.distributed as dist

        flags = torch.tensor([batch is not None, batch is not None and has_images(batch)],
                             dtype=torch.int64, device=self.acc.device)
        dist.all_reduce(flags)
        working, with_images = flags.tolist()
        return ["images"] * (with_images > 0) + ["text"] * (working - with_images > 0)

    def _dummy(self, kind: str) -> None:
        self._gathered(self.forward, self.dummy(kind))
        self.forwards += 1
        self.dummies += 1

    def run(self, fn, batch: dict):
        mine, out = ("images" if has_images(batch) else "text"), None
        for kind in self._kinds(batch):
            if kind == mine:
                out = self._gathered(fn, batch)
                self.forwards += 1
            else:
                self._dummy(kind)
        return out

    def finish(self) -> None:
        while kinds := self._kinds(None):
            for kind in kinds:
                self._dummy(kind)
