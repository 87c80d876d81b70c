"""Data: LLaVA conversation datasets, collation, and the synthetic compositional generator.

- :class:`LlavaDataset`, :class:`LlavaCollator`, :class:`LengthGroupedSampler`,
  :func:`length_grouped_indices`: LLaVA JSON/JSONL for training (:mod:`.records`,
  :mod:`.dataset`, :mod:`.collate`, :mod:`.sampler`).
- :class:`ConversationEncoder`: the chat-template encoding shared with evaluation
  (:mod:`.encoding`).
- :func:`generate_synthetic` / ``python -m compodistill.data.synthetic``: coloured shapes in
  spatial relations with captions, QA and SugarCrepe-style hard negatives.
- :func:`build_tiny_tokenizer`: a word-level tokenizer for tests and the CPU demo.
"""
from .collate import LlavaCollator
from .dataset import DataLossWarning, LlavaDataset, records_skipped_line
from .encoding import IGNORE_INDEX, ConversationEncoder
from .images import ImageTransform
from .records import MalformedRecordError, RecordProblem
from .sampler import LengthGroupedSampler, length_grouped_indices
from .synthetic import generate_synthetic
from .tiny_tokenizer import build_tiny_tokenizer

__all__ = [
    "IGNORE_INDEX",
    "ConversationEncoder",
    "DataLossWarning",
    "records_skipped_line",
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
