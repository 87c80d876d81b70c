"""LLaVA conversation data: records, chat-template encoding, label masking, collation.

A record (one JSON object, from a ``.json`` list or one ``.jsonl`` line) looks like::

    {"id": "42", "image": "shapes/42.png",            # or a list of files, or absent
     "conversations": [{"from": "human", "value": "<image>\\nWhat colour is the circle?"},
                       {"from": "gpt", "value": "red"}]}

Encoding (:class:`ConversationEncoder`, shared by training and evaluation so image tokens are
expanded identically in both):

1. The turns are rendered with the tokenizer's chat template (a plain ``USER:/ASSISTANT:``
   fallback when it has none). Each assistant turn's character span is found by rendering the
   conversation up to it with ``add_generation_prompt=True``: everything the template adds
   for that turn after the header (the reply and its end-of-turn token) is supervised.
2. The text is cut at assistant-span boundaries and at each ``<image>`` placeholder; text
   pieces are tokenized separately (no special tokens added), each placeholder becomes
   ``num_image_tokens`` copies of the image token id. Labels are -100 everywhere except in
   assistant spans; image tokens are never labelled.

Truncation to ``max_length`` never cuts an image block in half: with ``truncation="truncate"``
(default) the sequence is cut *before* the first image block that does not fit whole, and
that image and all later ones are dropped from ``pixel_values``; a sample left with no
supervised token is treated as malformed. With ``truncation="drop"`` every over-long sample is
treated as malformed. Malformed samples are skipped (with a count and one warning summary) or
raise :class:`MalformedRecordError`, by ``on_error``.
"""
from __future__ import annotations

import json
import os
import random
import warnings
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch
from torch.utils.data import Dataset, Sampler

IGNORE_INDEX = -100
ROLE_MAP = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
            "system": "system"}


class MalformedRecordError(ValueError):
    """A record that cannot be used; ``where`` names it (``"line 7"``, ``"record 3"``)."""

    def __init__(self, where: str, reason: str, detail: str):
        self.where, self.reason, self.detail = where, reason, detail
        super().__init__(f"{where}: {reason}: {detail}")


@dataclass(frozen=True)
class RecordProblem:
    """One skipped record: its location, a short reason category and the full message."""

    where: str
    reason: str
    message: str


# ----------------------------------------------------------------------------- images


class ImageTransform:
    """Resize to ``size`` (int or (h, w)), scale to [0, 1], normalise with ``mean``/``std``.

    The default mean = std = 0.5 maps pixels to [-1, 1] as SigLIP does. Returns (3, h, w) float32.
    """

    def __init__(self, size: int | tuple[int, int], mean: Sequence[float] = (0.5, 0.5, 0.5),
                 std: Sequence[float] = (0.5, 0.5, 0.5)):
        self.size = (size, size) if isinstance(size, int) else tuple(size)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)

    def __call__(self, image) -> torch.Tensor:
        import numpy as np
        from PIL import Image

        h, w = self.size
        image = image.convert("RGB")
        if image.size != (w, h):
            image = image.resize((w, h), Image.BICUBIC)
        x = torch.from_numpy(np.asarray(image, dtype=np.float32).copy()).permute(2, 0, 1) / 255.0
        return (x - self.mean) / self.std


def make_image_transform(image_processor_or_size) -> Callable[[list], torch.Tensor]:
    """Turn an HF image processor, a size, or a per-image callable into ``list[PIL] -> (n,3,H,W)``."""
    proc = image_processor_or_size
    if isinstance(proc, (int, tuple, list)):
        proc = ImageTransform(tuple(proc) if not isinstance(proc, int) else proc)
    if hasattr(proc, "preprocess"):  # a transformers image processor: batch call
        return lambda images: proc(images=[im.convert("RGB") for im in images],
                                   return_tensors="pt")["pixel_values"]
    if callable(proc):
        return lambda images: torch.stack([proc(im) for im in images])
    raise TypeError(f"image_processor_or_size must be an image processor, a size or a callable, "
                    f"got {type(image_processor_or_size).__name__}")


def open_image(path: str):
    """Open an image file as RGB (fully loaded, file closed)."""
    from PIL import Image

    with Image.open(path) as im:
        return im.convert("RGB")


