"""Visual-map kernels (compodistill/kernels/visual_attention.py) and the fused backward, against the fp32 reference.

Runs through the Triton interpreter (TRITON_INTERPRET=1 set before triton is imported).
Gradients come from loss = (out * dO).sum() + (A * G).sum() with random dO and G (G random
on padding entries too: the kernels must ignore them), compared with autograd through the
materialising reference. Helpers live in tests/_helpers.py; the accuracy rule in compodistill.testing.accuracy.
"""
import os

os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from compodistill import kernels as K  # noqa: E402
from compodistill.testing.visual_attention import ref_visual_maps  # noqa: E402

from _helpers import (BACKWARD_MODES, assert_close_rule, dense_ref_maps,  # noqa: E402
                      layout_index, make_layout, make_qkv, padding_mask, run_reference,
                      use_backward)

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16


def check_maps(maps, ref_maps, lowp_maps, layout, dtype):
    # bfloat16 inputs give bfloat16 maps (as eager attention's), the others float32.
    assert maps.dtype == (BF16 if dtype == BF16 else F32) and maps.shape == layout.map_shape
    assert_close_rule("A", maps, ref_maps, lowp_maps, dtype)
    assert (maps[~layout.allowed()] == 0).all(), "padding / masked pairs must hold 0"


# --------------------------------------------------------------------------- forward maps

@pytest.mark.parametrize("n,hq,hkv,d,pad,kinds,query,causal", [
    (1, 2, 1, 64, None, ("one",), "all", True),
    (7, 2, 2, 64, None, ("two", "none"), "all", True),
    (37, 4, 2, 80, "left", ("two", "one"), "visual", True),
    (37, 4, 1, 64, "right", ("one", "none"), "text", False),
    (129, 4, 2, 64, "left", ("two", "one"), "all", True),
    (200, 2, 1, 64, "right", ("one", "two"), "visual", False),
])
def test_visual_maps_forward(n, hq, hkv, d, pad, kinds, query, causal):
    q, k, v = make_qkv(2, hq, hkv, n, d, F32, seed=n + d)
    mask = padding_mask(2, n, pad)
    layout, vis = make_layout(2, n, mask, kinds, query, causal)
    out, maps = K.attention_with_visual_maps(q, k, v, layout)
    ref, lowp = run_reference(q, k, v, mask, causal, layout, vis, query)
    assert_close_rule("out", out, ref["out"], lowp["out"], F32)
    check_maps(maps, ref["maps"], lowp["maps"], layout, F32)
    torch.testing.assert_close(K.visual_maps(q, k, layout), maps, atol=1e-6, rtol=1e-5)


def test_visual_maps_explicit_query_mask():
    n = 40
    q, k, _ = make_qkv(2, 2, 2, n, 64, F32, seed=1)
    rows = torch.zeros(2, n, dtype=torch.bool)
    rows[:, ::3] = True
    layout, vis = make_layout(2, n, None, ("two",), rows, True)
    maps = K.visual_maps(q, k, layout)
    ref = dense_ref_maps(ref_visual_maps(q, k, vis, rows, None, True, None), layout)
    torch.testing.assert_close(maps, ref, atol=1e-6, rtol=1e-5)


def test_no_images_anywhere_gives_empty_maps_and_zero_grads():
    q, k, v = make_qkv(2, 2, 1, 16, 64, F32, seed=2)
    layout, _ = make_layout(2, 16, None, ("none",), "all", True)
    leaves = [t.clone().requires_grad_() for t in (q, k)]
    maps = K.visual_maps(*leaves, layout)
    assert maps.shape == (2, 16, 0)
    grads = torch.autograd.grad(maps.sum(), leaves, allow_unused=True)
    assert all(g is None or (g == 0).all() for g in grads)


# --------------------------------------------------------------------------- fused backward

