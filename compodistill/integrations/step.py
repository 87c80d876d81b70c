"""One distillation step, shared by the Trainer and TRL integrations: both backbones (the
teacher without gradient), the fused KD (+ CE) on their hidden states, and VAT captured
during the same two forwards. No (tokens × vocab) logits and no attention matrix exist.
"""
from __future__ import annotations

import contextlib
from collections import defaultdict

import torch
from torch import nn

from ..hf.backbone import hidden_states_and_head, unwrap_peft
from ..hf.distiller import AttentionDistiller
from ..hf.families import visual_positions
from ..logit_kd.module import FusedLinearKDLoss

__all__ = ["DistillStep", "through_wrapper"]


def through_wrapper(wrapper: nn.Module, inner: nn.Module, fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` run as the forward of ``wrapper`` (DDP, FSDP), which wraps
    ``inner``: the wrapper's pre-forward hooks (gradient sync, parameter gathering) still fire
    although ``fn`` calls the backbone rather than ``inner.forward``."""
    if wrapper is inner:
        return fn(*args, **kwargs)
    original = inner.forward

    def forward(*_args, **_kwargs):
        inner.forward = original
        return fn(*args, **kwargs)

    inner.forward = forward
    try:
        return wrapper()
    finally:
        inner.forward = original


class DistillStep:
    """``step(student, inputs, labels) -> (loss, terms)`` for one micro-batch.

    Args:
        teacher: the teacher model, in eval mode, on the student's device.
        kd: the fused logit loss (its ``weight_hard_loss`` is the LM term).
        vat: an :class:`~compodistill.hf.distiller.AttentionDistiller` built on the same
            student and teacher, or None for no VAT.
        vat_weight: weight of the VAT term.
    """

    def __init__(self, teacher: nn.Module, kd: FusedLinearKDLoss,
                 vat: AttentionDistiller | None = None, vat_weight: float = 1.0):
        if not isinstance(kd, FusedLinearKDLoss):
            raise TypeError(f"kd_loss must be a FusedLinearKDLoss, got {type(kd).__name__}")
        if vat is not None and not isinstance(vat, AttentionDistiller):
            raise TypeError(f"vat must be an AttentionDistiller or None, got {type(vat).__name__}")
        if isinstance(vat_weight, bool) or not isinstance(vat_weight, (int, float)) \
                or not vat_weight >= 0:
            raise ValueError(f"vat_weight must be a number >= 0, got {vat_weight!r}")
        if vat is not None and vat.teacher is not teacher:
            raise ValueError("the AttentionDistiller was built on another teacher model")
        self.teacher, self.kd, self.vat, self.vat_weight = teacher, kd, vat, float(vat_weight)
        self.metrics: dict[str, list[float]] = defaultdict(list)

    def __call__(self, student: nn.Module, inputs: dict, labels: torch.Tensor, *,
                 num_items_in_batch=None, kd_scale: float = 1.0, vat_scale: float = 1.0,
                 record: bool = True) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Loss of one micro-batch.

        Args:
            student: the (unwrapped) student; ``inputs`` its keyword inputs without labels.
            labels: (B, N) Hugging Face labels (unshifted, ``ignore_index`` ignored).
            num_items_in_batch: tokens of the accumulated batch (KD and CE become sums over
                this micro-batch divided by it); None: means over this micro-batch.
            kd_scale, vat_scale: factors on the logit and VAT terms (accumulation, devices).
            record: keep the detached terms in :attr:`metrics` for logging.
        """
        ids, mask = inputs.get("input_ids"), inputs.get("attention_mask")
        if ids is None:
            raise ValueError("the batch has no input_ids")
        capture = (self.vat.capture(ids, attention_mask=mask) if self.vat is not None
                   else contextlib.nullcontext())
        with capture as cap:
            with torch.no_grad():
                h_t, head_t = hidden_states_and_head(self.teacher, **inputs)
            h_s, head_s = hidden_states_and_head(student, **inputs)
        visual = (visual_positions(ids, unwrap_peft(student))
                  if self.kd.options["positions"] == "visual" else None)
        out = self.kd(h_s, head_s.weight, h_t.to(h_s.device), head_t.weight, labels,
                      head_s.bias, head_t.bias, attention_mask=mask, visual_mask=visual,
                      num_items_in_batch=num_items_in_batch)
        kd_total, soft, hard = out if isinstance(out, tuple) else (out, None, None)
        loss = kd_total * kd_scale
        terms = {"kd_ce": kd_total.detach()}
        if soft is not None:
            terms.update(kd=soft, ce=hard)
        if self.vat is not None:
            vat = cap.loss()
            loss = loss + (self.vat_weight * vat_scale) * vat
            terms["vat"] = vat.detach()
        if record:
            for name, value in terms.items():
                self.metrics[name].append(float(value))
        return loss, terms

    def pop_metrics(self, prefix: str = "") -> dict[str, float]:
        """Means of the recorded terms since the last call, then cleared."""
        out = {f"{prefix}{k}": sum(v) / len(v) for k, v in self.metrics.items() if v}
        self.metrics.clear()
        return out
