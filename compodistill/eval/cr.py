"""Compositional-reasoning evaluation (docs/evaluation.md): which caption, A or B, fits the image?

Every example (image, positive caption, negative caption) is asked twice, the positive caption
as option A and then as option B; the example scores the mean of the two answers, so a model
that always says "A" (or answers at random) scores 50%. Scorers:

- ``"generate"``: greedy decoding; the reply, stripped of whitespace, must be exactly ``A``
  or ``B``. Anything else is wrong and counted in ``unparsed``.
- ``"loglik"``: the next-token logits after the prompt; the option whose letter token scores
  higher is the answer (a tie counts as "B").
- ``"caption"`` (diagnostic, not the docs/evaluation.md protocol): no A/B question; the summed
  log-probability of each caption as the reply to :data:`CAPTION_PROMPT` (the synthetic data's
  captioning question); right when the positive caption scores higher. It shows whether a
  model's captions are grounded before it has learnt the harder A/B format.

Loaders: SugarCrepe-style JSON (``{"filename"|"image", "caption", "negative_caption"}`` per
record, one file per SugarCrepe category, e.g. ``swap_att.json``), Winoground-style JSONL
(``image_0, image_1, caption_0, caption_1``: two examples per line) and the synthetic
benchmark (``cr_eval.json`` of :mod:`compodistill.data.synthetic`). Results are reported per
category (attribute, relation, object, or whatever the files say) and overall.
"""
from __future__ import annotations

import json
import os
import warnings
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from ..data.prompts import CAPTION_PROMPT, cr_prompt
from .common import (batched, eos_ids, eval_mode, greedy_generate, label_logprobs,
                     last_token_logits, model_device, pad_id, progress_bar, to_device)
from .families import collate, encode_images, prompt_sample, reply_sample
from .unscored import Unscored, encode_or_skip

LETTERS = ("A", "B")
SCORERS = ("loglik", "generate", "caption")

# SugarCrepe file stem -> category.
SUGARCREPE_CATEGORIES = {
    "add_att": "attribute", "replace_att": "attribute", "swap_att": "attribute",
    "add_obj": "object", "replace_obj": "object", "swap_obj": "object",
    "replace_rel": "relation", "swap_rel": "relation",
}


@dataclass(frozen=True)
class CRExample:
    """An image (path or PIL image) with a caption that fits and one that does not."""

    image: Any
    positive: str
    negative: str
    category: str = "all"
    id: str = ""


@dataclass
class CRResult:
    """Accuracy of one scorer: overall (mean over examples), per category, and details.

    ``category_mean`` is the unweighted mean of the per-category accuracies. ``unparsed``
    counts generated replies that were not exactly A or B (always 0 for ``loglik``).
    ``examples`` holds per-example answers and scores. ``num_examples`` counts the scored
    examples; ``unscored`` lists those that could not be (an unreadable image), with reasons.
    """

    scorer: str
    accuracy: float
    per_category: dict[str, float]
    category_mean: float
    num_examples: int
    unparsed: int = 0
    examples: list[dict] = field(default_factory=list, repr=False)
    unscored: list[dict] = field(default_factory=list)

    def to_dict(self, with_examples: bool = False) -> dict:
        d = {"scorer": self.scorer, "accuracy": self.accuracy, "per_category": self.per_category,
             "category_mean": self.category_mean, "num_examples": self.num_examples,
             "unparsed": self.unparsed, "unscored": self.unscored}
        if with_examples:
            d["examples"] = self.examples
        return d


# ----------------------------------------------------------------------------- loaders


def _image_path(name: str, image_folder: str | None) -> str:
    path = os.path.join(image_folder, name) if image_folder else name
    if not os.path.splitext(path)[1]:  # Winoground ids come without an extension
        for ext in (".png", ".jpg", ".jpeg"):
            if os.path.isfile(path + ext):
                return path + ext
    return path


