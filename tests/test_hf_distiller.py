"""VAT through the attention hook equals eager attention + output_attentions + the reference.

For every matching mode and loss option: the loss and its gradients w.r.t. all student
parameters, computed by :class:`AttentionDistiller` (SDPA + chunked visual maps, no N×N
matrix) match those computed from ``attn_implementation="eager"`` attention probabilities
with :mod:`compodistill.testing.visual_attention`. Also gradient checkpointing, LLaVA models,
query modes, memory of the targets and error cases.
"""
import copy

import pytest
import torch

pytest.importorskip("transformers")
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM  # noqa: E402

from compodistill.hf import AttentionDistiller, attention, tiny_llava_pair  # noqa: E402
from compodistill.matching import match_layers  # noqa: E402
from compodistill.testing.visual_attention import (ref_adaptive_choice, ref_group_targets,  # noqa: E402
                                            ref_query_rows, ref_visual_allowed,
                                            ref_visual_loss)

IMG = 99
STUDENT_LAYERS = [0, 1, 2]
TEACHER_LAYERS = [1, 2, 3, 4]
LOSSES = [dict(loss="cosine", cosine="flat"), dict(loss="cosine", cosine="row"),
          dict(loss="cosine", cosine="pooled"), dict(loss="kl"),
          dict(loss="kl", distribution="rest"), dict(loss="reverse_kl"),
          dict(loss="jsd", beta=0.3), dict(loss="mse")]


def lm(layers: int, hidden: int, seed: int, kind: str = "qwen2"):
    """Tiny Qwen2/Llama with GQA and sharpened q/k so the visual maps are far from uniform."""
    torch.manual_seed(seed)
    cls, cfg = (Qwen2ForCausalLM, Qwen2Config) if kind == "qwen2" else (LlamaForCausalLM,
                                                                         LlamaConfig)
    config = cfg(hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         vocab_size=100, max_position_embeddings=128)
    model = cls(config)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(4.0)
            layer.self_attn.k_proj.weight.mul_(4.0)
    model.set_attn_implementation("eager")
    return model.eval()


