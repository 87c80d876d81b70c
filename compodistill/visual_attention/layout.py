"""Which query rows and visual key columns enter the visual-attention loss.

A visual map of one layer is stored as a dense ``(B, Qmax, Vmax)`` float32 tensor:
entry ``[b, r, c]`` is the head-mean attention probability of query position
``query_index[b, r]`` on key position ``visual_index[b, c]``. Rows ``r >= query_count[b]``
and columns ``c >= visual_count[b]`` are padding and hold 0, as do masked pairs
(a causal key after its query, a padded key). This is ``O(B * |Q| * Nv)`` memory:
the attention matrix itself never exists.

Student maps, teacher targets and every backend (reference, chunked PyTorch, Triton)
share this layout, so a target computed by one backend is a valid target for another.
"""
from __future__ import annotations

import dataclasses
import numbers

from dataclasses import dataclass
from typing import Sequence, Union

import torch

Spans = Sequence[Sequence[tuple[int, int]]]
VisualArg = Union[torch.Tensor, Spans]
QueryArg = Union[str, torch.Tensor]

QUERY_MODES = ("all", "visual", "text")


@dataclass(frozen=True)
class VisualLayout:
    """Gathered query rows and visual columns of a batch (see module docstring).

    Build it with :func:`visual_layout`; kernels only read the index tensors.
    """

    query_index: torch.Tensor  # (B, Qmax) int64, ascending positions, 0 beyond query_count
    query_count: torch.Tensor  # (B,) int64
    visual_index: torch.Tensor  # (B, Vmax) int64, ascending positions, 0 beyond visual_count
    visual_count: torch.Tensor  # (B,) int64
    key_mask: torch.Tensor | None  # (B, N) bool, True = real token; None = no padding
    seq_len: int
    causal: bool
    # Sliding window (causal only): query i sees keys j with i - j < window; None = no window.
    window: int | None = None

    @property
    def batch_size(self) -> int:
        return self.query_index.shape[0]

    @property
    def map_shape(self) -> tuple[int, int, int]:
        return (self.batch_size, self.query_index.shape[1], self.visual_index.shape[1])

    @property
    def query_valid(self) -> torch.Tensor:
        """(B, Qmax) bool: real (non-padding) gathered query rows."""
        return _count_mask(self.query_count, self.query_index.shape[1])

    @property
    def visual_valid(self) -> torch.Tensor:
        """(B, Vmax) bool: real gathered visual columns."""
        return _count_mask(self.visual_count, self.visual_index.shape[1])

    def allowed(self) -> torch.Tensor:
        """(B, Qmax, Vmax) bool: pairs whose probability may be non-zero.

        A pair is allowed when both row and column are real, the key is not padding and,
        if causal, the key does not come after the query (nor lie ``window`` or more
        positions before it).
        """
        ok = self.query_valid[:, :, None] & self.visual_valid[:, None, :]
        if self.causal:
            ok = ok & (self.visual_index[:, None, :] <= self.query_index[:, :, None])
        if self.window is not None:
            ok = ok & (self.query_index[:, :, None] - self.visual_index[:, None, :] < self.window)
        return ok

    def with_window(self, window: int | None) -> "VisualLayout":
        """The same layout for a sliding-window layer (docs/families.md); a window of N or
        more changes nothing and gives ``self``."""
        if window is None or window >= self.seq_len:
            return self
        if not self.causal:
            raise ValueError("a sliding window needs a causal layout")
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ValueError(f"window must be a positive int, got {window!r}")
        return dataclasses.replace(self, window=int(window))

    def to(self, device: torch.device | str) -> "VisualLayout":
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return VisualLayout(
            move(self.query_index), move(self.query_count), move(self.visual_index),
            move(self.visual_count), move(self.key_mask), self.seq_len, self.causal,
            self.window,
        )


def _count_mask(count: torch.Tensor, width: int) -> torch.Tensor:
    return torch.arange(width, device=count.device)[None, :] < count[:, None]


