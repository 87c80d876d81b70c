"""The grid task: three coloured shapes on a 3×3 grid, one image patch per cell (docs/experiment.md).

Made so that a tiny model can ground: each cell is exactly one patch of the vision tower
(``cell`` pixels = its ``patch_size``), every object fills one cell and is drawn the same way
wherever it is, so the patch embedding alone sees colour, shape and (with its position
embedding) position. Each image holds three objects with distinct colours and distinct
shapes, so binding is needed: knowing only which colours and shapes are present answers a
question with probability 1/3.

Questions (single-word answers, scored by candidate likelihood in :mod:`compodistill.eval.grid`):

- ``color``: "What color is the {shape}?"
- ``shape``: "What shape is the {color} object?"
- ``left``: "What color is the object left of the {shape}?" (asked only about a shape with
  exactly one object in a column to its left);
- ``caption``: "Describe the image." → the objects in cell order (row by row), e.g.
  ``"red circle, blue square, green triangle"``. Its CR negatives swap the colours of two
  objects (``color_swap``) or the places of two objects (``position_swap``).

Each training image gives two records: a dense multi-turn one (a question about each object,
then the ``left`` question, every answer supervised) and a caption record. Everything is a function of
the seed and the image's split and index.
"""
from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass

COLORS = {"red": (220, 40, 40), "green": (30, 170, 60), "blue": (40, 80, 230),
          "yellow": (235, 205, 30), "purple": (150, 60, 200)}
SHAPES = ("circle", "square", "triangle", "diamond", "cross")
GRID = 3
OBJECTS = 3
QUESTION_TYPES = ("color", "shape", "left")
CR_CATEGORIES = ("color_swap", "position_swap")
CAPTION_PROMPT = "Describe the image."


@dataclass(frozen=True)
class GridObject:
    color: str
    shape: str
    cell: int  # row * GRID + column

    @property
    def column(self) -> int:
        return self.cell % GRID


@dataclass(frozen=True)
class GridScene:
    """Three objects with distinct colours, shapes and cells, sorted by cell."""

    objects: tuple[GridObject, ...]

    def caption(self) -> str:
        return ", ".join(f"{o.color} {o.shape}" for o in self.objects)

    def left_of(self, obj: GridObject) -> GridObject | None:
        """The object left of ``obj`` when exactly one object is in a column left of it."""
        left = [o for o in self.objects if o.column < obj.column]
        return left[0] if len(left) == 1 else None

    def left_questions(self) -> list[tuple[GridObject, GridObject]]:
        """``(asked, answer)`` pairs for which the ``left`` question is well defined."""
        return [(o, self.left_of(o)) for o in self.objects if self.left_of(o) is not None]


def random_scene(rng: random.Random) -> GridScene:
    """Three objects with distinct colours, shapes and cells, redrawn until some object has
    exactly one object left of it (so every image can be asked the ``left`` question)."""
    while True:
        colors = rng.sample(sorted(COLORS), OBJECTS)
        shapes = rng.sample(SHAPES, OBJECTS)
        cells = rng.sample(range(GRID * GRID), OBJECTS)
        scene = GridScene(tuple(sorted((GridObject(c, s, k) for c, s, k in
                                        zip(colors, shapes, cells)), key=lambda o: o.cell)))
        if scene.left_questions():
            return scene


def color_swap(scene: GridScene, rng: random.Random) -> str:
    """The caption with the colours of two objects swapped."""
    i, j = rng.sample(range(OBJECTS), 2)
    colors = [o.color for o in scene.objects]
    colors[i], colors[j] = colors[j], colors[i]
    return ", ".join(f"{c} {o.shape}" for c, o in zip(colors, scene.objects))


def position_swap(scene: GridScene, rng: random.Random) -> str:
    """The caption with two objects in each other's place (same colour-shape pairs)."""
    i, j = rng.sample(range(OBJECTS), 2)
    objs = list(scene.objects)
    objs[i], objs[j] = objs[j], objs[i]
    return ", ".join(f"{o.color} {o.shape}" for o in objs)


