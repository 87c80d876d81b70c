"""Data: LLaVA conversation datasets, collation, and the synthetic compositional generator.

- :class:`LlavaDataset`, :class:`LlavaCollator`, :class:`LengthGroupedSampler`,
  :func:`length_grouped_indices`: LLaVA JSON/JSONL for training (see :mod:`.llava`).
- :class:`ConversationEncoder`: the chat-template encoding shared with evaluation.
- :func:`generate_synthetic` / ``python -m compodistill.data.synthetic``: coloured shapes in
  spatial relations with captions, QA and SugarCrepe-style hard negatives.
- :func:`build_tiny_tokenizer`: a word-level tokenizer for tests and the CPU demo.
"""
from .llava import (
    IGNORE_INDEX,
    ConversationEncoder,
    ImageTransform,
    LengthGroupedSampler,
    LlavaCollator,
    LlavaDataset,
    MalformedRecordError,
    RecordProblem,
    length_grouped_indices,
)
from .synthetic import generate_synthetic
from .tiny_tokenizer import build_tiny_tokenizer

__all__ = [
    "IGNORE_INDEX",
    "ConversationEncoder",
    "ImageTransform",
    "LengthGroupedSampler",
    "LlavaCollator",
    "LlavaDataset",
    "MalformedRecordError",
    "RecordProblem",
    "build_tiny_tokenizer",
    "generate_synthetic",
    "length_grouped_indices",
]
