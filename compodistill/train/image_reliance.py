"""Does a model look at its images? ``image_reliance`` at the start of every stage.

A run can train "blind" with a healthy-looking loss: vision weights not loaded, image tokens
not wired, a connector that outputs zeros. So at the start of each stage the student's (and,
in stages that run it, the teacher's) LM loss is measured on a few training batches twice:
with their own images, and with the images replaced. ``image_reliance`` is the second loss
minus the first (nats per response token); a model whose loss does not move is warned about
in one line (docs/stages.md#image-reliance). It costs a few forward passes, no training.

Replaced images: rolled by one across the batch when it holds at least two images of one
shape (each sample sees another sample's image), else one flat image of the batch's mean.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from ..logit_kd.from_logits import shift_labels
from ..data.family_inputs import family_inputs
from .stages import HiddenStates, lm_head, lm_loss

__all__ = ["BlindModelWarning", "Reliance", "measure", "replaced_images", "reliance_batches"]

# |loss with replaced images − loss with its own| at or below this share of the loss: the
# model does not depend on its images at all: a random init moves it by ~1e-5, a model
# with its image features cut off by exactly 0 (fp32 rounding of one loss: ~1e-7 of it).
BLIND_RELATIVE = 1e-6


class BlindModelWarning(UserWarning):
    """A model's loss does not depend on its images. ``--quiet`` never hides it."""


@dataclass(frozen=True)
class Reliance:
    """LM loss with the batches' own images and with them replaced; ``value`` = the rise."""

    real: float
    replaced: float

    @property
    def value(self) -> float:
        return self.replaced - self.real

    @property
    def blind(self) -> bool:
        return abs(self.value) <= BLIND_RELATIVE * max(abs(self.real), 1e-12)


def replaced_images(batch: dict) -> dict | None:
    """``batch`` with its images replaced (module docstring); None when it has none."""
    pixels = batch.get("pixel_values")
    if pixels is None or pixels.numel() == 0:
        return None
    out = dict(batch)
    grid = batch.get("image_grid_thw")
    if grid is not None:  # Qwen-style: every image's patches flattened into one tensor
        same = len(grid) > 1 and bool((grid == grid[0]).all())
        per = int(grid[0].prod()) if same else 0
        out["pixel_values"] = (pixels.roll(per, 0) if same else
                               torch.full_like(pixels, float(pixels.float().mean())))
    elif pixels.shape[0] > 1:  # one entry per image (LLaVA, Gemma 3, OneVision)
        out["pixel_values"] = pixels.roll(1, 0)
        if "image_sizes" in batch:
            out["image_sizes"] = batch["image_sizes"].roll(1, 0)
    else:
        out["pixel_values"] = torch.full_like(pixels, float(pixels.float().mean()))
    return out


@torch.no_grad()
def _loss(model, batch: dict) -> float:
    device = next(model.parameters()).device
    moved = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    h = HiddenStates(model)(moved["input_ids"], moved["attention_mask"],
                            moved.get("pixel_values"), **family_inputs(moved))
    return float(lm_loss(h, lm_head(model), shift_labels(moved["labels"])))


def measure(model, batches: list[dict]) -> Reliance | None:
    """:class:`Reliance` of ``model`` over ``batches`` (the mean over those with images), in
    eval mode (its mode is restored); None when no batch has an image."""
    was_training = model.training
    model.eval()
    try:
        pairs = [(b, r) for b in batches if (r := replaced_images(b)) is not None]
        if not pairs:
            return None
        real = sum(_loss(model, b) for b, _ in pairs) / len(pairs)
        replaced = sum(_loss(model, r) for _, r in pairs) / len(pairs)
    finally:
        model.train(was_training)
    return Reliance(real, replaced)


def reliance_batches(dataset, collate, batch_size: int, num_batches: int) -> list[dict]:
    """The first ``num_batches`` batches of ``dataset`` in order (no RNG drawn: the run's
    shuffling is unchanged), skipping samples the data set could not load."""
    batches, i = [], 0
    while len(batches) < num_batches and i < len(dataset):
        items = [x for x in (dataset[j] for j in range(i, min(i + batch_size, len(dataset))))
                 if x is not None]
        i += batch_size
        if items:
            batches.append(collate(items))
    return batches


def warn_if_blind(stage: str, who: str, reliance: Reliance | None) -> None:
    if reliance is not None and reliance.blind:
        warnings.warn(f"stage {stage}: the {who} does not depend on its images (LM loss "
                      f"{reliance.real:.4f} with them, {reliance.replaced:.4f} with them "
                      f"replaced); check that its vision weights loaded and its image tokens "
                      f"are wired", BlindModelWarning, stacklevel=2)
