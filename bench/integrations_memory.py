"""Benchmark: the memory the drop-in losses save inside a Hugging Face training step, on CPU.

One shape, four providers side by side in one run (docs/integrations.md quotes the table).
Each step: teacher forward without gradient, student forward, loss, backward; the peak of
live tensor bytes inside the step (``compodistill.testing.memory``: parameters and their
already-allocated gradients are outside it).

- ``naive_logits``: ``model(...).logits`` for both models, CE + KL(p_t‖p_s) in float32 from
  the full (B, N, V) logits (what a ``compute_loss`` override usually does);
- ``fused_kd``: :func:`compodistill.hf.hidden_states_and_head` + ``FusedLinearKDLoss``, the
  same CE + KL, no logits;
- ``eager_attentions_vat``: ``fused_kd`` + VAT from ``output_attentions=True`` (eager
  attention: every layer's (B, H, N, N) probabilities are returned and kept);
- ``capture_vat``: ``fused_kd`` + VAT through :class:`compodistill.hf.AttentionDistiller`
  (the chunked PyTorch path on CPU: no N×N matrix).

Models: random Qwen2 causal LMs from configs (student 64 wide, 4 layers; teacher 128 wide,
8 layers; 4 heads, 2 kv heads; vocabulary 32,000), float32, one image span of 256 tokens
standing in for the visual keys, VAT on every layer (preset "all", group windows).
Rows are appended to ``bench/results/integrations_memory.csv``.

Usage: ``python bench/integrations_memory.py [--batch 1] [--tokens 1024] [--vocab 32000]``
"""
from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from bench._common import RESULTS_DIR, eager_vat, provenance, write_rows  # noqa: E402
from compodistill import FusedLinearKDLoss, visual_layout  # noqa: E402
from compodistill.hf import (AttentionDistiller, enable_attention,  # noqa: E402
                             hidden_states_and_head)
from compodistill.testing.memory import peak_memory  # noqa: E402

BENCH = "integrations_memory"
PROVIDERS = ("naive_logits", "fused_kd", "eager_attentions_vat", "capture_vat")


def _model(hidden: int, layers: int, vocab: int, seed: int):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    return Qwen2ForCausalLM(Qwen2Config(
        hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab,
        max_position_embeddings=8192, tie_word_embeddings=False))


def _batch(b: int, n: int, vocab: int):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab - 1, (b, n), generator=g)
    start = min(128, n // 4)
    ids[:, start:start + 256] = vocab - 1  # the "image" token
    labels = ids.clone()
    labels[:, :start + 256] = -100  # prompt and image
    return ids, labels, ids == vocab - 1


def _naive_kd(student, teacher, ids, labels):
    with torch.no_grad():
        zt = teacher(input_ids=ids).logits
    zs = student(input_ids=ids).logits
    aligned = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], 1).reshape(-1)
    keep = aligned != -100
    zs, zt = zs.reshape(-1, zs.shape[-1]).float(), zt.reshape(-1, zt.shape[-1]).float()
    ce = F.cross_entropy(zs, aligned, ignore_index=-100)
    lp_s, lp_t = zs.log_softmax(-1), zt.log_softmax(-1)
    kl = (lp_t.exp() * (lp_t - lp_s)).sum(-1)[keep].mean()
    return ce + kl


def step(name, student, teacher, ids, labels, visual, kd, distiller):
    student.zero_grad(set_to_none=True)
    if name == "naive_logits":
        _naive_kd(student, teacher, ids, labels).backward()
        return
    eager = name == "eager_attentions_vat"
    cap = distiller.capture(visual_mask=visual) if name == "capture_vat" else None
    extra = dict(output_attentions=True) if eager else {}
    with cap if cap is not None else contextlib.nullcontext():
        with torch.no_grad():
            out_t = teacher.model(input_ids=ids, **extra)
        h_s, head_s = hidden_states_and_head(student, input_ids=ids, **extra) if not eager \
            else (None, None)
        if eager:
            out_s = student.model(input_ids=ids, **extra)
            h_s, head_s = out_s.last_hidden_state, student.lm_head
    loss = kd(h_s, head_s.weight, out_t.last_hidden_state, teacher.lm_head.weight, labels)
    if eager:
        layout = visual_layout(visual, *ids.shape)
        loss = loss + eager_vat(out_s.attentions, out_t.attentions, distiller.matches, layout,
                                 visual)
    if cap is not None:
        loss = loss + cap.loss()
    loss.backward()


def run(b: int, n: int, vocab: int, csv_path: Path | None) -> list[dict]:
    student = _model(64, 4, vocab, 0).train()
    teacher = _model(128, 8, vocab, 1).eval().requires_grad_(False)
    ids, labels, visual = _batch(b, n, vocab)
    kd = FusedLinearKDLoss(weight_hard_loss=1.0, weight_soft_loss=1.0, loss="kl")
    distiller = AttentionDistiller(student, teacher, image_token_id=vocab - 1, preset="all",
                                   enable=False)
    device = torch.device("cpu")
    prov, rows = provenance(device), []
    for name in PROVIDERS:
        if name == "capture_vat":
            enable_attention(student)
            enable_attention(teacher)
        else:
            attn = "eager" if name == "eager_attentions_vat" else "sdpa"
            student.set_attn_implementation(attn)
            teacher.set_attn_implementation(attn)
        step(name, student, teacher, ids, labels, visual, kd, distiller)  # warm-up
        t0 = time.perf_counter()
        with peak_memory(device) as mem:
            step(name, student, teacher, ids, labels, visual, kd, distiller)
        seconds = time.perf_counter() - t0  # with the tracker on: slower than a plain step
        print(f"{name:>22} {b}x{n} V={vocab}: peak {mem.mib:8.1f} MiB ({seconds:.1f} s tracked)")
        rows.append(dict(benchmark=BENCH, provider=name, x_name="BxNxV", x=f"{b}x{n}x{vocab}",
                         metric="peak_memory", value=f"{mem.mib:.4g}", unit="MiB",
                         extra="cpu tracker, one step", **prov))
    if csv_path is not None:
        write_rows(csv_path, rows)
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=32_000)
    parser.add_argument("--csv", type=Path, default=RESULTS_DIR / f"{BENCH}.csv")
    parser.add_argument("--no-csv", action="store_true", help="print only")
    args = parser.parse_args(argv)
    run(args.batch, args.tokens, args.vocab, None if args.no_csv else args.csv)


if __name__ == "__main__":
    main()
