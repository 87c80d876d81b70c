"""What the trainer allows per family (docs/families.md), checked before any step runs.

TAF exists for the families in ``TAF_FAMILIES``; a recipe may name the families it runs on
(``RecipeFacts.families``; the built-in ones run on every trainer family); Gemma 3's VAT
serves text query rows only (its image tokens attend both ways); the final logits must not be
softcapped. Otherwise they are refused with a
:class:`~compodistill.train.config.ConfigError` naming the key and the family, never run
on inputs they would get wrong.
"""
from __future__ import annotations

from ..hf.families import FAMILIES, TAF_FAMILIES
from ..hf.loading import resolve_model
from .config import ConfigError, DistillConfig

__all__ = ["check_family_options"]


def check_family_options(config: DistillConfig, student_config, teacher_config=None) -> None:
    """Refuse the options the student's family cannot train with, and a teacher of another
    family (the batch is built once, for the student's family).

    ``student_config``, ``teacher_config``: :class:`~compodistill.hf.families.ResolvedModel`
    (what the trainer and the cache writer pass: resolved once), model configs, or
    checkpoint folders (only ``config.json`` is read, so a refusal costs no weight loading);
    no teacher: None.

    Raises:
        ConfigError: ``teacher`` of another family than the student's; ``taf`` for a
            family without TAF (set ``taf: false`` and train the student's own connector),
            ``recipe`` for a family the recipe's
            ``facts.families`` leaves out; ``student``/``teacher`` with final-logit
            softcapping; ``vat.query`` other than ``text`` for Gemma 3 with VAT on.
    """
    student = resolve_model(student_config)
    teacher = resolve_model(teacher_config) if teacher_config is not None else None
    family = student.family
    if teacher is not None:
        other = teacher.family
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
    for key, model in (("student", student), ("teacher", teacher)):
        text = model.config.get_text_config() if model is not None else None
        softcap = getattr(text, "final_logit_softcapping", None)
        if softcap is not None:
            # the fused LM/KD losses read lm_head's weights: capped logits are never built
            raise ConfigError(key, f"{family.title} with final_logit_softcapping={softcap} is "
                                   f"not supported: the fused LM and KD losses use uncapped "
                                   f"logits; set it to null in the text config")
    if config.taf and family.name not in TAF_FAMILIES:
        names = ", ".join(FAMILIES[n].title for n in TAF_FAMILIES)
        raise ConfigError("taf", f"TAF is implemented for {names}, not for {family.title}; "
                                 f"set `taf: false` and train the student's own connector "
                                 f"(stages' trainable: connector, lora+connector)")
    if family.name == "gemma3" and config.vat.query != "text" and any(
            s.weights.vat for s in config.stages):
        # the trainer gives Gemma 3 its token_type_ids, under which the tokens of one image
        # attend to each other both ways: causal fused layers serve text query rows only
        raise ConfigError("vat.query", f"{config.vat.query!r} is not served for Gemma 3: its "
                                       f"image tokens attend bidirectionally (token_type_ids), "
                                       f"the fused layers are causal; set `query: text`")
    # teacher.cache: every trainer family (the family's inputs, visual ids and connector,
    # compodistill/teacher_cache/); recipes other than compodistill are refused at load.
