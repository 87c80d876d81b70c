"""Layer presets and student/teacher layer matching (compodistill.matching, docs/layer_matching.md)."""
import pytest
import torch

from compodistill.matching import (LayerMatch, adaptive_select, group_target, layer_preset,
                                   match_layers)
from compodistill.testing.visual_attention import (ref_adaptive_choice, ref_group_targets,
                                            ref_simple_teacher_layer)


# ----------------------------------------------------------------------------- presets

@pytest.mark.parametrize("depth,first,last", [(24, 8, 14), (28, 9, 15), (40, 13, 19)])
def test_official_student_table(depth, first, last):
    assert layer_preset("intermediate", depth, "student") == list(range(first, last + 1))


@pytest.mark.parametrize("depth,first,last", [(24, 8, 15), (28, 9, 17), (32, 11, 19),
                                              (40, 13, 23)])
def test_official_teacher_table(depth, first, last):
    assert layer_preset("intermediate", depth, "teacher") == list(range(first, last + 1))


def test_thirds_rule_other_depths():
    # 12: thirds at 4 and 8.
    assert layer_preset("early", 12) == [0, 1, 2, 3]
    assert layer_preset("intermediate", 12) == [4, 5, 6, 7]
    assert layer_preset("late", 12) == [8, 9, 10, 11]
    assert layer_preset("all", 12) == list(range(12))
    # 32 student (not in the student table): round(10.67) = 11, round(21.33) = 21.
    assert layer_preset("intermediate", 32, "student") == list(range(11, 21))
    # 40 is in the table only for "intermediate"; the other presets use thirds (13, 27).
    assert layer_preset("early", 40, "teacher") == list(range(0, 13))
    assert layer_preset("late", 40, "teacher") == list(range(27, 40))


@pytest.mark.parametrize("depth", [3, 5, 7, 10, 16, 22, 36, 48, 64])
def test_thirds_partition_the_depth(depth):
    parts = [layer_preset(p, depth) for p in ("early", "intermediate", "late")]
    assert sum(parts, []) == layer_preset("all", depth)


def test_preset_errors():
    with pytest.raises(ValueError, match="preset"):
        layer_preset("middle", 24)
    with pytest.raises(ValueError, match="role"):
        layer_preset("all", 24, role="both")
    with pytest.raises(ValueError, match="selects no layer"):
        layer_preset("early", 1)
    with pytest.raises(TypeError, match="num_layers"):
        layer_preset("all", 24.0)
    with pytest.raises(ValueError, match="num_layers"):
        layer_preset("all", 0)


# ----------------------------------------------------------------------------- group

def test_group_official_24_x_40():
    matches = match_layers(24, 40)
    assert len(matches) == 7
    assert all(len(m.teacher_layers) == 5 for m in matches)
    assert matches[0] == LayerMatch(8, (13, 14, 15, 16, 17))
    assert matches[-1] == LayerMatch(14, (19, 20, 21, 22, 23))


@pytest.mark.parametrize("teacher,first_window", [(24, (8, 9)), (28, (9, 10, 11)),
                                                  (32, (11, 12, 13))])
def test_group_official_window_sizes(teacher, first_window):
    matches = match_layers(24, teacher)
    assert [m.student_layer for m in matches] == list(range(8, 15))
    n = len(first_window)
    assert matches[0].teacher_layers == first_window
    for j, m in enumerate(matches):
        assert m.teacher_layers == tuple(range(first_window[0] + j, first_window[0] + j + n))


def test_group_explicit_layers():
    matches = match_layers(6, 10, student_layers=[1, 4], teacher_layers=[2, 3, 5])
    assert matches == [LayerMatch(1, (2, 3)), LayerMatch(4, (3, 5))]


def test_group_too_few_teacher_layers():
    with pytest.raises(ValueError, match=r"3 student layers.*2 teacher layers"):
        match_layers(6, 10, student_layers=[0, 1, 2], teacher_layers=[4, 5])


def test_group_matches_reference():
    matches = match_layers(24, 28)
    teacher_layers = layer_preset("intermediate", 28, "teacher")
    maps = {t: torch.full((1,), float(t)) for t in teacher_layers}
    expected = ref_group_targets([maps[t] for t in teacher_layers], len(matches))
    for m, e in zip(matches, expected):
        torch.testing.assert_close(group_target([maps[t] for t in m.teacher_layers]), e)


# ----------------------------------------------------------------------------- simple

