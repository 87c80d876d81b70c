"""Chat-template encoding of LLaVA conversations, shared by training and evaluation so image
tokens are expanded identically in both.

1. The turns are rendered with the tokenizer's chat template (a plain ``USER:/ASSISTANT:``
   fallback when it has none). Each assistant turn's character span is found by rendering the
   conversation up to it with ``add_generation_prompt=True``: everything the template adds
   for that turn after the header (the reply and its end-of-turn token) is supervised.
2. The text is cut at assistant-span boundaries and at each ``<image>`` placeholder; text
   pieces are tokenized separately (no special tokens added), each placeholder becomes
   ``num_image_tokens`` copies of the image token id. Labels are -100 everywhere except in
   assistant spans; image tokens are never labelled.

:func:`truncate_encoding` cuts an encoding to ``max_length`` without splitting an image block.
"""
from __future__ import annotations

import os
from typing import Sequence

import torch

from .images import make_image_transform, open_image

__all__ = ["IGNORE_INDEX", "ConversationEncoder", "simple_chat_template", "truncate_encoding"]

IGNORE_INDEX = -100


def simple_chat_template(messages: list[dict], add_generation_prompt: bool = False,
                         eos: str = "") -> str:
    """Fallback template for tokenizers without one: ``USER: ...\\nASSISTANT: ...<eos>\\n``."""
    out = []
    for m in messages:
        if m["role"] == "assistant":
            out.append(f"ASSISTANT: {m['content']}{eos}\n")
        else:
            out.append(f"{m['role'].upper()}: {m['content']}\n")
    if add_generation_prompt:
        out.append("ASSISTANT:")
    return "".join(out)


