"""Which student layers are aligned with which teacher layers (docs/layer_matching.md).

Three matching modes pair the chosen student layers ``l_1..l_k`` with the chosen teacher
layers ``t_1..t_m``:

* ``"group"`` (paper default, best): ``n = m − k + 1``; student layer ``l_j`` is aligned
  with the mean map of the sliding window ``t_j .. t_{j+n−1}`` (:func:`group_target`).
* ``"simple"``: one teacher layer per student layer by depth ratio,
  ``t = round((l+1)·L_t/L_s) − 1``, where ``l`` is the student layer's index in the whole
  model (the teacher layer choice of the preset is not used).
* ``"adaptive"``: each student layer has a window of candidate teacher layers and is aligned,
  at every step, with the candidate whose map is most similar to its own
  (:func:`adaptive_select`, no gradient through the choice). This is *our* definition: it
  cannot be recovered from the official code. The candidate windows are the group windows.

The depth presets ``"all" / "early" / "intermediate" / "late"`` split a model's depth in
thirds (our rule), except that ``"intermediate"`` uses the official code's table
(ptkjw1997/CompoDistill, ``DistillTrainer``) for the depths it lists.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

__all__ = ["PRESETS", "MODES", "LayerMatch", "layer_preset", "match_layers", "group_target",
           "adaptive_select"]

PRESETS = ("all", "early", "intermediate", "late")
MODES = ("group", "simple", "adaptive")
ROLES = ("student", "teacher")

# Official "intermediate" layers: student depth -> aligned layers (7 of them).
_OFFICIAL_STUDENT = {24: range(8, 15), 28: range(9, 16), 40: range(13, 20)}
# Official teacher layers: depth -> all layers the 7 group windows cover
# (window starts 8-14 n=2, 9-15 n=3, 11-17 n=3, 13-19 n=5).
_OFFICIAL_TEACHER = {24: range(8, 16), 28: range(9, 18), 32: range(11, 20), 40: range(13, 24)}


@dataclass(frozen=True)
class LayerMatch:
    """One student layer and the teacher layers it is aligned with.

    ``teacher_layers`` is the group window (``"group"``), a single layer (``"simple"``) or
    the candidate window (``"adaptive"``). Layer indices are 0-based in the whole model.
    """

    student_layer: int
    teacher_layers: tuple[int, ...]


def _check_depth(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} ({value!r})")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")


def layer_preset(preset: str, num_layers: int, role: str = "student") -> list[int]:
    """0-based layer indices of a depth preset for a model with ``num_layers`` layers.

    Thirds rule (ours): ``early = [0, round(L/3))``, ``intermediate = [round(L/3),
    round(2L/3))``, ``late = [round(2L/3), L)``, ``all = [0, L)``. ``L/3`` never ends in .5,
    so the rounding is unambiguous. For ``"intermediate"``, depths in the official code's
    table use it instead: student 24 → 8..14, 28 → 9..15, 40 → 13..19; teacher 24 → 8..15,
    28 → 9..17, 32 → 11..19, 40 → 13..23 (inclusive).

    Args:
        preset: one of ``"all"``, ``"early"``, ``"intermediate"``, ``"late"``.
        num_layers: the model's number of decoder layers.
        role: ``"student"`` or ``"teacher"`` (selects the official table's column).

    Raises:
        ValueError: unknown preset/role, or a preset that selects no layer (tiny models).
    """
    _check_depth("num_layers", num_layers)
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {PRESETS}, got {preset!r}")
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, got {role!r}")
    table = _OFFICIAL_STUDENT if role == "student" else _OFFICIAL_TEACHER
    if preset == "intermediate" and num_layers in table:
        return list(table[num_layers])
    first, second = round(num_layers / 3), round(2 * num_layers / 3)
    bounds = {"all": (0, num_layers), "early": (0, first), "intermediate": (first, second),
              "late": (second, num_layers)}[preset]
    layers = list(range(*bounds))
    if not layers:
        raise ValueError(f"preset {preset!r} selects no layer of a {num_layers}-layer {role} "
                         f"model; pass the layers explicitly")
    return layers


def _check_layers(name: str, layers: Sequence[int], num_layers: int) -> list[int]:
    """Validate an explicit layer list: non-empty ints, in range, strictly increasing."""
    if isinstance(layers, (str, bytes, torch.Tensor)) or not isinstance(layers, Sequence):
        raise TypeError(f"{name} must be a list of ints, got {type(layers).__name__}")
    layers = list(layers)
    bad = [x for x in layers if isinstance(x, bool) or not isinstance(x, int)]
    if bad:
        raise TypeError(f"{name} must contain ints, got {bad!r} in {layers!r}")
    if not layers:
        raise ValueError(f"{name} must not be empty")
    out = [x for x in layers if not 0 <= x < num_layers]
    if out:
        raise ValueError(f"{name} {layers!r}: {out!r} out of range for a {num_layers}-layer "
                         f"model (need 0 <= layer < {num_layers})")
    if len(set(layers)) != len(layers):
        raise ValueError(f"{name} {layers!r} contains duplicates")
    if layers != sorted(layers):
        raise ValueError(f"{name} {layers!r} must be sorted in increasing order")
    return layers


def _simple_teacher_layer(layer: int, num_student_layers: int, num_teacher_layers: int) -> int:
    """``round((l+1)·Lt/Ls) − 1`` with halves rounded up (exact integer arithmetic).

    Clamped at 0, which matters only for a teacher less than half as deep as the student.
    """
    numerator = 2 * (layer + 1) * num_teacher_layers + num_student_layers
    return max(0, numerator // (2 * num_student_layers) - 1)


def _windows(students: list[int], teachers: list[int]) -> list[LayerMatch]:
    k, m = len(students), len(teachers)
    if m < k:
        raise ValueError(f"group/adaptive matching needs at least as many teacher layers as "
                         f"student layers, got {k} student layers {students} and {m} teacher "
                         f"layers {teachers}")
    n = m - k + 1
    return [LayerMatch(s, tuple(teachers[j:j + n])) for j, s in enumerate(students)]


def match_layers(num_student_layers: int, num_teacher_layers: int, *, mode: str = "group",
                 preset: str = "intermediate", student_layers: Sequence[int] | None = None,
                 teacher_layers: Sequence[int] | None = None) -> list[LayerMatch]:
    """Pair student layers with teacher layers (docs/layer_matching.md).

    Args:
        num_student_layers, num_teacher_layers: depths of the two models.
        mode: ``"group"`` (sliding windows of ``n = m − k + 1`` teacher layers),
            ``"simple"`` (one teacher layer ``round((l+1)·Lt/Ls) − 1`` per student layer l,
            halves rounded up) or ``"adaptive"`` (candidate window = the group window).
        preset: depth preset (:func:`layer_preset`) for whichever side is not given
            explicitly.
        student_layers, teacher_layers: explicit 0-based layer lists (sorted, unique, in
            range); they override the preset. In ``"simple"`` mode the teacher side is
            normally derived from the depth ratio; an explicit ``teacher_layers`` list is
            instead paired one-to-one, in order, with the student layers (same length).

    Returns:
        One :class:`LayerMatch` per student layer, in increasing student layer order.

    Raises:
        TypeError / ValueError: bad depths, mode, preset or layer lists; fewer teacher than
            student layers in group/adaptive mode; a student deeper than its teacher
            without explicit layer lists.
    """
    _check_depth("num_student_layers", num_student_layers)
    _check_depth("num_teacher_layers", num_teacher_layers)
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if num_student_layers > num_teacher_layers and (student_layers is None
                                                    or teacher_layers is None):
        # Almost always swapped arguments; a deliberate deeper student names its layers.
        raise ValueError(f"num_student_layers={num_student_layers} is deeper than "
                         f"num_teacher_layers={num_teacher_layers}: the arguments are "
                         f"(student depth, teacher depth); for a student deeper than its "
                         f"teacher, pass student_layers and teacher_layers explicitly")
    if student_layers is None:
        students = layer_preset(preset, num_student_layers, "student")
    else:
        students = _check_layers("student_layers", student_layers, num_student_layers)
    if mode == "simple" and teacher_layers is None:
        return [LayerMatch(s, (_simple_teacher_layer(s, num_student_layers, num_teacher_layers),))
                for s in students]
    if teacher_layers is None:
        teachers = layer_preset(preset, num_teacher_layers, "teacher")
    else:
        teachers = _check_layers("teacher_layers", teacher_layers, num_teacher_layers)
    if mode == "simple":
        if len(teachers) != len(students):
            raise ValueError(f"simple matching with explicit teacher_layers pairs them one to "
                             f"one: got {len(students)} student layers {students} and "
                             f"{len(teachers)} teacher layers {teachers}")
        return [LayerMatch(s, (t,)) for s, t in zip(students, teachers)]
    return _windows(students, teachers)


def group_target(maps: Sequence[torch.Tensor]) -> torch.Tensor:
    """Group matching target: the element-wise mean of the window's teacher maps.

    Args:
        maps: the teacher maps of one window, e.g. (B, Qmax, Vmax) tensors of equal shape.
    """
    if len(maps) == 0:
        raise ValueError("group_target needs at least one teacher map")
    return torch.stack(list(maps)).mean(dim=0)


def adaptive_select(student_map: torch.Tensor, candidates: Sequence[torch.Tensor]) -> int:
    """Index of the candidate teacher map most similar to the student map.

    Similarity is the cosine of the flattened maps. The choice is made once per batch:
    each (B, Qmax, Vmax) map is flattened whole, so all samples of the batch share it (the
    zero padding of the layout adds nothing to the dot products or norms). Computed under
    ``torch.no_grad``: no gradient flows through the choice. Ties go to the first candidate.
    """
    if len(candidates) == 0:
        raise ValueError("adaptive_select needs at least one candidate map")
    with torch.no_grad():
        a = student_map.float().reshape(-1)
        flat = torch.stack([c.float().reshape(-1) for c in candidates])
        norms = (flat.norm(dim=1) * a.norm()).clamp_min(1e-12)
        scores = (flat @ a) / norms
        # argmax returns the first maximal index on ties.
        return int(torch.argmax(scores))
