"""Configuration of a distillation run: one file, every stage (docs/stages.md defaults).

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

from .config_fields import ConfigError, check_fields, choice, coerce
from .recipes import recipe_facts, recipe_names

STAGE_KINDS = ("dpt", "dft", "sft")
# What a stage trains: the TAF post-connector, the (trainable part of the) connector, LoRA on
# the language model (optionally with the post-connector or the connector), or every weight.
TRAINABLE = ("post_connector", "connector", "lora", "lora+post_connector", "lora+connector",
             "all")


def _facts(recipe: str):
    """The recipe's own facts (terms, stage defaults, chain), as a config error if unknown."""
    try:
        return recipe_facts(recipe)
    except ValueError:
        raise ConfigError("recipe", f"{recipe!r} is not a recipe; recipe must be one of "
                                    f"{tuple(recipe_names())}") from None


# The values each option accepts, copied from the losses they configure so that a typo fails
# when the file loads, not after both models have loaded (tests check the two stay equal).
KD_LOSSES = ("kl", "reverse_kl", "jsd")
KD_POSITIONS = ("response", "all", "visual")
VAT_MATCHING = ("group", "simple", "adaptive")
VAT_PRESETS = ("all", "early", "intermediate", "late")
# "response": the rows that predict a response token (from the labels; the trainer only)
VAT_QUERIES = ("all", "visual", "text", "response")
VAT_LOSSES = ("cosine", "kl", "reverse_kl", "jsd", "mse")
VAT_COSINE = ("flat", "row", "pooled")
VAT_DISTRIBUTIONS = ("renorm", "rest")
LAYER_REDUCTIONS = ("mean", "sum")
SCHEDULERS = ("cosine", "linear")
ON_BAD_RECORD = ("skip", "error")  # data.on_bad_record (docs/stages.md#bad-records)
MIXED_PRECISION = ("no", "fp16", "bf16")


@dataclass
class LossWeights:
    """Weights of the loss terms; a weight of 0 switches the term off.

    ``lm``, ``kd`` (logit KD on ``kd.positions``; the response tokens in LLaVA-KD) and ``vat``
    are CompoDistill's; ``kd_vis`` (KD on the visual positions) and ``rdist`` are LLaVA-KD's,
    ``feat`` (projected last-hidden-state MSE) is LLAVADI's. Which terms a stage may use
    depends on the recipe (its ``facts.terms``, :mod:`compodistill.train.recipes`).
    """

    lm: float = 1.0
    kd: float = 0.0
    vat: float = 0.0
    kd_vis: float = 0.0
    rdist: float = 0.0
    feat: float = 0.0
    # Terms of recipes registered outside the package, by name (see register_recipe).
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        check_fields(self)
        for name, value in self.extra.items():
            try:
                self.extra[name] = coerce(value, float)
            except TypeError:
                raise ConfigError(name, f"expected a number, got {value!r}") from None
        for name, value in self.as_dict().items():
            if value < 0:
                raise ConfigError(name, f"a loss weight must be >= 0, got {value}")

    @classmethod
    def from_dict(cls, weights: dict) -> "LossWeights":
        """Built-in terms go to their fields, any other name to ``extra``."""
        named = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        return cls(**{k: v for k, v in weights.items() if k in named},
                   extra={k: v for k, v in weights.items() if k not in named})

    def as_dict(self) -> dict:
        """Every term's weight by name, built-in and extra."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
               if f.name != "extra"}
        return {**out, **self.extra}


@dataclass
class KDOptions:
    """Logit distillation (docs/logit_kd.md)."""

    loss: str = choice("kl", KD_LOSSES)
    temperature: float = 1.0
    positions: str = choice("response", KD_POSITIONS)
    beta: float = 0.5

    def __post_init__(self):
        check_fields(self)
        if self.temperature <= 0:
            raise ConfigError("temperature", f"must be > 0, got {self.temperature}")
        if not 0.0 <= self.beta <= 1.0:
            raise ConfigError("beta", f"must be in [0, 1], got {self.beta}")


@dataclass
class VATOptions:
    """Visual-attention alignment (docs/visual_attention.md); defaults are the paper's."""

    matching: str = choice("group", VAT_MATCHING)
    preset: str = choice("intermediate", VAT_PRESETS)
    student_layers: list[int] | None = None
    teacher_layers: list[int] | None = None
    query: str = choice("all", VAT_QUERIES)
    loss: str = choice("cosine", VAT_LOSSES)
    cosine: str = choice("flat", VAT_COSINE)
    distribution: str = choice("renorm", VAT_DISTRIBUTIONS)
    layer_reduction: str = choice("mean", LAYER_REDUCTIONS)

    def __post_init__(self):
        check_fields(self)
        for key in ("student_layers", "teacher_layers"):
            layers = getattr(self, key)
            if layers is not None and (not layers or min(layers) < 0):
                raise ConfigError(key, f"must be a non-empty list of layer indices >= 0, "
                                       f"got {layers}")


