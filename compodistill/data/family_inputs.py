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

LLaVA-OneVision (:class:`OnevisionImageInputs`): anyres. An image alone in its sample is the
base crop plus the crops of the best grid of ``image_grid_pinpoints``, unpadded to the image's
aspect ratio, with one image-newline token per row; an image among several in a sample is the
base crop plus one newline. Gemma 3 (:class:`Gemma3ImageInputs`): ``mm_tokens_per_image``
tokens between ``boi`` and ``eoi``, and ``token_type_ids`` (1 on image tokens: those attend to
each other both ways). InternVL (:class:`InternVLImageInputs`): ``image_seq_length`` tokens per
tile between the tokenizer's start/end image tokens (one tile unless the image processor crops
to patches).
"""
from __future__ import annotations

import math
import os
from typing import Sequence

import torch

__all__ = ["BracketedImageInputs", "Gemma3ImageInputs", "InternVLImageInputs", "OnevisionImageInputs",
           "QwenVLImageInputs", "family_image_inputs"]


class BracketedImageInputs:
    """What the one-block families share: an image is ``start``, ``count`` image tokens,
    ``end`` (the subclass sets ``processor``, ``image_token_id``, ``start`` and ``end``), and
    its pixels are the image processor's ``pixel_values``."""

    extra_keys: tuple[str, ...] = ()

    def block(self, count: int) -> list[int]:
        return [self.start] + [self.image_token_id] * count + [self.end]

    def __call__(self, images: list) -> dict[str, torch.Tensor]:
        out = self.processor(images=_rgb(images), return_tensors="pt")
        return {"pixel_values": out["pixel_values"]}

    def batch_extras(self, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        return {}


class QwenVLImageInputs(BracketedImageInputs):
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

    def __call__(self, images: list) -> dict[str, torch.Tensor]:
        out = self.processor(images=_rgb(images), return_tensors="pt")
        return {"pixel_values": out["pixel_values"], "image_grid_thw": out["image_grid_thw"]}

    def batch_extras(self, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"mm_token_type_ids": (input_ids == self.image_token_id).long()}


def _rgb(images: list) -> list:
    return [im.convert("RGB") for im in images]


def _tile_side(config) -> int:
    side = config.vision_config.image_size
    return int(side[0] if isinstance(side, (list, tuple)) else side)


def _check_size(image_processor, config) -> None:
    # the tower was built for one tile size: another one fails deep inside the model
    size = image_processor.size
    got = (size["height"], size["width"]) if "height" in size else (size.get("shortest_edge"),) * 2
    side = _tile_side(config)
    if tuple(got) != (side, side):
        raise ValueError(f"image_processor: size {tuple(got)} does not match the vision tower's "
                         f"image_size {side} of {config.model_type}")


class OnevisionImageInputs:
    """LLaVA-OneVision image inputs from ``LlavaOnevisionImageProcessor`` (either backend).

    Token counts follow the model's own packing (and the LLaVA-OneVision processor): see the
    module docstring. ``pixel_values`` are 4-D, the real crops of every image in order (the
    processor pads each image to the most crops of the call; the model cuts the padding off
    again), so samples with different crop counts concatenate in the collator.
    ``image_sizes`` (H, W) and ``batch_num_images`` (one row per sample) go to the model.
    """

    extra_keys = ("image_sizes", "batch_num_images")
    # an image's count depends on how many share its sample: truncation must not leave one
    counts_per_image_count = True

    def __init__(self, image_processor, config):
        if not hasattr(image_processor, "image_grid_pinpoints"):
            raise TypeError(f"image_processor: a LLaVA-OneVision image processor is needed for "
                            f"{config.model_type}, got {type(image_processor).__name__}")
        pinpoints = [list(p) for p in config.image_grid_pinpoints]
        if [list(p) for p in image_processor.image_grid_pinpoints] != pinpoints:
            raise ValueError(f"image_processor: image_grid_pinpoints "
                             f"{image_processor.image_grid_pinpoints} differ from the model "
                             f"config's {pinpoints}")
        _check_size(image_processor, config)
        self.processor, self.pinpoints = image_processor, pinpoints
        self.side = _tile_side(config)
        self.per_side = self.side // int(config.vision_config.patch_size)
        self.max_crops = int(config.vision_aspect_ratio.removeprefix("anyres_max_"))
        # "default" drops the first feature of every crop (a CLS token); the processor counts
        # one token less for it
        self.drop = 1 if config.vision_feature_select_strategy == "default" else 0
        self.image_token_id = int(config.image_token_id)

    def _anyres(self, height: int, width: int) -> int:
        from transformers.image_processing_utils import select_best_resolution

        best_h, best_w = select_best_resolution([height, width], self.pinpoints)
        cur_h, cur_w = self.per_side * (best_h // self.side), self.per_side * (best_w // self.side)
        # unpadding: the grid is cut back to the image's aspect ratio
        if width / height > cur_w / cur_h:
            cur_h -= (cur_h - int(round(height * (cur_w / width), 7))) // 2 * 2
        else:
            cur_w -= (cur_w - int(round(width * (cur_h / height), 7))) // 2 * 2
        rows, features = cur_h, cur_h * cur_w
        ratio = math.sqrt(cur_h * cur_w / (self.max_crops * self.per_side ** 2))
        if ratio > 1.1:  # anyres_max_N: the crops are downsampled to about N crops' tokens
            rows, features = int(cur_h // ratio), int(cur_h // ratio) * int(cur_w // ratio)
        return self.per_side ** 2 + features + rows  # base crop + crops + one newline a row

    def token_counts(self, sizes: Sequence[tuple[int, int]]) -> list[int]:
        if len(sizes) > 1:  # several images in one sample: the base crop and a newline each
            return [self.per_side ** 2 + 1 - self.drop] * len(sizes)
        return [self._anyres(h, w) - self.drop for w, h in sizes]

    def block(self, count: int) -> list[int]:
        return [self.image_token_id] * count

    def __call__(self, images: list) -> dict[str, torch.Tensor]:
        from transformers.models.llava_onevision.modeling_llava_onevision import (
            image_size_to_num_patches)

        out = self.processor(images=[_rgb(images)], return_tensors="pt")
        sizes = out["image_sizes"]
        crops = [1 if len(images) > 1 else image_size_to_num_patches(
            size.tolist(), self.pinpoints, self.side) for size in sizes]
        pixels = torch.cat([p[:n] for p, n in zip(out["pixel_values"], crops)])
        return {"pixel_values": pixels, "image_sizes": sizes,
                "batch_num_images": torch.tensor([len(images)])}

    def batch_extras(self, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        return {}


class Gemma3ImageInputs(BracketedImageInputs):
    """Gemma 3 image inputs from ``Gemma3ImageProcessor`` (either backend): every image is
    ``mm_tokens_per_image`` tokens between ``boi`` and ``eoi``; ``token_type_ids`` mark them
    (the model lets the tokens of one image attend to each other both ways). Pan-and-scan
    crops are refused: each crop would be one more image block."""

    def __init__(self, image_processor, config):
        if not hasattr(image_processor, "do_pan_and_scan"):
            raise TypeError(f"image_processor: a Gemma 3 image processor is needed for "
                            f"{config.model_type}, got {type(image_processor).__name__}")
        if image_processor.do_pan_and_scan:
            raise ValueError("image_processor: do_pan_and_scan=True is not supported for "
                             "training (each crop becomes an image block of its own); save the "
                             "processor with do_pan_and_scan=False")
        _check_size(image_processor, config)
        self.processor = image_processor
        self.count = int(config.mm_tokens_per_image)
        self.image_token_id = int(config.image_token_id)
        self.start, self.end = int(config.boi_token_id), int(config.eoi_token_id)

    def token_counts(self, sizes: Sequence[tuple[int, int]]) -> list[int]:
        return [self.count] * len(sizes)

    def batch_extras(self, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"token_type_ids": (input_ids == self.image_token_id).long()}


class InternVLImageInputs(BracketedImageInputs):
    """InternVL (HF-native) image inputs from ``GotOcr2ImageProcessor`` (either backend):
    ``image_seq_length`` tokens per tile between the tokenizer's start and end image tokens;
    one tile per image unless the processor was saved with ``crop_to_patches=True`` (then its
    own tile count, thumbnail included)."""

    def __init__(self, image_processor, config, start: int, end: int):
        if not hasattr(image_processor, "get_number_of_image_patches") or not hasattr(
                image_processor, "crop_to_patches"):
            raise TypeError(f"image_processor: a GotOcr2 image processor is needed for "
                            f"{config.model_type}, got {type(image_processor).__name__}")
        _check_size(image_processor, config)
        self.processor = image_processor
        self.per_tile = int(config.image_seq_length)
        self.image_token_id = int(config.image_token_id)
        self.start, self.end = int(start), int(end)

    def token_counts(self, sizes: Sequence[tuple[int, int]]) -> list[int]:
        return [self.per_tile * self.processor.get_number_of_image_patches(h, w, {})
                for w, h in sizes]


def _internvl_markers(tokenizer) -> tuple[int, int]:
    # InternVL's tokenizer names its markers (start_image_token, end_image_token); its
    # config does not hold their ids
    if tokenizer is None:
        raise ValueError("tokenizer: InternVL needs the student's tokenizer (tokenizer=) for its "
                         "start/end image tokens")
    ids = []
    for name, default in (("start_image_token", "<img>"), ("end_image_token", "</img>")):
        token = getattr(tokenizer, name, None) or default
        index = tokenizer.convert_tokens_to_ids(token)
        if index is None or index == getattr(tokenizer, "unk_token_id", None):
            raise ValueError(f"tokenizer: InternVL needs its {name} ({token!r}) in the "
                             f"student's tokenizer")
        ids.append(int(index))
    return ids[0], ids[1]


def family_image_inputs(config, image_processor, tokenizer=None):
    """The ``image_inputs`` for a model config (or its ``ResolvedModel``): None for LLaVA (the
    fixed-count default path),
    :class:`QwenVLImageInputs` for Qwen2.5-VL / Qwen2-VL and Qwen3-VL,
    :class:`OnevisionImageInputs`, :class:`Gemma3ImageInputs`, :class:`InternVLImageInputs`.

    ``image_processor``: the processor object, or the checkpoint folder it was saved to
    (``AutoImageProcessor.from_pretrained``; only read for a family that needs one).
    ``tokenizer``: the student's; InternVL reads its start/end image tokens from it (default:
    the one saved in the ``image_processor`` folder).

    Raises:
        ValueError: for a family whose training inputs are not built yet, naming it, or no
            folder to load the image processor from.
    """
    from ..hf.families import config_of, family_of

    family = family_of(config)  # a ResolvedModel carries its family: not worked out again
    config = config_of(config)
    if family.name == "llava":
        return None
    if family.name not in ("qwen2_5_vl", "qwen3_vl", "llava_onevision", "gemma3", "internvl") or (
            config.model_type == "llava_next"):
        raise ValueError(f"no training inputs for {config.model_type} ({family.title}) yet")
    if image_processor is None or isinstance(image_processor, (str, os.PathLike)):
        from transformers import AutoImageProcessor, AutoTokenizer

        if not image_processor:
            raise ValueError(f"student: {family.title} needs its image processor: set "
                             f"config.student to the checkpoint folder that holds it")
        if family.name == "internvl" and tokenizer is None:  # saved next to it
            tokenizer = AutoTokenizer.from_pretrained(image_processor, local_files_only=True)
        image_processor = AutoImageProcessor.from_pretrained(image_processor,
                                                             local_files_only=True)
    if family.name == "llava_onevision":
        return OnevisionImageInputs(image_processor, config)
    if family.name == "gemma3":
        return Gemma3ImageInputs(image_processor, config)
    if family.name == "internvl":
        return InternVLImageInputs(image_processor, config, *_internvl_markers(tokenizer))
    return QwenVLImageInputs(image_processor, config)


# The batch keys the families add, which the model takes as they are: Qwen's grid and token
# types (without the token types transformers silently drops M-RoPE for 1-D positions),
# LLaVA-OneVision's image sizes and images per sample (anyres), Gemma 3's token types. The
# trainer, the cache writer and eval pass these, one list.
FAMILY_INPUTS = ("image_grid_thw", "mm_token_type_ids", "image_sizes", "batch_num_images",
                 "token_type_ids")


def family_inputs(batch: dict, device=None) -> dict:
    """The batch's :data:`FAMILY_INPUTS` (none for LLaVA), on ``device`` when given."""
    return {k: batch[k] if device is None else batch[k].to(device)
            for k in FAMILY_INPUTS if k in batch}