@pytest.mark.parametrize("n,hq,hkv,d,dtype,pad,kinds,query,causal", [
    (7, 2, 1, 64, F32, None, ("two", "none"), "all", True),
    (37, 4, 2, 64, F32, "left", ("two", "one"), "all", True),
    (37, 4, 1, 80, F32, "right", ("one", "two"), "visual", False),
    (37, 4, 4, 64, F16, "left", ("one", "none"), "text", True),
    (37, 4, 2, 64, BF16, None, ("two", "one"), "all", True),
    (129, 4, 2, 64, F32, "right", ("two", "one"), "visual", True),
    (70, 2, 1, 80, F16, None, ("one", "two"), "all", False),
])
@pytest.mark.parametrize("mode", BACKWARD_MODES)
def test_fused_backward_with_visual_terms(n, hq, hkv, d, dtype, pad, kinds, query, causal,
                                          mode, monkeypatch):
    use_backward(monkeypatch, mode)
    q, k, v = make_qkv(2, hq, hkv, n, d, dtype, seed=3 * n + hkv)
    mask = padding_mask(2, n, pad)
    layout, vis = make_layout(2, n, mask, kinds, query, causal)
    gen = torch.Generator().manual_seed(n)
    d_out = torch.randn(q.shape, generator=gen).to(dtype)
    g = torch.randn(layout.map_shape, generator=gen) * n  # maps are ~1/n: keep both terms alive
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out, maps = K.attention_with_visual_maps(*leaves, layout)
    loss = (out.float() * d_out.float()).sum() + (maps * g).sum()
    grads = torch.autograd.grad(loss, leaves)
    ref, lowp = run_reference(q, k, v, mask, causal, layout, vis, query, d_out=d_out, g=g)
    assert_close_rule("out", out.detach(), ref["out"], lowp["out"], dtype)
    check_maps(maps.detach(), ref["maps"], lowp["maps"], layout, dtype)
    for name, got, r, lo in zip("qkv", grads, ref["grads"], lowp["grads"]):
        assert got.dtype == dtype
        assert_close_rule(f"d{name}", got, r, lo, dtype)


@pytest.mark.parametrize("n,hkv,dtype,pad,causal", [
    (37, 2, F32, "left", True),
    (50, 1, F16, "right", False),
])
@pytest.mark.parametrize("mode", BACKWARD_MODES)
def test_maps_only_backward(n, hkv, dtype, pad, causal, mode, monkeypatch):
    """visual_maps (no v): the backward has only the visual terms (dO = 0)."""
    use_backward(monkeypatch, mode)
    q, k, v = make_qkv(2, 4, hkv, n, 64, dtype, seed=n)
    mask = padding_mask(2, n, pad)
    layout, vis = make_layout(2, n, mask, ("two", "one"), "all", causal)
    g = torch.randn(layout.map_shape, generator=torch.Generator().manual_seed(1)) * n
    leaves = [t.clone().requires_grad_() for t in (q, k)]
    maps = K.visual_maps(*leaves, layout)
    grads = torch.autograd.grad((maps * g).sum(), leaves)
    ref, lowp = run_reference(q, k, v, mask, causal, layout, vis, "all", g=g)
    check_maps(maps.detach(), ref["maps"], lowp["maps"], layout, dtype)
    for name, got, r, lo in zip("qk", grads, ref["grads"], lowp["grads"]):
        assert_close_rule(f"d{name}", got, r, lo, dtype)


def test_maps_gradient_only_through_maps_output():
    """attention_with_visual_maps where only A enters the loss (out unused)."""
    q, k, v = make_qkv(1, 2, 1, 30, 64, F32, seed=9)
    layout, vis = make_layout(1, 30, None, ("two",), "all", True)
    g = torch.randn(layout.map_shape)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    _, maps = K.attention_with_visual_maps(*leaves, layout)
    grads = torch.autograd.grad((maps * g).sum(), leaves[:2])
    ref, _ = run_reference(q, k, v, None, True, layout, vis, "all", g=g)
    for got, r in zip(grads, ref["grads"]):
        torch.testing.assert_close(got, r, atol=1e-5, rtol=1e-4)


