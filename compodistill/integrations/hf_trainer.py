"""Fused logit KD and VAT in any ``transformers.Trainer`` run (docs/integrations.md).

>>> trainer = FusedDistillTrainer(model=student, teacher_model=teacher, args=args,
...                               train_dataset=data,
...                               vat=AttentionDistiller(student, teacher))
>>> trainer.train()

Only :meth:`FusedDistillTrainer.compute_loss` changes: the training loop, the optimizer,
accumulation, logging and saving stay ``Trainer``'s. The loss follows ``Trainer``'s token
weighting for a causal LM: ``num_items_in_batch`` counts the predicted labelled tokens of
the whole accumulated batch (``labels[..., 1:] != -100``; counted here for every model, as
the loss is ours, even where ``Trainer`` would not count for the model), and the KD and LM
terms are sums divided by it; VAT, a mean per micro-batch, is divided by the accumulation
steps.
"""
from __future__ import annotations

import torch
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

    # compute_loss always divides by num_items_in_batch (counted in get_batch_samples).
    loss_is_scaled_for_ga = True

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

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """``Trainer``'s micro-batches of one step, with ``num_items_in_batch`` = the tokens
        our loss predicts over all of them (every process's, under
        ``average_tokens_across_devices``)."""
        batches, _ = super().get_batch_samples(epoch_iterator, num_batches, device)
        if not batches or any("labels" not in b for b in batches):
            return batches, None
        shift = self.distill.kd.shift_labels
        count = sum(int(((b["labels"][..., 1:] if shift and b["labels"].dim() == 2
                          else b["labels"]) != self.distill.kd.ignore_index).sum())
                    for b in batches)
        count = torch.tensor(count, device=device)
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            count = self.accelerator.gather(count).sum()
        return batches, count

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The distillation loss of one micro-batch (``Trainer``'s hook)."""
        if "labels" not in inputs:
            raise ValueError(f"the batch has no labels (keys: {sorted(inputs)}); the LM and KD "
                             f"terms need them")
        model_inputs = {k: v for k, v in inputs.items() if k != "labels"}
        kd_scale, vat_scale = 1.0, 1.0
        if model.training:
            # Trainer leaves the accumulation scaling to us (loss_is_scaled_for_ga): the
            # logit terms are divided by num_items_in_batch, VAT (a mean) by the steps.
            vat_scale = 1.0 / self.current_gradient_accumulation_steps
            if num_items_in_batch is None:  # a batch without labels never gets here
                raise ValueError("no num_items_in_batch for a training micro-batch")
            if self.args.average_tokens_across_devices and self.args.world_size > 1:
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
