"""Image loading and pixel transforms for LLaVA samples."""
from __future__ import annotations

from typing import Callable, Sequence

import torch

__all__ = ["ImageTransform", "make_image_transform", "open_image"]


class ImageTransform:
    """Resize to ``size`` (int or (h, w)), scale to [0, 1], normalise with ``mean``/``std``.

    The default mean = std = 0.5 maps pixels to [-1, 1] as SigLIP does. Returns (3, h, w) float32.
    """

    def __init__(self, size: int | tuple[int, int], mean: Sequence[float] = (0.5, 0.5, 0.5),
                 std: Sequence[float] = (0.5, 0.5, 0.5)):
        self.size = (size, size) if isinstance(size, int) else tuple(size)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)

    def __call__(self, image) -> torch.Tensor:
        import numpy as np
        from PIL import Image

        h, w = self.size
        image = image.convert("RGB")
        if image.size != (w, h):
            image = image.resize((w, h), Image.BICUBIC)
        x = torch.from_numpy(np.asarray(image, dtype=np.float32).copy()).permute(2, 0, 1) / 255.0
        return (x - self.mean) / self.std


def make_image_transform(image_processor_or_size) -> Callable[[list], torch.Tensor]:
    """Turn an HF image processor, a size, or a per-image callable into ``list[PIL] -> (n,3,H,W)``."""
    proc = image_processor_or_size
    if isinstance(proc, (int, tuple, list)):
        proc = ImageTransform(tuple(proc) if not isinstance(proc, int) else proc)
    if hasattr(proc, "preprocess"):  # a transformers image processor: batch call
        return lambda images: proc(images=[im.convert("RGB") for im in images],
                                   return_tensors="pt")["pixel_values"]
    if callable(proc):
        return lambda images: torch.stack([proc(im) for im in images])
    raise TypeError(f"image_processor_or_size must be an image processor, a size or a callable, "
                    f"got {type(image_processor_or_size).__name__}")


def open_image(path: str):
    """Open an image file as RGB (fully loaded, file closed)."""
    from PIL import Image

    with Image.open(path) as im:
        return im.convert("RGB")
