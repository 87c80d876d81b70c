"""Evaluation on the grid task (docs/experiment.md): no A/B letters, only likelihoods.

- :func:`score_questions`: each question is asked alone (image + question); the answer is the
  candidate whose token is most likely at the answer position (every candidate is a single
  token of the tokenizer; anything else is refused). Accuracy per question type with its
  standard error ``sqrt(p (1 - p) / n)``.
- :func:`score_captions`: CR by caption likelihood: right when the true caption's summed
  log-probability, as the reply to the caption prompt, beats its negative's (colour-swapped
  or position-swapped). Per category, with the standard error.
- :func:`target_attention`: per layer, the share of the head-mean image attention that falls
  on the question's target cell, for the question-word rows and for the answer position
  (the last prompt token, which predicts the answer). Uniform attention gives 1/cells. Tiny
  models only: it runs eager attention with ``output_attentions``.
"""
from __future__ import annotations

import math
import os
from collections import defaultdict
from typing import Sequence

import torch

from ..data.collate import LlavaCollator
from ..data.grid_task import CAPTION_PROMPT
from .common import batched, label_logprobs, model_device
from .families import collate, encode_images, reply_sample

__all__ = ["score_questions", "score_captions", "target_attention", "with_se"]


def with_se(correct: Sequence[float]) -> dict:
    """``{"acc", "se", "n"}`` of 0/1 outcomes (standard error of a proportion)."""
    n = len(correct)
    p = sum(correct) / n if n else float("nan")
    return {"acc": p, "se": math.sqrt(p * (1 - p) / n) if n else float("nan"), "n": n}


def paired_difference(items: Sequence[dict], preds_a: Sequence[str],
                      preds_b: Sequence[str]) -> dict:
    """Accuracy of model A minus model B on the same questions, per ``question_type`` and
    ``"all"``: ``{"diff", "se", "n"}``, with the paired standard error (the sample standard
    deviation of the per-question differences over sqrt(n)): both models answer the same
    questions, so the question-to-question spread they share cancels."""
    if not len(items) == len(preds_a) == len(preds_b):
        raise ValueError(f"paired_difference: {len(items)} items but {len(preds_a)} and "
                         f"{len(preds_b)} predictions")
    by_type = defaultdict(list)
    for it, a, b in zip(items, preds_a, preds_b):
        by_type[it["question_type"]].append(float(a == it["answer"]) - float(b == it["answer"]))
    by_type["all"] = [d for v in list(by_type.values()) for d in v]
    out = {}
    for t, d in by_type.items():
        n = len(d)
        mean = sum(d) / n
        var = sum((x - mean) ** 2 for x in d) / (n - 1) if n > 1 else float("nan")
        out[t] = {"diff": mean, "se": math.sqrt(var / n), "n": n}
    return out


def _image(item: dict, image_folder: str) -> str:
    return os.path.join(image_folder, item["image"])


def _candidate_ids(tokenizer, candidates: Sequence[str]) -> list[int]:
    ids = []
    for c in candidates:
        tok = tokenizer(c, add_special_tokens=False)["input_ids"]
        if len(tok) != 1 or tok[0] == tokenizer.unk_token_id:
            raise ValueError(f"candidate {c!r} is not a single known token ({tok}); "
                             f"score_questions needs single-token candidates")
        ids.append(tok[0])
    return ids


@torch.no_grad()
def score_questions(model, encoder, items: Sequence[dict], image_folder: str, *,
                    batch_size: int = 64) -> dict:
    """Accuracy (with standard error) per ``question_type`` and ``"all"``; also returns
    ``predictions`` in item order."""
    tok = encoder.tokenizer
    collate = LlavaCollator(tok.pad_token_id, padding_side="left",
                            image_inputs=getattr(encoder, "image_inputs", None))
    model.eval()
    device = model_device(model)
    preds: list[str] = []
    for chunk in batched(items, batch_size):
        feats = [encoder.encode_prompt(it["question"], [_image(it, image_folder)])
                 for it in chunk]
        batch = {k: v.to(device) for k, v in collate(feats).items()}
        logits = model(**batch).logits[:, -1].float()
        for row, it in zip(logits, chunk):
            cand = _candidate_ids(tok, it["candidates"])
            preds.append(it["candidates"][int(row[cand].argmax())])
    by_type = defaultdict(list)
    for it, p in zip(items, preds):
        by_type[it["question_type"]].append(float(p == it["answer"]))
    out = {t: with_se(v) for t, v in by_type.items()}
    out["all"] = with_se([x for v in by_type.values() for x in v])
    out["predictions"] = preds
    return out


