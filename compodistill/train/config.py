"""Configuration of a distillation run: one file, every stage (SPEC §7 defaults).

A run is a chain of stages; each stage names what it trains, which losses it adds with
which weights, and its optimisation schedule. Load from YAML/JSON with :func:`load_config`
or build the dataclasses directly.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

STAGE_KINDS = ("dpt", "dft", "sft")
# What a stage trains: the TAF post-connector, the (trainable part of the) connector, LoRA on
# the language model (optionally with the post-connector or the connector), or every weight.
TRAINABLE = ("post_connector", "connector", "lora", "lora+post_connector", "lora+connector",
             "all")
# The methods a run can follow (SPEC §5, §7); behaviour lives in compodistill.train.recipes.
RECIPES = ("compodistill", "llava_kd", "llavadi", "comd")
# Loss terms each recipe computes; a stage giving another term a weight is a config error.
RECIPE_TERMS = {"compodistill": ("lm", "kd", "vat"), "llava_kd": ("lm", "kd", "kd_vis", "rdist"),
                "llavadi": ("lm", "kd", "feat"), "comd": ("lm", "kd")}


@dataclass
class LossWeights:
    """Weights of the loss terms; a weight of 0 switches the term off.

    ``lm``, ``kd`` (logit KD on ``kd.positions``; the response tokens in LLaVA-KD) and ``vat``
    are CompoDistill's; ``kd_vis`` (KD on the visual positions) and ``rdist`` are LLaVA-KD's,
    ``feat`` (projected last-hidden-state MSE) is LLAVADI's. Which terms a stage may use
    depends on the recipe (:data:`RECIPE_TERMS`).
    """

    lm: float = 1.0
    kd: float = 0.0
    vat: float = 0.0
    kd_vis: float = 0.0
    rdist: float = 0.0
    feat: float = 0.0


@dataclass
class KDOptions:
    """Logit distillation (SPEC §4)."""

    loss: str = "kl"
    temperature: float = 1.0
    positions: str = "response"
    beta: float = 0.5


@dataclass
class VATOptions:
    """Visual-attention alignment (SPEC §2–§3); defaults are the paper's."""

    matching: str = "group"
    preset: str = "intermediate"
    student_layers: list[int] | None = None
    teacher_layers: list[int] | None = None
    query: str = "all"
    loss: str = "cosine"
    cosine: str = "flat"
    distribution: str = "renorm"
    layer_reduction: str = "mean"


@dataclass
class LlavaKDOptions:
    """LLaVA-KD (SPEC §5): RDist works on ``vocab_chunk`` lm_head rows at a time."""

    vocab_chunk: int = 8192

    def __post_init__(self):
        if self.vocab_chunk < 1:
            raise ValueError(f"llava_kd.vocab_chunk must be >= 1, got {self.vocab_chunk}")


@dataclass
class LlavaDIOptions:
    """LLAVADI (SPEC §5): width of the feature projector MLP d_s → proj_hidden → d_t."""

    proj_hidden: int = 5120

    def __post_init__(self):
        if self.proj_hidden < 1:
            raise ValueError(f"llavadi.proj_hidden must be >= 1, got {self.proj_hidden}")


@dataclass
class CoMDOptions:
    """CoMD competitive loop (SPEC §5); see :mod:`compodistill.train.recipes.comd`.

    ``judge``: ``"model"`` (a judge model scores both answers 1–10 in both orders; the model at
    ``judge_model``, default the teacher) or ``"overlap"`` (token F1 with the reference answer,
    mapped to 1–10). A sample is hard when teacher − student ≥ ``threshold``. Prompts are
    ``str.format`` templates (empty: the built-in ones). ``assess_samples`` caps how many
    instructions are assessed per round (None: all); ``accumulate`` makes the next round's
    instruction set the current one plus the augmented instructions (else the augmented only).
    """

    rounds: int = 4
    threshold: float = 1.0
    judge: str = "model"
    judge_model: str = ""
    judge_prompt: str = ""
    augment_prompt: str = ""
    assess_samples: int | None = None
    accumulate: bool = True
    max_new_tokens: int = 256
    instruction_max_new_tokens: int = 128
    judge_max_new_tokens: int = 16
    generation_batch_size: int = 8

    def __post_init__(self):
        if self.judge not in ("model", "overlap"):
            raise ValueError(f"comd.judge must be 'model' or 'overlap', got {self.judge!r}")
        for key in ("rounds", "max_new_tokens", "instruction_max_new_tokens",
                    "judge_max_new_tokens", "generation_batch_size"):
            if getattr(self, key) < 1:
                raise ValueError(f"comd.{key} must be >= 1, got {getattr(self, key)}")
        if self.assess_samples is not None and self.assess_samples < 1:
            raise ValueError(f"comd.assess_samples must be >= 1 or null, got {self.assess_samples}")