# --------------------------------------------------------------------------- teacher mode

def test_teacher_accumulates_window_mean_in_place():
    n = 33
    mask = padding_mask(2, n, "left")
    layout, vis = make_layout(2, n, mask, ("two", "one"), "visual", True)
    buf = torch.zeros(layout.map_shape)
    expected = torch.zeros(layout.map_shape)
    for layer in range(3):
        q, k, v = make_qkv(2, 4, 2, n, 64, F32, seed=100 + layer)
        q.requires_grad_()
        out, same = K.teacher_attention_with_visual_maps(q, k, v, layout, maps_out=buf,
                                                         weight=1 / 3)
        assert same is buf and not out.requires_grad and not buf.requires_grad
        expected += dense_ref_maps(ref_visual_maps(q.detach(), k, vis, "visual", mask, True,
                                                   None), layout) / 3
    torch.testing.assert_close(buf, expected, atol=1e-6, rtol=1e-5)
    fresh = K.teacher_visual_maps(q.detach(), k, layout, weight=2.0)
    torch.testing.assert_close(fresh, 2 * dense_ref_maps(
        ref_visual_maps(q.detach(), k, vis, "visual", mask, True, None), layout),
        atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="maps_out must be a float32"):
        K.teacher_visual_maps(q.detach(), k, layout, maps_out=torch.zeros(1, 2, 3))


# --------------------------------------------------------------------------- API surface

def test_compile_fused_student_and_teacher():
    n = 24
    q, k, v = make_qkv(1, 2, 1, n, 64, F32, seed=4)
    layout, _ = make_layout(1, n, None, ("two",), "all", True)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]

    def f(q, k, v):
        target = K.teacher_visual_maps(q.detach() * 0.5, k.detach(), layout)
        out, maps = K.attention_with_visual_maps(q, k, v, layout)
        return (out ** 2).sum() + ((maps - target) ** 2).sum() * 100

    eager = torch.autograd.grad(f(*leaves), leaves)
    got = torch.autograd.grad(torch.compile(f, backend="aot_eager", fullgraph=True)(*leaves),
                              leaves)
    for a, b in zip(eager, got):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_layout_as_index_tensors():
    """The spelled-out form (index tensors, key_mask, causal, scale) equals the layout form."""
    n = 26
    q, k, v = make_qkv(2, 2, 1, n, 64, F32, seed=6)
    mask = padding_mask(2, n, "right")
    layout, _ = make_layout(2, n, mask, ("one", "two"), "all", False)
    spelled = (*layout_index(layout), layout.key_mask, layout.causal, 0.2)
    out, maps = K.attention_with_visual_maps(q, k, v, layout, 0.2)
    out2, maps2 = K.attention_with_visual_maps(q, k, v, *spelled)
    torch.testing.assert_close(out2, out, atol=0, rtol=0)
    torch.testing.assert_close(maps2, maps, atol=0, rtol=0)
    torch.testing.assert_close(K.visual_maps(q, k, *spelled), maps, atol=0, rtol=0)
    torch.testing.assert_close(K.teacher_attention_with_visual_maps(q, k, v, *spelled)[1], maps,
                               atol=0, rtol=0)
    with pytest.raises(TypeError, match="too many positional"):
        K.visual_maps(q, k, layout, 0.2, 0.3)


def test_layout_errors():
    q, k, v = make_qkv(2, 2, 1, 10, 16, F32)
    layout, _ = make_layout(2, 12, None, ("one",), "all", True)
    with pytest.raises(ValueError, match="sequence length 12"):
        K.visual_maps(q, k, layout)
    with pytest.raises(TypeError, match="VisualLayout"):
        K.visual_maps(q, k, layout_index(layout))


