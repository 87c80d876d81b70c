"""``FusedLinearKDLoss``: the fused linear KD as a module with Liger-Kernel's argument names.

A drop-in for ``liger_kernel.chunked_loss.LigerFusedLinearJSDLoss`` (the names, defaults and
the meaning of ``beta`` are the same; docs/integrations.md has the table), which also serves
the Hugging Face ``Trainer`` and TRL: unshifted labels (``shift_labels=True``), any
``ignore_index``, ``reduction`` and ``num_items_in_batch`` for gradient accumulation.
Everything is computed by :func:`~compodistill.logit_kd.linear.linear_distillation_loss`;
this file only translates conventions.
"""
from __future__ import annotations

import torch
from torch import nn

from .from_logits import IGNORE_INDEX, LOSSES, check_kd_options, selected_rows
from .linear import linear_distillation_loss

__all__ = ["FusedLinearKDLoss", "REDUCTIONS"]

REDUCTIONS = ("mean", "sum")


def _loss_for_beta(loss: str, beta: float) -> str:
    # Liger and TRL read beta = 0 / 1 as the forward / reverse KL (the limits of their
    # generalized JSD once divided by beta); our "jsd" at those ends is 0.
    if loss != "jsd":
        return loss
    if float(beta) == 0.0:
        return "kl"
    if float(beta) == 1.0:
        return "reverse_kl"
    return "jsd"


