"""Fused logit KD and VAT in any ``transformers.Trainer`` run (docs/integrations.md).

>>> trainer = FusedDistillTrainer(model=student, teacher_model=teacher, args=args,
...                               train_dataset=data,
...                               vat=AttentionDistiller(student, teacher))
>>> trainer.train()

Only :meth:`FusedDistillTrainer.compute_loss` changes: the training loop, the optimizer,
accumulation, logging and saving stay ``Trainer``'s. The loss follows ``Trainer``'s token
weighting: with ``num_items_in_batch`` (gradient accumulation over labelled tokens) the KD
and LM terms are sums divided by the accumulated batch's token count, like a model's own
loss; VAT, a mean per micro-batch, is divided by the accumulation steps.
"""
from __future__ import annotations

import transformers
from torch import nn

from ..hf.distiller import AttentionDistiller
from ..logit_kd.module import FusedLinearKDLoss
from .step import DistillStep, through_wrapper

__all__ = ["FusedDistillTrainer", "default_kd_loss"]


def default_kd_loss() -> FusedLinearKDLoss:
    """LM + KL(p_t‖p_s), weights 1: the CompoDistill stages' logit terms."""
    return FusedLinearKDLoss(weight_hard_loss=1.0, weight_soft_loss=1.0, loss="kl")


class FusedDistillTrainer(transformers.Trainer):
    """A ``transformers.Trainer`` whose loss is ``weight_hard_loss·LM + weight_soft_loss·KD
    (+ vat_weight·VAT)`` against a teacher.

    Args:
        model: the student (a causal LM, a VLM of a supported family, or a peft wrapper).
        teacher_model: the teacher; put in eval mode on the training device, frozen.
        kd_loss: a :class:`~compodistill.logit_kd.module.FusedLinearKDLoss`; default
            :func:`default_kd_loss`. Its ``reduction`` applies when ``Trainer`` gives no
            ``num_items_in_batch``.
        vat: an :class:`~compodistill.hf.distiller.AttentionDistiller` on ``model`` and
            ``teacher_model`` (its options pick layers, query rows and the map loss), or
            None for logit KD only.
        vat_weight: weight of the VAT term.
        **kwargs: ``transformers.Trainer``'s own arguments (``args``, ``train_dataset``,
            ``data_collator``, ...). The batches need ``labels`` (unshifted, as for the model's
            own loss) and the model's inputs.
    """

    def __init__(self, model: nn.Module | None = None, teacher_model: nn.Module | None = None,
                 *args, kd_loss: FusedLinearKDLoss | None = None,
                 vat: AttentionDistiller | None = None, vat_weight: float = 1.0, **kwargs):
        if teacher_model is None:
            raise ValueError("FusedDistillTrainer needs teacher_model=")
        if kwargs.get("compute_loss_func") is not None:
            raise ValueError("FusedDistillTrainer computes the loss itself; drop "
                             "compute_loss_func")
        super().__init__(model, *args, **kwargs)
        teacher_model.requires_grad_(False)
        teacher = teacher_model.to(self.args.device).eval()
        self.distill = DistillStep(teacher, kd_loss if kd_loss is not None else default_kd_loss(),
                                   vat, vat_weight)
        self.teacher_model = teacher

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The distillation loss of one micro-batch (``Trainer``'s hook)."""
        if "labels" not in inputs:
            raise ValueError(f"the batch has no labels (keys: {sorted(inputs)}); the LM and KD "
                             f"terms need them")
        model_inputs = {k: v for k, v in inputs.items() if k != "labels"}
        kd_scale, vat_scale = 1.0, 1.0
        if num_items_in_batch is not None:
            # Trainer does not divide a loss normalised by num_items_in_batch by the
            # accumulation steps (model_accepts_loss_kwargs); VAT is a mean, so it is here.
            vat_scale = 1.0 / self.current_gradient_accumulation_steps if model.training else 1.0
            if self.args.average_tokens_across_devices:
                kd_scale = float(self.accelerator.num_processes)  # DDP averages the gradients
        unwrapped = self.accelerator.unwrap_model(model)
        loss, _ = through_wrapper(model, unwrapped, self.distill, unwrapped, model_inputs,
                                  inputs["labels"], num_items_in_batch=num_items_in_batch,
                                  kd_scale=kd_scale, vat_scale=vat_scale,
                                  record=model.training)
        return (loss, {"loss": loss.detach()}) if return_outputs else loss

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        """Adds the mean of each recorded term (``kd_ce``, ``vat``...) since the last log."""
        if "loss" in logs:
            logs.update(self.distill.pop_metrics())
        super().log(logs, *args, **kwargs)