@pytest.mark.slow
def test_fused_backward_longer_sequence():
    n, dtype = 320, F16
    q, k, v = make_qkv(2, 4, 2, n, 64, dtype, seed=7)
    mask = padding_mask(2, n, "left")
    layout, vis = make_layout(2, n, mask, ("two", "one"), "all", True)
    d_out = torch.randn(q.shape).to(dtype)
    g = torch.randn(layout.map_shape) * n
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out, maps = K.attention_with_visual_maps(*leaves, layout)
    grads = torch.autograd.grad((out.float() * d_out.float()).sum() + (maps * g).sum(), leaves)
    ref, lowp = run_reference(q, k, v, mask, True, layout, vis, "all", d_out=d_out, g=g)
    check_maps(maps.detach(), ref["maps"], lowp["maps"], layout, dtype)
    for name, got, r, lo in zip("qkv", grads, ref["grads"], lowp["grads"]):
        assert_close_rule(f"d{name}", got, r, lo, dtype)


def test_maps_from_a_given_lse_match_and_backpropagate():
    """visual_attention_maps(..., lse=) skips the lse-only forward: same maps and gradients."""
    from compodistill import visual_attention_maps
    n = 40
    mask = padding_mask(2, n, "right")
    layout, vis = make_layout(2, n, mask, ("one", "two"), "all", True)
    q, k, _ = make_qkv(2, 4, 2, n, 32, torch.float32, seed=3)
    _, stats = K.flash_forward(q, k, None, mask, True, None)
    lse = K.lse_from_stats(stats)
    g = torch.randn(layout.map_shape, generator=torch.Generator().manual_seed(1))
    results = []
    for given in (None, lse):
        qs, ks = q.clone().requires_grad_(), k.clone().requires_grad_()
        maps = visual_attention_maps(qs, ks, layout, backend="triton", lse=given)
        (maps * g).sum().backward()
        results.append((maps.detach(), qs.grad, ks.grad))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, atol=2e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="lse must have shape"):
        visual_attention_maps(q, k, layout, backend="triton", lse=lse[:, :2])