def _weight(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise ValueError(f"{name} must be a number >= 0, got {value!r}")
    return float(value)


class FusedLinearKDLoss(nn.Module):
    """``weight_hard_loss · CE + weight_soft_loss · KD`` from hidden states and lm_head
    weights; neither model's (tokens × vocab) logits ever exist.

    Args:
        weight_hard_loss: weight of the student's cross-entropy on the labels (Liger's name).
        weight_soft_loss: weight of the distillation term (Liger's name).
        beta: the generalized-JSD β of Liger and TRL: mixture ``m = β·p_t + (1−β)·p_s``,
            ``β·KL(p_t‖m) + (1−β)·KL(p_s‖m)``; β = 0 is the forward KL(p_t‖p_s) and β = 1 the
            reverse KL(p_s‖p_t), as in both libraries. Only read when ``loss="jsd"``.
        ignore_index: label value that marks a token out of both terms.
        temperature: softmax temperature of both models (the KD term only, as in Liger).
        loss: ``"jsd"`` (Liger's module, with ``beta``), ``"kl"`` or ``"reverse_kl"``.
        shift_labels: labels come as Hugging Face and TRL pass them, ``labels[b, i]`` = token
            i (position i predicts ``labels[b, i + 1]``), and are shifted here. ``False``:
            already aligned with the hidden states. A flattened (T, d) batch has no sample
            boundary to shift across, so its (T,) labels are always taken as aligned (Liger's
            convention).
        reduction: ``"mean"`` over the selected tokens, or ``"sum"``; a ``num_items_in_batch``
            given to :meth:`forward` overrides it with ``sum / num_items_in_batch`` (what
            ``transformers.Trainer`` and TRL do under gradient accumulation).
        positions, zscore, chunk_size, memory_budget_bytes, backend: as in
            :func:`~compodistill.logit_kd.linear.linear_distillation_loss` (its defaults).
        temperature_squared: multiply the KD term by T² (Hinton; the functional API always
            does). Liger and TRL do not: ``False`` gives their numbers at T ≠ 1.
        return_soft_hard_loss: also return the soft and hard terms, detached (Liger's name).
    """

    def __init__(self, weight_hard_loss: float = 0.5, weight_soft_loss: float = 0.5,
                 beta: float = 0.5, ignore_index: int = IGNORE_INDEX, temperature: float = 1.0,
                 *, loss: str = "jsd", shift_labels: bool = True, reduction: str = "mean",
                 positions: str = "response", zscore: bool = False,
                 chunk_size: int | None = None, memory_budget_bytes: int | None = None,
                 temperature_squared: bool = True, backend: str = "auto",
                 return_soft_hard_loss: bool = False):
        super().__init__()
        if loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
        check_kd_options(loss, beta, temperature, positions)
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
            raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")
        if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
            raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
        if backend not in ("auto", "triton", "torch"):
            raise ValueError(f"backend must be 'auto', 'triton' or 'torch', got {backend!r}")
        self.weight_hard_loss = _weight("weight_hard_loss", weight_hard_loss)
        self.weight_soft_loss = _weight("weight_soft_loss", weight_soft_loss)
        self.beta, self.ignore_index, self.temperature = float(beta), ignore_index, temperature
        self.loss, self.shift_labels, self.reduction = loss, bool(shift_labels), reduction
        self.temperature_squared = bool(temperature_squared)
        self.return_soft_hard_loss = bool(return_soft_hard_loss)
        self.options = dict(loss=_loss_for_beta(loss, beta), beta=float(beta),
                            temperature=float(temperature), positions=positions,
                            zscore=bool(zscore), chunk_size=chunk_size,
                            memory_budget_bytes=memory_budget_bytes, backend=backend)

    def _aligned_labels(self, labels, lead: tuple):
        if labels is None:
            return None
        if not isinstance(labels, torch.Tensor):
            raise TypeError(f"true_labels must be a tensor, got {type(labels).__name__}")
        if tuple(labels.shape) != lead:
            hint = (" (labels are never trimmed: pass the hidden states of every position, or "
                    "shift_labels=False with labels aligned to them)" if self.shift_labels else "")
            raise ValueError(f"true_labels has shape {tuple(labels.shape)}, expected {lead} "
                             f"(the leading dims of student_input){hint}")
        if labels.dtype.is_floating_point or labels.dtype == torch.bool:
            raise TypeError(f"true_labels must be an integer tensor, got {labels.dtype}")
        if self.ignore_index != IGNORE_INDEX:
            labels = labels.masked_fill(labels == self.ignore_index, IGNORE_INDEX)
        if self.shift_labels and labels.dim() == 2:  # (B, N): Hugging Face / TRL labels
            pad = torch.full_like(labels[:, :1], IGNORE_INDEX)
            labels = torch.cat([labels[:, 1:], pad], dim=1)
        return labels

    def forward(self, student_input: torch.Tensor, student_weight: torch.Tensor,
                teacher_input: torch.Tensor, teacher_weight: torch.Tensor,
                true_labels: torch.Tensor | None = None,
                student_bias: torch.Tensor | None = None,
                teacher_bias: torch.Tensor | None = None, *,
                attention_mask: torch.Tensor | None = None,
                visual_mask: torch.Tensor | None = None,
                num_items_in_batch: int | torch.Tensor | None = None):
        """The loss, a float32 scalar (with ``return_soft_hard_loss``: ``(loss, soft, hard)``).

        Args:
            student_input: (B, N, d_s) or (T, d_s) student hidden states before the lm_head.
            student_weight: (Vs, d_s) student lm_head weight; ``student_bias`` (Vs,).
            teacher_input: (B, N, d_t) or (T, d_t); teacher_weight (Vt >= Vs, d_t), only its
                first Vs rows are used (a padded teacher vocab is truncated, never the student
                padded); ``teacher_bias`` (Vt,). The teacher gets no gradient.
            true_labels: (B, N) or (T,) ints, ``ignore_index`` ignored; see ``shift_labels``.
            attention_mask, visual_mask: (B, N), for ``positions="all"`` / ``"visual"``.
            num_items_in_batch: tokens of the whole accumulated batch (``Trainer`` passes it
                to ``compute_loss``): each term is then ``sum / num_items_in_batch``.
        """
        if not isinstance(student_input, torch.Tensor):
            raise TypeError(f"student_input must be a tensor, got {type(student_input).__name__}")
        lead = tuple(student_input.shape[:-1])
        labels = self._aligned_labels(true_labels, lead)
        if labels is None and self.weight_hard_loss:
            raise ValueError("weight_hard_loss > 0 needs true_labels (or weight_hard_loss=0)")
        kd_w, ce_w = self.weight_soft_loss, self.weight_hard_loss
        if self.options["temperature"] != 1.0 and not self.temperature_squared:
            kd_w = kd_w / self.options["temperature"] ** 2
        scale_kd = scale_ce = 1.0
        reduce = self.reduction if num_items_in_batch is None else "items"
        if reduce != "mean":
            # The functional terms are means; turning a mean into a sum (or a sum over the
            # whole accumulated batch) is a per-term factor on the weight.
            denom = 1.0 if reduce == "sum" else float(num_items_in_batch)
            if not denom > 0:
                raise ValueError(f"num_items_in_batch must be > 0, got {num_items_in_batch!r}")
            device = student_input.device
            n_kd = int(selected_rows(lead, labels, self.options["positions"], attention_mask,
                                     visual_mask, device).sum()) if kd_w else 0
            n_ce = int((labels != IGNORE_INDEX).sum()) if ce_w and labels is not None else 0
            scale_kd, scale_ce = n_kd / denom, n_ce / denom
        total, terms = linear_distillation_loss(
            student_input, student_weight, teacher_input, teacher_weight, labels,
            b_s=student_bias, b_t=teacher_bias, attention_mask=attention_mask,
            visual_mask=visual_mask, ce_weight=ce_w * scale_ce, kd_weight=kd_w * scale_kd,
            return_terms=True, **self.options)
        if not self.return_soft_hard_loss:
            return total
        soft = terms["kd"] * (scale_kd * kd_w / self.weight_soft_loss
                              if self.weight_soft_loss else 0.0)
        return total, soft, terms["ce"] * scale_ce

    def extra_repr(self) -> str:
        return (f"weight_hard_loss={self.weight_hard_loss}, weight_soft_loss="
                f"{self.weight_soft_loss}, beta={self.beta}, ignore_index={self.ignore_index}, "
                f"temperature={self.temperature}, loss={self.loss!r}, "
                f"shift_labels={self.shift_labels}, reduction={self.reduction!r}")
