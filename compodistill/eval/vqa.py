"""Short-answer VQA evaluation: greedy generation, VQA answer normalisation, exact match.

Normalisation (:func:`normalize_answer`) follows the standard VQA evaluation script:
lower-case; newlines/tabs to spaces; each punctuation mark is removed when it touches a space
(or the text has a digit-comma-digit group, so ``1,000`` -> ``1000``) and becomes a space
otherwise; a period not followed by a digit is removed (``2.5`` stays); number words
``zero``..``ten`` become digits; the articles a/an/the are dropped; apostrophe-less
contractions are restored (``dont`` -> ``don't``). Scoring (:func:`vqa_score`): with a single
reference answer, exact match after normalisation; with several (VQAv2 has 10 annotators),
``min(1, matches / 3)``.
"""
from __future__ import annotations

import json
import os
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from ..data.answers import normalize_answer
from ..data.prompts import SHORT_ANSWER_SUFFIX
from .common import (batched, eos_ids, eval_mode, greedy_generate, model_device, pad_id,
                     progress_bar)
from .unscored import Unscored, encode_or_skip


def vqa_score(prediction: str, answers: Sequence[str]) -> float:
    """Exact match for one reference; ``min(1, matches / 3)`` for several (VQAv2 style)."""
    pred = normalize_answer(prediction)
    refs = [normalize_answer(a) for a in answers]
    matches = sum(pred == r for r in refs)
    if len(refs) <= 1:
        return float(matches > 0)
    return min(1.0, matches / 3)


@dataclass(frozen=True)
class VQAExample:
    """One question about an image (path or PIL) with its reference answer(s)."""

    image: Any
    question: str
    answers: tuple[str, ...]
    question_type: str = "all"
    id: str = ""


@dataclass
class VQAResult:
    """Mean VQA score overall and per question type; ``predictions`` per example.
    ``num_examples`` counts the scored questions; ``unscored`` lists those that could not be
    (an unreadable image), with reasons."""

    accuracy: float
    per_type: dict[str, float]
    num_examples: int
    predictions: list[dict] = field(default_factory=list, repr=False)
    unscored: list[dict] = field(default_factory=list)

    def to_dict(self, with_predictions: bool = False) -> dict:
        d = {"accuracy": self.accuracy, "per_type": self.per_type, "num_examples": self.num_examples,
             "unscored": self.unscored}
        if with_predictions:
            d["predictions"] = self.predictions
        return d


def load_vqa_json(path: str, image_folder: str | None = None) -> list[VQAExample]:
    """Load VQA JSON (a list) or JSONL: ``image``, ``question`` (or ``text``), ``answer`` (a
    string) or ``answers`` (strings or ``{"answer": ...}`` dicts), optional ``question_type``.

    Images are relative to ``image_folder`` (default: the file's folder), e.g. the synthetic
    ``vqa_eval.json``.
    """
    folder = image_folder if image_folder is not None else os.path.dirname(path)
    with open(path, encoding="utf-8") as f:
        recs = ([json.loads(x) for x in f if x.strip()] if path.endswith(".jsonl")
                else json.load(f))
    out = []
    for i, rec in enumerate(recs):
        answers = rec.get("answers", rec.get("answer"))
        if answers is None or "image" not in rec:
            raise ValueError(f"{path}: record {i}: needs image, question and answer(s)")
        answers = [answers] if isinstance(answers, str) else [
            a["answer"] if isinstance(a, dict) else a for a in answers]
        question = rec.get("question", rec.get("text"))
        out.append(VQAExample(os.path.join(folder, rec["image"]) if folder else rec["image"],
                              question, tuple(answers), rec.get("question_type", "all"),
                              str(rec.get("id", rec.get("question_id", i)))))
    return out


@torch.no_grad()
def evaluate_vqa(model, examples: Sequence[VQAExample], encoder, *, max_new_tokens: int = 8,
                 batch_size: int = 8, suffix: str = SHORT_ANSWER_SUFFIX, device=None,
                 use_hf_generate: bool = True, progress: bool = True) -> VQAResult:
    """Greedy-decode an answer per question and score it (see the module docstring).

    The prompt is ``question + suffix`` with the image tag first, encoded by ``encoder`` (the
    training data's :class:`~compodistill.data.ConversationEncoder`, or a
    :class:`~compodistill.eval.families.FamilyEncoder`).
    """
    tok = encoder.tokenizer
    device = model_device(model, device)
    # An unreadable image: its question is counted and reported, and scored over the rest.
    unscored, kept, feats = Unscored(), [], []
    for ex in examples:
        feat = encode_or_skip(lambda im: encoder.encode_prompt(ex.question + suffix, [im]),
                              ex.image, ex.id, unscored)
        if feat is not None:
            kept.append(ex)
            feats.append(feat)
    unscored.warn("VQA", len(examples))
    examples = kept
    preds: list[str] = []
    with eval_mode(model):
        for chunk in progress_bar(list(batched(feats, batch_size)), "VQA eval", progress):
            outs = greedy_generate(model, list(chunk), pad_token_id=pad_id(tok),
                                   eos_token_ids=eos_ids(tok), max_new_tokens=max_new_tokens,
                                   device=device, use_hf_generate=use_hf_generate,
                                   image_inputs=getattr(encoder, "image_inputs", None))
            preds += [tok.decode(o, skip_special_tokens=True).strip() for o in outs]
    per_type: dict[str, list[float]] = defaultdict(list)
    details = []
    for ex, pred in zip(examples, preds):
        score = vqa_score(pred, ex.answers)
        per_type[ex.question_type].append(score)
        details.append({"id": ex.id, "question_type": ex.question_type, "prediction": pred,
                        "answers": list(ex.answers), "score": score})
    n = len(examples)
    return VQAResult(sum(d["score"] for d in details) / max(n, 1),
                     {k: sum(v) / len(v) for k, v in sorted(per_type.items())}, n, details,
                     list(unscored.items))
