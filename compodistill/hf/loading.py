"""Load a local checkpoint of any trainer family, TAF students included (docs/families.md),
and resolve a checkpoint's family once (:func:`resolve_model`).

Above :mod:`.families` (which family a config is), :mod:`.taf` (LLaVA's TAF) and
:mod:`.family_taf` (TAF on the other families), which it all needs.
"""
from __future__ import annotations

import copy
import os
from pathlib import Path

from torch import nn

from .families import (ResolvedModel, check_trainer_checkpoint, config_of, family_of,
                       visual_token_ids)
from .family_taf import TAF_FILE, load_family_taf
from .taf import load_student

__all__ = ["load_family_model", "resolve_model"]


def resolve_model(source, key: str | None = None) -> ResolvedModel:
    """``source``'s family, config and visual token ids, worked out once.

    ``source``: a checkpoint folder (its ``config.json`` is read once, a TAF config too), a
    model, a config, or a :class:`ResolvedModel` (returned as it is). ``key``: the config key
    that named the folder; with it, a folder of a family ``compodistill train`` does not
    support is refused first, in one line naming ``key``.
    """
    if isinstance(source, ResolvedModel):
        return source
    if isinstance(source, (str, os.PathLike)):
        from transformers import AutoConfig

        family = check_trainer_checkpoint(source, key) if key else None
        config = AutoConfig.from_pretrained(source, local_files_only=True)
        return ResolvedModel(config, family or family_of(config), visual_token_ids(config),
                             os.fspath(source))
    config = config_of(source)
    return ResolvedModel(config, family_of(config), visual_token_ids(config))


def load_family_model(source, **kwargs) -> nn.Module:
    """A local checkpoint of any trainer family: LLaVA (TAF or not) through
    :func:`compodistill.hf.taf.load_student`, the others through
    ``AutoModelForImageTextToText``. ``source``: the folder, or its :class:`ResolvedModel`
    (its config is then not read again). ``kwargs`` go to ``from_pretrained``."""
    from transformers import AutoModelForImageTextToText

    model = resolve_model(source)
    if model.path is None:
        raise ValueError("load_family_model needs a checkpoint folder (or its ResolvedModel)")
    path = model.path
    if model.family.name == "llava":
        return load_student(path, config=copy.deepcopy(model.config), **kwargs)
    if (Path(path) / TAF_FILE).is_file():  # a TAF student, saved folded (hf/family_taf.py)
        return load_family_taf(AutoModelForImageTextToText, path, local_files_only=True,
                               config=copy.deepcopy(model.config), **kwargs)
    return AutoModelForImageTextToText.from_pretrained(
        path, local_files_only=True, config=copy.deepcopy(model.config), **kwargs)
