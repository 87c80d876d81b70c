"""Fused KD and VAT inside TRL's ``DistillationTrainer`` (docs/integrations.md; ``trl`` extra).

>>> trainer = TRLFusedDistillationTrainer(model=student, teacher_model=teacher, args=config,
...                                       train_dataset=prompts, processing_class=tokenizer,
...                                       vat=AttentionDistiller(student, teacher))
>>> trainer.train()

TRL keeps its loop: on-policy generation by the student, the buffering across accumulation
steps, ``num_items_in_batch`` over the generated completions, logging, saving. Only the
per-micro-batch loss (TRL's ``_compute_loss`` hook, already routed through the student's
DDP/FSDP wrapper by TRL) is ours: :class:`~compodistill.logit_kd.module.FusedLinearKDLoss`
on the completion tokens, with TRL's meaning of ``beta`` and ``temperature`` by default,
plus VAT captured during the same teacher and student forwards.

The hook is private to TRL, so the version is pinned (the ``trl`` extra); a TRL without it
is refused at construction rather than silently training TRL's own loss.
"""
from __future__ import annotations

import torch
import trl
from torch import nn

from ..hf.distiller import AttentionDistiller
from ..logit_kd.module import FusedLinearKDLoss
from .step import DistillStep

__all__ = ["TRLFusedDistillationTrainer", "trl_kd_loss", "MULTIMODAL_KEYS"]

# The model inputs TRL's generation step leaves in a micro-batch besides the token ids.
MULTIMODAL_KEYS = ("pixel_values", "image_grid_thw", "pixel_attention_mask", "spatial_shapes",
                   "image_sizes", "token_type_ids", "mm_token_type_ids", "image_position_ids")


def trl_kd_loss(args) -> FusedLinearKDLoss:
    """TRL's own loss as our module: its generalized JSD ``beta`` and ``temperature`` from
    ``args`` (a ``DistillationConfig``), no T² factor, no LM term (on-policy samples)."""
    return FusedLinearKDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=args.beta,
                             temperature=args.temperature, loss="jsd",
                             temperature_squared=False)


class TRLFusedDistillationTrainer(trl.DistillationTrainer):
    """TRL's ``DistillationTrainer`` with our fused KD in place of its loss, and VAT.

    Args:
        model, teacher_model, args, **kwargs: as for ``trl.DistillationTrainer``; the teacher
            must be an instantiated model on the student's device (no model id: VAT needs
            the same object the distiller was built on).
        kd_loss: a :class:`~compodistill.logit_kd.module.FusedLinearKDLoss`; default
            :func:`trl_kd_loss` (TRL's loss). Its labels are the completion tokens.
        vat: an :class:`~compodistill.hf.distiller.AttentionDistiller` on ``model`` and
            ``teacher_model``, or None.
        vat_weight: weight of the VAT term (a mean per micro-batch, divided by the
            accumulation steps as TRL scales its loss for accumulation).
    """

    def __init__(self, model: nn.Module, teacher_model: nn.Module, args=None, *,
                 kd_loss: FusedLinearKDLoss | None = None, vat: AttentionDistiller | None = None,
                 vat_weight: float = 1.0, **kwargs):
        if not callable(getattr(trl.DistillationTrainer, "_compute_loss", None)):
            raise ImportError(f"trl {trl.__version__} has no DistillationTrainer._compute_loss "
                              f"hook; install the version the `trl` extra pins")
        if not isinstance(teacher_model, nn.Module):
            raise TypeError(f"teacher_model must be an instantiated model, got "
                            f"{type(teacher_model).__name__}")
        super().__init__(model, teacher_model, args, **kwargs)
        teacher = self.accelerator.unwrap_model(self.teacher_model)
        teacher.requires_grad_(False)
        self.distill = DistillStep(teacher, kd_loss if kd_loss is not None
                                   else trl_kd_loss(self.args), vat, vat_weight)

    def _compute_loss(self, unwrapped_student, inputs, num_items_in_batch):
        # TRL's hook: (loss, entropy sum, valid tokens) of one micro-batch.
        input_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        loss_mask = inputs["completion_mask"]
        if "tool_mask" in inputs:
            loss_mask = loss_mask * inputs["tool_mask"]
        prompt_part = torch.zeros_like(inputs["prompt_ids"], dtype=torch.bool)
        completion = torch.cat([prompt_part, loss_mask.bool()], dim=1)
        labels = input_ids.masked_fill(~completion, -100)  # unshifted, as TRL's targets
        model_inputs = dict(input_ids=input_ids, attention_mask=attention_mask,
                            **{k: inputs[k] for k in MULTIMODAL_KEYS if k in inputs})
        self.teacher_model.eval()
        training = unwrapped_student.training
        vat_scale = 1.0 / self.args.gradient_accumulation_steps if training else 1.0
        loss, _ = self.distill(unwrapped_student, model_inputs, labels,
                               num_items_in_batch=num_items_in_batch, vat_scale=vat_scale,
                               record=training)
        # Entropy is TRL's metric of its own loss; NaN is left out of TRL's log (not a 0).
        entropy = torch.full((), float("nan"), device=loss.device)
        return loss, entropy, loss_mask.sum()

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        """Adds the mean of each recorded term (``kd_ce``, ``vat``...) since the last log."""
        if "loss" in logs:
            logs.update(self.distill.pop_metrics())
        super().log(logs, *args, **kwargs)
