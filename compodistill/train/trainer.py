"""CompoDistillTrainer: the CompoDistill stage chain (DPT → DFT → SFT) on accelerate.

(Not ``DistillationTrainer``: that is TRL's, and code that uses both must import both.)

>>> trainer = CompoDistillTrainer(load_config("configs/compodistill.yaml"))
>>> results = trainer.run()            # every stage, each from the previous one's output

Each stage writes ``<output_dir>/<stage>/`` with metrics (JSONL/CSV), a loss-curve PNG,
checkpoints while it runs, and the final model in ``model/`` (LoRA merged). A finished
stage is skipped when the run is started again; an interrupted one resumes from its last
checkpoint. ``config.recipe`` picks the method (:mod:`compodistill.train.recipes`): the
recipe supplies each stage's losses, or (CoMD) the whole run.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from ..hf.families import ResolvedModel
from ..hf.family_taf import apply_family_taf, is_taf, save_taf
# Every trainer family: LLaVA (TAF or not) as before, the others as AutoModelForImageTextToText.
from ..hf.loading import load_family_model as load_student
from ..hf.loading import resolve_model
from ..hf.llava import TAFLlavaForConditionalGeneration, apply_taf
from ..data.family_inputs import family_image_inputs
from . import distributed
from .checkpoint import atomic_directory_write, is_complete
from .config import DistillConfig, StageConfig, config_to_dict
from .engine import StageLoop, StageResult
from .families import check_family_options
from .stages import finish_stage, llava_core, prepare_trainable


def _load_llava(path: str, dtype=None):
    return load_student(path, dtype=dtype) if dtype is not None else load_student(path)


def check_checkpoint(path: str, key: str) -> ResolvedModel:
    """A model folder named by config ``key`` exists, holds a ``config.json`` and is of a
    trainer family: its :class:`~compodistill.hf.families.ResolvedModel`, read once and
    carried down from here (docs/ARCHITECTURE.md).

    Runs before any weights are loaded or anything is written, so a wrong path costs
    nothing and is named.
    """
    if not path:
        raise ValueError(f"{key}: not set; give the path of a model folder in the config")
    where = Path(path)
    hint = ("a local folder written by save_pretrained (download hub models first, e.g. with "
            "`hf download ORG/NAME --local-dir DIR`; `compodistill demo` writes a usable pair: "
            "runs/demo/teacher-warmup/1-teacher/model and runs/demo/student-warmup/1-student/model)")
    if not where.is_dir():
        raise FileNotFoundError(f"{key}: checkpoint folder not found: {path}; expected {hint}")
    if not (where / "config.json").is_file():
        raise FileNotFoundError(f"{key}: {path} has no config.json; expected {hint}")
    return resolve_model(path, key)  # the family, from config.json (docs/families.md)


def training_dataset(config: DistillConfig, model_config, tokenizer, source=None, *,
                     image_inputs=None):
    """The ``LlavaDataset`` a run trains on: ``source`` (a path or a list of records; default
    ``config.data.train_json``) encoded for the student whose config is ``model_config``.
    The teacher cache builds its data with this too, so sample i is the same in both.
    ``image_inputs``: a family's own image inputs (data/family_inputs.py); None for LLaVA."""
    from ..data import LlavaDataset, MalformedRecordError

    data = config.data
    source = source if source is not None else data.train_json
    if not source and not isinstance(source, list):
        raise ValueError("config.data.train_json is empty: nothing to train on")
    # data.on_bad_record: error stops here, before the first step, at the first bad record.
    on_error = "raise" if data.on_bad_record == "error" else "skip"
    try:
        if image_inputs is not None:  # a family with its own image inputs
            return LlavaDataset(source, data.image_folder or None, tokenizer, 1,
                                num_image_tokens=1, image_token_id=model_config.image_token_id,
                                max_length=data.max_length, on_error=on_error,
                                image_inputs=image_inputs)
        images = llava_image_processor(config)
        return LlavaDataset(source, data.image_folder or None, tokenizer,
                            images if images is not None else model_config.vision_config.image_size,
                            num_image_tokens=model_config.image_seq_length,
                            image_token_id=model_config.image_token_id,
                            max_length=data.max_length, on_error=on_error)
    except MalformedRecordError as exc:
        raise MalformedRecordError(exc.where, exc.reason, f"{exc.detail} (data.on_bad_record: "
                                   f"error stops at the first bad record, before training; fix "
                                   f"or remove it, or set on_bad_record: skip)") from None


