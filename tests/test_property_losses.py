"""Property-based tests (hypothesis) of the public loss APIs against the fp32 references.

Each example draws a whole problem: batch size, sequence length, GQA head layout, head dim,
padding side and amount per sample, image spans per sample (none, one, several, at the start
or the end of the real tokens, or covering all of them), the query rows, causality, dtype and
the loss options. Every result must be finite and match the materialising reference
(:mod:`compodistill.testing.visual_attention`) within the accuracy rule; invalid arguments must raise
the documented ValueError / TypeError.

Bounded in CI (hypothesis profile "ci", tests/conftest.py); ``COMPODISTILL_FUZZ=1`` selects
the "long" profile (1000 examples per test, 200 for the Triton-interpreter test).
"""
import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported (Triton test below)

import math  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import assume, example, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from compodistill import (linear_distillation_loss, logit_distillation_loss,  # noqa: E402
                          visual_attention_loss, visual_attention_maps, visual_layout)
from compodistill.testing.accuracy import (assert_accuracy, max_error, pad_maps,  # noqa: E402
                                           rounding_atol)
from compodistill.testing.visual_attention import (ref_visual_allowed, ref_visual_loss,  # noqa: E402
                                            ref_visual_maps)
from compodistill.testing.logit_kd import ref_logit_kd  # noqa: E402
from compodistill.kernels._common import map_dtype  # noqa: E402

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
FUZZ = os.environ.get("COMPODISTILL_FUZZ", "0") not in ("", "0")
# Relative tolerance (to the largest reference magnitude) of results returned in each dtype:
# the chunked path computes in fp32 whatever the input, only its gradients are rounded back.
LOSS_OPTIONS = st.fixed_dictionaries(dict(
    loss=st.sampled_from(("cosine", "kl", "reverse_kl", "jsd", "mse")),
    cosine=st.sampled_from(("flat", "row", "pooled")),
    distribution=st.sampled_from(("renorm", "rest")),
    beta=st.sampled_from((0.0, 0.25, 0.5, 1.0)),
    reduction=st.sampled_from(("mean", "sum", "none"))))


# --------------------------------------------------------------------------- strategies

