"""LLaVA training data: records parsed, encoded and truncated into model-ready samples.

Truncation to ``max_length`` never cuts an image block in half: with ``truncation="truncate"``
(default) the sequence is cut *before* the first image block that does not fit whole, and
that image and all later ones are dropped from ``pixel_values``; a sample left with no
supervised token is treated as malformed. With ``truncation="drop"`` every over-long sample is
treated as malformed. Malformed samples are skipped (with a count and one warning summary) or
raise :class:`MalformedRecordError`, by ``on_error``.
"""
from __future__ import annotations

import warnings
from collections import Counter

import torch
from torch.utils.data import Dataset

from .encoding import IGNORE_INDEX, ConversationEncoder, truncate_encoding
from .images import open_image
from .records import (MalformedRecordError, RecordProblem, parse_record, read_records,
                      record_where)

__all__ = ["LlavaDataset", "DataLossWarning", "records_skipped_line"]


class DataLossWarning(UserWarning):
    """Records were dropped from the training data. ``--quiet`` never hides it."""


def records_skipped_line(counts: dict, first: list[str]) -> str:
    """``records_skipped: {missing image: 1, unreadable image: 1} (first: record 1 (id 'a'),
    ...)``; ``records_skipped: none`` when every record was used."""
    if not counts:
        return "records_skipped: none"
    # most first, then by name: the same line from a data set and from a cache's index.json
    text = ", ".join(f"{reason}: {n}" for reason, n in sorted(counts.items(),
                                                               key=lambda kv: (-kv[1], kv[0])))
    return f"records_skipped: {{{text}}} (first: {'; '.join(first)})"


class LlavaDataset(Dataset):
    """LLaVA conversation data encoded for a LLaVA-style model.

    Records: :mod:`.records`; encoding: :mod:`.encoding`; truncation: this module's docstring.

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
        image_inputs: a family's per-image token counts and pixel inputs
            (:func:`~compodistill.data.family_inputs.family_image_inputs`); None: LLaVA's
            ``num_image_tokens`` per image and ``image_processor_or_size``.

    Items are dicts: ``input_ids``, ``labels`` (LongTensor (L,)), ``pixel_values``
    ((n_images, 3, H, W) or None), plus the family's extra inputs (``image_grid_thw``).
    """

    def __init__(self, records_or_path, image_folder: str | None, tokenizer,
                 image_processor_or_size, *, num_image_tokens: int, image_token: str = "<image>",
                 image_token_id: int | None = None, max_length: int = 1536,
                 on_error: str = "skip", truncation: str = "truncate", preprocess: bool = True,
                 system_prompt: str | None = None, progress: bool = False,
                 image_inputs=None):
        if on_error not in ("skip", "raise"):
            raise ValueError(f"on_error must be 'skip' or 'raise', got {on_error!r}")
        if truncation not in ("truncate", "drop"):
            raise ValueError(f"truncation must be 'truncate' or 'drop', got {truncation!r}")
        self.encoder = ConversationEncoder(
            tokenizer, image_processor_or_size, num_image_tokens=num_image_tokens,
            image_token=image_token, image_token_id=image_token_id, system_prompt=system_prompt)
        self.max_length, self.on_error, self.truncation = max_length, on_error, truncation
        self.image_inputs = image_inputs
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
            where = record_where(rec, where)  # every problem names the record's id
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
            warnings.warn(self.summary(), DataLossWarning, stacklevel=2)

    # -- errors
    def _report(self, exc: MalformedRecordError) -> bool:
        """Count ``exc``'s record; True the first time it is met."""
        if self.on_error == "raise":
            raise exc
        if any(p.where == exc.where for p in self.problems):
            return False  # a lazily found problem is met again every epoch: count it once
        self.problems.append(RecordProblem(exc.where, exc.reason, str(exc)))
        return True

    def records_skipped(self) -> dict[str, int]:
        """How many records were skipped, by reason (``{"missing image": 1, ...}``)."""
        return dict(Counter(p.reason for p in self.problems).most_common())

    def first_skipped(self, n: int = 3) -> list[str]:
        """Where the first ``n`` skipped records are (``"record 3 (id '7')"``)."""
        return [p.where for p in self.problems[:n]]

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
        image_ids = self._image_ids(sample)  # its own "unreadable image" error, not "template"
        try:
            enc = self.encoder.encode(sample["messages"], image_ids=image_ids)
        except ValueError as exc:
            raise MalformedRecordError(where, "template", str(exc)) from None
        if len(enc["input_ids"]) > self.max_length:
            if self.truncation == "drop":
                raise MalformedRecordError(where, "too long", f"{len(enc['input_ids'])} tokens "
                                           f"> max_length {self.max_length}")
            enc, kept = truncate_encoding(enc, self.max_length)
            total = len(image_ids or ())
            if kept == 1 < total and getattr(self.image_inputs, "counts_per_image_count", False):
                # LLaVA-OneVision: a lone image is packed otherwise than one of several
                raise MalformedRecordError(where, "too long", f"truncation to max_length "
                                           f"{self.max_length} keeps 1 of {total} images, whose "
                                           f"token counts were made for {total}")
            if all(t == IGNORE_INDEX for t in enc["labels"]):
                raise MalformedRecordError(where, "too long", "no assistant token left after "
                                           f"truncation to {self.max_length}")
        return {"input_ids": enc["input_ids"], "labels": enc["labels"],
                "num_images": len(enc["image_blocks"])}

    def _image_ids(self, sample: dict) -> list[list[int]] | None:
        # Every image's header, for every family: an unreadable image is found when the data
        # set is built, not later inside the loader (the family's token counts need the size).
        from PIL import Image

        sizes = []
        for path in sample["images"]:
            try:
                with Image.open(path) as im:  # the header only: no pixels decoded
                    sizes.append(im.size)
            except OSError as exc:
                raise MalformedRecordError(sample["where"], "unreadable image", str(exc)) from None
        if self.image_inputs is None:
            return None
        return [self.image_inputs.block(n) for n in self.image_inputs.token_counts(sizes)]

    @property
    def lengths(self) -> list[int]:
        """Token count per sample (exact when preprocessed, else a word-count estimate).

        Opens no image, so it is cheap enough for :class:`LengthGroupedSampler`.
        """
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
                if self.image_inputs is not None and paths:
                    extras = self.image_inputs([open_image(p) for p in paths])
                else:
                    extras = {"pixel_values": self.encoder.load_images(paths)}
            except (OSError, ValueError) as exc:
                raise MalformedRecordError(sample["where"], "unreadable image", str(exc)) from None
        except MalformedRecordError as exc:
            if self._report(exc):  # once per record, not once per epoch
                warnings.warn(f"LlavaDataset: skipped {exc}", DataLossWarning, stacklevel=2)
            return None
        return {"input_ids": torch.tensor(enc["input_ids"], dtype=torch.long),
                "labels": torch.tensor(enc["labels"], dtype=torch.long),
                "pixel_values": None, **extras}