@dataclass
class LlavaKDOptions:
    """LLaVA-KD (docs/stages.md): RDist works on ``vocab_chunk`` lm_head rows at a time."""

    vocab_chunk: int = 8192

    def __post_init__(self):
        check_fields(self)
        if self.vocab_chunk < 1:
            raise ConfigError("vocab_chunk", f"must be >= 1, got {self.vocab_chunk}")


@dataclass
class LlavaDIOptions:
    """LLAVADI (docs/stages.md): width of the feature projector MLP d_s → proj_hidden → d_t."""

    proj_hidden: int = 5120

    def __post_init__(self):
        check_fields(self)
        if self.proj_hidden < 1:
            raise ConfigError("proj_hidden", f"must be >= 1, got {self.proj_hidden}")


@dataclass
class CoMDOptions:
    """CoMD competitive loop (docs/stages.md); see :mod:`compodistill.train.recipes.comd`.

    ``judge``: ``"model"`` (a judge model scores both answers 1–10 in both orders; the model at
    ``judge_model``, default the teacher) or ``"overlap"`` (token F1 with the reference answer,
    mapped to 1–10). A sample is hard when teacher − student ≥ ``threshold``. Prompts are
    ``str.format`` templates (empty: the built-in ones). ``assess_samples`` caps how many
    instructions are assessed per round (None: all); ``accumulate`` makes the next round's
    instruction set the current one plus the augmented instructions (else the augmented only).
    """

    rounds: int = 4
    threshold: float = 1.0
    judge: str = choice("model", ("model", "overlap"))
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
        check_fields(self)
        for key in ("rounds", "max_new_tokens", "instruction_max_new_tokens",
                    "judge_max_new_tokens", "generation_batch_size"):
            if getattr(self, key) < 1:
                raise ConfigError(key, f"must be >= 1, got {getattr(self, key)}")
        if self.assess_samples is not None and self.assess_samples < 1:
            raise ConfigError("assess_samples", f"must be >= 1 or null, got {self.assess_samples}")


