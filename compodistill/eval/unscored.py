"""Questions an evaluation could not score: counted by reason and reported, never silently
left out of a score's denominator (docs/evaluation.md#questions-that-cannot-be-scored)."""
from __future__ import annotations

import os
import warnings
from collections import Counter
from dataclasses import dataclass, field

from ..data.dataset import DataLossWarning

__all__ = ["Unscored", "encode_or_skip"]


@dataclass
class Unscored:
    """The questions left out of a score: ``{"id", "reason", "detail"}`` each."""

    items: list[dict] = field(default_factory=list)

    def add(self, example_id: str, reason: str, detail: str) -> None:
        self.items.append({"id": example_id, "reason": reason, "detail": detail})

    def counts(self) -> dict[str, int]:
        """How many, by reason (``{"missing image": 1}``)."""
        return dict(Counter(u["reason"] for u in self.items).most_common())

    def line(self, total: int) -> str:
        """``not scored: 1 of 24 (missing image: 1; first: id 'q3')``; '' when all were."""
        if not self.items:
            return ""
        reasons = ", ".join(f"{r}: {n}" for r, n in self.counts().items())
        first = ", ".join(repr(u["id"]) for u in self.items[:3])
        return f"not scored: {len(self.items)} of {total} ({reasons}; first ids {first})"

    def warn(self, task: str, total: int) -> None:
        if self.items:
            warnings.warn(f"{task} eval: {self.line(total)}; the scores are over the rest",
                          DataLossWarning, stacklevel=3)


def encode_or_skip(encode, image, example_id: str, unscored: Unscored):
    """``encode(image)``, or None (and ``image``'s question counted in ``unscored``) when the
    image file is missing or unreadable."""
    if isinstance(image, (str, os.PathLike)) and not os.path.isfile(image):
        unscored.add(example_id, "missing image", f"image file not found: {image}")
        return None
    try:
        return encode(image)
    except OSError as exc:  # PIL's UnidentifiedImageError, a truncated file
        unscored.add(example_id, "unreadable image", f"{image}: {exc}")
        return None
