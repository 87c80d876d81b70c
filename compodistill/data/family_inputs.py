"""Model inputs of the non-LLaVA families for the training data pipeline (docs/families.md).

LLaVA 1.5 gives every image the same number of tokens and one pixel tensor of fixed size;
:class:`~compodistill.data.LlavaDataset` and :class:`~compodistill.data.LlavaCollator` do that
by default. A family with dynamic resolution needs, per image, its own token count (known
before tokenizing, so truncation and lengths stay exact) and extra model inputs. An
``image_inputs`` object gives the dataset both:

* ``token_counts(sizes)``: tokens per image from its ``(width, height)`` (PIL's size, read
  from the file header without decoding the pixels);
* ``block(count)``: the token ids of one image (placeholders plus the family's markers);
* ``__call__(images)``: the model's pixel inputs for a sample's PIL images;
* ``batch_extras(input_ids)``: inputs the family derives from the token ids of a batch.

Qwen2.5-VL / Qwen2-VL and Qwen3-VL (:class:`QwenVLImageInputs`): the image processor resizes
each image to a multiple of ``patch_size * merge_size`` within its pixel budget; an image has
``grid_h * grid_w / merge_size**2`` tokens, bracketed by ``vision_start``/``vision_end`` as the
Qwen processor writes them. The model needs ``pixel_values`` (patches of all images
concatenated), ``image_grid_thw`` (one row per image) and ``mm_token_type_ids`` (1 on image
tokens): without the last, transformers silently falls back to 1-D positions instead of
M-RoPE.
"""
from __future__ import annotations

import os
from typing import Sequence

import torch

__all__ = ["QwenVLImageInputs", "family_image_inputs"]


class QwenVLImageInputs:
    """Qwen2.5-VL (and Qwen2-VL) and Qwen3-VL image inputs from the family's own image
    processor (Qwen3-VL's is the same class).

    Args:
        image_processor: a ``Qwen2VLImageProcessor`` (either backend); its ``patch_size``,
            ``merge_size`` and pixel budget decide each image's token count.
        config: the model config (``image_token_id``, ``vision_start_token_id``,
            ``vision_end_token_id``).
    """

    extra_keys = ("image_grid_thw",)

    def __init__(self, image_processor, config):
        if not hasattr(image_processor, "get_number_of_image_patches"):
            raise TypeError(f"image_processor: a Qwen2-VL image processor is needed for "
                            f"{config.model_type}, got {type(image_processor).__name__}")
        self.processor = image_processor
        self.merge = int(image_processor.merge_size)
        self.image_token_id = int(config.image_token_id)
        self.start, self.end = int(config.vision_start_token_id), int(config.vision_end_token_id)

    def token_counts(self, sizes: Sequence[tuple[int, int]]) -> list[int]:
        """Tokens of each image of PIL size ``(width, height)`` after the processor's resize."""
        return [self.processor.get_number_of_image_patches(h, w) // self.merge ** 2
                for w, h in sizes]

    def block(self, count: int) -> list[int]:
        return [self.start] + [self.image_token_id] * count + [self.end]

    def __call__(self, images: list) -> dict[str, torch.Tensor]:
        out = self.processor(images=[im.convert("RGB") for im in images], return_tensors="pt")
        return {"pixel_values": out["pixel_values"], "image_grid_thw": out["image_grid_thw"]}

    def batch_extras(self, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"mm_token_type_ids": (input_ids == self.image_token_id).long()}


def family_image_inputs(config, image_processor):
    """The ``image_inputs`` for a model config: None for LLaVA (the fixed-count default path),
    :class:`QwenVLImageInputs` for Qwen2.5-VL / Qwen2-VL and Qwen3-VL.

    ``image_processor``: the processor object, or the checkpoint folder it was saved to
    (``AutoImageProcessor.from_pretrained``; only read for a family that needs one).

    Raises:
        ValueError: for a family whose training inputs are not built yet, naming it, or no
            folder to load the image processor from.
    """
    from ..hf.families import family_of

    family = family_of(config)
    if family.name == "llava":
        return None
    if family.name not in ("qwen2_5_vl", "qwen3_vl"):
        raise ValueError(f"no training inputs for the {family.title} family yet")
    if image_processor is None or isinstance(image_processor, (str, os.PathLike)):
        from transformers import AutoImageProcessor

        if not image_processor:
            raise ValueError(f"student: {family.title} needs its image processor: set "
                             f"config.student to the checkpoint folder that holds it")
        image_processor = AutoImageProcessor.from_pretrained(image_processor,
                                                             local_files_only=True)
    return QwenVLImageInputs(image_processor, config)
