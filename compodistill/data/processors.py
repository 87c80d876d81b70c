"""The tokenizer and image processor of a checkpoint folder, from its own processor when it has
one (docs/evaluation.md#processors).

A checkpoint saved with a transformers ``...Processor`` (image processor, tokenizer and chat
template in one object: ``processor_config.json``, or in the older layout of hub checkpoints a
``preprocessor_config.json`` naming its ``processor_class``) is loaded with ``AutoProcessor``
and its parts are used, so the chat template is the processor's even when the tokenizer files
carry none. A folder with only a tokenizer (and maybe ``preprocessor_config.json``, an image
processor saved on its own, as the trainer writes) gives those parts.

Processors that bundle a video processor (Qwen2.5-VL, Qwen3-VL, LLaVA-OneVision, InternVL)
need torchvision to be built; where it is missing, ``AutoProcessor`` fails and the parts are
loaded one by one from the same folder instead (``AutoImageProcessor`` reads the image
processor inside ``processor_config.json`` too), with the processor's chat template
(``chat_template.jinja`` / ``chat_template.json``) when the tokenizer has none, and a warning
saying why.
"""
from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass
from typing import Any

__all__ = ["PROCESSOR_FILE", "ProcessorParts", "has_processor", "load_image_processor",
           "load_processor_parts"]

PROCESSOR_FILE = "processor_config.json"  # what ProcessorMixin.save_pretrained writes
IMAGE_PROCESSOR_FILE = "preprocessor_config.json"  # an image processor saved on its own
TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json")  # a processor's chat template


@dataclass
class ProcessorParts:
    """``tokenizer`` (with the chat template), ``image_processor`` (None when the folder has
    none) and ``source``: ``"processor"`` (AutoProcessor), or ``"parts"``."""

    tokenizer: Any
    image_processor: Any
    source: str


def load_processor_parts(path) -> ProcessorParts:
    """The tokenizer and image processor saved in the folder ``path`` (local files only).

    Raises:
        OSError: the folder has no tokenizer (from transformers, naming the folder).
    """
    path = os.fspath(path)
    if has_processor(path):
        from transformers import AutoProcessor

        try:
            processor = AutoProcessor.from_pretrained(path, local_files_only=True)
        except (AttributeError, ImportError, ValueError) as error:
            # e.g. a bundled video processor without torchvision: the parts still load.
            reason = " ".join(str(error).split())
            warnings.warn(f"{path}: AutoProcessor failed ({type(error).__name__}: {reason}); "
                          f"loading its tokenizer and image processor separately", stacklevel=2)
        else:
            tokenizer = getattr(processor, "tokenizer", None)
            if tokenizer is not None:
                template = getattr(processor, "chat_template", None)
                if template and not getattr(tokenizer, "chat_template", None):
                    tokenizer.chat_template = template
                return ProcessorParts(tokenizer, getattr(processor, "image_processor", None),
                                      "processor")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = _saved_template(path)
    return ProcessorParts(tokenizer, load_image_processor(path), "parts")


def load_image_processor(path):
    """The image processor saved in the folder ``path`` (on its own or inside a processor),
    or None when there is none."""
    from transformers import AutoImageProcessor

    path = os.fspath(path)
    if not any(os.path.isfile(os.path.join(path, f)) for f in (PROCESSOR_FILE,
                                                                IMAGE_PROCESSOR_FILE)):
        return None
    return AutoImageProcessor.from_pretrained(path, local_files_only=True)


def has_processor(path) -> bool:
    """Whether the folder holds a whole processor (not just a tokenizer and image processor)."""
    if os.path.isfile(os.path.join(path, PROCESSOR_FILE)):
        return True
    image_config = os.path.join(path, IMAGE_PROCESSOR_FILE)
    if not os.path.isfile(image_config):
        return False
    with open(image_config, encoding="utf-8") as f:
        return bool(json.load(f).get("processor_class"))


def _saved_template(path) -> str | None:
    # The tokenizer reads chat_template.jinja itself; chat_template.json is the processor's.
    for name in TEMPLATE_FILES:
        file = os.path.join(path, name)
        if os.path.isfile(file):
            with open(file, encoding="utf-8") as f:
                text = f.read()
            return json.loads(text)["chat_template"] if name.endswith(".json") else text
    return None