def batch(n: int = 24, seed: int = 1):
    """One image; left padding + two images; right padding and no image."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 90, (3, n), generator=g)
    mask = torch.ones(3, n, dtype=torch.long)
    ids[0, 3:9] = IMG
    mask[1, :3] = 0
    ids[1, 4:7] = IMG
    ids[1, 12:16] = IMG
    mask[2, n - 5:] = 0
    return ids, mask


@pytest.fixture(scope="module")
def models():
    student_eager, teacher_eager = lm(3, 32, seed=0), lm(5, 48, seed=1)
    return student_eager, teacher_eager


def sample_maps(probs, rows, vis):
    """(B, H, N, N) eager probabilities -> one (|Q_b|, Nv_b) head-mean map per sample."""
    head_mean = probs.float().mean(dim=1)
    return [head_mean[b][rows[b]][:, vis[b]] for b in range(probs.shape[0])]


def reference_vat(student, teacher, ids, mask, matches, options, query="all",
                  layer_reduction="mean", forward=None):
    """Eager + output_attentions + reference loss; returns (loss, student output)."""
    forward = forward or (lambda m, **kw: m(input_ids=ids, attention_mask=mask, **kw))
    vis = ids == IMG
    rows = ref_query_rows(query, vis, mask)
    allowed = ref_visual_allowed(vis, query, mask)
    with torch.no_grad():
        t_att = forward(teacher, output_attentions=True).attentions
    out = forward(student, output_attentions=True)
    terms = []
    for match in matches:
        s_maps = sample_maps(out.attentions[match.student_layer], rows, vis)
        cands = [sample_maps(t_att[t], rows, vis) for t in match.teacher_layers]
        if len(cands) == 1:
            target = cands[0]
        elif options.get("_mode") == "adaptive":
            flat = lambda maps: torch.cat([m.reshape(-1) for m in maps])  # noqa: E731
            target = cands[ref_adaptive_choice(flat(s_maps), [flat(c) for c in cands])]
        else:  # group: mean of the window, per sample
            target = [ref_group_targets([c[b] for c in cands], 1)[0] for b in range(len(s_maps))]
        opts = {k: v for k, v in options.items() if not k.startswith("_")}
        terms.append(ref_visual_loss(s_maps, target, allowed, **opts))
    total = torch.stack(terms).sum()
    return (total / len(terms) if layer_reduction == "mean" else total), out


def hook_vat(student, teacher, ids, mask, mode, options, **kw):
    distiller = AttentionDistiller(student, teacher, image_token_id=IMG,
                                   student_layers=STUDENT_LAYERS,
                                   teacher_layers=None if mode == "simple" else TEACHER_LAYERS,
                                   matching=mode, **options, **kw)
    with distiller.capture(ids, attention_mask=mask) as cap:
        with torch.no_grad():
            teacher(input_ids=ids, attention_mask=mask)
        student(input_ids=ids, attention_mask=mask)
    return cap.loss(), cap, distiller


def grads(loss, model):
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.autograd.grad(loss, params, allow_unused=True)


def assert_grads_close(got, want):
    scale = max(float(w.abs().max()) for w in want if w is not None)
    assert scale > 0
    for g, w in zip(got, want):
        if w is None:
            assert g is None or float(g.abs().max()) == 0.0
            continue
        torch.testing.assert_close(g, w, rtol=2e-3, atol=2e-4 * scale)


@pytest.mark.parametrize("mode", ["group", "simple", "adaptive"])
@pytest.mark.parametrize("options", LOSSES, ids=lambda o: "-".join(map(str, o.values())))
def test_vat_matches_eager_reference(models, mode, options):
    student_eager, teacher_eager = models
    student, teacher = copy.deepcopy(student_eager), copy.deepcopy(teacher_eager)
    ids, mask = batch()
    loss, cap, distiller = hook_vat(student, teacher, ids, mask, mode, options)
    matches = match_layers(3, 5, mode=mode, student_layers=STUDENT_LAYERS,
                           teacher_layers=None if mode == "simple" else TEACHER_LAYERS)
    assert matches == distiller.matches
    want, _ = reference_vat(student_eager, teacher_eager, ids, mask, matches,
                            {**options, "_mode": mode})
    assert float(want.detach()) > 1e-6  # a meaningful comparison, not two zeros
    torch.testing.assert_close(loss, want, rtol=1e-4, atol=1e-6)
    assert_grads_close(grads(loss, student), grads(want, student_eager))


@pytest.mark.parametrize("query", ["visual", "text"])
def test_query_modes_and_sum_reduction(models, query):
    student_eager, teacher_eager = models
    student, teacher = copy.deepcopy(student_eager), copy.deepcopy(teacher_eager)
    ids, mask = batch()
    loss, _, d = hook_vat(student, teacher, ids, mask, "group", {}, query=query,
                          layer_reduction="sum")
    want, _ = reference_vat(student_eager, teacher_eager, ids, mask, d.matches, {},
                            query=query, layer_reduction="sum")
    torch.testing.assert_close(loss, want, rtol=1e-4, atol=1e-6)
    assert_grads_close(grads(loss, student), grads(want, student_eager))


def test_gradient_checkpointing_same_loss_and_grads(models, monkeypatch):
    student_eager, teacher_eager = models
    ids, mask = batch()
    plain, teacher = copy.deepcopy(student_eager), copy.deepcopy(teacher_eager)
    want, _, _ = hook_vat(plain, teacher, ids, mask, "group", {})
    want_grads = grads(want, plain)

    student = copy.deepcopy(student_eager).train()
    student.activation_checkpointing_enable()  # non-reentrant: the transformers default
    calls, replays = [], []
    monkeypatch.setattr(attention._Replay, "store", lambda self, *a: replays.append(a[:2]))
    distiller = AttentionDistiller(student, teacher, image_token_id=IMG,
                                   student_layers=STUDENT_LAYERS, teacher_layers=TEACHER_LAYERS)
    with distiller.capture(ids, attention_mask=mask) as cap:
        with torch.no_grad():
            teacher(input_ids=ids, attention_mask=mask)
        out = student(input_ids=ids, attention_mask=mask)
    store = cap.store
    cap.store = lambda *a: (calls.append(a[:2]), store(*a))  # recomputation must not store
    loss = cap.loss()
    torch.testing.assert_close(loss, want, rtol=1e-6, atol=1e-7)
    # backward outside the capture context: the checkpoint replays the capture
    assert_grads_close(grads(loss + 0.0 * out.logits.sum(), student), want_grads)
    assert calls == []
    assert sorted(replays) == [("student", l) for l in STUDENT_LAYERS]  # replayed, not stored
    assert cap.loss() is loss


def test_llava_pair_matches_eager_reference():
    student, teacher = tiny_llava_pair("siglip", "qwen2", student_layers=3, teacher_layers=5)
    for m in (student, teacher):
        m.set_attn_implementation({"text_config": "eager", "vision_config": "sdpa"})
        m.eval()
    student_eager, teacher_eager = copy.deepcopy(student), copy.deepcopy(teacher)
    nv, img = student.config.image_seq_length, student.config.image_token_id
    n = 2 * nv + 12
    ids = torch.randint(0, 100, (3, n))
    mask = torch.ones_like(ids)
    ids[0, 2:2 + nv] = img                               # one image
    mask[1, :2] = 0
    ids[1, 3:3 + nv] = img                               # two images, left padding
    ids[1, 5 + nv:5 + 2 * nv] = img
    mask[2, -4:] = 0                                     # no image, right padding
    pixels = torch.randn(3, 3, 32, 32)
    pixels = pixels[[0, 1, 1]]                           # one image per placeholder span
    distiller = AttentionDistiller(student, teacher, student_layers=[0, 1, 2],
                                   teacher_layers=[1, 2, 3, 4], loss="kl")
    assert student.config.vision_config._attn_implementation == "sdpa"

    def forward(m, **kw):
        return m(input_ids=ids, pixel_values=pixels, attention_mask=mask, **kw)

    with distiller.capture(ids, attention_mask=mask) as cap:
        with torch.no_grad():
            forward(teacher)
        forward(student)
    loss = cap.loss()
    global IMG
    saved, IMG = IMG, img
    try:
        want, _ = reference_vat(student_eager, teacher_eager, ids, mask, distiller.matches,
                                {"loss": "kl"}, forward=forward)
    finally:
        IMG = saved
    torch.testing.assert_close(loss, want, rtol=1e-4, atol=1e-6)
    assert_grads_close(grads(loss, student), grads(want, student_eager))


def test_llama_matches_eager_reference():
    student_eager, teacher_eager = lm(3, 32, 0, "llama"), lm(5, 48, 1, "llama")
    student, teacher = copy.deepcopy(student_eager), copy.deepcopy(teacher_eager)
    ids, mask = batch()
    loss, _, d = hook_vat(student, teacher, ids, mask, "group", {"loss": "jsd"})
    want, _ = reference_vat(student_eager, teacher_eager, ids, mask, d.matches, {"loss": "jsd"})
    torch.testing.assert_close(loss, want, rtol=1e-4, atol=1e-6)
    assert_grads_close(grads(loss, student), grads(want, student_eager))


@pytest.mark.parametrize("mode", ["group", "adaptive"])
def test_group_keeps_only_window_targets(models, mode):
    # Checked after the teacher forward and before loss(), which frees the targets.
    student, teacher = (copy.deepcopy(m) for m in models)
    ids, mask = batch()
    d = AttentionDistiller(student, teacher, image_token_id=IMG, student_layers=STUDENT_LAYERS,
                           teacher_layers=TEACHER_LAYERS, matching=mode)
    with d.capture(ids, attention_mask=mask) as cap:
        with torch.no_grad():
            teacher(input_ids=ids, attention_mask=mask)
        held = cap.held_targets()
        student(input_ids=ids, attention_mask=mask)
    one_map = 4 * cap.layout.query_index.shape[1] * cap.layout.visual_index.shape[1] * 3
    if mode == "group":
        assert held == {"windows": len(d.matches), "layers": 0,
                        "bytes": len(d.matches) * one_map}
    else:
        assert held == {"windows": 0, "layers": len(TEACHER_LAYERS),
                        "bytes": len(TEACHER_LAYERS) * one_map}
    cap.loss()
    assert cap.held_targets() == {"windows": 0, "layers": 0, "bytes": 0}


def test_batch_without_images_gives_attached_zero(models):
    student, teacher = (copy.deepcopy(m) for m in models)
    ids, mask = batch()
    ids[ids == IMG] = 1
    loss, _, _ = hook_vat(student, teacher, ids, mask, "group", {})
    assert float(loss.detach()) == 0.0 and loss.requires_grad
    assert all(g is None or float(g.abs().max()) == 0 for g in grads(loss, student))


def test_error_cases(models):
    student, teacher = (copy.deepcopy(m) for m in models)
    d = AttentionDistiller(student, teacher, image_token_id=IMG, student_layers=STUDENT_LAYERS,
                           teacher_layers=TEACHER_LAYERS)
    ids, mask = batch()
    with d.capture(ids, attention_mask=mask) as cap:
        student(input_ids=ids, attention_mask=mask)
    with pytest.raises(ValueError, match="teacher forward did not run"):
        cap.loss()
    with d.capture(ids, attention_mask=mask) as cap:
        with torch.no_grad():
            teacher(input_ids=ids, attention_mask=mask)
    with pytest.raises(ValueError, match="student forward did not run"):
        cap.loss()
    with pytest.raises(ValueError, match="ran twice"):
        with d.capture(ids, attention_mask=mask):
            with torch.no_grad():
                teacher(input_ids=ids, attention_mask=mask)
                teacher(input_ids=ids, attention_mask=mask)
    shifted = ids.clone()
    shifted[0] = torch.roll(ids[0], 1)
    with pytest.raises(ValueError, match="image-token positions differ in sample 0"):
        d.capture(ids, attention_mask=mask, teacher_input_ids=shifted)
    with pytest.raises(ValueError, match=r"shape \(B, N\)"):
        d.capture(ids, attention_mask=mask, teacher_input_ids=ids[:, :-1])
    with pytest.raises(ValueError, match="attention masks differ"):
        d.capture(ids, attention_mask=mask, teacher_attention_mask=torch.ones_like(mask))
    with pytest.raises(ValueError, match="image_token_id"):
        AttentionDistiller(student, teacher, preset="all").capture(ids)
    with pytest.raises(ValueError, match="loss must be one of"):
        AttentionDistiller(student, teacher, loss="l1")
    with pytest.raises(ValueError, match="layer_reduction"):
        AttentionDistiller(student, teacher, layer_reduction="max")
    with pytest.raises(ValueError, match="at least as many teacher layers"):
        AttentionDistiller(student, teacher, student_layers=[0, 1, 2], teacher_layers=[0, 1])
