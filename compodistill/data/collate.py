"""Batch collation of LLaVA samples (training and generation)."""
from __future__ import annotations

import torch

from .encoding import IGNORE_INDEX

__all__ = ["LlavaCollator"]


class LlavaCollator:
    """Pad a list of samples into a batch for ``LlavaForConditionalGeneration``.

    Returns ``input_ids`` and ``attention_mask`` (B, L), ``labels`` (B, L, -100 on padding;
    only when the samples have labels) and ``pixel_values``: every sample's images
    concatenated in order, (total_images, 3, H, W), which is how LLaVA matches images to
    image tokens; omitted when the batch has no image. ``None`` samples (lazily found
    malformed records) are dropped. Use ``padding_side="left"`` for generation.
    ``image_inputs`` (a family's, :mod:`.family_inputs`) adds that family's inputs: for Qwen
    ``image_grid_thw`` (rows of all images in order) and ``mm_token_type_ids``.
    """

    def __init__(self, pad_token_id: int, padding_side: str = "right",
                 pad_to_multiple_of: int | None = None, image_inputs=None):
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        self.pad_token_id, self.padding_side = int(pad_token_id), padding_side
        self.pad_to_multiple_of = pad_to_multiple_of
        # A family's inputs beyond LLaVA's (data/family_inputs.py); None: LLaVA.
        self.extra_keys = getattr(image_inputs, "extra_keys", ())
        self.batch_extras = getattr(image_inputs, "batch_extras", None)

    def __call__(self, features: list[dict | None]) -> dict[str, torch.Tensor]:
        features = [f for f in features if f is not None]
        if not features:
            raise ValueError("LlavaCollator: empty batch (all samples malformed?)")
        ids = [torch.as_tensor(f["input_ids"], dtype=torch.long) for f in features]
        length = max(len(x) for x in ids)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        has_labels = all(f.get("labels") is not None for f in features)
        batch_ids = torch.full((len(ids), length), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(ids), length), dtype=torch.long)
        labels = torch.full((len(ids), length), IGNORE_INDEX, dtype=torch.long)
        for i, (x, f) in enumerate(zip(ids, features)):
            sl = slice(0, len(x)) if self.padding_side == "right" else slice(length - len(x), length)
            batch_ids[i, sl] = x
            mask[i, sl] = 1
            if has_labels:
                labels[i, sl] = torch.as_tensor(f["labels"], dtype=torch.long)
        batch = {"input_ids": batch_ids, "attention_mask": mask}
        if has_labels:
            batch["labels"] = labels
        pixels = [f["pixel_values"] for f in features if f.get("pixel_values") is not None]
        if pixels:
            batch["pixel_values"] = torch.cat(pixels, dim=0)
        # Per-image rows of a family's extra inputs (Qwen's image_grid_thw), in image order.
        for key in self.extra_keys:
            rows = [f[key] for f in features if f.get(key) is not None]
            if rows:
                batch[key] = torch.cat(rows, dim=0)
        if self.batch_extras is not None:
            batch.update(self.batch_extras(batch_ids))
        return batch