def test_simple_depth_ratio():
    matches = match_layers(24, 40, mode="simple")
    # l = 8: 9·40/24 = 15 -> 14; l = 14: 15·40/24 = 25 -> 24; l = 9: 16.67 -> 17 -> 16.
    assert matches[0] == LayerMatch(8, (14,))
    assert matches[1] == LayerMatch(9, (16,))
    assert matches[-1] == LayerMatch(14, (24,))
    for m in matches:
        assert m.teacher_layers == (ref_simple_teacher_layer(m.student_layer, 24, 40),)


def test_simple_rounds_halves_up():
    # 24 -> 28: l = 2 gives 3.5 -> 4 -> 3; l = 8 gives 10.5 -> 11 -> 10.
    matches = match_layers(24, 28, mode="simple", student_layers=[2, 8])
    assert [m.teacher_layers for m in matches] == [(3,), (10,)]


def test_simple_all_layers_same_depth_is_identity():
    matches = match_layers(12, 12, mode="simple", preset="all")
    assert [m.teacher_layers for m in matches] == [(l,) for l in range(12)]


def test_simple_explicit_teacher_pairs_one_to_one():
    matches = match_layers(6, 10, mode="simple", student_layers=[1, 2],
                           teacher_layers=[5, 9])
    assert matches == [LayerMatch(1, (5,)), LayerMatch(2, (9,))]
    with pytest.raises(ValueError, match="one to one"):
        match_layers(6, 10, mode="simple", student_layers=[1, 2], teacher_layers=[5])


# ----------------------------------------------------------------------------- adaptive

def test_adaptive_windows_are_group_windows():
    assert match_layers(24, 40, mode="adaptive") == match_layers(24, 40, mode="group")


def test_adaptive_select():
    student = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]], requires_grad=True)  # (B=2, 1, 2)
    far = torch.tensor([[[0.0, 1.0]], [[1.0, 0.0]]])
    near = torch.tensor([[[2.0, 0.0]], [[0.0, 3.0]]])
    assert adaptive_select(student, [far, near]) == 1
    assert adaptive_select(student, [near, near * 2]) == 0  # tie -> first
    assert isinstance(adaptive_select(student, [far, near]), int)


def test_adaptive_select_matches_reference():
    torch.manual_seed(0)
    student = torch.rand(2, 3, 4)
    candidates = [torch.rand(2, 3, 4) for _ in range(5)]
    assert adaptive_select(student, candidates) == ref_adaptive_choice(student, candidates)


def test_group_target_and_select_errors():
    with pytest.raises(ValueError):
        group_target([])
    with pytest.raises(ValueError):
        adaptive_select(torch.zeros(1), [])


# ----------------------------------------------------------------------------- validation

@pytest.mark.parametrize("kwargs,exc,pattern", [
    (dict(student_layers=[0, 12]), ValueError, r"student_layers.*out of range"),
    (dict(student_layers=[-1, 2]), ValueError, r"student_layers.*out of range"),
    (dict(teacher_layers=[3, 3, 4]), ValueError, r"teacher_layers.*duplicates"),
    (dict(teacher_layers=[5, 4]), ValueError, r"teacher_layers.*sorted"),
    (dict(student_layers=[1.0, 2]), TypeError, r"student_layers.*ints"),
    (dict(student_layers=[True]), TypeError, r"student_layers.*ints"),
    (dict(student_layers="12"), TypeError, "student_layers"),
    (dict(student_layers=[]), ValueError, r"student_layers.*empty"),
    (dict(mode="greedy"), ValueError, "mode"),
    (dict(preset="middle"), ValueError, "preset"),
])
def test_validation(kwargs, exc, pattern):
    with pytest.raises(exc, match=pattern):
        match_layers(12, 24, **kwargs)


def test_depth_validation():
    with pytest.raises(TypeError, match="num_teacher_layers"):
        match_layers(12, "24")
    with pytest.raises(ValueError, match="num_student_layers"):
        match_layers(0, 24)


def test_layer_match_is_frozen():
    m = LayerMatch(1, (2, 3))
    with pytest.raises(Exception):
        m.student_layer = 3


def test_a_student_deeper_than_its_teacher_is_refused_unless_layers_are_explicit():
    with pytest.raises(ValueError, match=r"num_student_layers=40 is deeper than "
                                         r"num_teacher_layers=24"):
        match_layers(40, 24)
    with pytest.raises(ValueError, match="deeper"):
        match_layers(6, 4, mode="simple")
    pairs = match_layers(6, 4, student_layers=[2, 3], teacher_layers=[1, 2, 3])
    assert [(m.student_layer, m.teacher_layers) for m in pairs] == [(2, (1, 2)), (3, (2, 3))]