def _is_int(x) -> bool:
    if isinstance(x, torch.Tensor):
        return x.ndim == 0 and not x.is_floating_point()
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def response_rows(labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """The (B, N) bool query rows that predict a response token: row ``i`` when
    ``labels[b, i + 1]`` is supervised (labels as the data gives them, not yet shifted).
    These are the rows where a model produces its answer, the ones whose attention says
    where it looked for it (``vat.query: response``, docs/visual_attention.md)."""
    if not isinstance(labels, torch.Tensor) or labels.dim() != 2:
        raise ValueError(f"response_rows: labels must be a (B, N) tensor, got "
                         f"{getattr(labels, 'shape', type(labels).__name__)}")
    rows = torch.zeros(labels.shape, dtype=torch.bool, device=labels.device)
    rows[:, :-1] = labels[:, 1:] != ignore_index
    return rows


def spans_to_mask(spans: Spans, batch_size: int, seq_len: int,
                  device: torch.device | str | None = None) -> torch.Tensor:
    """Turn per-sample ``[(start, end), ...]`` spans (end exclusive) into a (B, N) bool mask.

    Several spans per sample are allowed; an empty list means the sample has no image.
    Spans must lie inside ``[0, seq_len]``, be non-empty and must not overlap.
    """
    if isinstance(spans, (torch.Tensor, str, bytes)) or not isinstance(spans, Sequence):
        raise TypeError(f"visual spans must be a list (one entry per sample) of (start, end) "
                        f"pairs, got {type(spans).__name__}")
    if len(spans) != batch_size:
        raise ValueError(f"visual spans: got {len(spans)} samples, but q has batch size "
                         f"{batch_size}")
    mask = torch.zeros(batch_size, seq_len, dtype=torch.bool)
    for b, sample in enumerate(spans):
        if isinstance(sample, (str, bytes)) or not isinstance(sample, Sequence):
            raise TypeError(f"visual spans[{b}] must be a list of (start, end) pairs, "
                            f"got {type(sample).__name__}")
        if len(sample) == 2 and all(_is_int(x) for x in sample):
            # The common slip: one level of nesting too few, [(s, e), ...] for [[(s, e)], ...].
            raise TypeError(f"visual spans[{b}] is {tuple(sample)!r}, a single (start, end) pair; "
                            f"each sample needs a list of pairs, e.g. "
                            f"[[(5, 21)], [(3, 19), (40, 56)], []] for three samples")
        intervals = []
        for span in sample:
            if (isinstance(span, (str, bytes)) or not isinstance(span, Sequence) or len(span) != 2
                    or not all(_is_int(x) for x in span)):
                raise TypeError(f"visual spans[{b}]: each span must be a (start, end) pair of "
                                f"ints, got {span!r}")
            start, end = int(span[0]), int(span[1])
            if not 0 <= start < end <= seq_len:
                raise ValueError(f"visual spans[{b}]: span ({start}, {end}) is empty or outside "
                                 f"the sequence of length {seq_len} (need 0 <= start < end <= N)")
            intervals.append((start, end))
        intervals.sort()
        for (s0, e0), (s1, e1) in zip(intervals, intervals[1:]):
            if s1 < e0:
                raise ValueError(f"visual spans[{b}]: spans ({s0}, {e0}) and ({s1}, {e1}) overlap")
        for start, end in intervals:
            mask[b, start:end] = True
    return mask.to(device) if device is not None else mask


def _as_bool_mask(name: str, mask: torch.Tensor, batch_size: int, seq_len: int,
                  device: torch.device) -> torch.Tensor:
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(mask).__name__}")
    if tuple(mask.shape) != (batch_size, seq_len):
        raise ValueError(f"{name} must have shape (B, N) = ({batch_size}, {seq_len}), "
                         f"got {tuple(mask.shape)}")
    if mask.dtype.is_floating_point or mask.dtype.is_complex:
        raise TypeError(f"{name} must be bool or integer (1 = keep), got {mask.dtype}")
    return mask.to(device=device, dtype=torch.bool)


def _gather_positions(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, N) bool -> ascending positions (B, max count) padded with 0, and counts (B,)."""
    count = mask.sum(dim=1)
    width = int(count.max()) if mask.shape[0] else 0
    # Stable sort puts the True positions first, in ascending order.
    order = torch.sort((~mask).to(torch.int8), dim=1, stable=True).indices[:, :width]
    index = torch.where(_count_mask(count, width), order, torch.zeros_like(order))
    return index.to(torch.int64), count.to(torch.int64)


def visual_layout(visual: VisualArg, batch_size: int, seq_len: int, *,
                  query: QueryArg = "all", attention_mask: torch.Tensor | None = None,
                  causal: bool = True, window: int | None = None,
                  device: torch.device | str = "cpu") -> VisualLayout:
    """Resolve the visual keys and query rows of docs/visual_attention.md into a :class:`VisualLayout`.

    Args:
        visual: image-token positions, a (B, N) bool mask or per-sample spans
            ``[[(start, end), ...], ...]`` (end exclusive).
        query: which rows enter the loss: ``"all"`` (every non-padding row, the paper),
            ``"visual"`` (rows that are image tokens, the official code), ``"text"``
            (non-padding rows that are not image tokens) or an explicit (B, N) bool mask.
        attention_mask: (B, N), 1/True for real tokens, 0 for padding (either side).
        causal: whether a query may only see keys at or before its own position.
        window: sliding-window attention (causal only): query i sees keys j with
            ``i - j < window``, as transformers' sliding-window layers (Gemma 3).
    """
    device = torch.device(device)
    if isinstance(visual, torch.Tensor):
        vis = _as_bool_mask("visual", visual, batch_size, seq_len, device)
    else:
        vis = spans_to_mask(visual, batch_size, seq_len, device)
    if attention_mask is None:
        key_mask = None
        real = torch.ones(batch_size, seq_len, dtype=torch.bool, device=device)
    else:
        key_mask = _as_bool_mask("attention_mask", attention_mask, batch_size, seq_len, device)
        real = key_mask
        padded_images = vis & ~real
        if bool(padded_images.any()):
            b = int(padded_images.any(dim=1).nonzero()[0])
            raise ValueError(f"visual: sample {b} marks padding positions (attention_mask == 0) "
                             f"as image tokens")
    if isinstance(query, str):
        if query == "all":
            rows = real
        elif query == "visual":
            rows = vis
        elif query == "text":
            rows = real & ~vis
        else:
            raise ValueError(f"query must be one of {QUERY_MODES} or a (B, N) bool mask, "
                             f"got {query!r}")
    else:
        rows = _as_bool_mask("query", query, batch_size, seq_len, device)
        if not bool(rows.any()):
            raise ValueError("query: the explicit query mask selects no rows")
        rows = rows & real
        if not bool(rows.any()):
            raise ValueError("query: the explicit query mask selects only padding rows")
    query_index, query_count = _gather_positions(rows)
    visual_index, visual_count = _gather_positions(vis)
    return VisualLayout(query_index, query_count, visual_index, visual_count, key_mask,
                        seq_len, bool(causal)).with_window(window)