def _records(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        if path.endswith(".jsonl"):
            return [json.loads(line) for line in f if line.strip()]
        data = json.load(f)
    if isinstance(data, dict):  # SugarCrepe: {"0": {...}, "1": {...}}
        return [dict(v, id=v.get("id", k)) for k, v in data.items()]
    return data


def load_sugarcrepe(path: str, image_folder: str | None = None,
                    category: str | None = None) -> list[CRExample]:
    """Load SugarCrepe-style JSON: one file, or every ``*.json`` in a folder.

    A record's category is its ``category`` key, else ``category``, else the file stem mapped
    by :data:`SUGARCREPE_CATEGORIES` (``swap_att`` -> attribute), else the stem itself. Images
    are ``filename`` or ``image``, relative to ``image_folder`` (default: the file's folder).
    """
    if os.path.isdir(path):
        files = sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(".json"))
        return [ex for f in files for ex in load_sugarcrepe(f, image_folder, category)]
    stem = os.path.splitext(os.path.basename(path))[0]
    default_cat = category or SUGARCREPE_CATEGORIES.get(stem, stem)
    folder = image_folder if image_folder is not None else os.path.dirname(path)
    out = []
    for i, rec in enumerate(_records(path)):
        name = rec.get("filename") or rec.get("image")
        if not name or "caption" not in rec or "negative_caption" not in rec:
            raise ValueError(f"{path}: record {i}: needs filename/image, caption, negative_caption")
        out.append(CRExample(_image_path(name, folder), rec["caption"], rec["negative_caption"],
                             rec.get("category", default_cat), str(rec.get("id", f"{stem}_{i}"))))
    return out


def load_synthetic_cr(path: str, image_folder: str | None = None) -> list[CRExample]:
    """Load ``cr_eval.json`` of ``compodistill data synth`` (images relative to its folder)."""
    return load_sugarcrepe(path, image_folder)


def load_winoground(path: str, image_folder: str | None = None) -> list[CRExample]:
    """Load Winoground-style JSON/JSONL: two examples per record.

    ``(image_0, caption_0 vs caption_1)`` and ``(image_1, caption_1 vs caption_0)``; the
    category is ``collapsed_tag`` or ``tag`` lower-cased (else ``"winoground"``). Image names
    without an extension are looked up as .png/.jpg in ``image_folder`` (default: the file's).
    """
    folder = image_folder if image_folder is not None else os.path.dirname(path)
    out = []
    for i, rec in enumerate(_records(path)):
        try:
            cat = str(rec.get("collapsed_tag") or rec.get("tag") or "winoground").lower()
            rid = str(rec.get("id", i))
            for k in (0, 1):
                out.append(CRExample(_image_path(str(rec[f"image_{k}"]), folder),
                                     rec[f"caption_{k}"], rec[f"caption_{1 - k}"], cat,
                                     f"{rid}_{k}"))
        except KeyError as exc:
            raise ValueError(f"{path}: record {i}: missing key {exc}") from None
    return out


# ----------------------------------------------------------------------------- scoring


def _letter_ids(tokenizer) -> list[int]:
    ids = []
    for letter in LETTERS:
        toks = tokenizer(letter, add_special_tokens=False)["input_ids"]
        if len(toks) != 1:
            warnings.warn(f"{letter!r} is {len(toks)} tokens; the loglik scorer uses the first")
        ids.append(toks[0])
    return ids


def _summarise(scorer: str, examples: Sequence[CRExample], correct: list[list[float]],
               answers: list[list[str]], unparsed: int) -> CRResult:
    per_cat: dict[str, list[float]] = defaultdict(list)
    details = []
    for ex, c, a in zip(examples, correct, answers):
        score = sum(c) / 2  # both orders, averaged
        per_cat[ex.category].append(score)
        details.append({"id": ex.id, "category": ex.category, "answers": a, "score": score})
    cats = {k: sum(v) / len(v) for k, v in sorted(per_cat.items())}
    n = len(examples)
    return CRResult(scorer, sum(d["score"] for d in details) / max(n, 1), cats,
                    sum(cats.values()) / max(len(cats), 1), n, unparsed, details)


def _caption_logprobs(model, encoder, images, captions: Sequence[str], device) -> list[float]:
    # Summed log p(caption tokens and end of turn | image, captioning question), per caption.
    feats = [reply_sample(encoder, CAPTION_PROMPT, cap, images) for cap in captions]
    batch = to_device(collate(encoder, feats, pad_id(encoder.tokenizer), "right"), device)
    return label_logprobs(model, batch)


