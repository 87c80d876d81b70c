"""A tiny word-level tokenizer for tests and the CPU demo, built in code (no download).

Real runs use the student's own tokenizer. Tiny models on the synthetic data learn far
faster with whole-word tokens than with bytes, so this builds a ``WordLevel`` vocabulary
over the synthetic generator's words (plus anything passed in), wraps it in
:class:`~transformers.PreTrainedTokenizerFast` and gives it a ChatML chat template, the
same shape as Qwen2's, so the data code takes exactly the path it takes with a real model.
"""
from __future__ import annotations

import re
import string
from typing import Iterable

IMAGE_TOKEN = "<image>"
PAD_TOKEN = "<pad>"
UNK_TOKEN = "<unk>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"

# ChatML, as in Qwen2 (without its default system prompt, to keep sequences short).
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Words of the synthetic generator's captions, questions and answers, and the roles.
BASE_WORDS = (
    "system user assistant "
    "a an the of is are there what which where how many color colour shape object objects "
    "red green blue yellow purple orange white black gray "
    "circle square triangle diamond star cross "
    "left right above below of to relative "
    "yes no caption captions describes describe fits image picture this in and or "
    "answer question using single word phrase with letter option from given choices directly "
    "one sentence zero two three four five six seven eight nine ten"
).split()


def _words(texts: Iterable[str]) -> list[str]:
    # Same split as the `Whitespace` pre-tokenizer: runs of word characters or of punctuation.
    found: list[str] = []
    for text in texts:
        found.extend(re.findall(r"\w+|[^\w\s]+", text))
    return found


def build_tiny_tokenizer(extra_words: Iterable[str] = (), texts: Iterable[str] = ()):
    """Build a word-level ``PreTrainedTokenizerFast`` with a ChatML chat template.

    Args:
        extra_words: additional vocabulary entries.
        texts: a corpus whose words are added to the vocabulary (split like the
            pre-tokenizer splits: runs of ``\\w`` characters or of punctuation).

    Returns:
        A tokenizer whose special tokens are ``<pad>`` (pad), ``<unk>`` (unk),
        ``<|im_end|>`` (eos), ``<|im_start|>`` and ``<image>``. ``<image>`` has the last id,
        ``len(tokenizer) - 1``, which is the default image token of a model built by
        :func:`compodistill.hf.llava.build_llava` with ``vocab_size=len(tokenizer)``. The
        vocabulary is sorted, so the same inputs always give the same ids. Unknown words map to ``<unk>``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = [PAD_TOKEN, UNK_TOKEN, IM_START, IM_END]
    words = set(BASE_WORDS) | {w.capitalize() for w in BASE_WORDS}
    words |= set(extra_words) | set(_words(texts))
    words |= set(string.ascii_letters) | set(string.digits) | set(string.punctuation)
    words |= {str(i) for i in range(100)}
    vocab = {tok: i for i, tok in enumerate(specials)}
    for word in sorted(words - set(specials) - {IMAGE_TOKEN}):
        vocab[word] = len(vocab)
    # Last id: compodistill.hf's builders default the image token to vocab_size - 1.
    vocab[IMAGE_TOKEN] = len(vocab)
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK_TOKEN))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.decoder = decoders.WordPiece(prefix="##")  # joins words with single spaces
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token=PAD_TOKEN,
        unk_token=UNK_TOKEN,
        eos_token=IM_END,
        additional_special_tokens=[IM_START, IMAGE_TOKEN],
    )
    tok.chat_template = CHATML_TEMPLATE
    return tok
