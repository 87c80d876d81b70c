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
# the language model (optionally with the post-connector), or every weight.
TRAINABLE = ("post_connector", "connector", "lora", "lora+post_connector", "all")


@dataclass
class LossWeights:
    """Weights of the loss terms; a weight of 0 switches the term off."""

    lm: float = 1.0
    kd: float = 0.0
    vat: float = 0.0


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


def default_stage(kind: str, **overrides) -> StageConfig:
    """A stage with SPEC §7 defaults, ``overrides`` applied on top."""
    if kind not in STAGE_DEFAULTS:
        raise ValueError(f"stage kind must be one of {STAGE_KINDS}, got {kind!r}")
    base = dict(STAGE_DEFAULTS[kind])
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
    stages: list[StageConfig] = field(default_factory=lambda: [
        default_stage("dpt"), default_stage("dft"), default_stage("sft")])
    kd: KDOptions = field(default_factory=KDOptions)
    vat: VATOptions = field(default_factory=VATOptions)
    taf: bool = True
    seed: int = 0
    mixed_precision: str = "no"
    gradient_checkpointing: bool = False
    log_every: int = 1
    save_every: int = 0
    max_bad_steps: int = 5
    teacher_device: str | None = None

    def __post_init__(self):
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
    stages = []
    for i, stage in enumerate(raw.pop("stages", None) or [{"kind": "dpt"}, {"kind": "dft"},
                                                          {"kind": "sft"}]):
        stage = _build(StageConfig, stage, f"stages[{i}]")
        if "kind" not in stage:
            raise ValueError(f"stages[{i}]: 'kind' is required (one of {STAGE_KINDS})")
        weights = _build(LossWeights, stage.pop("weights", None), f"stages[{i}].weights")
        stages.append(default_stage(stage.pop("kind"), weights=weights, **stage))
    return DistillConfig(
        data=DataConfig(**_build(DataConfig, raw.pop("data", None), "data")),
        kd=KDOptions(**_build(KDOptions, raw.pop("kd", None), "kd")),
        vat=VATOptions(**_build(VATOptions, raw.pop("vat", None), "vat")),
        stages=stages, **raw)


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
