"""Helpers shared by several test files (test files never import one another)."""
from __future__ import annotations

import math

import torch
from torch.utils.data import DataLoader

from compodistill.train.config import default_stage
from compodistill.train.engine import StageLoop
from compodistill.testing.accuracy import assert_accuracy
from compodistill.testing.visual_attention import ref_attention_output, ref_visual_maps
from compodistill.train.metrics import read_metrics
from compodistill.visual_attention.layout import visual_layout


def run_loop(tmp, max_steps, *, save_every=0, nan_calls=(), crash_call=None, max_bad=5,
             grad_accum=1):
    """A toy linear-regression stage through the real StageLoop: ``(result, weights)``.

    ``nan_calls``: loss calls that return NaN; ``crash_call``: the call that raises
    KeyboardInterrupt (stands in for a killed process).
    """
    import accelerate

    torch.manual_seed(0)
    acc = accelerate.Accelerator(cpu=True, gradient_accumulation_steps=grad_accum)
    model = torch.nn.Linear(4, 1)
    x = torch.randn(64, 4, generator=torch.Generator().manual_seed(1))
    data = [{"x": x[i], "y": x[i].sum(0, keepdim=True), "attention_mask": torch.ones(3)}
            for i in range(64)]
    loader = DataLoader(data, batch_size=8, shuffle=True,
                        generator=torch.Generator().manual_seed(0))
    stage = default_stage("sft", max_steps=max_steps, batch_size=8, lr=0.1,
                          grad_accum=grad_accum)
    calls = {"n": 0}

    def loss_terms(prepared, batch):
        calls["n"] += 1
        if calls["n"] == crash_call:
            raise KeyboardInterrupt  # stands in for a killed process
        loss = torch.nn.functional.mse_loss(prepared(batch["x"]), batch["y"])
        return {"lm": loss * float("nan") if calls["n"] in nan_calls else loss}

    loop = StageLoop(acc, model, list(model.parameters()), loader, stage, loss_terms, tmp,
                     save_every=save_every, max_bad_steps=max_bad, show_progress=False)
    return loop.run(), model.weight.detach().clone()


def losses(folder):
    """The ``loss`` column of a stage folder's metrics."""
    return [r["loss"] for r in read_metrics(folder / "metrics.jsonl")]


def assert_one_line_error(code, stderr, *words):
    """A CLI user error: exit status 2, one message line plus the --debug hint, no traceback,
    and the message names every one of ``words``."""
    assert code == 2, stderr
    assert "Traceback" not in stderr, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 2 and lines[1].startswith("(run again with --debug"), stderr
    for word in words:
        assert word in lines[0], lines[0]


def write_tiny_pair(root, *, num: int, student_layers: int = 2, teacher_layers: int = 4,
                    num_eval: int = 1, teacher: bool = True):
    """Synthetic data in ``root/data`` and a tiny student (with its tokenizer) and teacher saved
    to ``root/student`` and ``root/teacher``, as a user's checkpoints would be. Returns the
    tokenizer."""
    import json

    from compodistill.data import build_tiny_tokenizer, generate_synthetic
    from compodistill.hf import tiny_llava_pair

    generate_synthetic(str(root / "data"), num=num, num_eval=num_eval, image_size=16,
                       progress=False)
    records = json.loads((root / "data" / "train.json").read_text())
    tok = build_tiny_tokenizer(texts=[t["value"] for r in records for t in r["conversations"]])
    student, teacher_model = tiny_llava_pair(vocab_size=len(tok), image_size=16, patch_size=8,
                                             student_layers=student_layers,
                                             teacher_layers=teacher_layers)
    student.save_pretrained(root / "student")
    tok.save_pretrained(root / "student")
    if teacher:
        teacher_model.save_pretrained(root / "teacher")
    return tok


