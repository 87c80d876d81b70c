"""Answer rows and their target cells on the grid task, for VAT on the answer rows, the oracle
one-hot target and the teacher's auxiliary attention loss (docs/experiment.md, "Protocol").

- :func:`cell_colors`: which colour fills each cell of a grid image (read from its pixels: the
  objects are drawn in exact colours on white, so no scene bookkeeping is needed);
- :func:`turn_target_cells`: the target cell of every question turn of a training record
  (None for the caption turn, which has no single cell);
- :func:`answer_rows`: the (B, N) mask of the rows that predict each supervised answer's first
  token (the last prompt row of each turn), from the unshifted labels;
- :func:`onehot_targets`: a (B, Qmax, Vmax) one-hot map on each answer row's target cell, in
  a :class:`VisualLayout` gathered with that mask (the oracle arm's VAT target).

Training uses the records' own ``target_cells`` and the response rows
(:func:`compodistill.apps.grounded.train_model`); these readers are the independent check and
the oracle arm's pieces, not wired yet (docs/experiment.md, "Status of the protocol's code").
"""
from __future__ import annotations

import os
import re
from typing import Sequence

import torch

from ..data.grid_task import COLORS, GRID

__all__ = ["cell_colors", "turn_target_cells", "answer_rows", "onehot_targets"]

_COLOR_Q = re.compile(r"What color is the (\w+)\?")
_SHAPE_Q = re.compile(r"What shape is the (\w+) object\?")


def cell_colors(image, cell: int = 12) -> dict[str, int]:
    """``{colour: cell}`` for the objects of a grid image (a path or a PIL image)."""
    from PIL import Image

    img = Image.open(image).convert("RGB") if isinstance(image, (str, os.PathLike)) else image
    px = img.load()
    by_rgb = {rgb: name for name, rgb in COLORS.items()}
    out = {}
    for k in range(GRID * GRID):
        x0, y0 = (k % GRID) * cell, (k // GRID) * cell
        counts: dict[str, int] = {}
        for y in range(y0, y0 + cell):
            for x in range(x0, x0 + cell):
                name = by_rgb.get(px[x, y])
                if name:
                    counts[name] = counts.get(name, 0) + 1
        if counts:
            out[max(counts, key=counts.get)] = k
    return out


def turn_target_cells(record: dict, image_folder: str, cell: int = 12) -> list[int | None]:
    """The target cell of each human turn of a LLaVA grid record, in order: the cell of the
    object the answer is about (None for a turn that is not a colour, shape or left question).
    Colours are distinct in an image, so the colour in the question or the answer names it."""
    colors = cell_colors(os.path.join(image_folder, record["image"]), cell)
    conv = record["conversations"]
    out = []
    for human, reply in zip(conv[::2], conv[1::2]):
        text, answer = human["value"].replace("<image>\n", ""), reply["value"].strip()
        if _SHAPE_Q.fullmatch(text):
            out.append(colors.get(_SHAPE_Q.fullmatch(text).group(1)))
        elif _COLOR_Q.fullmatch(text) or text.startswith("What color is the object left of"):
            out.append(colors.get(answer))
        else:
            out.append(None)
    return out


def answer_rows(labels: torch.Tensor) -> torch.Tensor:
    """(B, N) bool: row p where token p+1 starts a supervised span (labels[p+1] != -100 and
    labels[p] == -100). ``labels`` are the unshifted per-token labels (-100 = not trained)."""
    sup = labels != -100
    rows = torch.zeros_like(sup)
    rows[:, :-1] = sup[:, 1:] & ~sup[:, :-1]
    return rows


def onehot_targets(layout, cells: Sequence[Sequence[int | None]]) -> torch.Tensor:
    """The oracle map: 1 on each gathered answer row's target cell, in ``layout`` (gathered
    with :func:`answer_rows` as the query mask). ``cells[b]``: sample b's target cell per
    answer row, in row order; None (a caption turn) leaves that row all zero."""
    out = torch.zeros(layout.map_shape, dtype=torch.float32)
    counts = layout.query_count.tolist()
    for b, row_cells in enumerate(cells):
        if len(row_cells) != counts[b]:
            raise ValueError(f"cells: sample {b} has {len(row_cells)} target cells for "
                             f"{counts[b]} answer rows")
        for q, c in enumerate(row_cells):
            if c is not None:
                out[b, q, c] = 1.0
    return out
