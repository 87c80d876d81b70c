"""What the recipes read from the student's family (docs/stages.md#recipes-on-every-family).

The recipes run on every trainer family through the same generic pieces as CompoDistill's own
stages: the batch's family inputs (:func:`~compodistill.data.family_inputs.family_inputs`) go to
every forward, visual positions are the tokens whose id is one of the config's
:func:`~compodistill.hf.families.visual_token_ids` (image and video placeholders, whatever
the family calls them), and widths come from the text config.
"""
from __future__ import annotations

import torch
from torch import nn

from ...hf.families import family_of, visual_positions
from ..stages import StageLosses, llava_core

__all__ = ["RecipeLosses", "text_hidden_size", "visual_mask"]


def visual_mask(input_ids: torch.Tensor, model: nn.Module) -> torch.Tensor:
    """(B, N) bool: the positions of ``input_ids`` that hold visual features of ``model``'s
    family (:func:`~compodistill.hf.families.visual_positions`: any of its image/video
    placeholder ids; vision start/end markers excluded)."""
    return visual_positions(input_ids, llava_core(model).config)


def text_hidden_size(model: nn.Module) -> int:
    """The language model's hidden width (``hidden_size`` of the text config) of any family."""
    config = llava_core(model).config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    width = getattr(text, "hidden_size", None)
    if width is None:
        raise ValueError(f"{family_of(config).title}: the text config has no hidden_size")
    return int(width)


class RecipeLosses(StageLosses):
    """:class:`StageLosses` whose KD options mark the family's visual positions
    (:func:`visual_mask`), the base of the LLaVA-KD and LLAVADI losses."""

    def kd_options(self, batch: dict, head_s: nn.Linear, head_t: nn.Linear, **overrides) -> dict:
        options = super().kd_options(batch, head_s, head_t)
        options["visual_mask"] = visual_mask(batch["input_ids"], self.student)
        return {**options, **overrides}
