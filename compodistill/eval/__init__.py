"""Evaluation: compositional reasoning (A/B caption choice, docs/evaluation.md) and short-answer VQA.

- :func:`evaluate_cr` with :func:`load_sugarcrepe`, :func:`load_winoground`,
  :func:`load_synthetic_cr`; :func:`cr_prompt` is the exact prompt (also used in the
  synthetic training data).
- :func:`evaluate_vqa` with :func:`load_vqa_json`; :func:`normalize_answer`, :func:`vqa_score`.

Models are any logits callable or transformers model; prompts go through the training data's
:class:`~compodistill.data.ConversationEncoder` so image tokens are expanded identically.
"""
from .cr import (CRExample, CRResult, cr_prompt, evaluate_cr, format_cr_results, load_sugarcrepe,
                 load_synthetic_cr, load_winoground)
from .vqa import (SHORT_ANSWER_SUFFIX, VQAExample, VQAResult, evaluate_vqa, load_vqa_json,
                  normalize_answer, vqa_score)

__all__ = [
    "CRExample",
    "CRResult",
    "SHORT_ANSWER_SUFFIX",
    "VQAExample",
    "VQAResult",
    "cr_prompt",
    "evaluate_cr",
    "evaluate_vqa",
    "format_cr_results",
    "load_sugarcrepe",
    "load_synthetic_cr",
    "load_vqa_json",
    "load_winoground",
    "normalize_answer",
    "vqa_score",
]
