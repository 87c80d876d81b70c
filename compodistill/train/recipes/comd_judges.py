"""CoMD's pluggable parts: the text generator and the judges (docs/stages.md).

- A **generator** is ``generate(prompts, images) -> texts``: one user turn per prompt (images:
  a list of image paths per prompt), greedy answers as text. :class:`GreedyGenerator` wraps a
  model of any trainer family (its ``generate``, with the family's image inputs).
- A **judge** is ``judge(requests) -> [(score_first, score_second) | None]``: it scores the two
  answers of each :class:`JudgeRequest` (None: no usable verdict). The assessor calls it with
  both orders. :class:`ModelJudge` asks a judge model for two 1–10 scores and parses them
  strictly (:func:`parse_judge_scores`); :class:`ReferenceOverlapJudge` scores each answer by
  its token F1 against the reference answer, mapped to 1–10 (cheap, runs on CPU).
"""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Protocol, Sequence

__all__ = ["Generator", "Judge", "JudgeRequest", "JudgeParseError", "GreedyGenerator",
           "ModelJudge", "ReferenceOverlapJudge", "parse_judge_scores", "token_f1",
           "DEFAULT_JUDGE_PROMPT"]

DEFAULT_JUDGE_PROMPT = (
    "Two assistants answered an instruction about the image.\n"
    "[Instruction]\n{instruction}\n\n[Assistant 1]\n{first}\n\n[Assistant 2]\n{second}\n\n"
    "Rate the helpfulness, relevance and accuracy of each answer on a scale of 1 to 10. "
    "Reply with exactly two numbers separated by a space, the score of Assistant 1 and then "
    "the score of Assistant 2, and nothing else.")

IMAGE_TAG = "<image>"


class Generator(Protocol):
    def __call__(self, prompts: Sequence[str], images: Sequence[Sequence[str]]) -> list[str]: ...


@dataclass
class JudgeRequest:
    """One comparison: ``first`` and ``second`` answer ``instruction`` (images: paths)."""

    instruction: str
    first: str
    second: str
    reference: str = ""
    images: list = field(default_factory=list)


class Judge(Protocol):
    def __call__(self, requests: Sequence[JudgeRequest]) -> list[tuple[float, float] | None]: ...


class JudgeParseError(ValueError):
    """The judge's reply is not exactly the scores asked for."""


_NUMBER = r"(\d+(?:\.\d+)?)"


def parse_judge_scores(text: str, count: int = 2, low: float = 1.0,
                       high: float = 10.0) -> tuple[float, ...]:
    """Exactly ``count`` numbers in [low, high], separated by spaces or commas, nothing else.

    Leading/trailing whitespace is allowed; anything else (words, a missing or extra number,
    a score out of range) raises :class:`JudgeParseError` rather than guessing.
    """
    pattern = r"\s*" + r"\s*[,\s]\s*".join([_NUMBER] * count) + r"\s*"
    match = re.fullmatch(pattern, text or "")
    if not match:
        raise JudgeParseError(f"expected {count} scores, got {text!r}")
    scores = tuple(float(g) for g in match.groups())
    if any(not low <= s <= high for s in scores):
        raise JudgeParseError(f"scores must be in [{low:g}, {high:g}], got {text!r}")
    return scores


def strip_image_tags(text: str) -> str:
    """The instruction text without ``<image>`` tags (images are passed separately)."""
    return text.replace(IMAGE_TAG, "").strip()


