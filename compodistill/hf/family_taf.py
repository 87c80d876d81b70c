"""TAF for Qwen2.5-VL (docs/taf.md, docs/families.md): the student's vision merger becomes a
frozen copy of the teacher's followed by a trainable post-connector ``Linear(d_t, d_s)``.

The saved checkpoint stays a plain Qwen2.5-VL model: the post-connector is folded into the
merger's last linear layer (``post(W x + b) = (P W) x + (P b + c)``, the same function), so
``from_pretrained`` and any tool load it. The unfolded parts (the teacher's last layer and the
post-connector) are written next to it in :data:`TAF_FILE`; :func:`load_taf_parts` rebuilds
the TAF merger from them, so training resumes on the same parameters.
"""
from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

__all__ = ["TAF_FILE", "QwenTAFMerger", "apply_family_taf", "folded_state_dict", "is_taf",
           "load_taf_parts", "save_taf"]

TAF_FILE = "compodistill_taf.safetensors"
LAST = "mlp.2"  # the last Linear of Qwen2.5-VL's merger (ln_q -> mlp: Linear, GELU, Linear)


class QwenTAFMerger(nn.Module):
    """``post(teacher(x))``: the teacher's merger (frozen) and ``post = Linear(d_t, d_s)``."""

    def __init__(self, teacher: nn.Module, post: nn.Linear):
        super().__init__()
        self.teacher, self.post = teacher, post
        self.freeze_teacher_part()

    def freeze_teacher_part(self) -> None:
        """Only ``post`` trains (docs/taf.md)."""
        for p in self.teacher.parameters():
            p.requires_grad_(False)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.post(self.teacher(hidden_states))


def _visual(model: nn.Module) -> nn.Module:
    return model.model.visual


def is_taf(model: nn.Module) -> bool:
    """Whether a Qwen model's merger is a :class:`QwenTAFMerger`."""
    visual = getattr(getattr(model, "model", None), "visual", None)
    return isinstance(getattr(visual, "merger", None), QwenTAFMerger)


def apply_family_taf(student: nn.Module, teacher: nn.Module) -> nn.Module:
    """Replace the student's merger (in place) by the teacher's, frozen, plus a trainable
    ``Linear(d_t, d_s)``; returns the student.

    Raises:
        ValueError: the mergers read vision features of different widths.
    """
    merger_t = _visual(teacher).merger
    merger_s = _visual(student).merger
    last_t, last_s = merger_t.get_submodule(LAST), merger_s.get_submodule(LAST)
    if merger_t.ln_q.weight.shape != merger_s.ln_q.weight.shape or (
            merger_t.mlp[0].in_features != merger_s.mlp[0].in_features):
        raise ValueError(f"TAF needs the same vision features in both models: student merger "
                         f"input {merger_s.mlp[0].in_features} vs teacher "
                         f"{merger_t.mlp[0].in_features}")
    ref = last_s.weight
    frozen = copy.deepcopy(merger_t).to(device=ref.device, dtype=ref.dtype)
    post = nn.Linear(last_t.out_features, last_s.out_features).to(device=ref.device,
                                                                  dtype=ref.dtype)
    _visual(student).merger = QwenTAFMerger(frozen, post)
    return student


def folded_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict with the TAF merger folded into a plain merger's keys."""
    merger = _visual(model).merger
    prefix = next(n for n, m in model.named_modules() if m is merger) + "."
    state = {}
    for key, value in model.state_dict().items():
        if not key.startswith(prefix):
            state[key] = value
        elif key.startswith(prefix + "teacher.") and not key.startswith(
                f"{prefix}teacher.{LAST}."):
            state[prefix + key[len(prefix + "teacher."):]] = value
    last, post = merger.teacher.get_submodule(LAST), merger.post
    with torch.no_grad():
        state[f"{prefix}{LAST}.weight"] = (post.weight.double() @ last.weight.double()).to(
            last.weight.dtype)
        state[f"{prefix}{LAST}.bias"] = (post.weight.double() @ last.bias.double()
                                        + post.bias.double()).to(last.bias.dtype)
    return state


def taf_parts(model: nn.Module) -> dict[str, torch.Tensor]:
    """What folding loses: the teacher's last merger layer and the post-connector."""
    merger = _visual(model).merger
    last = merger.teacher.get_submodule(LAST)
    return {"teacher_last.weight": last.weight, "teacher_last.bias": last.bias,
            "post.weight": merger.post.weight, "post.bias": merger.post.bias}


def load_taf_parts(model: nn.Module, folder) -> nn.Module:
    """Rebuild the TAF merger of a folded checkpoint from ``folder/TAF_FILE`` (no-op without
    it); the merger's other layers are the teacher's, as saved."""
    from safetensors.torch import load_file

    path = Path(folder) / TAF_FILE
    if not path.is_file():
        return model
    parts = load_file(str(path))
    merger = _visual(model).merger
    frozen = copy.deepcopy(merger)
    w = parts["teacher_last.weight"]
    frozen.mlp[2] = nn.Linear(w.shape[1], w.shape[0])
    frozen.get_submodule(LAST).load_state_dict({"weight": parts["teacher_last.weight"],
                                                "bias": parts["teacher_last.bias"]})
    post = nn.Linear(parts["post.weight"].shape[1], parts["post.weight"].shape[0])
    post.load_state_dict({"weight": parts["post.weight"], "bias": parts["post.bias"]})
    ref = merger.get_submodule(LAST).weight
    _visual(model).merger = QwenTAFMerger(frozen.to(ref.device, ref.dtype),
                                          post.to(ref.device, ref.dtype))
    return model


def save_taf(model: nn.Module, folder) -> None:
    """``save_pretrained`` of the folded model (a plain checkpoint) plus :data:`TAF_FILE`."""
    from safetensors.torch import save_file

    model.save_pretrained(folder, state_dict=folded_state_dict(model), safe_serialization=True)
    save_file({k: v.detach().contiguous() for k, v in taf_parts(model).items()},
              str(Path(folder) / TAF_FILE))