def keep_equal_length_records(root, multiple: int = 4) -> int:
    """Keep only the caption records of ``root/data/train.json`` whose answer has the most
    common word count: the same prompt and answer length each, so every micro-batch has the
    same number of tokens and labels. A multi-process step averages the processes' mean
    losses; with equal counts that is the mean over the whole batch, as in one process.
    The count kept is a multiple of ``multiple`` (the batch size: no partial batch), and is
    returned."""
    import collections
    import json

    path = root / "data" / "train.json"
    captions = [r for r in json.loads(path.read_text())
                if r["conversations"][0]["value"].endswith("Describe the image in one sentence.")]
    words = collections.Counter(len(r["conversations"][1]["value"].split()) for r in captions)
    common = words.most_common(1)[0][0]
    records = [r for r in captions if len(r["conversations"][1]["value"].split()) == common]
    records = records[:len(records) // multiple * multiple]
    path.write_text(json.dumps(records))
    return len(records)


def local_bpe_tokenizer(folder, texts=("a red circle left of a blue square",
                                        "what color is it")):
    """A byte-level BPE tokenizer trained here on ``texts`` with `tokenizers` (no download),
    saved to ``folder`` and reloaded; the four placeholders (image, video, vision start,
    vision end) take the last ids, as the tiny family models expect."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    core.train_from_iterator(list(texts), trainer)
    core.add_special_tokens(["<image>", "<video>", "<vision_start>", "<vision_end>"])
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>")
    tok.save_pretrained(folder)
    again = AutoTokenizer.from_pretrained(folder)
    text = "a red circle<image><image>what color"
    assert again(text)["input_ids"] == tok(text)["input_ids"]
    return again


# --------------------------------------------------------------------------- kernel tests
# Inputs, layouts and the fp32 / low-precision yardsticks of the Triton kernel tests.

# Kernel tests: atol relative to the largest reference value.
ATOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def padding_mask(batch: int, n: int, pad: str | None) -> torch.Tensor | None:
    """None, or a (B, N) bool mask with padding on the given side (a different amount per
    sample; sample 0 of a left-padded batch of length > 1 gets a row with no allowed key)."""
    if pad is None:
        return None
    mask = torch.ones(batch, n, dtype=torch.bool)
    for b in range(batch):
        amount = min(n - 1, (n // 4) + 2 * b)
        if amount <= 0:
            continue
        if pad == "left":
            mask[b, :amount] = False
        else:
            mask[b, n - amount:] = False
    return mask


def image_spans(lo: int, hi: int, kind: str) -> list[tuple[int, int]]:
    """Image spans inside the real region [lo, hi): 'none', 'one' or 'two' images."""
    length = hi - lo
    if kind == "none" or length <= 0:
        return []
    a = lo + length // 4
    b = min(hi, a + max(1, length // 3))
    spans = [(a, b)]
    if kind == "two" and hi - b >= 2:
        c = b + max(1, (hi - b) // 3)
        d = min(hi, c + max(1, length // 6))
        if c < d:
            spans.append((c, d))
    return spans


def make_layout(batch, n, mask, kinds, query="all", causal=True):
    """Layout with per-sample image kinds, e.g. ('two', 'none'); also returns the visual mask."""
    spans = []
    for b in range(batch):
        real = torch.arange(n) if mask is None else mask[b].nonzero().flatten()
        lo, hi = (int(real.min()), int(real.max()) + 1) if len(real) else (0, 0)
        spans.append(image_spans(lo, hi, kinds[b % len(kinds)]))
    layout = visual_layout(spans, batch, n, query=query, attention_mask=mask, causal=causal)
    vis = torch.zeros(batch, n, dtype=torch.bool)
    for b, sample in enumerate(spans):
        for s, e in sample:
            vis[b, s:e] = True
    return layout, vis


def layout_index(layout):
    return layout.query_index, layout.query_count, layout.visual_index, layout.visual_count


def make_qkv(batch, hq, hkv, n, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, hq, n, d, generator=g).to(dtype)
    k = torch.randn(batch, hkv, n, d, generator=g).to(dtype)
    v = torch.randn(batch, hkv, n, d, generator=g).to(dtype)
    return q, k, v


def lowp_attention(q, k, v, mask, causal, scale=None):
    """Materialised attention computed entirely at the input dtype (the 'plain torch' yardstick).

    Returns (out, probs (B, Hq, N, N)), both differentiable, at q's dtype.
    """
    batch, hq, n, d = q.shape
    rep = hq // k.shape[1]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    k = k.repeat_interleave(rep, 1)
    s = (q @ k.transpose(-1, -2)) * scale
    allowed = torch.ones(batch, 1, n, n, dtype=torch.bool)
    if mask is not None:
        allowed = allowed & mask[:, None, None, :]
    if causal:
        allowed = allowed & torch.ones(n, n, dtype=torch.bool).tril()
    has = allowed.any(-1, keepdim=True)
    s = torch.where(allowed & has, s, torch.where(has, float("-inf"), 0.0)).to(q.dtype)
    p = torch.softmax(s, -1) * has
    out = p @ v.repeat_interleave(rep, 1) if v is not None else None
    return out, p


def lowp_maps(probs, layout):
    """Dense (B, Qmax, Vmax) maps from materialised probs (at their dtype)."""
    head_mean = probs.mean(1)
    rows = [head_mean[b][layout.query_index[b]][:, layout.visual_index[b]]
            for b in range(head_mean.shape[0])]
    return torch.stack(rows) * layout.allowed()


def dense_ref_maps(maps, layout):
    """Pad the reference's ragged per-sample maps into the kernel layout (differentiable)."""
    _, qmax, vmax = layout.map_shape
    return torch.stack([torch.nn.functional.pad(m, (0, vmax - m.shape[1], 0, qmax - m.shape[0]))
                        for m in maps])


def assert_close_rule(name, got, ref, lowp, dtype):
    """The accuracy rule: |got - ref| <= 2 |lowp - ref| + ATOL[dtype] * max|ref| + 1e-6."""
    scale = ref.abs().max().item() if ref.numel() else 0.0
    assert_accuracy(got, ref, lowp, atol=ATOL[dtype] * scale + 1e-6, name=name)


def run_reference(q, k, v, mask, causal, layout=None, vis=None, query="all", d_out=None, g=None):
    """fp32 reference (out, lse, maps, grads) and the low-precision torch yardstick.

    loss = (out * dO).sum() + (A * G).sum() (each term only when given).
    """
    results = {}
    for kind in ("ref", "lowp"):
        if kind == "ref":
            leaves = [t.detach().float().requires_grad_() for t in (q, k, v)]
            out, lse = ref_attention_output(*leaves, mask, causal, None)
            maps = None
            if layout is not None:
                maps = dense_ref_maps(ref_visual_maps(leaves[0], leaves[1], vis, query, mask,
                                                      causal, None), layout)
        else:
            leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
            out, probs = lowp_attention(*leaves, mask, causal)
            lse = None
            maps = lowp_maps(probs, layout) if layout is not None else None
        loss = 0.0
        if d_out is not None:
            loss = loss + (out.float() * d_out.float()).sum()
        if g is not None:
            loss = loss + (maps.float() * g).sum()
        grads = None
        if d_out is not None or g is not None:
            wrt = leaves if d_out is not None else leaves[:2]
            grads = torch.autograd.grad(loss, wrt, allow_unused=True)
            grads = [torch.zeros_like(w) if gr is None else gr for gr, w in zip(grads, wrt)]
        results[kind] = dict(out=out.detach(), lse=None if lse is None else lse.detach(),
                             maps=None if maps is None else maps.detach(), grads=grads)
    return results["ref"], results["lowp"]


# The two backwards of compodistill/kernels/attention.py: "atomic" (the default, 5 matmuls, dq by float32
# atomics inside the dk/dv kernel) and "split" (the deterministic mode: dk/dv, then dq).
BACKWARD_MODES = ("atomic", "split")
BACKWARD_KERNELS = {"atomic": ["_bwd_delta_kernel", "_bwd_dkdvdq_kernel"],
                    "split": ["_bwd_delta_kernel", "_bwd_dkdv_kernel", "_bwd_dq_kernel"]}


def use_backward(monkeypatch, mode: str) -> None:
    """Select the backward through the deterministic switch (COMPODISTILL_DETERMINISTIC)."""
    monkeypatch.setenv("COMPODISTILL_DETERMINISTIC", "1" if mode == "split" else "0")


def launched_kernels(fn) -> list[str]:
    """Names of the kernels ``fn()`` launches (recorded, not run: outputs are garbage)."""
    from compodistill.kernels._common import recording_launches
    with recording_launches() as log:
        fn()
    return [getattr(kern, "fn", kern).__name__ for kern, _grid, _args, _kwargs in log]


def crash_and_resume(monkeypatch, make_trainer, *, at_step: int = 3) -> None:
    """``make_trainer().run()`` interrupted at its ``at_step``-th loss call (a
    KeyboardInterrupt stands in for a killed process), then a fresh trainer run to resume."""
    import pytest

    from compodistill.train import stages as stages_module

    original = stages_module.StageLosses.__call__
    calls = {"n": 0}

    def crash(self, prepared, batch):
        calls["n"] += 1
        if calls["n"] == at_step:
            raise KeyboardInterrupt
        return original(self, prepared, batch)

    monkeypatch.setattr(stages_module.StageLosses, "__call__", crash)
    with pytest.raises(KeyboardInterrupt):
        make_trainer().run()
    monkeypatch.setattr(stages_module.StageLosses, "__call__", original)
    make_trainer().run()


# --------------------------------------------------------------------------- family pairs

def family_image_processor(family: str, **overrides):
    """The family's own image processor class, sized for the tiny models of
    ``tiny_family_pair`` (no download); ``overrides`` go to its constructor."""
    import transformers as tf

    if family in ("qwen2_5_vl", "qwen3_vl"):  # 4-px patches, 2x2 merge: 4..16 tokens an image
        options = dict(patch_size=4, merge_size=2, temporal_patch_size=2, min_pixels=16 * 16,
                       max_pixels=32 * 32)
        return tf.Qwen2VLImageProcessorPil(**{**options, **overrides})
    tile = {"size": {"height": 16, "width": 16}}  # the 16-px tiles of the tiny SigLIP towers
    others = {"llava_onevision": (tf.LlavaOnevisionImageProcessorPil, dict(
                  tile, image_grid_pinpoints=[[16, 16], [16, 32], [32, 16], [32, 32]])),
              "gemma3": (tf.Gemma3ImageProcessorPil, tile),
              "internvl": (tf.GotOcr2ImageProcessorPil, dict(tile, crop_to_patches=False))}
    if family in others:
        cls, options = others[family]
        return cls(**{**options, **overrides})
    raise ValueError(f"tests/_helpers.py: no tiny image processor for family {family!r}; "
                     f"add it to family_image_processor")


def write_family_pair(root, family: str, *, num: int = 6, sizes=((16, 16), (24, 16), (32, 32)),
                      sliding_window: int | None = None):
    """Synthetic data in ``root/data`` (the first images resized to ``sizes``: one token count
    each), a locally trained tokenizer, and a tiny student (with tokenizer and the family's
    image processor) and teacher of ``family`` saved to ``root/student`` and
    ``root/teacher``. The teacher's vocabulary has 8 extra rows (KD truncates it).
    ``sliding_window``: Gemma 3's window (``tiny_family_pair``). Returns the tokenizer."""
    import json

    from PIL import Image

    from compodistill.data import generate_synthetic
    from compodistill.hf.families import tiny_family_pair

    generate_synthetic(str(root / "data"), num=num, num_eval=1, image_size=16, progress=False)
    for index, (w, h) in enumerate(sizes):
        path = root / "data" / "images" / f"train_{index:06d}.png"
        Image.open(path).convert("RGB").resize((w, h)).save(path)
    records = json.loads((root / "data" / "train.json").read_text())
    tok = local_bpe_tokenizer(root / "student", [t["value"] for r in records
                                                 for t in r["conversations"]])
    if family == "internvl":  # InternVL's tokenizer names its image start/end markers
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(root / "student", extra_special_tokens={
            "start_image_token": "<vision_start>", "end_image_token": "<vision_end>"})
        tok.save_pretrained(root / "student")
    student, teacher = tiny_family_pair(family, vocab_size=len(tok),
                                        teacher_vocab_size=len(tok) + 8,
                                        sliding_window=sliding_window)
    student.save_pretrained(root / "student")
    family_image_processor(family).save_pretrained(root / "student")
    teacher.save_pretrained(root / "teacher")
    return tok


def free_port() -> int:
    """A TCP port nothing listens on now (the OS picks it), so two suites side by side never
    share a rendezvous port the way accelerate's fixed default (29500) makes them."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def accelerate_launch(config_file, *args) -> list:
    """The ``accelerate launch`` command line for ``config_file`` with a free rendezvous port."""
    import sys

    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
            str(config_file), "--main_process_port", str(free_port()), *map(str, args)]