def records_skipped(dataset) -> tuple[dict[str, int], list[str]]:
    """The records ``dataset`` dropped, by reason, and where the first few are; ({}, []) for
    a data set that does not count them (a user's own)."""
    inner = getattr(dataset, "dataset", dataset)  # the teacher cache's IndexedDataset
    if not hasattr(inner, "records_skipped"):
        return {}, []
    return inner.records_skipped(), inner.first_skipped()


def llava_image_processor(config: DistillConfig):
    """The image processor saved with a LLaVA student (alone or in its processor), as eval
    uses it; None: the default resize to the tower's size (docs/evaluation.md#processors)."""
    from ..data.processors import load_image_processor

    student = config.student
    return load_image_processor(student) if student and Path(student).is_dir() else None


class CompoDistillTrainer:
    """Run the stages of a :class:`~compodistill.train.config.DistillConfig`.

    Args:
        config: the run's configuration.
        student, teacher: models to use instead of loading ``config.student`` /
            ``config.teacher`` from disk.
        tokenizer: defaults to the one saved next to the student.
        train_dataset: defaults to ``LlavaDataset(config.data.train_json, ...)``.
        accelerator: an ``accelerate.Accelerator``; default: one built from the config.
        show_progress: tqdm bars per stage.
        recipe: a :class:`~compodistill.train.recipes.Recipe` instance (e.g. CoMD with a custom
            judge); default: the one ``config.recipe`` names.
    """

    def __init__(self, config: DistillConfig, *, student=None, teacher=None, tokenizer=None,
                 train_dataset=None, accelerator=None, show_progress: bool = True, recipe=None):
        from .recipes import get_recipe

        from accelerate.utils import DataLoaderConfiguration, set_seed

        # Each model's family, config and visual ids, resolved once and passed down.
        self.student_model = (check_checkpoint(config.student, "student") if student is None
                              else resolve_model(student))
        self.teacher_model = (resolve_model(teacher) if teacher is not None else
                              check_checkpoint(config.teacher, "teacher") if config.teacher
                              else None)
        if train_dataset is None and config.data.train_json and not Path(
                config.data.train_json).is_file():
            raise FileNotFoundError(f"data.train_json: training data not found: "
                                    f"{config.data.train_json}")
        check_family_options(config, self.student_model, self.teacher_model)
        if config.cpu_threads is not None:
            torch.set_num_threads(config.cpu_threads)
        self.config = config
        self.recipe = recipe if recipe is not None else get_recipe(config.recipe)
        self.acc = accelerator or distributed.make_accelerator(
            mixed_precision=config.mixed_precision,
            # The loop steps the scheduler once per optimiser step itself (accelerate would
            # step it once per process: a schedule that many times too fast).
            step_scheduler_with_optimizer=False,
            # Each process collates its own samples: dispatching (one process slicing whole
            # batches on dim 0) would cut per-image rows (pixel patches, image_grid_thw) apart
            # from their samples.
            dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True,
                                                      dispatch_batches=False))
        set_seed(config.seed)
        self.output_dir = Path(config.output_dir)
        self.show_progress = show_progress
        self.student = student if student is not None else _load_llava(self.student_model)
        self.teacher = teacher if teacher is not None else (
            _load_llava(self.teacher_model) if self.teacher_model is not None else None)
        if self.teacher is not None:
            self.teacher.eval().requires_grad_(False)
            self.teacher.to(config.teacher_device or self.acc.device)
        self.tokenizer = tokenizer if tokenizer is not None else self._load_tokenizer()
        self.image_inputs = family_image_inputs(self.student_model, config.student,
                                                 self.tokenizer)
        self.dataset = train_dataset if train_dataset is not None else self.load_dataset()
        # teacher: {cache: DIR}: the targets come from the cache, no teacher is ever loaded.
        self.teacher_cache = None
        if config.teacher_cache is not None:
            from .cache_source import CacheSource

            self.teacher_cache = CacheSource(config, self.student_model, self.image_inputs)
            self.dataset = self.teacher_cache.indexed(self.dataset)

    def _load_tokenizer(self):
        from ..data.processors import load_processor_parts

        if not self.config.student:
            raise ValueError("pass tokenizer= or set config.student to a folder with a tokenizer")
        # the student's own processor when saved with it: its chat template (docs/evaluation.md)
        return load_processor_parts(self.config.student).tokenizer

    def load_dataset(self, source=None):
        """``LlavaDataset`` of ``source`` (a path or a list of records; default the config's)."""
        return training_dataset(self.config, self.student.config, self.tokenizer, source,
                                image_inputs=self.image_inputs)

    # ------------------------------------------------------------------ pieces
    def data_loader(self, stage: StageConfig) -> DataLoader:
        """The stage's training batches: per-process micro-batches of ``batch_size /
        (grad_accum x processes)``, shuffled, or length-grouped with ``data.group_by_length``."""
        from ..data import LengthGroupedSampler, LlavaCollator

        per_step = stage.grad_accum * self.acc.num_processes
        if stage.batch_size % per_step:
            raise ValueError(f"stage {stage.name}: batch_size {stage.batch_size} must be a "
                             f"multiple of grad_accum x processes = {per_step}")
        pad = self.tokenizer.pad_token_id
        if pad is None:
            pad = self.tokenizer.eos_token_id or 0
        micro = stage.batch_size // per_step
        # Batches of similar lengths waste less compute on padding; the order is still random
        # (seeded, reshuffled per epoch through the loader's set_epoch).
        sampler = (LengthGroupedSampler(self.dataset, micro, seed=self.config.seed)
                   if self.config.data.group_by_length else None)
        collate = LlavaCollator(pad, image_inputs=self.image_inputs)
        if self.teacher_cache is not None:  # batches name their samples for the cache
            collate = self.teacher_cache.collator(collate)
        return DataLoader(self.dataset, batch_size=micro, sampler=sampler,
                          shuffle=sampler is None, collate_fn=collate,
                          num_workers=self.config.data.num_workers,
                          generator=torch.Generator().manual_seed(self.config.seed))

    def stage_dir(self, stage: StageConfig) -> Path:
        """``<output_dir>/<i>-<name>``: where a stage of the chain writes everything."""
        index = [s.name for s in self.config.stages].index(stage.name)
        return self.output_dir / f"{index + 1}-{stage.name}"

    def reload(self, folder) -> torch.nn.Module:
        """A saved stage output, on this process's device."""
        return _load_llava(str(folder)).to(self.acc.device)

    def save_model(self, model, folder: Path) -> None:
        """``save_pretrained`` of the (unwrapped) model and the tokenizer, written atomically."""
        def write(tmp: Path) -> None:
            unwrapped = self.acc.unwrap_model(model)
            if is_taf(unwrapped):  # a plain checkpoint, TAF folded in (hf/family_taf.py)
                save_taf(unwrapped, tmp)
            else:
                unwrapped.save_pretrained(tmp, safe_serialization=True)
            self.tokenizer.save_pretrained(tmp)
            if self.image_inputs is not None:  # the family's image processor goes along
                self.image_inputs.processor.save_pretrained(tmp)
            else:  # LLaVA's, when the student came with one
                image_processor = llava_image_processor(self.config)
                if image_processor is not None:
                    image_processor.save_pretrained(tmp)

        if self.acc.is_main_process:
            atomic_directory_write(folder, write)
        self.acc.wait_for_everyone()

    # ------------------------------------------------------------------ stages
    def image_reliance(self, stage: StageConfig, student, with_teacher: bool) -> dict:
        """The student's (and the teacher's, when the stage runs it) LM-loss rise with the
        images replaced, on the first ``image_reliance_batches`` batches; a one-line warning
        for a model that does not depend on its images (docs/stages.md#image-reliance)."""
        from ..data import LlavaCollator
        from . import image_reliance as ir

        n = self.config.image_reliance_batches
        if not n or distributed.is_fsdp2(self.acc):  # FSDP2: the weights are not whole here
            return {}
        pad = self.tokenizer.pad_token_id
        collate = LlavaCollator(pad if pad is not None else (self.tokenizer.eos_token_id or 0),
                                image_inputs=self.image_inputs)
        micro = max(1, stage.batch_size // (stage.grad_accum * self.acc.num_processes))
        batches = ir.reliance_batches(self.dataset, collate, micro, n)
        models = [("student", student)]
        if with_teacher and self.teacher is not None:
            models.append(("teacher", self.teacher))
        out = {}
        for who, model in models:
            reliance = ir.measure(model, batches)
            if reliance is not None:
                out[who] = round(reliance.value, 6)
                ir.warn_if_blind(stage.name, who, reliance)
        return out

    def run_stage(self, stage: StageConfig) -> StageResult | None:
        """Train one stage on ``self.student``; returns None when it had already finished."""
        stage_dir = self.stage_dir(stage)
        final = stage_dir / "model"
        if is_complete(final):
            self.student = _load_llava(str(final)).to(self.acc.device)
            self.acc.print(f"stage {stage.name}: already finished, loaded {final}")
            return None
        if self.config.taf and self.teacher is not None and not isinstance(
                self.student, TAFLlavaForConditionalGeneration) and not is_taf(self.student):
            family = self.student_model.family
            self.student = (apply_taf(self.student, self.teacher) if family.name == "llava"
                            else apply_family_taf(self.student, self.teacher, family))
        elif self.config.taf and self.teacher_cache is not None and not isinstance(
                self.student, TAFLlavaForConditionalGeneration) and not is_taf(self.student):
            self.student = self.teacher_cache.apply_taf(self.student)  # connector from the cache
        student, params = prepare_trainable(self.student, stage)
        if self.config.gradient_checkpointing:
            llava_core(student).gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False})
            if hasattr(student, "enable_input_require_grads"):
                student.enable_input_require_grads()
        parts = self.recipe.stage_parts(self, student, params, stage, stage_dir)
        losses, frame = parts.losses, None
        reliance = self.image_reliance(stage, student, getattr(losses, "need_teacher", False))
        if distributed.zero_stage(self.acc) == 3:  # the frozen lm_head, gathered once per step
            losses = distributed.zero3_head_step(losses, llava_core(student), stage.name)
        if distributed.is_deepspeed(self.acc):  # docs/distributed.md: teacher replicated
            frame = distributed.skeleton(parts.module)
        if distributed.is_fsdp2(self.acc):  # docs/distributed.md
            if self.teacher is not None:
                distributed.shard_teacher(self.teacher, self.acc)
                if getattr(losses, "need_teacher", True):  # no teacher work in e.g. SFT
                    losses = distributed.teacher_step(losses, self.teacher)
            frame = distributed.skeleton(parts.module)
        loop = StageLoop(self.acc, parts.module, parts.params, self.data_loader(stage), stage,
                         losses, stage_dir, save_every=self.config.save_every,
                         log_every=self.config.log_every, max_bad_steps=self.config.max_bad_steps,
                         show_progress=self.show_progress,
                         records_skipped=lambda: records_skipped(self.dataset)[0],
                         image_reliance=reliance)
        result = loop.run()
        if frame is not None:
            return self._finish_sharded_stage(loop, parts, frame, stage, stage_dir, result)
        self.recipe.after_stage(self, parts, stage, stage_dir)
        self.student = finish_stage(student)
        for p in self.student.parameters():
            p.requires_grad_(False)
        self.save_model(self.student, final)
        return result

    def _finish_sharded_stage(self, loop, parts, frame, stage, stage_dir, result):
        """FSDP2, DeepSpeed: the main process merges and saves the consolidated weights; then every
        process reloads them (the sharded modules are not used again)."""
        import dataclasses

        full = distributed.consolidated(self.acc, loop.model, frame)
        if full is not None:
            plain = dataclasses.replace(parts, module=full, extras=distributed.counterparts(
                parts.module, full, parts.extras))
            self.recipe.after_stage(self, plain, stage, stage_dir)
            student = finish_stage(full.model)
            student.requires_grad_(False)
            self.save_model(student, stage_dir / "model")
        else:
            self.acc.wait_for_everyone()  # save_model's barrier on the other processes
        self.acc.free_memory()  # drop the sharded model and optimizer from accelerate's lists
        self.student = self.reload(stage_dir / "model")
        return result

    def run(self, stages: list[str] | None = None) -> list[StageResult]:
        """Run the recipe: for all but CoMD, the named stages (default: all) in config order.

        Returns the results of the stages trained in this call.
        """
        return self.recipe.run(self, stages)

    def run_chain(self, stages: list[str] | None = None) -> list[StageResult]:
        """Run the named stages (default: all) in config order; returns their results."""
        names = [s.name for s in self.config.stages]
        wanted = names if stages is None else list(stages)
        unknown = sorted(set(wanted) - set(names))
        if unknown:
            raise ValueError(f"unknown stages {unknown}; the config has {names}")
        self.output_dir.mkdir(parents=True, exist_ok=True)
        if self.acc.is_main_process:
            (self.output_dir / "config.json").write_text(
                json.dumps(config_to_dict(self.config), indent=2))
        results = []
        for stage in self.config.stages:
            final = self.stage_dir(stage) / "model"
            if stage.name in wanted:
                result = self.run_stage(stage)
                if result is not None:
                    results.append(result)
            elif is_complete(final):  # the chain: a later stage starts from this output
                self.student = _load_llava(str(final)).to(self.acc.device)
        return results