# ----------------------------------------------------------------------------- encoding


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

    def encode(self, messages: list[dict], add_generation_prompt: bool = False) -> dict:
        """Token ids, labels and image blocks of one conversation.

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
        image_starts = set(images)
        ids: list[int] = []
        labels: list[int] = []
        blocks: list[tuple[int, int]] = []
        bounds = sorted(cuts)
        for a, b in zip(bounds[:-1], bounds[1:]):
            if a in image_starts:
                blocks.append((len(ids), len(ids) + self.num_image_tokens))
                ids += [self.image_token_id] * self.num_image_tokens
                labels += [IGNORE_INDEX] * self.num_image_tokens
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


# ----------------------------------------------------------------------------- records


def read_records(source) -> tuple[list[tuple[dict, str]], list[RecordProblem]]:
    """Read ``.json`` (a list), ``.jsonl`` (one object per line) or an in-memory list.

    Returns ``(record, where)`` pairs (``where`` = ``"line N"`` for JSONL, 1-based, or
    ``"record N"``, 0-based) and the problems of lines that are not valid JSON objects.
    """
    if not isinstance(source, (str, os.PathLike)):
        return [(r, f"record {i}") for i, r in enumerate(source)], []
    path = os.fspath(source)
    with open(path, encoding="utf-8") as f:
        if not path.endswith(".jsonl"):
            data = json.load(f)
            if isinstance(data, dict):  # {id: record} mapping
                data = list(data.values())
            return [(r, f"record {i}") for i, r in enumerate(data)], []
        out, problems = [], []
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                if not isinstance(rec, dict):
                    raise ValueError(f"expected a JSON object, got {type(rec).__name__}")
            except ValueError as exc:
                problems.append(RecordProblem(f"line {lineno}", "bad JSON",
                                              f"line {lineno}: bad JSON: {exc}"))
                continue
            out.append((rec, f"line {lineno}"))
        return out, problems


def parse_record(rec: Any, where: str, image_folder: str | None,
                 image_token: str = "<image>") -> tuple[list[dict], list[str]]:
    """Validate one LLaVA record; return chat messages and image paths.

    Raises :class:`MalformedRecordError` for a missing/unknown structure, a missing image
    file, no assistant turn, or a mismatch between ``<image>`` tags and images. A record with
    images but no tag gets them prepended to its first user turn (the LLaVA convention).
    """
    if isinstance(rec, dict) and rec.get("id") is not None:
        where = f"{where} (id {rec['id']!r})"
    if not isinstance(rec, dict) or not isinstance(rec.get("conversations"), list):
        raise MalformedRecordError(where, "bad record", "no 'conversations' list")
    messages = []
    for turn in rec["conversations"]:
        role = ROLE_MAP.get(turn.get("from")) if isinstance(turn, dict) else None
        if role is None or not isinstance(turn.get("value"), str):
            raise MalformedRecordError(where, "bad record", f"bad turn {turn!r:.80}")
        messages.append({"role": role, "content": turn["value"]})
    if not any(m["role"] == "assistant" and m["content"] for m in messages):
        raise MalformedRecordError(where, "no assistant turn", "nothing to supervise")
    images = rec.get("image") or []
    images = [images] if isinstance(images, str) else list(images)
    paths = []
    for name in images:
        path = os.path.join(image_folder, name) if image_folder else name
        if not os.path.isfile(path):
            raise MalformedRecordError(where, "missing image", f"image file not found: {path}")
        paths.append(path)
    tags = sum(m["content"].count(image_token) for m in messages)
    if paths and tags == 0:
        first = next(i for i, m in enumerate(messages) if m["role"] == "user")
        messages[first] = {"role": "user",
                           "content": (image_token + "\n") * len(paths) + messages[first]["content"]}
    elif tags != len(paths):
        raise MalformedRecordError(where, "image tag mismatch",
                                   f"{tags} {image_token} tags but {len(paths)} images")
    return messages, paths


class LlavaDataset(Dataset):
    """LLaVA conversation data encoded for a LLaVA-style model (see the module docstring).

    Args:
        records_or_path: a ``.json``/``.jsonl`` path or a list of record dicts.
        image_folder: folder the records' image paths are relative to (None: as given).
        tokenizer: the student's tokenizer.
        image_processor_or_size: see :class:`ConversationEncoder`.
        num_image_tokens: visual features per image.
        image_token: the placeholder string; ``image_token_id`` defaults to its tokenizer id.
        max_length: maximum tokens per sample (docs/stages.md: 1536).
        on_error: ``"skip"`` (count, keep in :attr:`problems`, warn once) or ``"raise"``.
        truncation: ``"truncate"`` (cut before the first image that does not fit) or ``"drop"``.
        preprocess: tokenize everything up front (exact :attr:`lengths`, problems found at
            once). ``False`` tokenizes in ``__getitem__`` and estimates lengths from word counts;
            malformed samples found then are returned as ``None`` (``"skip"``), which
            :class:`LlavaCollator` drops.

    Items are dicts: ``input_ids``, ``labels`` (LongTensor (L,)), ``pixel_values``
    ((n_images, 3, H, W) or None).
    """

    def __init__(self, records_or_path, image_folder: str | None, tokenizer,
                 image_processor_or_size, *, num_image_tokens: int, image_token: str = "<image>",
                 image_token_id: int | None = None, max_length: int = 1536,
                 on_error: str = "skip", truncation: str = "truncate", preprocess: bool = True,
                 system_prompt: str | None = None, progress: bool = False):
        if on_error not in ("skip", "raise"):
            raise ValueError(f"on_error must be 'skip' or 'raise', got {on_error!r}")
        if truncation not in ("truncate", "drop"):
            raise ValueError(f"truncation must be 'truncate' or 'drop', got {truncation!r}")
        self.encoder = ConversationEncoder(
            tokenizer, image_processor_or_size, num_image_tokens=num_image_tokens,
            image_token=image_token, image_token_id=image_token_id, system_prompt=system_prompt)
        self.max_length, self.on_error, self.truncation = max_length, on_error, truncation
        self.problems: list[RecordProblem] = []
        records, bad_lines = read_records(records_or_path)
        for problem in bad_lines:
            self._report(MalformedRecordError(problem.where, problem.reason,
                                              problem.message.split(": ", 2)[-1]))
        self.samples: list[dict] = []
        iterator = records
        if progress:
            from tqdm.auto import tqdm
            iterator = tqdm(records, desc="encoding records")
        for rec, where in iterator:
            try:
                messages, paths = parse_record(rec, where, image_folder, image_token)
                sample = {"messages": messages, "images": paths, "where": where}
                if preprocess:
                    sample.update(self._encode(sample))
                self.samples.append(sample)
            except MalformedRecordError as exc:
                self._report(exc)
        self.num_records = len(records) + len(bad_lines)
        if self.problems:
            warnings.warn(self.summary(), stacklevel=2)

    # -- errors
    def _report(self, exc: MalformedRecordError) -> None:
        if self.on_error == "raise":
            raise exc
        if any(p.where == exc.where for p in self.problems):
            return  # a lazily found problem is met again every epoch: count it once
        self.problems.append(RecordProblem(exc.where, exc.reason, str(exc)))

    @property
    def num_skipped(self) -> int:
        """How many records were skipped as malformed (so far: lazily found ones included)."""
        return len(self.problems)

    def summary(self) -> str:
        """One line: how many records were skipped, by reason, and the first few locations."""
        counts = Counter(p.reason for p in self.problems)
        by_reason = ", ".join(f"{n} {r}" for r, n in counts.most_common())
        first = "; ".join(p.message for p in self.problems[:3])
        return (f"LlavaDataset: skipped {len(self.problems)} of {self.num_records} records "
                f"({by_reason}). First: {first}")

    # -- encoding
    def _encode(self, sample: dict) -> dict:
        where = sample["where"]
        try:
            enc = self.encoder.encode(sample["messages"])
        except ValueError as exc:
            raise MalformedRecordError(where, "template", str(exc)) from None
        if len(enc["input_ids"]) > self.max_length:
            if self.truncation == "drop":
                raise MalformedRecordError(where, "too long", f"{len(enc['input_ids'])} tokens "
                                           f"> max_length {self.max_length}")
            enc, _ = truncate_encoding(enc, self.max_length)
            if all(t == IGNORE_INDEX for t in enc["labels"]):
                raise MalformedRecordError(where, "too long", "no assistant token left after "
                                           f"truncation to {self.max_length}")
        return {"input_ids": enc["input_ids"], "labels": enc["labels"],
                "num_images": len(enc["image_blocks"])}

    @property
    def lengths(self) -> list[int]:
        """Token count per sample (exact when preprocessed, else a word-count estimate)."""
        out = []
        for s in self.samples:
            if "input_ids" in s:
                out.append(len(s["input_ids"]))
            else:
                words = sum(len(m["content"].split()) for m in s["messages"])
                out.append(min(self.max_length, words + len(s["images"]) * (
                    self.encoder.num_image_tokens - 1)))
        return out

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict | None:
        sample = self.samples[index]
        try:
            enc = sample if "input_ids" in sample else self._encode(sample)
            paths = sample["images"][: enc["num_images"]]
            try:
                pixels = self.encoder.load_images(paths)
            except (OSError, ValueError) as exc:
                raise MalformedRecordError(sample["where"], "unreadable image", str(exc)) from None
        except MalformedRecordError as exc:
            self._report(exc)
            warnings.warn(str(exc), stacklevel=2)
            return None
        return {"input_ids": torch.tensor(enc["input_ids"], dtype=torch.long),
                "labels": torch.tensor(enc["labels"], dtype=torch.long),
                "pixel_values": pixels}


# ----------------------------------------------------------------------------- batching


class LlavaCollator:
    """Pad a list of samples into a batch for ``LlavaForConditionalGeneration``.

    Returns ``input_ids`` and ``attention_mask`` (B, L), ``labels`` (B, L, -100 on padding;
    only when the samples have labels) and ``pixel_values``: every sample's images
    concatenated in order, (total_images, 3, H, W), which is how LLaVA matches images to
    image tokens; omitted when the batch has no image. ``None`` samples (lazily found
    malformed records) are dropped. Use ``padding_side="left"`` for generation.
    """

    def __init__(self, pad_token_id: int, padding_side: str = "right",
                 pad_to_multiple_of: int | None = None):
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        self.pad_token_id, self.padding_side = int(pad_token_id), padding_side
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, features: list[dict | None]) -> dict[str, torch.Tensor]:
        features = [f for f in features if f is not None]
        if not features:
            raise ValueError("LlavaCollator: empty batch (all samples malformed?)")
        ids = [torch.as_tensor(f["input_ids"], dtype=torch.long) for f in features]
        length = max(len(x) for x in ids)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        has_labels = all(f.get("labels") is not None for f in features)
        batch_ids = torch.full((len(ids), length), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(ids), length), dtype=torch.long)
        labels = torch.full((len(ids), length), IGNORE_INDEX, dtype=torch.long)
        for i, (x, f) in enumerate(zip(ids, features)):
            sl = slice(0, len(x)) if self.padding_side == "right" else slice(length - len(x), length)
            batch_ids[i, sl] = x
            mask[i, sl] = 1
            if has_labels:
                labels[i, sl] = torch.as_tensor(f["labels"], dtype=torch.long)
        batch = {"input_ids": batch_ids, "attention_mask": mask}
        if has_labels:
            batch["labels"] = labels
        pixels = [f["pixel_values"] for f in features if f.get("pixel_values") is not None]
        if pixels:
            batch["pixel_values"] = torch.cat(pixels, dim=0)
        return batch


def length_grouped_indices(lengths: Sequence[int], batch_size: int, *, mega_batch_mult: int = 50,
                           seed: int = 0) -> list[int]:
    """A random permutation whose consecutive ``batch_size`` chunks have similar lengths.

    Shuffle, split into mega-batches of ``mega_batch_mult * batch_size``, sort each by length
    (longest first) and move the longest batch to the front, so an out-of-memory shows up at
    the first step (the same scheme as transformers' ``LengthGroupedSampler``).
    """
    rng = random.Random(seed)
    indices = list(range(len(lengths)))
    rng.shuffle(indices)
    mega = max(1, mega_batch_mult * batch_size)
    groups = [sorted(indices[i: i + mega], key=lambda j: -lengths[j])
              for i in range(0, len(indices), mega)]
    if groups:
        longest = max(range(len(groups)), key=lambda g: lengths[groups[g][0]])
        groups[0][0], groups[longest][0] = groups[longest][0], groups[0][0]
    return [i for g in groups for i in g]


class LengthGroupedSampler(Sampler[int]):
    """Sampler over :func:`length_grouped_indices`; call :meth:`set_epoch` for a new order."""

    def __init__(self, lengths: Sequence[int], batch_size: int, *, mega_batch_mult: int = 50,
                 seed: int = 0):
        self.lengths, self.batch_size = list(lengths), batch_size
        self.mega_batch_mult, self.seed, self.epoch = mega_batch_mult, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self) -> Iterator[int]:
        return iter(length_grouped_indices(self.lengths, self.batch_size,
                                           mega_batch_mult=self.mega_batch_mult,
                                           seed=self.seed + self.epoch))