class ConversationEncoder:
    """Chat-template rendering, tokenization, label masking and image loading.

    Args:
        tokenizer: a transformers tokenizer (its ``chat_template`` is used when set).
        image_processor_or_size: an HF image processor, an int / (h, w) size for
            :class:`ImageTransform`, or a callable mapping one PIL image to a (3, H, W) tensor.
        num_image_tokens: visual features per image (each ``<image>`` becomes this many tokens).
        image_token: the placeholder string in the text.
        image_token_id: id written for image tokens; default: the tokenizer's id of
            ``image_token`` (must exist then). Use the model config's ``image_token_id``.
        system_prompt: optional system message prepended to every conversation.
    """

    def __init__(self, tokenizer, image_processor_or_size, *, num_image_tokens: int,
                 image_token: str = "<image>", image_token_id: int | None = None,
                 system_prompt: str | None = None):
        if num_image_tokens < 1:
            raise ValueError(f"num_image_tokens must be >= 1, got {num_image_tokens}")
        self.tokenizer = tokenizer
        self.num_image_tokens = int(num_image_tokens)
        self.image_token = image_token
        if image_token_id is None:
            image_token_id = tokenizer.convert_tokens_to_ids(image_token)
            if image_token_id is None or image_token_id == tokenizer.unk_token_id:
                raise ValueError(f"the tokenizer has no token {image_token!r}: pass image_token_id "
                                 f"(the model config's image_token_id)")
        self.image_token_id = int(image_token_id)
        self.system_prompt = system_prompt
        self.transform = make_image_transform(image_processor_or_size)

    # -- text
    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        """The chat-template string of ``messages`` (role/content dicts)."""
        if self.system_prompt and (not messages or messages[0]["role"] != "system"):
            messages = [{"role": "system", "content": self.system_prompt}] + list(messages)
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=add_generation_prompt)
        return simple_chat_template(messages, add_generation_prompt, self.tokenizer.eos_token or "")

    def _assistant_spans(self, messages: list[dict], full: str) -> list[tuple[int, int]]:
        spans, cursor = [], 0
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            pre = self.render(messages[:i], add_generation_prompt=True)
            upto = self.render(messages[: i + 1])
            if upto.startswith(pre) and full.startswith(upto) and len(pre) >= cursor:
                spans.append((len(pre), len(upto)))
                cursor = len(upto)
                continue
            # Template not prefix-consistent (e.g. it rewrites earlier turns): label the reply text.
            pos = full.find(m["content"], cursor)
            if pos < 0:
                raise ValueError(f"cannot locate assistant turn {i} in the rendered chat template")
            spans.append((pos, pos + len(m["content"])))
            cursor = pos + len(m["content"])
        return spans

    def encode(self, messages: list[dict], add_generation_prompt: bool = False,
               image_ids: Sequence[list[int]] | None = None) -> dict:
        """Token ids, labels and image blocks of one conversation.

        ``image_ids``: per image, the token ids it becomes (families with a token count per
        image, :mod:`.family_inputs`); default ``num_image_tokens`` image token ids each.

        Returns a dict with ``input_ids`` and ``labels`` (lists of int, -100 outside assistant
        turns and on image tokens) and ``image_blocks``: the ``(start, end)`` token span of each
        expanded image, in order.
        """
        full = self.render(messages, add_generation_prompt)
        spans = [] if add_generation_prompt and not any(
            m["role"] == "assistant" for m in messages) else self._assistant_spans(messages, full)
        cuts = {0, len(full)}
        for s, e in spans:
            cuts.update((s, e))
        images, pos = [], full.find(self.image_token)
        while pos >= 0:
            images.append(pos)
            cuts.update((pos, pos + len(self.image_token)))
            pos = full.find(self.image_token, pos + len(self.image_token))
        if image_ids is not None and len(image_ids) != len(images):
            raise ValueError(f"{len(images)} {self.image_token} tags but token ids for "
                             f"{len(image_ids)} images")
        image_starts = set(images)
        ids: list[int] = []
        labels: list[int] = []
        blocks: list[tuple[int, int]] = []
        bounds = sorted(cuts)
        for a, b in zip(bounds[:-1], bounds[1:]):
            if a in image_starts:
                block = ([self.image_token_id] * self.num_image_tokens if image_ids is None
                         else list(image_ids[len(blocks)]))
                blocks.append((len(ids), len(ids) + len(block)))
                ids += block
                labels += [IGNORE_INDEX] * len(block)
                continue
            piece = self.tokenizer(full[a:b], add_special_tokens=False)["input_ids"]
            supervised = any(s <= a and b <= e for s, e in spans)
            ids += piece
            labels += piece if supervised else [IGNORE_INDEX] * len(piece)
        return {"input_ids": ids, "labels": labels, "image_blocks": blocks}

    def load_images(self, paths: Sequence[str]) -> torch.Tensor | None:
        """Open and transform image files: (n, 3, H, W), or None for no paths."""
        if not paths:
            return None
        return self.transform([open_image(p) for p in paths])

    def prompt_ids(self, prompt: str, num_images: int = 0) -> torch.Tensor:
        """Token ids of one user turn plus the generation prompt, for evaluation.

        ``prompt`` holds one ``<image>`` tag per image; when it has none, ``num_images`` tags
        are prepended (each followed by a newline), as in the training data.
        """
        if num_images and self.image_token not in prompt:
            prompt = (self.image_token + "\n") * num_images + prompt
        enc = self.encode([{"role": "user", "content": prompt}], add_generation_prompt=True)
        if len(enc["image_blocks"]) != num_images:
            raise ValueError(f"prompt has {len(enc['image_blocks'])} {self.image_token} tags "
                             f"but {num_images} images")
        return torch.tensor(enc["input_ids"], dtype=torch.long)

    def pixels(self, images: Sequence) -> torch.Tensor | None:
        """Transform paths or PIL images to (n, 3, H, W); None for no images."""
        if not images:
            return None
        return self.transform([open_image(im) if isinstance(im, (str, os.PathLike)) else im
                               for im in images])

    def encode_prompt(self, prompt: str, images: Sequence = ()) -> dict:
        """:meth:`prompt_ids` and :meth:`pixels` as one sample for :class:`LlavaCollator`."""
        return {"input_ids": self.prompt_ids(prompt, len(images)),
                "pixel_values": self.pixels(images)}


def truncate_encoding(enc: dict, max_length: int) -> tuple[dict, int]:
    """Cut ``enc`` to at most ``max_length`` tokens without splitting an image block.

    The cut moves back to the start of the first image block that does not fit whole.
    Returns the truncated encoding and how many leading images it keeps.
    """
    n = len(enc["input_ids"])
    if n <= max_length:
        return enc, len(enc["image_blocks"])
    cut = max_length
    for s, e in enc["image_blocks"]:
        if s < cut < e:
            cut = s
            break
    kept = [(s, e) for s, e in enc["image_blocks"] if e <= cut]
    return ({"input_ids": enc["input_ids"][:cut], "labels": enc["labels"][:cut],
             "image_blocks": kept}, len(kept))

