"""The optimisation loop of one stage, on accelerate.

The loop knows nothing about distillation: a stage hands it the model, the trainable
parameters, a data loader and ``loss_terms(model, batch) -> {name: scalar}`` (``model`` is the
accelerate-prepared module, so the forward goes through DDP/FSDP wrappers); the loop weights
and sums the terms, steps the optimiser with gradient accumulation and clipping, skips
non-finite steps, logs metrics, and saves/resumes crash-safe checkpoints.
"""
from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from .checkpoint import (atomic_directory_write, latest_checkpoint, prune_checkpoints,
                         recover_checkpoints, sharded_directory_write, write_json)
from .config import StageConfig
from .distributed import configure_deepspeed, is_deepspeed, is_fsdp2, is_sharded
from .metrics import MetricsLogger, plot_loss_curves, read_metrics


@dataclass
class Combined:
    """Several loss terms computed by one fused call and already weighted by the stage
    weights (e.g. LM + KD from one pass over both lm_heads). ``parts`` are the unweighted
    term values, detached, for the metrics."""

    value: torch.Tensor
    parts: dict


class TooManyBadSteps(RuntimeError):
    """Raised after ``max_bad_steps`` consecutive non-finite losses or gradients."""


@dataclass
class StageResult:
    name: str
    steps: int
    skipped_steps: int
    final_losses: dict
    seconds: float
    metrics_path: Path
    plot_path: Path | None
    # records of the data set dropped, by reason ({"missing image": 1, ...}); not steps
    records_skipped: dict = field(default_factory=dict)
    # LM loss rise with the images replaced, per model ({"student": 0.41, "teacher": 0.63})
    image_reliance: dict = field(default_factory=dict)


def total_optimizer_steps(stage: StageConfig, batches_per_epoch: int) -> int:
    if stage.max_steps:
        return int(stage.max_steps)
    return max(1, math.ceil(batches_per_epoch * stage.epochs / stage.grad_accum))


def _peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return float("nan")


