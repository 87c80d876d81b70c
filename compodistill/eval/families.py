"""Evaluation prompts for the families with their own image inputs (docs/evaluation.md).

LLaVA 1.5 evaluates through a plain :class:`~compodistill.data.ConversationEncoder`: every
image is the same count of image tokens and one pixel tensor. The other trainer families
(Qwen2.5-VL, Qwen3-VL, and whatever :func:`~compodistill.data.family_inputs.family_image_inputs`
covers) give each image its own token block and extra model inputs. :class:`FamilyEncoder`
encodes prompts with the same ``image_inputs`` object as the training data, so an evaluated
prompt is tokenised exactly as a training sample with the same images.

The evaluations (cr.py, vqa.py, grid.py) call :func:`encode_images`, :func:`prompt_sample`,
:func:`reply_sample` and :func:`collate`, which serve both encoders.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Sequence

import torch

from ..data.collate import LlavaCollator
from ..data.encoding import ConversationEncoder
from ..data.images import open_image

__all__ = ["EncodedImages", "FamilyEncoder", "collate", "encode_images", "family_images",
           "prompt_sample", "reply_sample"]


def _refuse_pixels(images):
    raise TypeError("FamilyEncoder: a family's pixel inputs come from encode_images(), "
                    "not from a per-image transform")


class FamilyEncoder(ConversationEncoder):
    """A :class:`ConversationEncoder` whose images go through a family's ``image_inputs``.

    Args:
        tokenizer: the model's tokenizer (chat template included).
        image_inputs: from :func:`~compodistill.data.family_inputs.family_image_inputs`:
            ``token_counts(sizes)``, ``block(count)``, ``__call__(images)`` and
            ``batch_extras(input_ids)`` (and ``extra_keys``, the per-image inputs).
        image_token_id: the config's image placeholder id (written inside each block by
            ``image_inputs``; used here only to check the tokenizer does not need one).
    """

    def __init__(self, tokenizer, image_inputs, *, image_token_id: int,
                 image_token: str = "<image>", system_prompt: str | None = None):
        super().__init__(tokenizer, _refuse_pixels, num_image_tokens=1, image_token=image_token,
                         image_token_id=image_token_id, system_prompt=system_prompt)
        self.image_inputs = image_inputs

    def encode_images(self, images: Sequence) -> "EncodedImages":
        return family_images(self.image_inputs, images)

    def prompt_ids(self, prompt: str, num_images: int = 0) -> torch.Tensor:
        raise TypeError("FamilyEncoder.prompt_ids: an image's token count depends on its size; "
                        "use encode_prompt(prompt, images)")

    def encode_prompt(self, prompt: str, images: Sequence = ()) -> dict:
        return prompt_sample(self, prompt, self.encode_images(images))


@dataclass
class EncodedImages:
    """A sample's images, encoded once: ``inputs`` (``pixel_values`` and the family's per-image
    inputs, e.g. ``image_grid_thw``), ``image_ids`` (the token ids of each image; None: the
    encoder's fixed count of image tokens) and ``count``."""

    inputs: dict = field(default_factory=dict)
    image_ids: list[list[int]] | None = None
    count: int = 0


def family_images(image_inputs, images: Sequence) -> EncodedImages:
    """A sample's images (paths or PIL images) through a family's ``image_inputs``: each its
    own token block (from its size) and the family's pixel inputs."""
    pil = [open_image(im) if isinstance(im, (str, os.PathLike)) else im.convert("RGB")
           for im in images]
    if not pil:
        return EncodedImages({}, [], 0)
    counts = image_inputs.token_counts([im.size for im in pil])
    return EncodedImages(dict(image_inputs(pil)), [list(image_inputs.block(n)) for n in counts],
                         len(pil))


def encode_images(encoder, images: Sequence) -> EncodedImages:
    """:meth:`FamilyEncoder.encode_images`, or LLaVA's pixel tensor for a plain encoder."""
    if isinstance(encoder, FamilyEncoder):
        return encoder.encode_images(images)
    pixels = encoder.pixels(images)
    return EncodedImages({"pixel_values": pixels}, None, len(images))


def _with_tags(encoder, prompt: str, count: int) -> str:
    # As in the training data: one tag per image, before the text, when the prompt has none.
    if count and encoder.image_token not in prompt:
        prompt = (encoder.image_token + "\n") * count + prompt
    return prompt


def _check_tags(encoder, enc: dict, count: int) -> None:
    if len(enc["image_blocks"]) != count:
        raise ValueError(f"prompt has {len(enc['image_blocks'])} {encoder.image_token} tags "
                         f"but {count} images")


def prompt_sample(encoder, prompt: str, images: EncodedImages) -> dict:
    """One user turn plus the generation prompt, as a collator sample with ``images``."""
    enc = encoder.encode([{"role": "user", "content": _with_tags(encoder, prompt, images.count)}],
                         add_generation_prompt=True, image_ids=images.image_ids)
    _check_tags(encoder, enc, images.count)
    return {"input_ids": torch.tensor(enc["input_ids"], dtype=torch.long), **images.inputs}


def reply_sample(encoder, prompt: str, reply: str, images: EncodedImages) -> dict:
    """A user turn and the assistant's ``reply``, labelled on the reply (and its end of turn)."""
    enc = encoder.encode([{"role": "user", "content": _with_tags(encoder, prompt, images.count)},
                          {"role": "assistant", "content": reply}], image_ids=images.image_ids)
    _check_tags(encoder, enc, images.count)
    return {"input_ids": torch.tensor(enc["input_ids"], dtype=torch.long),
            "labels": torch.tensor(enc["labels"], dtype=torch.long), **images.inputs}


def collate(encoder, features: list[dict], pad_token_id: int, padding_side: str) -> dict:
    """Pad samples into a batch with the family's extra inputs (none for LLaVA)."""
    return LlavaCollator(pad_token_id, padding_side,
                         image_inputs=getattr(encoder, "image_inputs", None))(features)
