"""What the trainer allows per family (docs/families.md), checked before any step runs.

TAF is built on LLaVA's projector or Qwen2.5-VL's merger, and a recipe may name the families
it runs on
(``RecipeFacts.families``; the built-in ones run on every trainer family); for another
family they are refused with a
:class:`~compodistill.train.config.ConfigError` naming the key and the family, never run
on inputs they would get wrong.
"""
from __future__ import annotations

import os

from ..hf.families import FAMILIES, TAF_FAMILIES, family_of
from .config import ConfigError, DistillConfig

__all__ = ["check_family_options"]


def _model_config(config_or_folder):
    if isinstance(config_or_folder, (str, os.PathLike)):
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(config_or_folder, local_files_only=True)
    return config_or_folder


def check_family_options(config: DistillConfig, student_config, teacher_config=None) -> None:
    """Refuse the options the student's family cannot train with, and a teacher of another
    family (the batch is built once, for the student's family).

    ``student_config``, ``teacher_config``: model configs, or checkpoint folders (only
    ``config.json`` is read, so a refusal costs no weight loading); no teacher: None.

    Raises:
        ConfigError: ``teacher`` of another family than the student's; ``taf`` for a family without TAF (set ``taf: false`` and train the
            student's own connector), ``recipe`` for a family the recipe's
            ``facts.families`` leaves out.
    """
    family = family_of(_model_config(student_config))
    if teacher_config is not None:
        other = family_of(_model_config(teacher_config))
        if other != family:
            raise ConfigError("teacher", f"a {other.title} teacher cannot teach a "
                                         f"{family.title} student: both must be one family")
    from .recipes import recipe_facts

    allowed = recipe_facts(config.recipe).families  # None: every trainer family
    if allowed is not None and family.name not in allowed:
        names = ", ".join(FAMILIES[n].title if n in FAMILIES else n for n in allowed)
        raise ConfigError("recipe", f"{config.recipe!r} is implemented for {names}, "
                                    f"not for {family.title}; {family.title} trains with "
                                    f"'compodistill'")
    if family.name == "llava":
        return
    if config.taf and family.name not in TAF_FAMILIES:
        raise ConfigError("taf", f"TAF is implemented for LLaVA and Qwen2.5-VL, not for "
                                 f"{family.title}; "
                                 f"set `taf: false` and train the student's own connector "
                                 f"(stages' trainable: connector, lora+connector)")
    # teacher.cache: every trainer family (the family's inputs, visual ids and connector,
    # compodistill/teacher_cache/); recipes other than compodistill are refused at load.