@dataclass
class StageConfig:
    """One stage of the chain. ``kind`` picks the defaults of SPEC §7."""

    kind: str
    name: str = ""
    trainable: str = ""
    weights: LossWeights = field(default_factory=LossWeights)
    lr: float = 2e-4
    epochs: float = 1.0
    max_steps: int | None = None
    batch_size: int = 8
    grad_accum: int = 1
    warmup_ratio: float = 0.03
    scheduler: str = "cosine"
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    lora_r: int = 128
    lora_alpha: int = 256
    lora_dropout: float = 0.05
    merge_previous_lora: bool = False

    def __post_init__(self):
        if self.kind not in STAGE_KINDS:
            raise ValueError(f"stage kind must be one of {STAGE_KINDS}, got {self.kind!r}")
        defaults = STAGE_DEFAULTS[self.kind]
        self.name = self.name or self.kind
        self.trainable = self.trainable or defaults["trainable"]
        if self.trainable not in TRAINABLE:
            raise ValueError(f"stage {self.name}: trainable must be one of {TRAINABLE}, "
                             f"got {self.trainable!r}")
        for key in ("lr", "epochs", "batch_size", "grad_accum"):
            if getattr(self, key) <= 0:
                raise ValueError(f"stage {self.name}: {key} must be positive, "
                                 f"got {getattr(self, key)}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(f"stage {self.name}: warmup_ratio must be in [0, 1), "
                             f"got {self.warmup_ratio}")


# SPEC §7: DPT trains the post-connector with LM + KD; DFT adds LoRA and VAT; SFT merges the
# DFT LoRA and trains a fresh one on the LM loss alone.
STAGE_DEFAULTS: dict[str, dict[str, Any]] = {
    "dpt": dict(trainable="post_connector", weights=dict(lm=1.0, kd=1.0, vat=0.0), batch_size=256),
    "dft": dict(trainable="lora+post_connector", weights=dict(lm=1.0, kd=1.0, vat=1.0),
                batch_size=128),
    "sft": dict(trainable="lora", weights=dict(lm=1.0, kd=0.0, vat=0.0), batch_size=192,
                merge_previous_lora=True),
}

# SPEC §5 stage defaults of the other recipes (no TAF, so the connector itself trains).
# LLaVA-KD: DPT (connector, lr 1e-3) -> SFT (CE) -> DFT (CE + KL_res + KL_vis + RDist).
_LLAVA_KD_ALL = dict(lm=1.0, kd=1.0, kd_vis=1.0, rdist=1.0)
RECIPE_STAGE_DEFAULTS: dict[str, dict[str, dict[str, Any]]] = {
    "compodistill": STAGE_DEFAULTS,
    "llava_kd": {
        "dpt": dict(trainable="connector", weights=_LLAVA_KD_ALL, lr=1e-3, batch_size=256),
        "sft": dict(trainable="lora+connector", weights=dict(lm=1.0), batch_size=128),
        "dft": dict(trainable="lora+connector", weights=_LLAVA_KD_ALL, batch_size=128),
    },
    # LLAVADI distils in fine-tuning; pre-training aligns the connector on the LM loss.
    "llavadi": {
        "dpt": dict(trainable="connector", weights=dict(lm=1.0), lr=1e-3, batch_size=256),
        "sft": dict(trainable="lora+connector", weights=dict(lm=1.0), batch_size=128),
        "dft": dict(trainable="lora+connector", weights=dict(lm=1.0, kd=1.0, feat=1.0),
                    batch_size=128),
    },
    # CoMD: every training step of every round runs the configured stages (instruction tuning).
    "comd": {kind: dict(trainable="lora", weights=dict(lm=1.0), batch_size=128)
             for kind in STAGE_KINDS},
}
RECIPE_DEFAULT_STAGES = {"compodistill": ("dpt", "dft", "sft"), "llava_kd": ("dpt", "sft", "dft"),
                         "llavadi": ("dpt", "dft"), "comd": ("sft",)}


def default_stage(kind: str, recipe: str = "compodistill", **overrides) -> StageConfig:
    """A stage with the recipe's defaults (SPEC §5/§7), ``overrides`` applied on top.

    Weights not named by the recipe's defaults or ``overrides`` are 0, except ``lm`` (1).
    """
    if kind not in STAGE_DEFAULTS:
        raise ValueError(f"stage kind must be one of {STAGE_KINDS}, got {kind!r}")
    if recipe not in RECIPES:
        raise ValueError(f"recipe must be one of {RECIPES}, got {recipe!r}")
    base = dict(RECIPE_STAGE_DEFAULTS[recipe][kind])
    weights = LossWeights(**{**base.pop("weights"), **overrides.pop("weights", {})})
    return StageConfig(kind=kind, weights=weights, **{**base, **overrides})