@torch.no_grad()
def _caption_logprobs(model, encoder, items, image_folder, key: str, batch_size: int):
    device = model_device(model)
    out = []
    for chunk in batched(items, batch_size):
        feats = [reply_sample(encoder, CAPTION_PROMPT, it[key],
                              encode_images(encoder, [_image(it, image_folder)]))
                 for it in chunk]
        batch = {k: v.to(device) for k, v in
                 collate(encoder, feats, encoder.tokenizer.pad_token_id, "right").items()}
        out += label_logprobs(model, batch)
    return out


def score_captions(model, encoder, items: Sequence[dict], image_folder: str, *,
                   batch_size: int = 64) -> dict:
    """CR accuracy (true caption more likely than its negative) per ``category`` and ``"all"``."""
    model.eval()
    pos = _caption_logprobs(model, encoder, items, image_folder, "caption", batch_size)
    neg = _caption_logprobs(model, encoder, items, image_folder, "negative_caption", batch_size)
    by_cat = defaultdict(list)
    for it, p, n in zip(items, pos, neg):
        by_cat[it["category"]].append(float(p > n))
    out = {c: with_se(v) for c, v in by_cat.items()}
    out["all"] = with_se([x for v in by_cat.values() for x in v])
    return out


@torch.no_grad()
def target_attention(model, encoder, items: Sequence[dict], image_folder: str, *,
                     batch_size: int = 32) -> dict:
    """Share of image attention on the target cell, per layer, per query row kind.

    Returns ``{"question": [per layer], "answer": [per layer], "image_mass_answer": [per
    layer], "answer_per_head": [per layer][per head], "uniform": 1 / cells, "n": items}``:
    ``question`` averages the rows of the question's words, ``answer`` the last prompt row
    (head-mean attention); ``answer_per_head`` is the answer row's share in each head's own
    attention (a sharp head that the mean hides shows here); ``image_mass_answer`` is the
    total attention the answer row puts on the image tokens (how much it looks at all).
    """
    if getattr(encoder, "image_inputs", None) is not None:
        raise ValueError(f"target_attention: the grid cells are LLaVA's fixed image tokens; "
                         f"{model.config.model_type} gives each image its own token count")
    cfg = model.config
    image_id, cells = cfg.image_token_id, cfg.image_seq_length
    tok = encoder.tokenizer
    end_id = tok.eos_token_id
    collate = LlavaCollator(tok.pad_token_id, padding_side="left")
    impl = cfg.text_config._attn_implementation
    model.set_attn_implementation({"text_config": "eager"})
    model.eval()
    device = model_device(model)
    sums: dict[str, list[float]] | None = None
    heads: torch.Tensor | None = None
    try:
        for chunk in batched(items, batch_size):
            feats = [encoder.encode_prompt(it["question"], [_image(it, image_folder)])
                     for it in chunk]
            q_len = [len(tok(it["question"], add_special_tokens=False)["input_ids"])
                     for it in chunk]
            batch = {k: v.to(device) for k, v in collate(feats).items()}
            out = model(**batch, output_attentions=True)
            ids = batch["input_ids"]
            for b, it in enumerate(chunk):
                vis = (ids[b] == image_id).nonzero()[:, 0]
                # Question words: the q_len tokens just before the user turn's end token.
                end = int((ids[b] == end_id).nonzero()[-1, 0])
                rows = {"question": torch.arange(end - q_len[b], end), "answer": [-1]}
                layer_vals = defaultdict(list)
                for att in out.attentions:
                    a = att[b].float().mean(0)  # head mean, (N, N)
                    for kind, r in rows.items():
                        img = a[r][:, vis]
                        share = (img[:, it["target_cell"]] / img.sum(-1).clamp_min(1e-12))
                        layer_vals[kind].append(float(share.mean()))
                    layer_vals["image_mass_answer"].append(float(a[-1, vis].sum()))
                img = torch.stack([att[b, :, -1, vis].float() for att in out.attentions])
                per_head = img[..., it["target_cell"]] / img.sum(-1).clamp_min(1e-12)
                heads = per_head if heads is None else heads + per_head  # (layers, heads)
                if sums is None:
                    sums = {k: [0.0] * len(v) for k, v in layer_vals.items()}
                for k, v in layer_vals.items():
                    sums[k] = [s + x for s, x in zip(sums[k], v)]
    finally:
        model.set_attn_implementation({"text_config": impl})
    n = len(items)
    result = {k: [round(s / n, 4) for s in v] for k, v in (sums or {}).items()}
    if heads is not None:
        result["answer_per_head"] = [[round(x / n, 4) for x in layer] for layer in heads.tolist()]
    return {**result, "uniform": round(1 / cells, 4), "n": n}