class StageLoop:
    """Run one stage to completion (or resume it from its latest checkpoint)."""

    def __init__(self, accelerator, model: torch.nn.Module, params: list[torch.nn.Parameter],
                 loader, stage: StageConfig, loss_terms: Callable[[torch.nn.Module, dict], dict],
                 stage_dir: str | Path, *, save_every: int = 0, log_every: int = 1,
                 max_bad_steps: int = 5, show_progress: bool = True, keep_last: int = 0,
                 records_skipped: Callable[[], dict] | None = None,
                 image_reliance: dict | None = None):
        from transformers import get_cosine_schedule_with_warmup, get_linear_schedule_with_warmup

        if not params:
            raise ValueError(f"stage {stage.name}: no trainable parameters")
        self.acc = accelerator
        self.stage = stage
        # accumulate() syncs (and the loop steps) every grad_accum micro-batches.
        accelerator.gradient_accumulation_steps = stage.grad_accum
        self.loss_terms = loss_terms
        self.stage_dir = Path(stage_dir)
        self.save_every, self.log_every, self.max_bad_steps = save_every, log_every, max_bad_steps
        self.show_progress = show_progress
        self.keep_last = int(keep_last)  # newest complete checkpoints kept (0: all)
        self.params = params
        # Each process sees 1/num_processes of the (not yet prepared) loader's batches.
        self.total_steps = total_optimizer_steps(
            stage, math.ceil(len(loader) / accelerator.num_processes))
        optimizer = torch.optim.AdamW(params, lr=stage.lr, weight_decay=stage.weight_decay)
        warmup = math.ceil(stage.warmup_ratio * self.total_steps)
        make = (get_cosine_schedule_with_warmup if stage.scheduler == "cosine"
                else get_linear_schedule_with_warmup)
        scheduler = make(optimizer, warmup, self.total_steps)
        if is_deepspeed(accelerator):  # the engine accumulates, clips and steps itself
            configure_deepspeed(accelerator, stage, loader.batch_size)
        self.model, self.optimizer, self.loader, self.scheduler = accelerator.prepare(
            model, optimizer, loader, scheduler)
        # Every process writes its part of a checkpoint (FSDP2 shards, ZeRO partitions).
        self.sharded = is_sharded(accelerator)
        if is_fsdp2(accelerator):  # fully_shard replaced the parameters by sharded (DTensor) ones
            self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.logger = MetricsLogger(self.stage_dir, enabled=accelerator.is_main_process)
        self.weights = stage.weights.as_dict()  # every term's weight, by name
        # The data set's dropped records by reason (read at each log: the loader finds some).
        self.records_skipped = records_skipped or dict
        self.image_reliance = dict(image_reliance or {})  # measured before the first step

    # ------------------------------------------------------------------ checkpoints
    def _save(self, step: int, skipped: int) -> None:
        def write(tmp: Path) -> None:
            self.acc.save_state(str(tmp))
            if self.acc.is_main_process:
                write_json(tmp / "loop_state.json", {"step": step, "skipped": skipped})

        self.acc.wait_for_everyone()
        if self.sharded:  # every process writes its shards (save_state is collective)
            sharded_directory_write(self.stage_dir / f"checkpoint-{step}", write, self.acc)
            if self.acc.is_main_process:
                prune_checkpoints(self.stage_dir, self.keep_last)
            self.acc.wait_for_everyone()
            return
        if self.acc.is_main_process:
            atomic_directory_write(self.stage_dir / f"checkpoint-{step}", write)
            prune_checkpoints(self.stage_dir, self.keep_last)
        self.acc.wait_for_everyone()

    def _resume(self) -> tuple[int, int]:
        if self.acc.is_main_process:
            recover_checkpoints(self.stage_dir)
        self.acc.wait_for_everyone()
        ckpt = latest_checkpoint(self.stage_dir)
        if ckpt is None:
            self._truncate_metrics(0)  # records of a run killed before its first checkpoint
            return 0, 0
        import json

        self.acc.load_state(str(ckpt))
        state = json.loads((ckpt / "loop_state.json").read_text())
        self._truncate_metrics(state["step"])
        return int(state["step"]), int(state["skipped"])

    def _truncate_metrics(self, step: int) -> None:
        """Drop metric records logged after the checkpoint we resume from."""
        if self.acc.is_main_process:
            self.logger.truncate(step)

    # ------------------------------------------------------------------ loop
    def _weighted(self, terms: dict) -> torch.Tensor:
        total = None
        for name, value in terms.items():
            if isinstance(value, Combined):
                total = value.value if total is None else total + value.value
                continue
            weight = self.weights.get(name, 1.0)
            if weight:
                total = weight * value if total is None else total + weight * value
        if total is None:
            raise ValueError(f"stage {self.stage.name}: every loss term has weight 0")
        return total

    def _all_finite(self, value: torch.Tensor) -> bool:
        flag = torch.tensor([float(torch.isfinite(value).all())], device=self.acc.device)
        return bool(self.acc.reduce(flag, reduction="sum").item() == self.acc.num_processes)

    def run(self, resume: bool = True) -> StageResult:
        step, skipped = self._resume() if resume else (0, 0)
        batches_done = step * self.stage.grad_accum
        bad_in_a_row, window_bad, start = 0, False, time.perf_counter()
        bad_terms: dict = {}
        tokens, window_start = 0, time.perf_counter()
        last: dict = {}
        progress = None
        if self.show_progress and self.acc.is_local_main_process:
            from tqdm.auto import tqdm

            progress = tqdm(total=self.total_steps, initial=step, desc=self.stage.name,
                            dynamic_ncols=True)
        self.model.train()
        epoch = 0
        while step < self.total_steps:
            self.loader.set_epoch(epoch) if hasattr(self.loader, "set_epoch") else None
            loader = self.loader
            skip = batches_done - epoch * len(self.loader)
            if skip > 0:
                if skip >= len(self.loader):
                    epoch += 1
                    continue
                loader = self.acc.skip_first_batches(self.loader, skip)
            for batch in loader:
                with self.acc.accumulate(self.model):
                    terms = self.loss_terms(self.model, batch)
                    total = self._weighted(terms)
                    finite = self._all_finite(total.detach())
                    if not finite:  # only on a bad micro-batch: name the culprits
                        bad_terms.update(nonfinite_terms(terms))
                    window_bad = window_bad or not finite
                    if finite:  # accelerate divides by grad_accum itself
                        self.acc.backward(total)
                    tokens += int(batch["attention_mask"].sum()) if "attention_mask" in batch else 0
                    batches_done += 1
                    if not self.acc.sync_gradients:
                        continue
                    # One bad micro-batch spoils the whole accumulation window.
                    finite, window_bad = not window_bad, False
                    grad_norm = (self.acc.clip_grad_norm_(self.params, self.stage.max_grad_norm)
                                 if finite else torch.tensor(float("nan")))
                    finite = finite and self._all_finite(torch.as_tensor(grad_norm))
                    if finite:
                        self.optimizer.step()
                        bad_in_a_row = 0
                    else:
                        skipped += 1
                        bad_in_a_row += 1
                        which = (f" (non-finite terms: {', '.join(bad_terms)})" if bad_terms
                                 else "")
                        warnings.warn(f"stage {self.stage.name} step {step + 1}: non-finite loss "
                                      f"or gradient{which}, step skipped ({skipped} so far)")
                        if bad_in_a_row >= self.max_bad_steps:
                            raise TooManyBadSteps(
                                f"stage {self.stage.name}: {bad_in_a_row} non-finite steps in a "
                                f"row (max_bad_steps={self.max_bad_steps}); lower the learning "
                                f"rate or check the data")
                    bad_terms = {}
                    self.scheduler.step()
                    self.optimizer.zero_grad(set_to_none=True)
                    step += 1
                    last = _term_values(terms)
                    last["loss"] = float(total.detach())
                    if step % self.log_every == 0 or step == self.total_steps:
                        elapsed = max(1e-9, time.perf_counter() - window_start)
                        record = {"stage": self.stage.name, "step": step, **last,
                                  "lr": self.scheduler.get_last_lr()[0],
                                  "grad_norm": float(grad_norm), "tokens_per_s": tokens / elapsed,
                                  "peak_mem_mib": _peak_memory_mib(self.acc.device),
                                  "skipped_steps": skipped,
                                  **_skipped_columns(self.records_skipped()),
                                  **{f"image_reliance_{who}": v
                                     for who, v in self.image_reliance.items()}}
                        self.logger.log(record)
                        tokens, window_start = 0, time.perf_counter()
                        if progress is not None:
                            shown = {k.removeprefix("loss_"): f"{v:.3g}" for k, v in last.items()}
                            shown["tok/s"] = f"{record['tokens_per_s']:.0f}"
                            if record["peak_mem_mib"] == record["peak_mem_mib"]:  # not NaN
                                shown["mem"] = f"{record['peak_mem_mib'] / 1024:.1f}G"
                            progress.set_postfix(shown)
                    if progress is not None:
                        progress.update(1)
                    if self.save_every and step % self.save_every == 0:
                        self._save(step, skipped)
                    if step >= self.total_steps:
                        break
            epoch += 1
        if progress is not None:
            progress.close()
        self.logger.close()
        plot = None
        if self.acc.is_main_process:
            plot = plot_loss_curves(read_metrics(self.logger.jsonl_path),
                                    self.stage_dir / "loss_curves.png",
                                    title=f"stage {self.stage.name}")
        return StageResult(self.stage.name, step, skipped, last, time.perf_counter() - start,
                           self.logger.jsonl_path, plot, dict(self.records_skipped()),
                           dict(self.image_reliance))


def _skipped_columns(counts: dict) -> dict:
    """``records_skipped`` (total) and ``records_skipped_<reason>`` for a metrics record."""
    out = {"records_skipped": sum(counts.values())}
    out.update({f"records_skipped_{reason.replace(' ', '_')}": n for reason, n in counts.items()})
    return out


def nonfinite_terms(terms: dict) -> dict:
    """``{label: None}`` (ordered) of the terms and parts that are NaN or inf, a VAT layer
    part named with its student layer (``vat_layer3`` -> ``vat (student layer 3)``)."""
    out = {}
    for name, value in terms.items():
        parts = value.parts if isinstance(value, Combined) else {name: value}
        for key, v in parts.items():
            if not bool(torch.isfinite(torch.as_tensor(v).detach()).all()):
                label = (f"vat (student layer {key[len('vat_layer'):]})"
                         if key.startswith("vat_layer") else key)
                out[label] = None
    return out


def _term_values(terms: dict) -> dict:
    """``loss_<name>`` for every term, the parts of a :class:`Combined` one by one."""
    out = {}
    for name, value in terms.items():
        parts = value.parts if isinstance(value, Combined) else {name: value}
        out.update({f"loss_{k}": float(v.detach()) for k, v in parts.items()})
    return out
