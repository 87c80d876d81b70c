"""What each built-in recipe is, as the config sees it: data only, read before any model loads.

The config checks a run's terms and fills its stage defaults from these facts, so they live
below everything the recipes themselves import (the stages, the engine, the trainer).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RecipeFacts:
    """What a recipe is, as the config sees it (read before any model loads).

    Attributes:
        terms: the loss terms it computes; a stage giving another term a weight is an error.
        stage_defaults: per stage kind (``dpt``/``dft``/``sft``), the :class:`StageConfig`
            fields it sets (``trainable``, ``weights``, ``lr``, ``batch_size``...); a kind it
            leaves out falls back to ``{"trainable": "lora", "weights": {"lm": 1.0}}``.
        default_stages: the stage chain when the config names none.
        taf: whether the student gets TAF when the config does not say.
        families: the trainer families (``compodistill.hf.families``) it runs on; None: every
            one. A LLaVA-only recipe sets ``("llava",)`` and is refused for another family
            with a ``ConfigError`` naming ``recipe`` and the family.
    """

    terms: tuple
    stage_defaults: dict
    default_stages: tuple
    taf: bool = False
    families: tuple | None = None

    def stage_default(self, kind: str) -> dict:
        base = self.stage_defaults.get(kind, {"trainable": "lora", "weights": {"lm": 1.0}})
        return {**base, "weights": dict(base.get("weights", {"lm": 1.0}))}


# DPT trains the TAF post-connector with LM + KD; DFT adds LoRA and VAT; SFT trains a fresh
# LoRA on the LM loss alone (every stage's LoRA is merged when it ends).
COMPODISTILL = RecipeFacts(
    terms=("lm", "kd", "vat"),
    stage_defaults={
        "dpt": dict(trainable="post_connector", weights=dict(lm=1.0, kd=1.0), batch_size=256),
        "dft": dict(trainable="lora+post_connector", weights=dict(lm=1.0, kd=1.0, vat=1.0),
                    batch_size=128),
        "sft": dict(trainable="lora", weights=dict(lm=1.0), batch_size=192),
    },
    default_stages=("dpt", "dft", "sft"),
    taf=True)

# DPT (connector, lr 1e-3) -> SFT (CE) -> DFT (CE + KL_res + KL_vis + RDist); no TAF, so the
# connector itself trains.
_ALL_TERMS = dict(lm=1.0, kd=1.0, kd_vis=1.0, rdist=1.0)
LLAVA_KD = RecipeFacts(
    terms=("lm", "kd", "kd_vis", "rdist"),
    stage_defaults={
        "dpt": dict(trainable="connector", weights=_ALL_TERMS, lr=1e-3, batch_size=256),
        "sft": dict(trainable="lora+connector", weights=dict(lm=1.0), batch_size=128),
        "dft": dict(trainable="lora+connector", weights=_ALL_TERMS, batch_size=128),
    },
    default_stages=("dpt", "sft", "dft"))

# LLAVADI distils in fine-tuning; pre-training aligns the connector on the LM loss (the chain
# is ours: the paper gives none).
LLAVADI = RecipeFacts(
    terms=("lm", "kd", "feat"),
    stage_defaults={
        "dpt": dict(trainable="connector", weights=dict(lm=1.0), lr=1e-3, batch_size=256),
        "sft": dict(trainable="lora+connector", weights=dict(lm=1.0), batch_size=128),
        "dft": dict(trainable="lora+connector", weights=dict(lm=1.0, kd=1.0, feat=1.0),
                    batch_size=128),
    },
    default_stages=("dpt", "dft"))

# Every training step of every round runs the configured stages (instruction tuning).
COMD = RecipeFacts(
    terms=("lm", "kd"),
    stage_defaults={kind: dict(trainable="lora", weights=dict(lm=1.0), batch_size=128)
                    for kind in ("dpt", "dft", "sft")},
    default_stages=("sft",))

BUILTIN = {"compodistill": COMPODISTILL, "llava_kd": LLAVA_KD, "llavadi": LLAVADI,
           "comd": COMD}
