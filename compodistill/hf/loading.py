"""Load a local checkpoint of any trainer family, TAF students included (docs/families.md).

Above :mod:`.families` (which family a config is), :mod:`.taf` (LLaVA's TAF) and
:mod:`.family_taf` (TAF on the other families), which it all needs.
"""
from __future__ import annotations

from pathlib import Path

from torch import nn

from .families import family_of
from .family_taf import TAF_FILE, load_family_taf
from .taf import load_student

__all__ = ["load_family_model"]


def load_family_model(path, **kwargs) -> nn.Module:
    """A local checkpoint of any trainer family: LLaVA (TAF or not) through
    :func:`compodistill.hf.taf.load_student`, the others through
    ``AutoModelForImageTextToText``. ``kwargs`` go to ``from_pretrained``."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    config = AutoConfig.from_pretrained(path, local_files_only=True)
    if family_of(config).name == "llava":
        return load_student(path, **kwargs)
    if (Path(path) / TAF_FILE).is_file():  # a TAF student, saved folded (hf/family_taf.py)
        return load_family_taf(AutoModelForImageTextToText, path, local_files_only=True,
                               **kwargs)
    return AutoModelForImageTextToText.from_pretrained(path, local_files_only=True, **kwargs)
