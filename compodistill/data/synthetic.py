"""Synthetic compositional data: coloured shapes in spatial relations (``compodistill data synth``).

Each image shows two objects with distinct colours and shapes, the first in a spatial relation
to the second (``left of``, ``right of``, ``above``, ``below``); the caption reads
``"a red circle left of a blue square"``. Hard negatives follow the SugarCrepe categories:

- ``attribute``: the colours swapped (``"a blue circle left of a red square"``);
- ``relation``: the relation swapped for its opposite (``"a red circle right of a blue square"``);
- ``object``: one shape replaced by a shape absent from the image.

Written to ``--out``: ``images/*.png``; ``train.json`` (LLaVA conversations: captioning, short
QA and the CR question with the evaluation's exact prompt); ``cr_eval.json`` (image, caption,
negative_caption, category: one item per category per image); ``vqa_eval.json`` (question,
answer, question_type: color, shape, relation (yes/no), position); ``meta.json``. Image paths
are relative to ``--out`` (use it as ``image_folder``). Everything is deterministic in the
seed, and image ``i`` does not depend on ``--num``. Few colours and shapes and small images
keep the task learnable by tiny models.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
from dataclasses import dataclass

from .prompts import CAPTION_PROMPT, SHORT_ANSWER_SUFFIX, cr_prompt

COLORS = {"red": (220, 40, 40), "green": (30, 170, 60), "blue": (40, 80, 230),
          "yellow": (235, 205, 30)}
SHAPES = ("circle", "square", "triangle", "diamond")
RELATIONS = ("left of", "right of", "above", "below")
OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
CATEGORIES = ("attribute", "relation", "object")
QUESTION_TYPES = ("color", "shape", "relation", "position")


@dataclass(frozen=True)
class Scene:
    """Two objects; ``color1 shape1`` is ``relation`` ``color2 shape2``."""

    color1: str
    shape1: str
    relation: str
    color2: str
    shape2: str

    def caption(self) -> str:
        return describe(self.color1, self.shape1, self.relation, self.color2, self.shape2)


def describe(c1: str, s1: str, rel: str, c2: str, s2: str) -> str:
    """The caption of a scene: ``"a red circle left of a blue square"``."""
    return f"a {c1} {s1} {rel} a {c2} {s2}"


def random_scene(rng: random.Random) -> Scene:
    """Two objects with distinct colours and shapes, so every negative differs from the caption."""
    c1, c2 = rng.sample(sorted(COLORS), 2)
    s1, s2 = rng.sample(SHAPES, 2)
    return Scene(c1, s1, rng.choice(RELATIONS), c2, s2)


def hard_negative(scene: Scene, category: str, rng: random.Random) -> str:
    """A false caption of ``scene`` of one SugarCrepe category (attribute, relation, object)."""
    c1, s1, rel, c2, s2 = scene.color1, scene.shape1, scene.relation, scene.color2, scene.shape2
    if category == "attribute":
        return describe(c2, s1, rel, c1, s2)
    if category == "relation":
        return describe(c1, s1, OPPOSITE[rel], c2, s2)
    if category == "object":
        new = rng.choice([s for s in SHAPES if s not in (s1, s2)])
        return describe(c1, new, rel, c2, s2) if rng.random() < 0.5 else describe(c1, s1, rel, c2, new)
    raise ValueError(f"unknown category {category!r}; expected one of {CATEGORIES}")


def render_scene(scene: Scene, size: int, rng: random.Random):
    """Draw ``scene`` on a white ``size`` x ``size`` RGB image (object 1 first)."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (size, size), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    near, far, mid = 0.27 * size, 0.73 * size, 0.5 * size
    jitter = lambda: rng.uniform(-0.06, 0.06) * size  # noqa: E731 - small placement noise
    first = {"left of": (near, mid), "right of": (far, mid), "above": (mid, near),
             "below": (mid, far)}[scene.relation]
    second = (size - first[0], size - first[1])  # mirror through the centre
    shift = jitter()  # shared off-axis shift keeps the two objects aligned
    horizontal = scene.relation in ("left of", "right of")
    for (x, y), color, shape in ((first, scene.color1, scene.shape1),
                                 (second, scene.color2, scene.shape2)):
        x, y = (x + jitter(), y + shift) if horizontal else (x + shift, y + jitter())
        _draw_shape(draw, shape, x, y, 0.17 * size, COLORS[color])
    return img


