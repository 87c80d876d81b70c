"""A teacher sharded over the processes of the cache run (``teacher.shard``, docs/teacher_cache.md).

Under ``accelerate launch`` with an FSDP2 config, the teacher is sharded with the trainer's
own :func:`~compodistill.train.distributed.shard_teacher` (inference mode: no optimizer, no
gradients; one group per decoder / vision layer, the root holding the rest, an untied
``lm_head`` a group of its own). Every process still writes its own shards of samples.

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

__all__ = ["use_sharded_teacher", "shard_cache_teacher", "Lockstep", "has_images"]


def use_sharded_teacher(mode: str, accelerator) -> bool:
    """Whether this run shards the teacher: ``auto`` under an FSDP2 accelerate config with
    several processes, ``fsdp`` always (else a one-line ``ValueError`` saying why not),
    ``none`` never."""
    from ..train.distributed import is_deepspeed, is_fsdp2

    processes = accelerator.num_processes
    if mode == "none":
        return False
    if mode == "auto":
        return is_fsdp2(accelerator) and processes > 1
    hint = ("launch it with `accelerate launch --config_file configs/accelerate/fsdp.yaml` "
            "(an FSDP2 config) or set teacher.shard: none")
    if processes < 2:
        raise ValueError(f"teacher.shard: fsdp shards the teacher over the processes of "
                         f"`accelerate launch`, and this run has 1 process; {hint}")
    if is_deepspeed(accelerator):
        raise ValueError("teacher.shard: fsdp needs an FSDP2 accelerate config; this run is "
                         "DeepSpeed, whose ZeRO-3 inference the cache run does not support; "
                         + hint)
    if not is_fsdp2(accelerator):
        raise ValueError(f"teacher.shard: fsdp needs an FSDP2 accelerate config "
                         f"(distributed_type: FSDP, fsdp_version: 2); this run is "
                         f"{accelerator.distributed_type.value}; {hint}")
    return True


def shard_cache_teacher(teacher: torch.nn.Module, accelerator) -> torch.nn.Module:
    """``teacher`` (frozen, eval, whole on the CPU) sharded in place; ``fully_shard`` moves
    each process's shards to its device."""
    from ..train.distributed import shard_teacher

    return shard_teacher(teacher, accelerator)


def has_images(batch: dict) -> bool:
    """Whether the teacher's forward on ``batch`` runs its vision tower."""
    return batch.get("pixel_values") is not None


class Lockstep:
    """Run a sharded teacher's forwards in step on every process (module docstring).

    ``dummy(kind)`` returns a collated batch of that kind (``"images"`` or ``"text"``);
    ``forward(batch)`` runs the teacher on it. ``run(fn, batch)`` returns ``fn(batch)``,
    ``fn`` running exactly one teacher forward; ``finish()`` runs dummies until every
    process is done. Each forward, real or dummy, runs with the teacher's ``lm_head``
    gathered (``teacher_step``: one all-gather, which the targets read). ``forwards`` counts
    this process's forwards, ``dummies`` the dummy ones among them.
    """

    def __init__(self, accelerator, teacher, forward, dummy):
        from ..train.distributed import teacher_step

        self.acc, self.forward, self.dummy = accelerator, forward, dummy
        self._gathered = lambda fn, batch: teacher_step(lambda _, b: fn(b), teacher)(None, batch)
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
