"""Benchmark: one distillation training step on Qwen2-shaped models (LM + logit KD + VAT).

Student: Qwen2-1.5B shape (hidden 1536, 28 layers, 12 heads, 2 kv heads, intermediate 8960,
vocab 151,936). Teacher: Qwen2.5-3B shape (hidden 2048, 36 layers, 16 heads, 2 kv heads,
intermediate 11,008). Random weights from configs (no download), text-only language models
with a fake image span of 576 tokens per sample, bf16, no padding. VAT on the
"intermediate" preset (student 9–15, teacher 12–23, group windows of 6), cosine flat, all
query rows.

Providers (one step = teacher forward without grad, student forward, losses, backward;
no optimizer step):
- ``eager_attn_kd``: ``attn_implementation="eager"`` + ``output_attentions=True`` for both
  models, VAT from the returned attention probabilities (the usual way; OOM at long N);
- ``sdpa_logit_kd``: SDPA, LM + logit KD only (the cost floor VAT is measured against);
- ``compodistill``: :class:`compodistill.hf.AttentionDistiller` (fused Triton on CUDA, chunked
  PyTorch on CPU), LM + logit KD + VAT.
- ``trainer_two_calls`` / ``trainer_one_call``: the trainer's own step (hidden states, fused
  linear LM + KD, VAT through the hook) with LM and KD as two fused calls (as the trainer did
  before) or one call with both weights (as it does now): the cost of the second lm_head pass.

Tokens per step (B×N): 4×1024, 4×2048, 2×4096, 1×8192 on CUDA; tiny models and 2×128,
1×256 on CPU (float32). Time (ms), tokens/s and peak memory (MiB, CUDA) are appended to
``bench/results/model_step.csv`` through ``bench/_common.py``; ``--plot`` draws a PNG.

``--family qwen2_5_vl`` runs a Qwen2.5-VL pair instead (7B → 3B shapes with
dynamic-resolution images on CUDA, tiny on CPU): ``bench/model_step_family.py``.

Usage: ``python bench/model_step.py [--device cuda|cpu] [--shapes 1x8192 ...]
[--providers NAME ...] [--family qwen2_5_vl] [--plot]``
"""
from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from bench._common import (benchmark_main, eager_vat, provenance, read_rows, step_rows,  # noqa: E402
                           write_rows)
from compodistill import visual_layout  # noqa: E402
from compodistill.hf import AttentionDistiller, enable_attention  # noqa: E402
from transformers import Qwen2Config, Qwen2ForCausalLM  # noqa: E402
from bench.model_step_family import PROVIDERS as FAMILY_PROVIDERS  # noqa: E402

BENCH = "model_step"
IMAGE_TOKEN = 151_655  # Qwen2-VL's <|image_pad|>; any id works for a text-only LM
SETUPS = {
    "cuda": dict(
        student=dict(hidden_size=1536, num_hidden_layers=28, num_attention_heads=12,
                     num_key_value_heads=2, intermediate_size=8960, vocab_size=151_936),
        teacher=dict(hidden_size=2048, num_hidden_layers=36, num_attention_heads=16,
                     num_key_value_heads=2, intermediate_size=11_008, vocab_size=151_936),
        shapes=[(4, 1024), (4, 2048), (2, 4096), (1, 8192)], image=(32, 576),
        dtype=torch.bfloat16),
    "cpu": dict(
        student=dict(hidden_size=64, num_hidden_layers=6, num_attention_heads=4,
                     num_key_value_heads=2, intermediate_size=128, vocab_size=1024),
        teacher=dict(hidden_size=96, num_hidden_layers=9, num_attention_heads=4,
                     num_key_value_heads=2, intermediate_size=192, vocab_size=1024),
        shapes=[(2, 128), (1, 256)], image=(8, 64), dtype=torch.float32),
}


