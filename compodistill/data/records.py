"""LLaVA records: reading ``.json``/``.jsonl`` files and validating each record.

A record (one JSON object, from a ``.json`` list or one ``.jsonl`` line) looks like::

    {"id": "42", "image": "shapes/42.png",            # or a list of files, or absent
     "conversations": [{"from": "human", "value": "<image>\\nWhat colour is the circle?"},
                       {"from": "gpt", "value": "red"}]}

:func:`parse_record` turns one into chat messages (``role``/``content`` dicts, roles mapped
by :data:`ROLE_MAP`) and image paths, or raises :class:`MalformedRecordError`.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

__all__ = ["ROLE_MAP", "MalformedRecordError", "RecordProblem", "parse_record", "read_records",
           "record_where"]

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


def record_where(rec: Any, where: str) -> str:
    """``where`` with the record's id when it has one: ``"record 3 (id '7')"``."""
    if isinstance(rec, dict) and rec.get("id") is not None:
        tag = f" (id {rec['id']!r})"
        return where if where.endswith(tag) else where + tag
    return where


def parse_record(rec: Any, where: str, image_folder: str | None,
                 image_token: str = "<image>") -> tuple[list[dict], list[str]]:
    """Validate one LLaVA record; return chat messages and image paths.

    Raises :class:`MalformedRecordError` for a missing/unknown structure, a missing image
    file, no assistant turn, or a mismatch between ``<image>`` tags and images. A record with
    images but no tag gets them prepended to its first user turn (the LLaVA convention).
    """
    where = record_where(rec, where)
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
