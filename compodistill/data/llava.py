"""LLaVA conversation data, re-exported from the modules that hold it.

:mod:`.records` (parsing, validation), :mod:`.images` (pixel transforms), :mod:`.encoding`
(chat template, image tokens, labels, truncation), :mod:`.dataset` (:class:`LlavaDataset`),
:mod:`.collate` (:class:`LlavaCollator`), :mod:`.sampler` (:class:`LengthGroupedSampler`).
Kept so that ``from compodistill.data.llava import X`` keeps working.
"""
from .collate import LlavaCollator
from .dataset import LlavaDataset
from .encoding import IGNORE_INDEX, ConversationEncoder, simple_chat_template, truncate_encoding
from .images import ImageTransform, make_image_transform, open_image
from .records import ROLE_MAP, MalformedRecordError, RecordProblem, parse_record, read_records
from .sampler import LengthGroupedSampler, length_grouped_indices

__all__ = ["IGNORE_INDEX", "ROLE_MAP", "ConversationEncoder", "ImageTransform",
           "LengthGroupedSampler", "LlavaCollator", "LlavaDataset", "MalformedRecordError",
           "RecordProblem", "length_grouped_indices", "make_image_transform", "open_image",
           "parse_record", "read_records", "simple_chat_template", "truncate_encoding"]