@dataclass
class StageConfig:
    """One stage of the chain. ``kind`` picks the defaults of docs/stages.md."""

    kind: str = choice(None, STAGE_KINDS)
    name: str = ""
    trainable: str = ""
    weights: LossWeights = field(default_factory=LossWeights)
    lr: float = 2e-4
    epochs: float = 1.0
    max_steps: int | None = None
    batch_size: int = 8
    grad_accum: int = 1
    warmup_ratio: float = 0.03
    scheduler: str = choice("cosine", SCHEDULERS)
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    lora_r: int = 128
    lora_alpha: int = 256
    lora_dropout: float = 0.05

    def __post_init__(self):
        if isinstance(self.weights, dict):
            self.weights = LossWeights.from_dict(self.weights)
        if self.kind not in STAGE_KINDS:  # first: the defaults below depend on it
            raise ConfigError("kind", f"{self.kind!r} is not a stage kind; "
                                      f"stage kind must be one of {STAGE_KINDS}")
        self.name = self.name or self.kind
        self.trainable = self.trainable or _facts("compodistill").stage_default(
            self.kind)["trainable"]
        check_fields(self)
        if self.trainable not in TRAINABLE:
            raise ConfigError("trainable", f"{self.trainable!r} is not one of "
                                           f"{', '.join(map(repr, TRAINABLE))}")
        for key in ("lr", "epochs", "batch_size", "grad_accum", "lora_r", "lora_alpha"):
            if getattr(self, key) <= 0:
                raise ConfigError(key, f"must be positive, got {getattr(self, key)}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError("max_steps", f"must be >= 1 or null, got {self.max_steps}")
        for key in ("warmup_ratio", "lora_dropout"):
            if not 0.0 <= getattr(self, key) < 1.0:
                raise ConfigError(key, f"must be in [0, 1), got {getattr(self, key)}")
        if self.weight_decay < 0 or self.max_grad_norm < 0:
            raise ConfigError("weight_decay" if self.weight_decay < 0 else "max_grad_norm",
                              "must be >= 0")


def default_stage(kind: str, recipe: str = "compodistill", **overrides) -> StageConfig:
    """A stage with the recipe's defaults (docs/stages.md), ``overrides`` applied on top.

    Weights not named by the recipe's defaults or ``overrides`` are 0, except ``lm`` (1).
    """
    if kind not in STAGE_KINDS:
        raise ConfigError("kind", f"{kind!r} is not a stage kind; "
                                  f"stage kind must be one of {STAGE_KINDS}")
    base = _facts(recipe).stage_default(kind)
    weights = overrides.pop("weights", {})
    if isinstance(weights, LossWeights):  # explicit weights: every field is taken as given
        weights = weights.as_dict()
    try:
        weights = LossWeights.from_dict({**base.pop("weights"), **weights})
    except ConfigError as e:
        raise e.within("weights") from None
    return StageConfig(kind=kind, weights=weights, **{**base, **overrides})


@dataclass
class DataConfig:
    """Where the LLaVA-format data lives."""

    train_json: str = ""
    image_folder: str = ""
    max_length: int = 1536
    # A record that cannot be used (missing or unreadable image, no conversations...): skip
    # it (counted by reason in the summaries and metrics) or stop before the first step.
    on_bad_record: str = choice("skip", ON_BAD_RECORD)
    num_workers: int = 0
    # Batch samples of similar token counts (LengthGroupedSampler): less padding per batch.
    group_by_length: bool = False

    def __post_init__(self):
        check_fields(self)
        if self.max_length < 1 or self.num_workers < 0:
            raise ConfigError("max_length" if self.max_length < 1 else "num_workers",
                              f"must be {'>= 1' if self.max_length < 1 else '>= 0'}")


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
    recipe: str = "compodistill"  # a name registered in compodistill.train.recipes
    llava_kd: LlavaKDOptions = field(default_factory=LlavaKDOptions)
    llavadi: LlavaDIOptions = field(default_factory=LlavaDIOptions)
    comd: CoMDOptions = field(default_factory=CoMDOptions)
    # None: the recipe's default (TAF is CompoDistill's; the other recipes have none).
    taf: bool | None = None
    seed: int = 0
    mixed_precision: str = choice("no", MIXED_PRECISION)
    gradient_checkpointing: bool = False
    log_every: int = 1
    save_every: int = 0
    max_bad_steps: int = 5
    # Batches on which each stage starts by measuring image_reliance (0: not measured).
    image_reliance_batches: int = 2
    teacher_device: str | None = None
    # torch's CPU threads for this run (None: torch's default). Tiny models on a shared CPU
    # run fastest with 1: more threads spin-wait each other when other jobs take the cores.
    cpu_threads: int | None = None
    # ``teacher: {cache: DIR, ...}`` in the file: a compodistill.teacher_cache
    # TeacherCacheOptions (targets come from the cache); None: the teacher runs online.
    teacher_cache: Any = None

    def __post_init__(self):
        facts = _facts(self.recipe)  # first: the stage defaults depend on it
        check_fields(self)
        for key in ("log_every", "max_bad_steps"):
            if getattr(self, key) < 1:
                raise ConfigError(key, f"must be >= 1, got {getattr(self, key)}")
        if self.cpu_threads is not None and self.cpu_threads < 1:
            raise ConfigError("cpu_threads", f"must be >= 1 or null, got {self.cpu_threads}")
        if self.image_reliance_batches < 0:
            raise ConfigError("image_reliance_batches", f"must be >= 0 (0: not measured), "
                                                        f"got {self.image_reliance_batches}")
        if self.save_every < 0:
            raise ConfigError("save_every", f"must be >= 0 (0: only at the end), "
                                            f"got {self.save_every}")
        if self.taf is None:
            self.taf = facts.taf
        if self.stages is None:
            self.stages = [default_stage(k, self.recipe) for k in facts.default_stages]
        allowed = facts.terms
        for i, stage in enumerate(self.stages):
            extra = [name for name, value in stage.weights.as_dict().items()
                     if name not in allowed and value]
            if extra:
                raise ConfigError(f"stages[{i}].weights",
                                  f"recipe {self.recipe!r} has no loss terms {extra}; "
                                  f"it computes {list(allowed)}")
        names = [s.name for s in self.stages]
        if len(set(names)) != len(names):
            raise ConfigError("stages", f"stage names must be unique, got {names}")
        if self.teacher_cache is not None:
            from .cache_options import check_cacheable

            check_cacheable(self)


# Keys renamed before the first release: the error says what the key is called now.
RENAMED = {"DataConfig": {"on_error": "on_bad_record (skip | error)"}}


def _build(cls, data, where: str) -> dict:
    """The keys of a config section, rejecting unknown keys by name (typos must not pass)."""
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(where, f"expected a mapping of keys to values, got {data!r}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        renamed = "".join(f"; {old} is now {new}" for old, new in RENAMED.get(cls.__name__, {})
                          .items() if old in unknown)
        raise ConfigError(where, f"unknown keys {unknown}; expected some of {sorted(known)}"
                                 f"{renamed}")
    return dict(data)


def _section(cls, data, where: str):
    try:
        return cls(**_build(cls, data, where))
    except ConfigError as e:
        raise e.within(where) from None


def config_from_dict(raw: dict) -> DistillConfig:
    """Build a :class:`DistillConfig` from plain data (as read from YAML/JSON).

    Every value is checked here, so a bad one raises :class:`ConfigError` (a ``ValueError``)
    naming its key path, the value and the choices before any model is loaded.
    """
    raw = _build(DistillConfig, raw, "config")
    if isinstance(raw.get("teacher"), dict):  # teacher: {cache: DIR, ...}
        from .cache_options import TeacherCacheOptions

        raw["teacher_cache"] = TeacherCacheOptions.from_dict(raw["teacher"])
        raw["teacher"] = ""  # training never loads it: teacher_cache.path is the cache run's
    recipe = raw.get("recipe", "compodistill")
    if not isinstance(recipe, str):
        raise ConfigError("recipe", f"expected a string, got {recipe!r}")
    stage_list = raw.pop("stages", None) or [{"kind": k}
                                             for k in _facts(recipe).default_stages]
    if not isinstance(stage_list, list):
        raise ConfigError("stages", f"expected a list of stages, got {stage_list!r}")
    stages = []
    for i, stage in enumerate(stage_list):
        where = f"stages[{i}]"
        stage = _build(StageConfig, stage, where)
        if "kind" not in stage:
            raise ConfigError(f"{where}.kind", f"is required (one of {STAGE_KINDS})")
        try:
            weights = stage.pop("weights", None) or {}
            if not isinstance(weights, dict):
                raise ConfigError("weights", f"expected a mapping of term names to weights, "
                                             f"got {weights!r}")
            stages.append(default_stage(stage.pop("kind"), recipe, weights=weights, **stage))
        except ConfigError as e:
            raise e.within(where) from None
    sections = {name: _section(cls, raw.pop(name, None), name) for name, cls in (
        ("data", DataConfig), ("kd", KDOptions), ("vat", VATOptions),
        ("llava_kd", LlavaKDOptions), ("llavadi", LlavaDIOptions), ("comd", CoMDOptions))}
    return DistillConfig(stages=stages, **sections, **raw)


def load_config(path: str | Path) -> DistillConfig:
    """Read and check a YAML (``.yaml``/``.yml``) or JSON config file.

    Raises ``FileNotFoundError`` for a missing file and :class:`ConfigError` (naming the file
    and the key) for anything wrong inside it.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    text = path.read_text()
    try:
        if path.suffix in (".yaml", ".yml"):
            import yaml

            raw = yaml.safe_load(text) or {}
        else:
            raw = json.loads(text)
    except Exception as e:  # a syntax error: say where, in one line
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(str(path), f"cannot be parsed: {first}") from None
    if not isinstance(raw, dict):
        raise ConfigError(str(path), f"the config must be a mapping, got {type(raw).__name__}")
    try:
        return config_from_dict(raw)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e.key}" if e.key else str(path), e.message) from None


def config_to_dict(config: DistillConfig) -> dict:
    return dataclasses.asdict(config)