def _draw_shape(draw, shape: str, x: float, y: float, r: float, fill) -> None:
    if shape == "circle":
        draw.ellipse([x - r, y - r, x + r, y + r], fill=fill)
    elif shape == "square":
        draw.rectangle([x - 0.85 * r, y - 0.85 * r, x + 0.85 * r, y + 0.85 * r], fill=fill)
    elif shape == "triangle":
        draw.polygon([(x, y - r), (x - r, y + 0.8 * r), (x + r, y + 0.8 * r)], fill=fill)
    elif shape == "diamond":
        draw.polygon([(x, y - r), (x + r, y), (x, y + r), (x - r, y)], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def vqa_items(scene: Scene, rng: random.Random) -> list[dict]:
    """One short-answer question of each type about ``scene``."""
    c1, s1, rel, c2, s2 = scene.color1, scene.shape1, scene.relation, scene.color2, scene.shape2
    asked = rel if rng.random() < 0.5 else OPPOSITE[rel]
    return [
        {"question": f"What color is the {s1}?", "answer": c1, "question_type": "color"}
        if rng.random() < 0.5 else
        {"question": f"What color is the {s2}?", "answer": c2, "question_type": "color"},
        {"question": f"What shape is the {c2} object?", "answer": s2, "question_type": "shape"}
        if rng.random() < 0.5 else
        {"question": f"What shape is the {c1} object?", "answer": s1, "question_type": "shape"},
        {"question": f"Is the {c1} {s1} {asked} the {c2} {s2}?",
         "answer": "yes" if asked == rel else "no", "question_type": "relation"},
        {"question": f"Where is the {c1} {s1} relative to the {c2} {s2}?",
         "answer": rel.split()[0], "question_type": "position"},
    ]


def _train_turns(scene: Scene, rng: random.Random) -> list[tuple[str, str]]:
    # (question, answer) per task: caption, one QA, one CR question (the eval's exact prompt).
    qa = rng.choice(vqa_items(scene, rng))
    negative = hard_negative(scene, rng.choice(CATEGORIES), rng)
    positive_first = rng.random() < 0.5
    a, b = (scene.caption(), negative) if positive_first else (negative, scene.caption())
    return [(CAPTION_PROMPT, scene.caption()),
            (qa["question"] + SHORT_ANSWER_SUFFIX, qa["answer"]),
            (cr_prompt(a, b), "A" if positive_first else "B")]


def generate_synthetic(out: str, num: int = 1000, num_eval: int | None = None,
                       image_size: int = 32, seed: int = 0, multi_turn: bool = False,
                       progress: bool = True) -> dict:
    """Write the synthetic data set (see the module docstring) and return its file paths.

    Args:
        out: output folder (created).
            Returns the paths of ``train``/``cr_eval``/``vqa_eval``/``meta`` JSON, the
            ``image_folder`` and the record ``counts``.
        num: training images. Each gives three single-turn records (caption, QA, CR), or one
            three-turn record with ``multi_turn=True``.
        num_eval: evaluation images (default ``max(10, num // 5)``), disjoint from training.
        image_size: side in pixels.
        seed: everything is a function of the seed (and of the image's split and index).
    """
    from tqdm.auto import tqdm

    num_eval = max(10, num // 5) if num_eval is None else num_eval
    os.makedirs(os.path.join(out, "images"), exist_ok=True)
    train, cr, vqa = [], [], []
    jobs = [("train", i) for i in range(num)] + [("eval", i) for i in range(num_eval)]
    for split, i in tqdm(jobs, desc="synthetic images", disable=not progress):
        rng = random.Random(f"{seed}-{split}-{i}")  # str seeds are hashed deterministically
        scene = random_scene(rng)
        name = f"images/{split}_{i:06d}.png"
        render_scene(scene, image_size, rng).save(os.path.join(out, name))
        if split == "train":
            turns = _train_turns(scene, rng)
            groups = [turns] if multi_turn else [[t] for t in turns]
            for k, group in enumerate(groups):
                conv = []
                for j, (q, a) in enumerate(group):
                    conv += [{"from": "human", "value": ("<image>\n" if j == 0 else "") + q},
                             {"from": "gpt", "value": a}]
                train.append({"id": f"train_{i:06d}_{k}", "image": name, "conversations": conv})
            continue
        for cat in CATEGORIES:
            cr.append({"id": f"eval_{i:06d}_{cat}", "image": name, "caption": scene.caption(),
                       "negative_caption": hard_negative(scene, cat, rng), "category": cat})
        for j, item in enumerate(vqa_items(scene, rng)):
            vqa.append({"id": f"eval_{i:06d}_q{j}", "image": name, **item})
    paths = {k: os.path.join(out, f"{k}.json") for k in ("train", "cr_eval", "vqa_eval", "meta")}
    meta = {"seed": seed, "num": num, "num_eval": num_eval, "image_size": image_size,
            "multi_turn": multi_turn, "colors": sorted(COLORS), "shapes": list(SHAPES),
            "relations": list(RELATIONS), "categories": list(CATEGORIES),
            "counts": {"train": len(train), "cr_eval": len(cr), "vqa_eval": len(vqa)}}
    for key, data in (("train", train), ("cr_eval", cr), ("vqa_eval", vqa), ("meta", meta)):
        with open(paths[key], "w", encoding="utf-8") as f:
            json.dump(data, f, indent=1)
    return {**paths, "image_folder": out, "counts": meta["counts"]}


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options of ``compodistill data synth`` (shared with this module's own CLI)."""
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--num", type=int, default=1000, help="training images (default 1000)")
    p.add_argument("--num-eval", type=int, default=None, help="eval images (default num // 5)")
    p.add_argument("--image-size", type=int, default=32, help="image side in pixels (default 32)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--multi-turn", action="store_true", help="one 3-turn record per image")
    return p


def build_parser() -> argparse.ArgumentParser:
    p = add_arguments(argparse.ArgumentParser(prog="compodistill data synth",
                                              description=__doc__.split("\n")[0]))
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def run(args: argparse.Namespace) -> int:
    """Generate the data set that ``args`` (from :func:`add_arguments`) describes."""
    res = generate_synthetic(args.out, args.num, args.num_eval, args.image_size, args.seed,
                             args.multi_turn, progress=not args.quiet)
    counts = res["counts"]
    print(f"wrote {counts['train']} training records, {counts['cr_eval']} CR items and "
          f"{counts['vqa_eval']} VQA items to {args.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """CLI entry: ``compodistill data synth --out DIR [--num N] [--image-size S] [--seed K]``."""
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
