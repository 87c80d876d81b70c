"""The prompts that training data and evaluation share.

The synthetic data trains on the exact prompts the CR and VQA evaluations ask, so they live
here, below both: ``data`` writes them, ``eval`` reads them.
"""
from __future__ import annotations

CR_QUESTION = "Which caption describes the image?"
CR_INSTRUCTION = "Answer with the option's letter from the given choices directly."
CAPTION_PROMPT = "Describe the image in one sentence."
SHORT_ANSWER_SUFFIX = "\nAnswer the question using a single word or phrase."


def cr_prompt(caption_a: str, caption_b: str) -> str:
    """The user prompt of one CR question (the ``<image>`` tag is added by the encoder)."""
    return f"{CR_QUESTION}\nA. {caption_a}\nB. {caption_b}\n{CR_INSTRUCTION}"