def test_maps_grid_runs_column_chunks_fastest():
    """The map pass's grid is (column chunk, row block, sample): the programs that read one
    block of q rows (all heads) are adjacent in launch order, so q is read from DRAM about
    once, not once per column chunk. Recorded, not run."""
    from compodistill.kernels._common import recording_launches
    from compodistill.kernels.visual_attention import _BLOCK_Q, _BLOCK_V
    n = 256
    layout, _ = make_layout(2, n, None, ("one", "two"), "all", True)
    q, k, _ = make_qkv(2, 2, 1, n, 16, F32)
    _, stats = K.flash_forward(q, k, None, None, True, None)
    _, qmax, vmax = layout.map_shape
    assert vmax > _BLOCK_V and qmax > _BLOCK_Q  # several chunks along both axes
    with recording_launches() as log:
        K.visual_maps_from_lse(q, k, stats, *layout_index(layout), True, None)
    grids = [grid for kern, grid, _a, _k in log if kern.__name__ == "_visual_maps_kernel"]
    assert grids == [(-(-vmax // _BLOCK_V), -(-qmax // _BLOCK_Q), 2)]


def test_refine_runs_only_on_row_blocks_with_large_scores(monkeypatch):
    """The refine pass rescoring the visual keys is gated per (block of rows, head) by the
    forward's row maxima: a block whose |row max| stays below REFINE_AT keeps the forward's
    statistics untouched; a block reaching it gets them rebuilt from the map tiles. The
    input's log2-sum plane is deliberately wrong, which only a rebuilt row corrects."""
    from compodistill.kernels import visual_attention as VA
    monkeypatch.setattr(VA, "_BLOCK_Q", 16)  # two row blocks in 32 rows
    n = 32
    layout, vis = make_layout(1, n, None, ("one",), "all", True)
    q, k, _ = make_qkv(1, 2, 1, n, 16, F32)
    q[:, :, 16:] *= 40.0  # rows 16..31: |s| in the hundreds, above REFINE_AT
    _, stats = K.flash_forward(q, k, None, None, True, None,
                               K.inverse_index(layout.visual_index, layout.visual_count, n))
    m = stats[0]
    assert float(m[..., :16].abs().max()) < VA.REFINE_AT <= float(m[..., 16:].abs().max())
    wrong = stats.clone()
    wrong[1] += 0.5
    index = layout_index(layout)
    refined = VA.refine_visual_stats(q, k, wrong, *index, True, None)
    rebuilt = VA.refine_visual_stats(q, k, stats, *index, True, None, refine_at=0.0)
    assert torch.equal(refined[:, :, :, :16], wrong[:2, :, :, :16]), "small rows were rescored"
    assert torch.equal(refined[:, :, :, 16:], rebuilt[:, :, :, 16:]), "large rows were not"
    assert (refined[1, :, :, 16:] - stats[1, :, :, 16:]).abs().max() < 1e-4


def _logged_launches(monkeypatch):
    """Names of the kernels launched (``+maps`` for a forward with its maps phase), run."""
    from compodistill.kernels import _common, attention, visual_attention
    log = []

    def logged(kernel, grid, *args, **kwargs):
        name = getattr(kernel, "fn", kernel).__name__
        log.append(name + ("+maps" if kwargs.get("HAS_MAPS") else ""))
        return _common.launch(kernel, grid, *args, **kwargs)
    for module in (attention, visual_attention):
        monkeypatch.setattr(module, "launch", logged)
    return log


# The passes that may score image keys: the forward's maps phase and the gathered kernels.
IMAGE_SCORE_PASSES = ("_fwd_kernel+maps", "_visual_stats_kernel", "_visual_maps_kernel",
                      "_visual_row_terms_kernel")


def _scoring_launches(monkeypatch):
    """(name, dots) of every launch, dots being the ``tl.dot`` calls it executed under the
    interpreter: a launch with no dot scored no image key (the refine gate closed)."""
    from triton.runtime import interpreter
    log = _logged_launches(monkeypatch)
    dots = []
    builder = interpreter.InterpreterBuilder
    dot = builder.create_dot

    def create_dot(self, *args):
        dots.append(len(log))
        return dot(self, *args)
    monkeypatch.setattr(builder, "create_dot", create_dot)

    def scored():
        return [name for i, name in enumerate(log, 1)
                if name in IMAGE_SCORE_PASSES and i in dots]
    return log, scored


@pytest.mark.parametrize("max_score", [None, 1e4])
def test_vat_step_scores_image_keys_in_two_passes(max_score, monkeypatch):
    """A student VAT step (loss forward and backward, Triton) scores the image keys twice
    at moderate scores: the gathered maps pass and the backward's row terms; a teacher maps
    call once. The refine gate launches but scores nothing there; at |s| ~ 1e4 it rescores
    the rows whose maximum needs it (one more pass, the exactness kept)."""
    from compodistill import visual_attention_loss
    n = 48
    layout, vis = make_layout(2, n, None, ("two", "one"), "all", True)
    q, k, _ = make_qkv(2, 4, 2, n, 16, F32)
    if max_score is not None:
        q = q * (max_score / float((q @ k.repeat_interleave(2, 1).transpose(-1, -2)).abs().max()
                                   / 4.0))
    log, scored = _scoring_launches(monkeypatch)
    target = K.teacher_visual_maps(q, k, layout)
    gate = [] if max_score is None else ["_visual_stats_kernel"]
    assert log == ["_fwd_kernel", "_visual_stats_kernel", "_visual_maps_kernel"], log
    assert scored() == gate + ["_visual_maps_kernel"], scored()
    log.clear()
    qs = q.clone().requires_grad_()
    loss = visual_attention_loss(qs, k, target, vis, backend="triton")
    loss.backward()
    assert scored() == gate + ["_visual_maps_kernel", "_visual_row_terms_kernel"], scored()
    assert torch.isfinite(qs.grad).all()


def test_deterministic_mode_runs_the_same_maps_passes(monkeypatch):
    """The gathered maps pass sums the heads in registers in a fixed order: the
    deterministic mode runs the same passes as the default, and gives the same bits."""
    n = 40
    layout, _ = make_layout(1, n, None, ("two",), "all", True)
    q, k, _ = make_qkv(1, 4, 2, n, 16, F32)
    fast = K.teacher_visual_maps(q, k, layout)
    log = _logged_launches(monkeypatch)
    monkeypatch.setenv("COMPODISTILL_DETERMINISTIC", "1")
    slow = K.teacher_visual_maps(q, k, layout)
    assert log == ["_fwd_kernel", "_visual_stats_kernel", "_visual_maps_kernel"], log
    assert torch.equal(fast, slow)


@pytest.mark.parametrize("dtype", [F32, BF16])
def test_fresh_maps_need_no_zero_fill(dtype, monkeypatch):
    """The gathered pass writes every entry of a fresh map, padding and masked pairs as 0:
    the buffer comes from torch.empty, here filled with NaN first."""
    from compodistill.kernels import _common, visual_attention
    n = 37
    mask = padding_mask(2, n, "left")
    layout, vis = make_layout(2, n, mask, ("two", "none"), "all", True)
    q, k, v = make_qkv(2, 4, 2, n, 16, dtype, seed=3)

    def nan_buffer(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=_common.map_buffer(
            shape, dtype, device).dtype, device=device)
    monkeypatch.setattr(visual_attention, "map_buffer", nan_buffer)
    maps = K.visual_maps(q, k, layout)
    assert maps.dtype == (BF16 if dtype == BF16 else F32)
    assert torch.isfinite(maps).all()
    assert (maps[~layout.allowed()] == 0).all()
    ref, lowp = run_reference(q, k, v, mask, True, layout, vis, "all")
    check_maps(maps, ref["maps"], lowp["maps"], layout, dtype)


def test_row_terms_grid_runs_heads_fastest():
    """The row-terms pass's grid is (head, row block, sample): the Hq programs that read
    one block of G rows are adjacent in launch order, so G is read from DRAM about once per
    row block, not once per query head. Recorded, not run."""
    from compodistill.kernels._common import recording_launches
    from compodistill.kernels.visual_attention import _BLOCK_Q
    n = 200
    layout, _ = make_layout(2, n, None, ("one", "two"), "all", True)
    q, k, _ = make_qkv(2, 4, 2, n, 16, F32)
    _, stats = K.flash_forward(q, k, None, None, True, None)
    g = torch.zeros(layout.map_shape)
    with recording_launches() as log:
        K.visual_row_terms(q, k, stats, *layout_index(layout), g, True, None)
    grids = [grid for kern, grid, _a, _k in log if kern.__name__ == "_visual_row_terms_kernel"]
    assert grids == [(4, -(-layout.map_shape[1] // _BLOCK_Q), 2)]


def test_teacher_layer_with_output_is_one_launch(monkeypatch):
    """The HF hook's teacher layers (and so the teacher cache writer) call
    teacher_attention_with_visual_maps with v and a window's running buffer: one forward
    launch per layer computes the output and adds weight * A into the buffer."""
    from compodistill.kernels._common import deterministic
    if deterministic():
        pytest.skip("the deterministic mode runs the gathered passes")
    n = 40
    layout, _ = make_layout(1, n, None, ("two",), "all", True)
    q, k, v = make_qkv(1, 4, 2, n, 16, F32)
    acc = torch.zeros(layout.map_shape)
    log = _logged_launches(monkeypatch)
    for weight in (0.25, 0.75):
        out, acc = K.teacher_attention_with_visual_maps(q, k, v, layout, maps_out=acc,
                                                        weight=weight)
    assert log == ["_fwd_kernel+maps"] * 2, log
    torch.testing.assert_close(acc, K.teacher_visual_maps(q, k, layout), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(out, K.flash_attention(q, k, v), rtol=1e-5, atol=1e-6)