class GreedyGenerator:
    """Greedy answers of a model of any trainer family to single user turns, in batches.

    Args:
        model: the model (eval mode is set for the call and restored after).
        encoder: a :class:`~compodistill.data.ConversationEncoder` for the model.
        tokenizer: decodes the new tokens (special tokens skipped).
        max_new_tokens: length cap per answer.
        batch_size: prompts per ``generate`` call.
        image_inputs: the family's image inputs (:mod:`compodistill.data.family_inputs`, as
            the trainer's ``image_inputs``): each image then becomes its own token block and
            pixel inputs, and the batch carries the family's extra keys (Qwen's
            ``image_grid_thw``, ``mm_token_type_ids``). None: LLaVA, the encoder's fixed count.
    """

    def __init__(self, model, encoder, tokenizer, *, max_new_tokens: int = 256,
                 batch_size: int = 8, image_inputs=None):
        self.model, self.encoder, self.tokenizer = model, encoder, tokenizer
        self.max_new_tokens, self.batch_size = int(max_new_tokens), int(batch_size)
        self.image_inputs = image_inputs

    def encode(self, prompt: str, images: Sequence[str]) -> dict:
        """One prompt (``<image>`` tags stripped, one per image put back in front) as a sample
        for :class:`~compodistill.data.LlavaCollator`; a family's images as eval encodes them."""
        if self.image_inputs is None:
            return self.encoder.encode_prompt(strip_image_tags(prompt), list(images))
        from ...eval.families import family_images, prompt_sample

        return prompt_sample(self.encoder, strip_image_tags(prompt),
                             family_images(self.image_inputs, images))

    def batch(self, features: list[dict]) -> dict:
        """The left-padded generation batch of encoded prompts, family inputs included."""
        from ...eval.common import pad_id
        from ...eval.families import collate

        return collate(self, features, pad_id(self.tokenizer), "left")

    def generate_ids(self, features: list[dict]) -> list[list[int]]:
        """Greedy new token ids of encoded prompts (:meth:`encode`), cut at the first end token
        (eval's :func:`~compodistill.eval.common.greedy_generate`, the family's inputs included)."""
        from ...eval.common import eos_ids, greedy_generate, pad_id

        return greedy_generate(self.model, features, pad_token_id=pad_id(self.tokenizer),
                               eos_token_ids=eos_ids(self.tokenizer),
                               max_new_tokens=self.max_new_tokens, image_inputs=self.image_inputs)

    def __call__(self, prompts: Sequence[str], images: Sequence[Sequence[str]]) -> list[str]:
        from ...eval.common import batched, eval_mode

        import torch

        features = [self.encode(p, im) for p, im in zip(prompts, images)]
        out: list[str] = []
        with eval_mode(self.model), torch.no_grad():
            for chunk in batched(features, self.batch_size):
                ids = self.generate_ids(list(chunk))
                out += [self.tokenizer.decode(t, skip_special_tokens=True).strip() for t in ids]
        return out


class ModelJudge:
    """Ask a judge model (a generator) for two 1–10 scores per comparison.

    Args:
        generate: a :class:`Generator` around the judge model (e.g. :class:`GreedyGenerator`
            on the teacher with a short ``max_new_tokens``).
        prompt: ``str.format`` template with ``{instruction}``, ``{first}``, ``{second}`` and
            optionally ``{reference}``.
    """

    def __init__(self, generate: Generator, prompt: str = DEFAULT_JUDGE_PROMPT):
        self.generate, self.prompt = generate, prompt or DEFAULT_JUDGE_PROMPT

    def __call__(self, requests: Sequence[JudgeRequest]) -> list[tuple[float, float] | None]:
        prompts = [self.prompt.format(instruction=strip_image_tags(r.instruction),
                                      first=r.first, second=r.second, reference=r.reference)
                   for r in requests]
        replies = self.generate(prompts, [r.images for r in requests])
        verdicts: list[tuple[float, float] | None] = []
        for reply in replies:
            try:
                verdicts.append(parse_judge_scores(reply))
            except JudgeParseError:
                verdicts.append(None)  # unusable: the sample is not counted as hard
        return verdicts


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD-style token F1 after VQA answer normalisation (0 when either side is empty)."""
    from ...data.answers import normalize_answer

    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    common = sum((Counter(pred) & Counter(ref)).values())
    if not pred or not ref or not common:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


class ReferenceOverlapJudge:
    """Score each answer ``1 + 9 · token_f1(answer, reference)`` (order-independent)."""

    def __call__(self, requests: Sequence[JudgeRequest]) -> list[tuple[float, float] | None]:
        return [(1.0 + 9.0 * token_f1(r.first, r.reference),
                 1.0 + 9.0 * token_f1(r.second, r.reference)) for r in requests]
