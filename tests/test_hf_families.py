"""VAT on every supported VLM family equals eager attention + output_attentions + the reference.

Each family gets a tiny random teacher/student pair built from its own transformers config
classes, saved and reloaded with ``from_pretrained``. One batch per family mixes samples
with one image, with two images of different token counts (Qwen's dynamic resolution,
LLaVA-OneVision's anyres crops with image-newline tokens), a text-only sample (a video for
Qwen), left and right padding. The visual positions come from the model's own config.
"""
import copy

import pytest
import torch

pytest.importorskip("transformers")
from transformers import AutoModelForImageTextToText  # noqa: E402

from compodistill.hf import AttentionDistiller  # noqa: E402
from compodistill.hf.attention import decoder_attention_modules  # noqa: E402
from compodistill.hf.families import (TINY_FAMILIES, family_of, tiny_family_batch,  # noqa: E402
                                      tiny_family_pair, visual_token_ids)
from compodistill.testing.visual_attention import (ref_group_targets, ref_query_rows,  # noqa: E402
                                                   ref_visual_allowed, ref_visual_loss)

STUDENT_LAYERS, TEACHER_LAYERS = [0, 1], [1, 2, 3]
# per family: image sizes per sample (see tiny_family_batch), videos, sequence length
BATCHES = {
    "qwen2_5_vl": ([[4], [2, 6], []], [0, 0, 2], 36),
    "qwen3_vl": ([[4], [2, 6], []], [0, 0, 2], 36),
    "llava_onevision": ([[16], [32, 16], []], (), 56),
    "gemma3": ([[1], [1, 1], []], (), 32),
    "internvl": ([[1], [1, 1], []], (), 32),
}


def _sharpen(model):
    """Scale q and k so that the maps are far from uniform (a meaningful comparison)."""
    with torch.no_grad():
        for attn in decoder_attention_modules(model):
            attn.q_proj.weight.mul_(4.0)
            attn.k_proj.weight.mul_(4.0)


@pytest.fixture(scope="module", params=TINY_FAMILIES)
def family(request, tmp_path_factory):
    """(name, student, teacher, batch): saved and reloaded, language models on eager."""
    name = request.param
    # Gemma 3: a window of 6 on its sliding layers (student 0, teacher 2) cuts off image keys
    student, teacher = tiny_family_pair(name, sliding_window=6 if name == "gemma3" else None)
    root = tmp_path_factory.mktemp(name)
    loaded = []
    for role, model in (("student", student), ("teacher", teacher)):
        _sharpen(model)
        model.save_pretrained(root / role)
        again = AutoModelForImageTextToText.from_pretrained(root / role).eval()
        for key, value in model.state_dict().items():
            assert torch.equal(again.state_dict()[key], value), key
        again.set_attn_implementation({"text_config": "eager", "vision_config": "sdpa"})
        loaded.append(again)
    images, videos, n = BATCHES[name]
    batch = tiny_family_batch(loaded[0], images, seq_len=n, padding=["right", "left", "right"],
                              videos=videos)
    batch.pop("token_type_ids", None)  # Gemma 3's bidirectional image rows: own test
    return name, loaded[0], loaded[1], batch