@dataclass
class DataConfig:
    """Where the LLaVA-format data lives."""

    train_json: str = ""
    image_folder: str = ""
    max_length: int = 1536
    on_error: str = "skip"
    num_workers: int = 0


@dataclass
class DistillConfig:
    """A whole run: models, data, the stage chain and the engine settings."""

    teacher: str = ""
    student: str = ""
    output_dir: str = "runs/compodistill"
    data: DataConfig = field(default_factory=DataConfig)
    # None: the recipe's default chain (CompoDistill: DPT -> DFT -> SFT).
    stages: list[StageConfig] | None = None
    kd: KDOptions = field(default_factory=KDOptions)
    vat: VATOptions = field(default_factory=VATOptions)
    recipe: str = "compodistill"
    llava_kd: LlavaKDOptions = field(default_factory=LlavaKDOptions)
    llavadi: LlavaDIOptions = field(default_factory=LlavaDIOptions)
    comd: CoMDOptions = field(default_factory=CoMDOptions)
    # None: the recipe's default (TAF is CompoDistill's; the other recipes have none).
    taf: bool | None = None
    seed: int = 0
    mixed_precision: str = "no"
    gradient_checkpointing: bool = False
    log_every: int = 1
    save_every: int = 0
    max_bad_steps: int = 5
    teacher_device: str | None = None

    def __post_init__(self):
        if self.recipe not in RECIPES:
            raise ValueError(f"recipe must be one of {RECIPES}, got {self.recipe!r}")
        if self.taf is None:
            self.taf = self.recipe == "compodistill"
        if self.stages is None:
            self.stages = [default_stage(k, self.recipe)
                           for k in RECIPE_DEFAULT_STAGES[self.recipe]]
        allowed = RECIPE_TERMS[self.recipe]
        for stage in self.stages:
            extra = [f.name for f in dataclasses.fields(stage.weights)
                     if f.name not in allowed and getattr(stage.weights, f.name)]
            if extra:
                raise ValueError(f"stage {stage.name}: recipe {self.recipe!r} has no loss terms "
                                 f"{extra}; it computes {list(allowed)}")
        names = [s.name for s in self.stages]
        if len(set(names)) != len(names):
            raise ValueError(f"stage names must be unique, got {names}")
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            raise ValueError(f"mixed_precision must be 'no', 'fp16' or 'bf16', "
                             f"got {self.mixed_precision!r}")


def _build(cls, data: dict | None, where: str):
    """Dataclass from a dict, rejecting unknown keys by name (typos must not pass silently)."""
    data = dict(data or {})
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{where}: unknown keys {unknown}; expected some of {sorted(known)}")
    return data


def config_from_dict(raw: dict) -> DistillConfig:
    """Build a :class:`DistillConfig` from plain data (as read from YAML/JSON)."""
    raw = _build(DistillConfig, raw, "config")
    recipe = raw.get("recipe", "compodistill")
    if recipe not in RECIPES:
        raise ValueError(f"recipe must be one of {RECIPES}, got {recipe!r}")
    stages = []
    for i, stage in enumerate(raw.pop("stages", None) or [
            {"kind": k} for k in RECIPE_DEFAULT_STAGES[recipe]]):
        stage = _build(StageConfig, stage, f"stages[{i}]")
        if "kind" not in stage:
            raise ValueError(f"stages[{i}]: 'kind' is required (one of {STAGE_KINDS})")
        weights = _build(LossWeights, stage.pop("weights", None), f"stages[{i}].weights")
        stages.append(default_stage(stage.pop("kind"), recipe, weights=weights, **stage))
    sections = {name: cls(**_build(cls, raw.pop(name, None), name)) for name, cls in (
        ("data", DataConfig), ("kd", KDOptions), ("vat", VATOptions),
        ("llava_kd", LlavaKDOptions), ("llavadi", LlavaDIOptions), ("comd", CoMDOptions))}
    return DistillConfig(stages=stages, **sections, **raw)


def load_config(path: str | Path) -> DistillConfig:
    """Read a YAML (``.yaml``/``.yml``) or JSON config file."""
    path = Path(path)
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        import yaml

        raw = yaml.safe_load(text) or {}
    else:
        raw = json.loads(text)
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: the config must be a mapping, got {type(raw).__name__}")
    return config_from_dict(raw)


def config_to_dict(config: DistillConfig) -> dict:
    return dataclasses.asdict(config)