def _spans(draw, lo, hi, kind):
    """Non-overlapping image spans inside the real tokens [lo, hi) of one sample."""
    length = hi - lo
    if kind == "none" or length <= 0:
        return []
    if kind == "all":
        return [(lo, hi)]
    size = draw(st.integers(1, length))
    if kind == "start":
        return [(lo, lo + size)]
    if kind == "end":
        return [(hi - size, hi)]
    count = 1 if kind == "one" else draw(st.integers(1, min(4, (length + 1) // 2)))
    points = draw(st.lists(st.integers(lo, hi), min_size=2 * count, max_size=2 * count,
                           unique=True))
    points.sort()
    return [(points[i], points[i + 1]) for i in range(0, len(points), 2)]


@st.composite
def attention_case(draw, max_n=256, dtypes=(F32, F16, BF16), head_dims=(8, 16, 64, 80)):
    """A full visual-loss problem (tensors are built from the drawn seed)."""
    batch = draw(st.integers(1, 3))
    size = draw(st.sampled_from(("tiny", "small", "small", "medium", "large")))
    bounds = {"tiny": (1, 4), "small": (5, 24), "medium": (25, 64), "large": (65, 256)}[size]
    n = draw(st.integers(min(bounds[0], max_n), min(bounds[1], max_n)))
    hkv = draw(st.sampled_from((1, 2)))
    group = draw(st.sampled_from((1, 2, 4) if hkv == 1 else (1, 2, 3)))
    d = draw(st.sampled_from(head_dims))
    pad = draw(st.sampled_from(("none", "left", "right")))
    mask = None
    if pad != "none":
        mask = torch.ones(batch, n, dtype=torch.bool)
        for b in range(batch):
            amount = draw(st.integers(0, n))  # n: a fully padded sample
            if amount:
                mask[b, slice(0, amount) if pad == "left" else slice(n - amount, n)] = False
    spans = []
    for b in range(batch):
        real = torch.arange(n) if mask is None else mask[b].nonzero().flatten()
        lo, hi = (int(real.min()), int(real.max()) + 1) if len(real) else (0, 0)
        kind = draw(st.sampled_from(("none", "one", "several", "start", "end", "all")))
        spans.append(_spans(draw, lo, hi, kind))
    query = draw(st.sampled_from(("all", "visual", "text", "mask")))
    seed = draw(st.integers(0, 2**31 - 1))
    if query == "mask":
        g = torch.Generator().manual_seed(seed + 1)
        query = torch.rand(batch, n, generator=g) < draw(st.sampled_from((0.2, 0.5, 1.0)))
        real = torch.ones(batch, n, dtype=torch.bool) if mask is None else mask
        assume(bool((query & real).any()))  # an empty selection is an error (tested below)
    return dict(batch=batch, n=n, hq=hkv * group, hkv=hkv, d=d, mask=mask, spans=spans,
                query=query, causal=draw(st.booleans()), dtype=draw(st.sampled_from(dtypes)),
                magnitude=draw(st.sampled_from((0.3, 1.0, 2.0))), seed=seed)


def make_tensors(case, hq=None, seed_offset=0):
    g = torch.Generator().manual_seed(case["seed"] + seed_offset)
    shape_q = (case["batch"], hq or case["hq"], case["n"], case["d"])
    shape_k = (case["batch"], case["hkv"], case["n"], case["d"])
    q = (torch.randn(shape_q, generator=g) * case["magnitude"]).to(case["dtype"])
    k = (torch.randn(shape_k, generator=g) * case["magnitude"]).to(case["dtype"])
    return q, k


def visual_mask(case):
    vis = torch.zeros(case["batch"], case["n"], dtype=torch.bool)
    for b, sample in enumerate(case["spans"]):
        for s, e in sample:
            vis[b, s:e] = True
    return vis


def layout_of(case):
    return visual_layout(case["spans"], case["batch"], case["n"], query=case["query"],
                         attention_mask=case["mask"], causal=case["causal"])


def ref_maps(q, k, case):
    return ref_visual_maps(q, k, visual_mask(case), case["query"], case["mask"], case["causal"])


def assert_close(name, got, ref, dtype, extra=0.0):
    """The accuracy rule with no lower-precision baseline: rounding to ``dtype`` + 1e-6 (+ extra)."""
    assert_accuracy(got, ref, atol=rounding_atol(ref, dtype) + 1e-6 + extra, name=name)


def check_maps_and_loss(case, options, backend):
    layout = layout_of(case)
    q, k = make_tensors(case)
    q_t, k_t = make_tensors(case, hq=case["hkv"] * 2, seed_offset=7)  # teacher: other heads
    kwargs = dict(query=case["query"], attention_mask=case["mask"], causal=case["causal"])

    # Maps: float32, the layout's shape, zero off the allowed pairs, equal to the reference.
    maps = visual_attention_maps(q, k, case["spans"], backend=backend, **kwargs)
    assert maps.dtype == (F32 if backend == "torch" else map_dtype(case["dtype"]))
    assert tuple(maps.shape) == layout.map_shape
    ref = pad_maps(ref_maps(q, k, case), layout.query_count, layout.visual_count) \
        if case["batch"] else None
    assert_close("maps", maps, ref, F32 if backend == "torch" else case["dtype"])
    assert (maps[~layout.allowed()] == 0).all()

    # Loss and gradients against the reference loss on the reference maps.
    target = visual_attention_maps(q_t, k_t, case["spans"], backend="torch", **kwargs)
    qs, ks = q.clone().requires_grad_(), k.clone().requires_grad_()
    loss = visual_attention_loss(qs, ks, target, case["spans"], backend=backend, **options,
                                 **kwargs)
    assert loss.dtype == F32 and torch.isfinite(loss).all()
    assert loss.shape == ((case["batch"],) if options["reduction"] == "none" else ())
    (loss.sum() if loss.dim() else loss).backward()
    assert qs.grad is not None and ks.grad is not None
    assert qs.grad.dtype == q.dtype and ks.grad.dtype == k.dtype

    qr, kr = q.detach().float().requires_grad_(), k.detach().float().requires_grad_()
    targets = ref_maps(q_t, k_t, case)
    allowed = ref_visual_allowed(visual_mask(case), case["query"], case["mask"], case["causal"])
    ref_loss = ref_visual_loss(ref_maps(qr, kr, case), targets, allowed, **options)
    grads = torch.autograd.grad(ref_loss.sum(), (qr, kr), allow_unused=True)
    grads = [torch.zeros_like(t) if g is None else g for g, t in zip(grads, (qr, kr))]
    # Ill-conditioned losses (e.g. the rest bucket 1 − ΣA when ΣA ≈ 1) move with the rounding
    # of any fp32 computation, the reference's included: the chunked path in float64 is the
    # yardstick of how far the fp32 reference itself is off, and that slack is allowed
    # (|got − ref| ≤ |got − truth| + |truth − ref| ≤ 3 |ref − truth| by the accuracy rule).
    q64, k64 = q.detach().double().requires_grad_(), k.detach().double().requires_grad_()
    truth = visual_attention_loss(q64, k64, target.double(), case["spans"], backend="torch",
                                  **options, **kwargs)
    truth_grads = torch.autograd.grad(truth.sum(), (q64, k64), allow_unused=True)
    slack = [3 * max_error(r, t) if t is not None else 0.0 for r, t in zip(grads, truth_grads)]
    # bf16 maps (Triton, bf16 inputs): the yardstick is PyTorch on the reference maps rounded
    # to bf16 (straight through: the loss and its G at the rounded maps), as eager attention
    # in bf16 hands them over. The cosine's G cancels when A_s ≈ A_t, which amplifies that
    # rounding in dq and dk.
    lowp, lowp_grads = None, (None, None)
    if maps.dtype != F32:
        qb, kb = q.detach().float().requires_grad_(), k.detach().float().requires_grad_()
        rounded = [m + (m.to(maps.dtype).float() - m).detach() for m in ref_maps(qb, kb, case)]
        lowp = ref_visual_loss(rounded, targets, allowed, **options)
        lowp_grads = torch.autograd.grad(lowp.sum(), (qb, kb), allow_unused=True)
        lowp_grads = [torch.zeros_like(t) if g is None else g for g, t in zip(lowp_grads,
                                                                              (qb, kb))]
        lowp = lowp.detach()
    assert_accuracy(loss.detach(), ref_loss.detach(), lowp,
                    atol=rounding_atol(ref_loss, F32) + 1e-6 + 1e-5
                    + 3 * max_error(ref_loss.detach(), truth.detach()), name="loss")
    for name, got, ref_g, low, extra in zip(("dq", "dk"), (qs.grad, ks.grad), grads,
                                            lowp_grads, slack):
        assert_accuracy(got, ref_g, low, atol=rounding_atol(ref_g, case["dtype"]) + 1e-6
                        + extra, name=name)


# --------------------------------------------------------------------------- visual losses

@given(case=attention_case(), options=LOSS_OPTIONS)
def test_visual_loss_matches_reference_torch(case, options):
    check_maps_and_loss(case, options, "torch")


@settings(max_examples=200 if FUZZ else 6)
@given(case=attention_case(max_n=64, head_dims=(8, 16, 64)), options=LOSS_OPTIONS)
def test_visual_loss_matches_reference_triton_interpreter(case, options):
    pytest.importorskip("triton")
    check_maps_and_loss(case, options, "triton")


CORRUPTIONS = ("heads", "dtype_mix", "int_dtype", "span_outside", "span_overlap",
               "span_empty", "visual_on_padding", "query_empty", "query_name", "mask_shape",
               "mask_float", "loss", "cosine", "distribution", "reduction", "beta", "scale",
               "target_shape", "target_type", "backend", "not_tensor", "three_dims")


@given(case=attention_case(max_n=32, dtypes=(F32,)), corruption=st.sampled_from(CORRUPTIONS))
def test_invalid_arguments_raise_documented_errors(case, corruption):
    q, k = make_tensors(case)
    n, batch = case["n"], case["batch"]
    spans, mask = case["spans"], case["mask"]
    kwargs = dict(query=case["query"], attention_mask=mask, causal=case["causal"])
    options = {}
    layout = layout_of(case)
    target = torch.zeros(layout.map_shape)
    error = ValueError
    if corruption == "heads":
        assume(case["hq"] > 1)
        k = torch.randn(batch, case["hq"] + 1, n, case["d"])
    elif corruption == "dtype_mix":
        k, error = k.to(F16), TypeError
    elif corruption == "int_dtype":
        q, error = q.to(torch.int32), TypeError
    elif corruption == "span_outside":
        spans = [[(0, n + 1)]] + spans[1:]
    elif corruption == "span_overlap":
        assume(n >= 3)
        spans = [[(0, 2), (1, 3)]] + spans[1:]
    elif corruption == "span_empty":
        spans = [[(1, 1)]] + spans[1:]
    elif corruption == "visual_on_padding":
        assume(mask is not None and not bool(mask.all()))
        vis = ~mask
        spans = vis
    elif corruption == "query_empty":
        kwargs["query"] = torch.zeros(batch, n, dtype=torch.bool)
    elif corruption == "query_name":
        kwargs["query"] = "images"
    elif corruption == "mask_shape":
        kwargs["attention_mask"] = torch.ones(batch, n + 1, dtype=torch.bool)
    elif corruption == "mask_float":
        kwargs["attention_mask"], error = torch.ones(batch, n), TypeError
    elif corruption in ("loss", "cosine", "distribution", "reduction"):
        options[corruption] = "bogus"
    elif corruption == "beta":
        options["beta"] = 1.5
    elif corruption == "scale":
        options["scale"] = -1.0
    elif corruption == "target_shape":
        target = torch.zeros(batch, layout.map_shape[1] + 1, layout.map_shape[2])
    elif corruption == "target_type":
        target, error = target.tolist(), TypeError
    elif corruption == "backend":
        options["backend"] = "cuda"
    elif corruption == "not_tensor":
        q, error = q.tolist(), TypeError
    elif corruption == "three_dims":
        q = q[0]
    with pytest.raises(error):
        visual_attention_loss(q, k, target, spans, **kwargs, **options)
    if corruption not in ("loss", "cosine", "distribution", "reduction", "beta", "target_shape",
                          "target_type"):
        maps_options = {key: v for key, v in options.items() if key in ("scale", "backend")}
        with pytest.raises(error):
            visual_attention_maps(q, k, spans, **kwargs, **maps_options)


# --------------------------------------------------------------------------- logit losses

@st.composite
def logit_case(draw):
    batch, n = draw(st.integers(1, 3)), draw(st.integers(1, 12))
    vs = draw(st.integers(1, 40))
    return dict(batch=batch, n=n, vs=vs, vt=vs + draw(st.sampled_from((0, 0, 3))),
                dtype=draw(st.sampled_from((F32, F16, BF16))),
                loss=draw(st.sampled_from(("kl", "reverse_kl", "jsd"))),
                beta=draw(st.sampled_from((0.0, 0.3, 0.5, 1.0))),
                temperature=draw(st.sampled_from((0.5, 1.0, 2.0, 4.0))),
                positions=draw(st.sampled_from(("response", "all", "visual"))),
                zscore=draw(st.booleans()), masked=draw(st.booleans()),
                magnitude=draw(st.sampled_from((0.5, 3.0, 30.0))),
                chunk=draw(st.one_of(st.none(), st.integers(1, 8))),
                seed=draw(st.integers(0, 2**31 - 1)))


def logit_inputs(case):
    g = torch.Generator().manual_seed(case["seed"])
    b, n = case["batch"], case["n"]
    zs = (torch.randn(b, n, case["vs"], generator=g) * case["magnitude"]).to(case["dtype"])
    zt = (torch.randn(b, n, case["vt"], generator=g) * case["magnitude"]).to(case["dtype"])
    labels = torch.randint(0, case["vs"], (b, n), generator=g)
    labels[torch.rand(b, n, generator=g) < 0.4] = -100
    attn = (torch.rand(b, n, generator=g) < 0.8) if case["masked"] else None
    vis = torch.rand(b, n, generator=g) < 0.5
    return zs, zt, labels, attn, vis


def reference_grad(zs, zt, labels, compute_dtype, **opts):
    r = zs.detach().to(compute_dtype).requires_grad_()
    ref = ref_logit_kd(r, zt, labels, compute_dtype=compute_dtype, **opts)
    (grad,) = torch.autograd.grad(ref, r, allow_unused=True)
    return ref, torch.zeros_like(r) if grad is None else grad


# Found by the long profile: z-scoring two nearly equal logits (vocab 2) is ill-conditioned,
# so every float32 implementation, the reference included, is ~5e-4 off the float64 truth.
ZSCORE_VOCAB2 = dict(batch=2, n=5, vs=2, vt=2, dtype=F32, loss="kl", beta=0.0, temperature=2.0,
                     positions="all", zscore=True, masked=True, magnitude=0.5, chunk=None, seed=5)


@example(case=ZSCORE_VOCAB2)
@given(case=logit_case())
def test_logit_distillation_matches_reference(case):
    zs, zt, labels, attn, vis = logit_inputs(case)
    opts = dict(loss=case["loss"], beta=case["beta"], temperature=case["temperature"],
                positions=case["positions"], attention_mask=attn, visual_mask=vis,
                zscore=case["zscore"])
    s = zs.clone().requires_grad_()
    loss = logit_distillation_loss(s, zt, labels, chunk_size=case["chunk"], backend="torch",
                                   **opts)
    loss.backward()
    ref, ref_grad = reference_grad(zs, zt, labels, F32, **opts)
    assert loss.dtype == F32
    assert_close("kd", loss.detach(), ref.detach().float(), F32, extra=1e-5)
    assert s.grad.dtype == zs.dtype
    # The accuracy rule with a float64 yardstick: error <= 2 x the float32 reference's own
    # error, plus the rounding of the gradient to its dtype.
    _, truth = reference_grad(zs, zt, labels, torch.float64, **opts)
    atol = rounding_atol(truth, case["dtype"]) + 1e-6
    assert_accuracy(s.grad, truth, ref_grad, atol=atol, name="kd grad")


@given(case=logit_case(), n_hidden=st.sampled_from((4, 16)),
       weights=st.sampled_from(((1.0, 0.0), (1.0, 0.5), (0.0, 1.0), (0.3, 2.0))),
       bias=st.booleans())
def test_linear_distillation_matches_reference(case, n_hidden, weights, bias):
    kd_weight, ce_weight = weights
    g = torch.Generator().manual_seed(case["seed"])
    b, n, vs, vt, dt = case["batch"], case["n"], case["vs"], case["vt"], case["dtype"]
    scale = case["magnitude"] / math.sqrt(n_hidden)
    h_s = torch.randn(b, n, n_hidden, generator=g).to(dt)
    h_t = torch.randn(b, n, n_hidden + 2, generator=g).to(dt)
    w_s = (torch.randn(vs, n_hidden, generator=g) * scale).to(dt)
    w_t = (torch.randn(vt, n_hidden + 2, generator=g) * scale).to(dt)
    b_s = torch.randn(vs, generator=g).to(dt) if bias else None
    b_t = torch.randn(vt, generator=g).to(dt) if bias else None
    _, _, labels, attn, vis = logit_inputs(case)
    opts = dict(loss=case["loss"], beta=case["beta"], temperature=case["temperature"],
                positions=case["positions"], attention_mask=attn, visual_mask=vis,
                zscore=case["zscore"])
    leaves = [t.clone().requires_grad_() for t in (h_s, w_s)]
    bs = b_s.clone().requires_grad_() if bias else None
    loss = linear_distillation_loss(leaves[0], leaves[1], h_t, w_t, labels, b_s=bs, b_t=b_t,
                                    kd_weight=kd_weight, ce_weight=ce_weight,
                                    chunk_size=case["chunk"], backend="torch", **opts)
    loss.backward()
    # Reference: the reference KD (and CE, mean over the response tokens) on logits made in
    # float64. The same computation with the logits made at the input dtype (plain PyTorch)
    # sets the baseline of the accuracy rule: large logits make the loss ill-conditioned, and
    # rounding the logits alone moves the gradient.
    results = []
    for logits_dtype in (torch.float64, dt):
        cast = lambda t: t.detach().to(logits_dtype)  # noqa: E731
        ref_leaves = [cast(t).requires_grad_() for t in (h_s, w_s)]
        ref_bs = cast(b_s).requires_grad_() if bias else None
        zs = ref_leaves[0] @ ref_leaves[1].T + (ref_bs if bias else 0.0)
        zt = cast(h_t) @ cast(w_t).T + (cast(b_t) if bias else 0.0)
        ref = kd_weight * ref_logit_kd(zs, zt, labels, **opts)
        if ce_weight:
            sel = labels != -100
            ce = (torch.nn.functional.cross_entropy(zs[sel].float(), labels[sel],
                                                    reduction="sum")
                  / max(int(sel.sum()), 1)) if bool(sel.any()) else zs.float().sum() * 0.0
            ref = ref + ce_weight * ce
        wrt = ref_leaves + ([ref_bs] if bias else [])
        grads = torch.autograd.grad(ref, wrt, allow_unused=True)
        results.append((ref.detach(), [torch.zeros_like(t) if g is None else g
                                       for g, t in zip(grads, wrt)]))
    got = [leaves[0].grad, leaves[1].grad] + ([bs.grad] if bias else [])
    assert loss.dtype == F32
    ref, ref_grads = results[0]
    base, base_grads = results[-1]
    # The accuracy rule, plus the rounding of each output to its dtype.
    assert_accuracy(loss.detach(), ref, base, atol=rounding_atol(ref, dt) + 1e-5 + 1e-6,
                    name="loss")
    for name, gr, rg, bg in zip(("dh_s", "dW_s", "db_s"), got, ref_grads, base_grads):
        assert gr is not None and gr.dtype == dt
        assert_accuracy(gr, rg, bg, atol=rounding_atol(rg, dt) + 1e-6, name=name)


LOGIT_CORRUPTIONS = ("vocab", "temperature", "beta", "loss", "positions", "no_labels",
                     "no_visual", "float_labels", "shape", "int_logits")


@given(case=logit_case(), corruption=st.sampled_from(LOGIT_CORRUPTIONS))
def test_logit_invalid_arguments_raise(case, corruption):
    zs, zt, labels, attn, vis = logit_inputs(case)
    kwargs = dict(positions=case["positions"], attention_mask=attn, visual_mask=vis)
    error = ValueError
    if corruption == "vocab":
        zt = zt[..., : case["vs"] - 1] if case["vs"] > 1 else zt[..., :0]
    elif corruption == "temperature":
        kwargs["temperature"] = 0.0
    elif corruption == "beta":
        kwargs["beta"] = -0.1
    elif corruption == "loss":
        kwargs["loss"] = "kl_div"
    elif corruption == "positions":
        kwargs["positions"] = "text"
    elif corruption == "no_labels":
        kwargs["positions"], labels = "response", None
    elif corruption == "no_visual":
        kwargs["positions"], kwargs["visual_mask"] = "visual", None
    elif corruption == "float_labels":
        kwargs["positions"], labels, error = "response", labels.float(), TypeError
    elif corruption == "shape":
        zt = zt[:, :-1] if case["n"] > 1 else torch.cat([zt, zt], 1)
    elif corruption == "int_logits":
        zs, error = zs.long(), TypeError
    with pytest.raises(error):
        logit_distillation_loss(zs, zt, labels, backend="torch", **kwargs)