def reference_loss(student, teacher, batch, matches, query="all", **options):
    """Eager attention probabilities + the fp32 reference loss (group matching)."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    vis = torch.isin(ids, torch.tensor(visual_token_ids(student)))
    rows, allowed = ref_query_rows(query, vis, mask), ref_visual_allowed(vis, query, mask)

    def maps(probs):
        head_mean = probs.float().mean(dim=1)
        return [head_mean[b][rows[b]][:, vis[b]] for b in range(probs.shape[0])]

    with torch.no_grad():
        t_att = teacher(**batch, output_attentions=True).attentions
    s_att = student(**batch, output_attentions=True).attentions
    terms = []
    for m in matches:
        s_maps = maps(s_att[m.student_layer])
        window = [maps(t_att[t]) for t in m.teacher_layers]
        target = [ref_group_targets([w[b] for w in window], 1)[0] for b in range(len(s_maps))]
        terms.append(ref_visual_loss(s_maps, target, allowed, **options))
    return torch.stack(terms).mean()


def hook_loss(student, teacher, batch, query="all", **options):
    distiller = AttentionDistiller(student, teacher, student_layers=STUDENT_LAYERS,
                                   teacher_layers=TEACHER_LAYERS, query=query, **options)
    with distiller.capture(batch["input_ids"], attention_mask=batch["attention_mask"]) as cap:
        with torch.no_grad():
            teacher(**batch)
        student(**batch)
    return cap.loss(), distiller


def assert_same_loss_and_grads(loss, want, student, student_eager):
    assert float(want.detach()) > 1e-4  # far from zero: a meaningful comparison
    torch.testing.assert_close(loss, want, rtol=1e-4, atol=1e-6)
    params = [p for p in student.parameters() if p.requires_grad]
    params_eager = [p for p in student_eager.parameters() if p.requires_grad]
    got = torch.autograd.grad(loss, params, allow_unused=True)
    expected = torch.autograd.grad(want, params_eager, allow_unused=True)
    scale = max(float(w.abs().max()) for w in expected if w is not None)
    assert scale > 0
    for g, w in zip(got, expected):
        if w is None:
            assert g is None or float(g.abs().max()) == 0.0
        else:
            torch.testing.assert_close(g, w, rtol=2e-3, atol=2e-4 * scale)


@pytest.mark.parametrize("options", [dict(loss="cosine"), dict(loss="kl")],
                         ids=["cosine", "kl"])
def test_family_vat_matches_eager_reference(family, options):
    name, student_eager, teacher_eager, batch = family
    student, teacher = copy.deepcopy(student_eager), copy.deepcopy(teacher_eager)
    vis = torch.isin(batch["input_ids"], torch.tensor(visual_token_ids(student)))
    counts = vis.sum(dim=1).tolist()
    assert counts[0] > 0 and counts[1] > counts[0]    # one image; two of different sizes
    if name.startswith("qwen"):
        assert counts[2] > 0 and "pixel_values_videos" in batch
    else:
        assert counts[2] == 0                            # text only
    loss, distiller = hook_loss(student, teacher, batch, **options)
    assert [m.teacher_layers for m in distiller.matches] == [(1, 2), (2, 3)]
    want = reference_loss(student_eager, teacher_eager, batch, distiller.matches, **options)
    assert_same_loss_and_grads(loss, want, student, student_eager)
    # the hook reached the language model only: the vision tower keeps its attention
    assert student.config.get_text_config()._attn_implementation == "compodistill"
    assert student.config.vision_config._attn_implementation == "sdpa"


def test_gemma3_bidirectional_image_rows_refused_or_served(tmp_path):
    """Gemma 3 with token_type_ids attends bidirectionally among one image's tokens. With
    query rows on images the causal kernels would give a silently wrong loss: refused on the
    first call. Text query rows see the same keys under both masks: served, and exact."""
    student_eager, teacher_eager = tiny_family_pair("gemma3")
    for model in (student_eager, teacher_eager):
        _sharpen(model)
        model.set_attn_implementation({"text_config": "eager", "vision_config": "sdpa"})
    batch = tiny_family_batch(student_eager, [[1], [1, 1], []], seq_len=32,
                              padding=["right", "left", "right"])
    assert "token_type_ids" in batch
    student, teacher = copy.deepcopy(student_eager), copy.deepcopy(teacher_eager)
    with pytest.raises(ValueError, match=r"teacher layer 1: .*non-causal span.*token_type_ids"):
        hook_loss(student, teacher, batch, query="all")
    loss, distiller = hook_loss(student, teacher, batch, query="text")
    want = reference_loss(student_eager, teacher_eager, batch, distiller.matches, query="text")
    assert_same_loss_and_grads(loss, want, student, student_eager)


def test_softcapping_and_bidirectional_refused_at_construction():
    student, teacher = tiny_family_pair("gemma3", teacher_layers=2)
    teacher.config.get_text_config().attn_logit_softcapping = 50.0
    with pytest.raises(ValueError, match=r"teacher layer 0: attention-logit softcapping"):
        AttentionDistiller(student, teacher, student_layers=[0], teacher_layers=[1])
    teacher.config.get_text_config().attn_logit_softcapping = None
    student.config.get_text_config().use_bidirectional_attention = True
    with pytest.raises(ValueError, match=r"student: .*bidirectional"):
        AttentionDistiller(student, teacher, student_layers=[0], teacher_layers=[1])


def test_family_detection_and_visual_ids():
    from transformers import (Gemma3Config, InternVLConfig, LlavaOnevisionConfig,
                              Qwen2_5_VLConfig, Qwen3VLConfig, SiglipVisionConfig)

    assert family_of(Qwen2_5_VLConfig()).name == "qwen2_5_vl"
    assert family_of(Qwen3VLConfig()).name == "qwen3_vl"
    assert family_of(Gemma3Config()).name == "gemma3"
    assert family_of(InternVLConfig()).name == "internvl"
    onevision = LlavaOnevisionConfig()
    assert family_of(onevision).name == "llava_onevision"
    assert visual_token_ids(onevision) == (onevision.image_token_id, onevision.video_token_id)
    qwen = Qwen2_5_VLConfig()
    assert visual_token_ids(qwen) == (qwen.image_token_id, qwen.video_token_id)
    assert qwen.vision_start_token_id not in visual_token_ids(qwen)
    with pytest.raises(ValueError, match=r"'siglip_vision_model' is not a supported .*Qwen2.5-VL"):
        family_of(SiglipVisionConfig())


def test_train_names_the_family_and_the_supported_ones(capsys, tmp_path):
    """`compodistill train` reads the family from config.json before loading weights."""
    from _helpers import assert_one_line_error
    from compodistill.cli import main
    from transformers import SiglipVisionConfig

    SiglipVisionConfig().save_pretrained(tmp_path / "siglip")
    # every family trains now (TRAINER_FAMILIES); the message lists them all
    supported = ("LLaVA (1.5) (llava)", "Qwen2.5-VL (qwen2_5_vl/qwen2_vl)", "Qwen3-VL (qwen3_vl)",
                 "LLaVA-OneVision / LLaVA-NeXT (llava_onevision/llava_next)",
                 "Gemma 3 (gemma3)", "InternVL (HF-native) (internvl)")
    for folder, words in (("siglip", ("student:", "'siglip_vision_model'", *supported)),):
        cfg = tmp_path / f"{folder}.yaml"
        cfg.write_text(f"student: {tmp_path / folder}\noutput_dir: {tmp_path}/out\n")
        code, err = main(["train", "--config", str(cfg)]), capsys.readouterr().err
        assert_one_line_error(code, err, *words)
    assert not (tmp_path / "out").exists()


def test_different_sizes_layers_heads_and_vocabulary():
    """A Qwen2.5-VL pair of different depth, width, heads, GQA ratio and vocabulary rows:
    every matching mode pairs the depths, and logit KD from hidden states truncates the
    teacher's vocabulary to the student's."""
    import compodistill as cd
    from compodistill.testing.logit_kd import ref_logit_kd

    student, teacher = tiny_family_pair("qwen2_5_vl", student_layers=3, teacher_layers=5,
                                        teacher_vocab_size=136)
    s_text, t_text = student.config.get_text_config(), teacher.config.get_text_config()
    assert (s_text.num_attention_heads, s_text.num_key_value_heads) == (2, 1)
    assert (t_text.num_attention_heads, t_text.num_key_value_heads) == (4, 2)
    assert teacher.lm_head.weight.shape[0] == 136 > student.lm_head.weight.shape[0] == 128
    batch = tiny_family_batch(student, [[4], [2, 6]], seq_len=30, padding=["left", "right"])
    for mode in ("group", "simple", "adaptive"):
        distiller = AttentionDistiller(student, teacher, preset="all", matching=mode)
        assert distiller.student_layers == [0, 1, 2]
        with distiller.capture(batch["input_ids"], attention_mask=batch["attention_mask"]) as cap:
            with torch.no_grad():
                out_t = teacher(**batch, output_hidden_states=True)
            out_s = student(**batch, output_hidden_states=True)
        assert torch.isfinite(cap.loss()) and float(cap.loss()) > 0
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    labels = cd.shift_labels(labels)
    h_s, h_t = out_s.hidden_states[-1], out_t.hidden_states[-1]
    got = cd.linear_distillation_loss(h_s, student.lm_head.weight, h_t, teacher.lm_head.weight,
                                      labels=labels, loss="kl", positions="response")
    want = ref_logit_kd(out_s.logits, out_t.logits, labels, loss="kl", positions="response")
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # the teacher's extra rows are really dropped: a softmax over all 136 differs
    assert not torch.allclose(torch.log_softmax(out_t.logits[..., :128], -1)[..., 0],
                              torch.log_softmax(out_t.logits, -1)[..., 0])


def test_bench_family_step_runs_on_the_cpu():
    """bench/model_step.py --family qwen2_5_vl: the CPU shapes run through the same code as
    the 7B -> 3B GPU shapes (which need a GPU)."""
    from bench.model_step_family import FAMILY_SETUPS, run_family

    rows = run_family(torch.device("cpu"), shapes=[(1, 96)], repeat=1,
                      providers=["qwen2_5_vl_compodistill"])
    times = [float(r["value"]) for r in rows if r["metric"] == "time"]
    assert len(times) == 1 and times[0] > 0
    assert "Nv=24 images=2" in rows[0]["extra"]
    cuda = FAMILY_SETUPS["cuda"]
    assert cuda["teacher"]["vocab_size"] == 152_064 and cuda["student"]["vocab_size"] == 151_936


@pytest.mark.parametrize("name", ["qwen2_5_vl", "gemma3"])
def test_lora_and_gradient_checkpointing_on_a_family(name):
    """What the trainer's DFT stage does to a student: LoRA on the language model (the
    trainer's target pattern) and gradient checkpointing; same VAT loss and LoRA gradients
    with and without checkpointing."""
    from peft import LoraConfig, get_peft_model

    from compodistill.train.stages import LORA_TARGETS

    student, teacher = tiny_family_pair(name, student_layers=2, teacher_layers=3,
                                        sliding_window=6 if name == "gemma3" else None)
    _sharpen(student)
    _sharpen(teacher)
    images = [[4], [2, 6]] if name == "qwen2_5_vl" else [[1], [1, 1]]
    batch = tiny_family_batch(student, images, seq_len=30, padding=["left", "right"])
    batch.pop("token_type_ids", None)
    results = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        peft_student = get_peft_model(copy.deepcopy(student), LoraConfig(
            r=4, lora_alpha=8, target_modules=LORA_TARGETS, init_lora_weights=False))
        assert all("vision" not in n and "visual" not in n
                   for n, p in peft_student.named_parameters() if p.requires_grad)
        peft_student.train()
        if checkpointing:
            peft_student.get_base_model().activation_checkpointing_enable()  # non-reentrant
            assert peft_student.get_base_model().is_activation_checkpointing
        distiller = AttentionDistiller(peft_student, teacher, student_layers=[0, 1],
                                       teacher_layers=[0, 1, 2])
        with distiller.capture(batch["input_ids"], attention_mask=batch["attention_mask"]) as cap:
            with torch.no_grad():
                teacher(**batch)
            out = peft_student(**batch)
        loss = cap.loss()
        params = [p for p in peft_student.parameters() if p.requires_grad]
        assert params
        results.append((loss.detach(), torch.autograd.grad(loss + 0 * out.logits.sum(), params)))
    (l0, g0), (l1, g1) = results
    assert float(l0) > 1e-4
    torch.testing.assert_close(l1, l0, rtol=1e-6, atol=1e-7)
    for a, b in zip(g1, g0):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


# --------------------------------------------------------------------------- real processors

@pytest.mark.parametrize("name", TINY_FAMILIES)
def test_real_image_processor_and_tokenizer_feed_the_hook(name, tmp_path):
    """A locally trained tokenizer and the family's image processor: save_pretrained /
    from_pretrained round trips, and their outputs (images of two sizes) run through the
    tiny model and the distiller with the right number of visual tokens (the model itself
    refuses a count that does not match its image features)."""
    import numpy as np
    from PIL import Image
    from transformers import AutoImageProcessor

    from _helpers import local_bpe_tokenizer

    tok = local_bpe_tokenizer(tmp_path / "tokenizer")
    student, teacher = tiny_family_pair(name, student_layers=2, teacher_layers=3,
                                        vocab_size=len(tok))
    assert visual_token_ids(student)[0] == tok.convert_tokens_to_ids("<image>")
    from _helpers import family_image_processor

    processor = family_image_processor(name)
    processor.save_pretrained(tmp_path / "proc")
    again = AutoImageProcessor.from_pretrained(tmp_path / "proc")
    assert type(again) is type(processor)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (16, 24, 3), dtype=np.uint8)),
              Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8))]
    pixels = again(images=images, return_tensors="pt")
    first = processor(images=images, return_tensors="pt")
    assert all(torch.equal(first[k], pixels[k]) for k in first)
    inputs = {k: v for k, v in pixels.items() if k != "num_patches"}
    if name.startswith("qwen"):
        counts = (pixels["image_grid_thw"].prod(-1) // 4).tolist()   # dynamic resolution
        assert counts == [6, 16]
    elif name == "llava_onevision":
        with torch.no_grad():
            feats = student.model.get_image_features(
                pixel_values=pixels["pixel_values"], image_sizes=pixels["image_sizes"],
                vision_feature_layer=student.config.vision_feature_layer,
                vision_feature_select_strategy=student.config.vision_feature_select_strategy)
        counts = [int(f.shape[0]) for f in getattr(feats, "pooler_output", feats)]
        assert counts[0] != counts[1]                                  # anyres
    else:
        counts = [4, 4]
    text = tok("a red circle left of a blue square")["input_ids"]
    img, start, end = (tok.convert_tokens_to_ids(t)
                       for t in ("<image>", "<vision_start>", "<vision_end>"))
    ids = text[:3]
    for count in counts:
        ids += [start] + [img] * count + [end] if name.startswith("qwen") else [img] * count
    ids = torch.tensor([ids + text[3:]])
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), **inputs}
    if name.startswith("qwen"):
        batch["mm_token_type_ids"] = (ids == img).long()
    distiller = AttentionDistiller(student, teacher, student_layers=[1], teacher_layers=[2])
    with distiller.capture(ids, attention_mask=batch["attention_mask"]) as cap:
        with torch.no_grad():
            teacher(**batch)
        student(**batch)
    assert cap.layout.visual_count.tolist() == [sum(counts)]
    assert torch.isfinite(cap.loss().detach())


@pytest.mark.parametrize("head_dim", [16, 256])
def test_gemma3_sliding_window_through_the_triton_kernels(monkeypatch, head_dim):
    """The fused path (the CUDA branch, here the Triton interpreter): Gemma 3's sliding
    layers reach the kernels with their window; loss and gradients equal eager's, also at
    the head dim of every real Gemma 3 (256)."""
    import os

    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs TRITON_INTERPRET=1 (set before triton is imported)")
    from compodistill.hf import attention

    student_eager, teacher_eager = tiny_family_pair("gemma3", student_layers=2,
                                                    teacher_layers=3, sliding_window=6,
                                                    head_dim=head_dim)
    assert student_eager.config.text_config.head_dim == head_dim
    for model in (student_eager, teacher_eager):
        _sharpen(model)
        model.set_attn_implementation({"text_config": "eager", "vision_config": "sdpa"})
    batch = tiny_family_batch(student_eager, [[1], [1, 1], []], seq_len=32,
                              padding=["right", "left", "right"])
    batch.pop("token_type_ids")
    student, teacher = copy.deepcopy(student_eager), copy.deepcopy(teacher_eager)
    windows = []
    fused = attention._fused_attention
    monkeypatch.setattr(attention, "resolve_backend", lambda *a: "triton")
    monkeypatch.setattr(attention, "_fused_attention", lambda q, k, v, layout, *a: (
        windows.append(layout.window), fused(q, k, v, layout, *a))[1])
    distiller = AttentionDistiller(student, teacher, student_layers=[0, 1],
                                   teacher_layers=[0, 1, 2])
    with distiller.capture(batch["input_ids"], attention_mask=batch["attention_mask"]) as cap:
        with torch.no_grad():
            teacher(**batch)
        student(**batch)
    loss = cap.loss()
    assert sorted(windows, key=str) == [6, 6, 6, None, None]  # teacher 0, 2 and student 0
    want = reference_loss(student_eager, teacher_eager, batch, distiller.matches)
    assert_same_loss_and_grads(loss, want, student, student_eager)