def _kd_loss():
    """Logit KD: the library's chunked loss when available, else plain torch KL."""
    try:
        from compodistill.logit_kd.from_logits import logit_distillation_loss, shift_labels
    except ImportError:
        logit_distillation_loss = None

    def kd(student_logits, teacher_logits, input_ids):
        if logit_distillation_loss is not None:
            return logit_distillation_loss(student_logits, teacher_logits,
                                           shift_labels(input_ids), positions="response")
        zs = student_logits[:, :-1].float().flatten(0, 1)
        zt = teacher_logits[:, :-1, :zs.shape[-1]].float().flatten(0, 1)
        return F.kl_div(F.log_softmax(zs, -1), F.log_softmax(zt, -1), log_target=True,
                        reduction="batchmean")
    return kd


def _model(cfg: dict, dtype, device, seed: int):
    torch.manual_seed(seed)
    config = Qwen2Config(**cfg, max_position_embeddings=32_768, tie_word_embeddings=False)
    with torch.device(device):
        return Qwen2ForCausalLM._from_config(config, dtype=dtype)


def _inputs(b: int, n: int, image: tuple[int, int], vocab: int, device):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, min(vocab, IMAGE_TOKEN), (b, n), generator=g)
    start, length = image
    ids[:, start:start + length] = IMAGE_TOKEN if vocab > IMAGE_TOKEN else vocab - 1
    return ids.to(device), ids.to(device) == int(ids[0, start])


PROVIDERS = ("eager_attn_kd", "sdpa_logit_kd", "compodistill", "trainer_two_calls",
             "trainer_one_call")
# The trainer's own step (hidden states -> fused linear LM + KD, VAT through the hook), with
# LM and KD as two fused calls (each runs both lm_heads: the trainer before the single-pass
# change) or as one call with both weights (the trainer now).
TRAINER_PROVIDERS = ("trainer_two_calls", "trainer_one_call")


def _step(name, student, teacher, ids, visual, kd, distiller):
    """One training step of provider ``name`` (models already switched to its attention)."""
    eager = name == "eager_attn_kd"
    b, n = ids.shape
    layout = visual_layout(visual, b, n, device=ids.device)

    if name in TRAINER_PROVIDERS:
        return _trainer_step(name, student, teacher, ids, visual, distiller)

    def run():
        student.zero_grad(set_to_none=True)
        cap = distiller.capture(visual_mask=visual) if name == "compodistill" else None
        with cap if cap is not None else contextlib.nullcontext():
            with torch.no_grad():
                t_out = teacher(input_ids=ids, output_attentions=eager)
            s_out = student(input_ids=ids, labels=ids, output_attentions=eager)
        loss = s_out.loss + kd(s_out.logits, t_out.logits, ids)
        if cap is not None:
            loss = loss + cap.loss()
        if eager:
            loss = loss + eager_vat(s_out.attentions, t_out.attentions, distiller.matches,
                                     layout, visual)
        loss.backward()
    return run


def _trainer_step(name, student, teacher, ids, visual, distiller):
    from compodistill import linear_distillation_loss, shift_labels

    labels = shift_labels(ids)
    w_s, w_t = student.lm_head.weight, teacher.lm_head.weight

    def run():
        student.zero_grad(set_to_none=True)
        with distiller.capture(visual_mask=visual) as cap:
            with torch.no_grad():
                h_t = teacher.model(input_ids=ids).last_hidden_state
            h_s = student.model(input_ids=ids).last_hidden_state
        if name == "trainer_two_calls":
            loss = (linear_distillation_loss(h_s, w_s, h_t, w_t, labels, ce_weight=1.0,
                                             kd_weight=0.0)
                    + linear_distillation_loss(h_s, w_s, h_t, w_t, labels))
        else:
            loss = linear_distillation_loss(h_s, w_s, h_t, w_t, labels, ce_weight=1.0,
                                            kd_weight=1.0)
        (loss + cap.loss()).backward()
    return run