def render(scene: GridScene, cell: int = 12):
    """A white ``GRID*cell`` square image, each object filling its cell (no jitter)."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (GRID * cell, GRID * cell), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    for o in scene.objects:
        x0, y0 = (o.cell % GRID) * cell, (o.cell // GRID) * cell
        _draw(draw, o.shape, x0, y0, cell - 1, COLORS[o.color])
    return img


def _draw(draw, shape: str, x0: int, y0: int, s: int, fill) -> None:
    # Coloured fill with a black outline: the outline gives the patch embedding a shape
    # signal that does not depend on the colour (a bare colour mask mixes the two).
    m, ink = s / 2, dict(fill=fill, outline=(0, 0, 0))
    if shape == "circle":
        draw.ellipse([x0, y0, x0 + s, y0 + s], **ink)
    elif shape == "square":
        draw.rectangle([x0 + 1, y0 + 1, x0 + s - 1, y0 + s - 1], **ink)
    elif shape == "triangle":
        draw.polygon([(x0 + m, y0), (x0, y0 + s), (x0 + s, y0 + s)], **ink)
    elif shape == "diamond":
        draw.polygon([(x0 + m, y0), (x0 + s, y0 + m), (x0 + m, y0 + s), (x0, y0 + m)], **ink)
    elif shape == "cross":
        w = max(1, round(s / 5))
        draw.polygon([(x0 + m - w, y0), (x0 + m + w, y0), (x0 + m + w, y0 + m - w),
                      (x0 + s, y0 + m - w), (x0 + s, y0 + m + w), (x0 + m + w, y0 + m + w),
                      (x0 + m + w, y0 + s), (x0 + m - w, y0 + s), (x0 + m - w, y0 + m + w),
                      (x0, y0 + m + w), (x0, y0 + m - w), (x0 + m - w, y0 + m - w)], **ink)
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def question(kind: str, scene: GridScene, obj: GridObject) -> dict:
    """One question of ``kind`` about ``obj``: text, answer, candidates and the target cell
    (the cell of the object whose attribute is the answer)."""
    if kind == "color":
        return dict(question=f"What color is the {obj.shape}?", answer=obj.color,
                    candidates=sorted(COLORS), target_cell=obj.cell, question_type=kind)
    if kind == "shape":
        return dict(question=f"What shape is the {obj.color} object?", answer=obj.shape,
                    candidates=list(SHAPES), target_cell=obj.cell, question_type=kind)
    if kind == "left":
        answer = scene.left_of(obj)
        if answer is None:
            raise ValueError(f"no single object is left of the {obj.shape} in {scene}")
        return dict(question=f"What color is the object left of the {obj.shape}?",
                    answer=answer.color, candidates=sorted(COLORS), target_cell=answer.cell,
                    question_type=kind)
    raise ValueError(f"unknown question type {kind!r}; expected one of {QUESTION_TYPES}")


def dense_turns(scene: GridScene, rng: random.Random) -> list[tuple[str, str, int]]:
    """The ``(question, answer, target_cell)`` turns of one dense question record: a colour or shape question about each object
    (in a random order; never both about the same object, so no answer gives another away),
    and the ``left`` question at a random place. The caption is a record of its own: after the questions its
    words would be copied from the answers, and a prototype that ended every record with it
    learnt to copy and never to look (its questions stayed at the presence-only level)."""
    turns = []
    for obj in rng.sample(scene.objects, OBJECTS):
        q = question(rng.choice(("color", "shape")), scene, obj)
        turns.append((q["question"], q["answer"], q["target_cell"]))
    asked, _ = rng.choice(scene.left_questions())
    q = question("left", scene, asked)
    # At a random place: always last, after every object's answer, a prototype teacher learnt
    # it from the earlier answers and failed it when asked alone.
    turns.insert(rng.randrange(len(turns) + 1), (q["question"], q["answer"], q["target_cell"]))
    return turns


def _record(rid: str, image: str, turns: list[tuple]) -> dict:
    """A LLaVA record; turns with a third element also give ``target_cells``, the target cell
    of each answer in order (what the teacher's attention target is made from)."""
    conv = []
    for j, (q, a, *_) in enumerate(turns):
        conv += [{"from": "human", "value": ("<image>\n" if j == 0 else "") + q},
                 {"from": "gpt", "value": a}]
    record = {"id": rid, "image": image, "conversations": conv}
    if turns and all(len(t) == 3 for t in turns):
        record["target_cells"] = [t[2] for t in turns]
    return record


def _scene(seed: int, split: str, i: int) -> tuple[GridScene, random.Random]:
    rng = random.Random(f"grid-{seed}-{split}-{i}")  # str seeds hash deterministically
    return random_scene(rng), rng


def generate_grid_task(out: str, num_train: int = 1000, num_eval: int = 600, seed: int = 0,
                       cell: int = 12) -> dict:
    """Write the grid task to ``out`` and return its file paths.

    Files: ``images/*.png``; ``train.json`` (LLaVA format, two records per training image,
    in image order: ``train_<i>_q``, the dense questions, with ``target_cells``, the cell of
    each answer's object, and ``train_<i>_c``, the caption); ``questions.json`` (one question of each type per eval image: ``image``,
    ``question``, ``answer``, ``candidates``, ``question_type``, ``target_cell``);
    ``cr_eval.json`` (one item per CR category per eval image: ``image``, ``caption``,
    ``negative_caption``, ``category``); ``meta.json``. Image paths are relative to ``out``.
    Training image ``i`` does not depend on ``num_train``, nor eval image ``i`` on ``num_eval``.
    """
    for name, value in (("num_train", num_train), ("num_eval", num_eval), ("cell", cell)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    os.makedirs(os.path.join(out, "images"), exist_ok=True)
    train, questions, cr = [], [], []
    for i in range(num_train):
        scene, rng = _scene(seed, "train", i)
        name = f"images/train_{i:06d}.png"
        render(scene, cell).save(os.path.join(out, name))
        train.append(_record(f"train_{i:06d}_q", name, dense_turns(scene, rng)))
        train.append(_record(f"train_{i:06d}_c", name, [(CAPTION_PROMPT, scene.caption())]))
    for i in range(num_eval):
        scene, rng = _scene(seed, "eval", i)
        name = f"images/eval_{i:06d}.png"
        render(scene, cell).save(os.path.join(out, name))
        asked, _ = rng.choice(scene.left_questions())
        for kind, obj in (("color", rng.choice(scene.objects)),
                          ("shape", rng.choice(scene.objects)), ("left", asked)):
            questions.append({"id": f"eval_{i:06d}_{kind}", "image": name,
                              **question(kind, scene, obj)})
        for cat, make in (("color_swap", color_swap), ("position_swap", position_swap)):
            cr.append({"id": f"eval_{i:06d}_{cat}", "image": name, "caption": scene.caption(),
                       "negative_caption": make(scene, rng), "category": cat})
    paths = {k: os.path.join(out, f"{k}.json") for k in ("train", "questions", "cr_eval", "meta")}
    meta = {"seed": seed, "num_train": num_train, "num_eval": num_eval, "cell": cell,
            "grid": GRID, "colors": sorted(COLORS), "shapes": list(SHAPES),
            "question_types": list(QUESTION_TYPES), "cr_categories": list(CR_CATEGORIES)}
    for key, data in (("train", train), ("questions", questions), ("cr_eval", cr),
                      ("meta", meta)):
        with open(paths[key], "w", encoding="utf-8") as f:
            json.dump(data, f, indent=1)
    return {**paths, "image_folder": out}


def presence_only_answer(item: dict, present: dict, rng: random.Random) -> str:
    """What a model that knows only which colours and shapes are present answers: a random
    present value of the asked kind (the baseline the task must hold at about 1/3)."""
    pool = present["shapes"] if item["question_type"] == "shape" else present["colors"]
    return rng.choice(sorted(pool))
