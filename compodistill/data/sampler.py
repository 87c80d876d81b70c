"""Length-grouped sampling: batches of similar-length samples waste less compute on padding."""
from __future__ import annotations

import random
from typing import Iterator, Sequence

from torch.utils.data import Sampler

__all__ = ["LengthGroupedSampler", "length_grouped_indices"]


def length_grouped_indices(lengths: Sequence[int], batch_size: int, *, mega_batch_mult: int = 50,
                           seed: int = 0) -> list[int]:
    """A random permutation whose consecutive ``batch_size`` chunks have similar lengths.

    Shuffle, split into mega-batches of ``mega_batch_mult * batch_size``, sort each by length
    (longest first) and move the longest batch to the front, so an out-of-memory shows up at
    the first step (the same scheme as transformers' ``LengthGroupedSampler``).
    """
    if batch_size < 1 or mega_batch_mult < 1:
        raise ValueError(f"batch_size and mega_batch_mult must be >= 1, got {batch_size} and "
                         f"{mega_batch_mult}")
    rng = random.Random(seed)
    indices = list(range(len(lengths)))
    rng.shuffle(indices)
    mega = mega_batch_mult * batch_size
    groups = [sorted(indices[i: i + mega], key=lambda j: -lengths[j])
              for i in range(0, len(indices), mega)]
    if groups:
        longest = max(range(len(groups)), key=lambda g: lengths[groups[g][0]])
        groups[0][0], groups[longest][0] = groups[longest][0], groups[0][0]
    return [i for g in groups for i in g]


class LengthGroupedSampler(Sampler[int]):
    """Every index once per epoch, ordered by :func:`length_grouped_indices`.

    Use it as ``DataLoader(dataset, batch_size=batch_size, sampler=sampler)`` (without
    ``shuffle``) with the same ``batch_size`` (per process), and call :meth:`set_epoch` before
    each epoch: the order depends only on ``seed + epoch``, as in ``DistributedSampler``, so a
    resumed run replays the same batches.

    Args:
        lengths: token count per sample, or a dataset with a ``lengths`` attribute (such as
            :attr:`LlavaDataset.lengths <compodistill.data.LlavaDataset.lengths>`); read once.
        batch_size: the DataLoader's batch size; chunks of this many consecutive indices
            have similar lengths.
        mega_batch_mult: mega-batch size in batches: larger groups lengths more tightly,
            smaller keeps more randomness.
        seed: base seed of the shuffle.
    """

    def __init__(self, lengths, batch_size: int, *, mega_batch_mult: int = 50, seed: int = 0):
        if hasattr(lengths, "lengths"):
            lengths = lengths.lengths() if callable(lengths.lengths) else lengths.lengths
        if int(batch_size) < 1 or int(mega_batch_mult) < 1:
            raise ValueError(f"batch_size and mega_batch_mult must be >= 1, got {batch_size} "
                             f"and {mega_batch_mult}")
        try:
            self.lengths = [int(n) for n in lengths]
        except (TypeError, ValueError):
            raise TypeError("LengthGroupedSampler needs token counts per sample or a dataset "
                            f"with a 'lengths' attribute, got {type(lengths).__name__}") from None
        self.batch_size, self.mega_batch_mult = int(batch_size), int(mega_batch_mult)
        self.seed, self.epoch = int(seed), 0

    def set_epoch(self, epoch: int) -> None:
        """Select the order of epoch ``epoch`` (DataLoader wrappers such as accelerate's call
        this on the sampler)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self) -> Iterator[int]:
        return iter(length_grouped_indices(self.lengths, self.batch_size,
                                           mega_batch_mult=self.mega_batch_mult,
                                           seed=self.seed + self.epoch))