def run(device: torch.device, csv_path: Path, shapes=None, repeat: int = 3,
        providers=None) -> list[dict]:
    setup = SETUPS["cuda" if device.type == "cuda" else "cpu"]
    dtype = setup["dtype"]
    student = _model(setup["student"], dtype, device, seed=0).train()
    teacher = _model(setup["teacher"], dtype, device, seed=1).eval().requires_grad_(False)
    kd = _kd_loss()
    prov = provenance(device)
    rows = []
    distiller = AttentionDistiller(student, teacher, enable=False)  # intermediate preset
    for b, n in shapes or setup["shapes"]:
        ids, visual = _inputs(b, n, setup["image"], setup["student"]["vocab_size"], device)
        for name in providers or PROVIDERS:
            if name == "compodistill" or name in TRAINER_PROVIDERS:
                enable_attention(student)
                enable_attention(teacher)
            else:
                attn = "eager" if name == "eager_attn_kd" else "sdpa"
                student.set_attn_implementation(attn)
                teacher.set_attn_implementation(attn)
            fn = _step(name, student, teacher, ids, visual, kd, distiller)
            rows += step_rows(fn, device, student, bench=BENCH, provider=name, b=b, n=n,
                              extra=f"B={b} N={n} Nv={setup['image'][1]} {dtype}", prov=prov,
                              repeat=repeat)
    write_rows(csv_path, rows)
    return rows


def run_family_rows(device: torch.device, csv_path: Path, shapes=None, repeat: int = 3,
                    providers=None) -> list[dict]:
    """``--family qwen2_5_vl``: the family pair of ``bench/model_step_family.py``."""
    from bench.model_step_family import run_family

    rows = run_family(device, shapes=shapes, repeat=repeat, providers=providers)
    write_rows(csv_path, rows)
    return rows


def plot(csv_path: Path, device_name: str, png_path: Path) -> Path:
    """Time, tokens/s and peak memory per B×N for each provider (rows of ``device_name``)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in read_rows(csv_path) if r["benchmark"] == BENCH
            and r["device"] == device_name]
    xs = list(dict.fromkeys(r["x"] for r in rows))
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for ax, metric in zip(axes, ("time", "tokens_per_s", "peak_memory")):
        provs = sorted({r["provider"] for r in rows})
        for i, prov in enumerate(provs):
            pts = {r["x"]: float(r["value"]) for r in rows  # the latest row per x wins
                   if r["provider"] == prov and r["metric"] == metric}
            pos = [j + (i - len(provs) / 2 + 0.5) * 0.25 for j in range(len(xs))]
            ax.bar(pos, [pts.get(x, float("nan")) for x in xs], width=0.25, label=prov)
        unit = {"time": "ms", "tokens_per_s": "tok/s", "peak_memory": "MiB"}[metric]
        ax.set_xticks(range(len(xs)), xs)
        ax.set(xlabel="B×N", ylabel=f"{metric} ({unit})", title=f"{BENCH}: {metric}")
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=8)
    fig.suptitle(f"{device_name} (missing bar = OOM)", fontsize=9)
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    plt.close(fig)
    return png_path


def _shape(text: str) -> tuple[int, int]:
    b, n = text.lower().split("x")
    return int(b), int(n)


def main(argv=None) -> None:
    import argparse
    import functools

    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--providers", nargs="+", choices=PROVIDERS + FAMILY_PROVIDERS,
                     default=None,
                     help=f"only these providers (default all: {', '.join(PROVIDERS)})")
    pre.add_argument("--family", choices=("qwen2_5_vl",), default=None,
                     help="run a VLM family pair instead (bench/model_step_family.py): "
                          "Qwen2.5-VL 7B -> 3B shapes on CUDA, tiny on CPU")
    known, rest = pre.parse_known_args(argv)
    runner = run_family_rows if known.family else run
    benchmark_main(rest, doc=__doc__, bench=BENCH,
                   run=functools.partial(runner, providers=known.providers), plot=plot, repeat=3,
                   sweep=("--shapes", dict(type=_shape, help="override B×N, e.g. 1x8192")))

if __name__ == "__main__":
    main()