@torch.no_grad()
def evaluate_cr(model, examples: Sequence[CRExample], encoder, *,
                scorers: Sequence[str] = ("loglik", "generate"), batch_size: int = 8,
                max_new_tokens: int = 3,
                device=None, use_hf_generate: bool = True,
                progress: bool = True) -> dict[str, CRResult]:
    """Score ``model`` on CR examples with each scorer (see the module docstring).

    Args:
        model: logits callable or transformers model (see :mod:`compodistill.eval.common`).
        examples: from one of the loaders.
        encoder: the :class:`~compodistill.data.ConversationEncoder` of the training data (same
            tokenizer, chat template, image transform and image-token expansion).
        scorers: any of ``"loglik"``, ``"generate"``, ``"caption"`` (diagnostic).
        max_new_tokens: generation budget; the strict parser still needs exactly A or B.

    Returns:
        ``{scorer: CRResult}``.
    """
    unknown = set(scorers) - set(SCORERS)
    if unknown:
        raise ValueError(f"unknown scorers {sorted(unknown)}; expected {SCORERS}")
    tok = encoder.tokenizer
    device = model_device(model, device)
    letters = _letter_ids(tok)
    family = getattr(encoder, "image_inputs", None)  # None: LLaVA's fixed image tokens
    # An unreadable image: its example is counted and reported, and scored over the rest.
    unscored, encoded = Unscored(), []
    for ex in examples:
        images = encode_or_skip(lambda im: encode_images(encoder, [im]), ex.image, ex.id,
                                unscored)
        if images is not None:
            encoded.append((ex, images))
    unscored.warn("CR", len(examples))
    examples = [ex for ex, _ in encoded]
    # Two prompts per example: positive as A, then positive as B. One image transform each.
    prompts = []
    correct = {s: [[0.0, 0.0] for _ in examples] for s in scorers}
    answers = {s: [["", ""] for _ in examples] for s in scorers}
    for i, (ex, images) in enumerate(encoded):
        if "caption" in scorers:  # one comparison, counted for both "orders"
            with eval_mode(model):
                pos, neg = _caption_logprobs(model, encoder, images, [ex.positive, ex.negative],
                                             device)
            answers["caption"][i] = [f"{pos:.3f}", f"{neg:.3f}"]
            correct["caption"][i] = [float(pos > neg)] * 2
        for order, (a, b) in enumerate(((ex.positive, ex.negative), (ex.negative, ex.positive))):
            prompts.append((i, order, prompt_sample(encoder, cr_prompt(a, b), images)))
    unparsed = 0
    if not {"loglik", "generate"} & set(scorers):
        prompts = []
    with eval_mode(model):
        for chunk in progress_bar(list(batched(prompts, batch_size)), "CR eval", progress):
            feats = [f for _, _, f in chunk]
            if "loglik" in scorers:
                logits = last_token_logits(model, feats, pad_id(tok), device, family)
                pick_a = (logits[:, letters[0]] > logits[:, letters[1]]).tolist()
                for (i, order, _), a in zip(chunk, pick_a):
                    answer = "A" if a else "B"
                    answers["loglik"][i][order] = answer
                    correct["loglik"][i][order] = float(answer == LETTERS[order])
            if "generate" in scorers:
                outs = greedy_generate(model, feats, pad_token_id=pad_id(tok),
                                       eos_token_ids=eos_ids(tok), max_new_tokens=max_new_tokens,
                                       device=device, use_hf_generate=use_hf_generate,
                                       image_inputs=family)
                for (i, order, _), out in zip(chunk, outs):
                    text = tok.decode(out, skip_special_tokens=True).strip()
                    unparsed += text not in LETTERS
                    answers["generate"][i][order] = text
                    correct["generate"][i][order] = float(text == LETTERS[order])
    results = {s: _summarise(s, examples, correct[s], answers[s],
                             unparsed if s == "generate" else 0) for s in scorers}
    for r in results.values():
        r.unscored = list(unscored.items)
    return results


def format_cr_results(results: dict[str, CRResult]) -> str:
    """A small text table: one row per scorer, one column per category, then overall."""
    cats = sorted({c for r in results.values() for c in r.per_category})
    head = f"{'scorer':<9}" + "".join(f"{c:>11}" for c in cats) + f"{'overall':>9}{'unparsed':>10}"
    rows = [head]
    for name, r in results.items():
        rows.append(f"{name:<9}" + "".join(f"{100 * r.per_category.get(c, float('nan')):>10.1f}%"
                                           for c in cats)
                    + f"{100 * r.accuracy:>8.1f}%{r.unparsed:>10d}")
    first = next(iter(results.values()), None)
    if first is not None and first.unscored:
        unscored = Unscored(first.unscored)
        rows.append(unscored.line(first.num_examples + len(unscored.items)))
    return "\n".join(rows)
