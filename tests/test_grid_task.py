"""The grid task generator: deterministic, answers right (read back from the pixels), a
presence-only guesser at about 1/3, dense records in the LLaVA format."""
import functools
import json
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from compodistill.data.grid_task import (COLORS, CR_CATEGORIES, GRID, QUESTION_TYPES, SHAPES,
                                         generate_grid_task, presence_only_answer)

CELL = 12


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    out = tmp_path_factory.mktemp("grid")
    paths = generate_grid_task(str(out), num_train=40, num_eval=600, seed=3, cell=CELL)
    return {k: (json.loads(Path(v).read_text()) if v.endswith(".json") else v)
            for k, v in paths.items()}


@functools.lru_cache(maxsize=None)
def _read_scene(path: Path) -> dict:
    """Cell -> (colour, ink mask) from the image alone: the nearest palette colour of the
    fill (neither white nor the black outline) of each cell, and where the ink is
    (independent of the generator's scene objects)."""
    px = np.asarray(Image.open(path).convert("RGB"), dtype=np.int32)
    names, palette = list(COLORS), np.array(list(COLORS.values()))
    cells = {}
    for cell in range(GRID * GRID):
        r, c = divmod(cell, GRID)
        block = px[r * CELL:(r + 1) * CELL, c * CELL:(c + 1) * CELL].reshape(-1, 3)
        fill = block[(block != 255).any(-1) & (block != 0).any(-1)]  # not white, not outline
        if len(fill):
            dist = ((fill[:, None, :] - palette[None]) ** 2).sum(-1).argmin(-1)
            mask = (block != 255).any(-1).tobytes()
            cells[cell] = (names[Counter(dist.tolist()).most_common(1)[0][0]], mask)
    return cells


def _shape_by_count(task) -> dict:
    # Each shape is drawn with the same pixels in every cell, so its ink mask names it.
    counts = {}
    for rec in task["train"][1::2]:  # the caption records
        cells = _read_scene(Path(task["image_folder"]) / rec["image"])
        caption = rec["conversations"][-1]["value"].split(", ")
        for (cell, (color, n)), obj in zip(sorted(cells.items()), caption):
            assert obj.split()[0] == color
            counts.setdefault(n, set()).add(obj.split()[1])
    assert all(len(v) == 1 for v in counts.values()), counts
    return {n: next(iter(v)) for n, v in counts.items()}


def test_deterministic_and_prefix_stable(tmp_path, task):
    a = generate_grid_task(str(tmp_path / "a"), num_train=5, num_eval=4, seed=3, cell=CELL)
    b = generate_grid_task(str(tmp_path / "b"), num_train=5, num_eval=4, seed=3, cell=CELL)
    c = generate_grid_task(str(tmp_path / "c"), num_train=5, num_eval=4, seed=4, cell=CELL)
    for key in ("train", "questions", "cr_eval"):
        assert Path(a[key]).read_text() == Path(b[key]).read_text()
        assert Path(a[key]).read_text() != Path(c[key]).read_text()
    img = "images/eval_000002.png"
    assert (Path(a["image_folder"], img).read_bytes() == Path(b["image_folder"], img).read_bytes())
    # Image i does not depend on how many images are asked for.
    assert json.loads(Path(a["train"]).read_text()) == task["train"][:10]
    assert json.loads(Path(a["questions"]).read_text()) == [
        q for q in json.loads(Path(generate_grid_task(
            str(tmp_path / "d"), num_train=2, num_eval=9, seed=3, cell=CELL)["questions"])
            .read_text()) if int(q["id"].split("_")[1]) < 4]


def test_answers_match_the_pixels(task):
    by_count = _shape_by_count(task)
    seen = Counter()
    for q in task["questions"]:
        cells = _read_scene(Path(task["image_folder"]) / q["image"])
        objs = {cell: (color, by_count[n]) for cell, (color, n) in cells.items()}
        assert len(objs) == 3 and len({c for c, _ in objs.values()}) == 3
        assert len({s for _, s in objs.values()}) == 3
        assert q["candidates"] == (list(SHAPES) if q["question_type"] == "shape"
                                   else sorted(COLORS))
        words = q["question"].rstrip("?").split()
        if q["question_type"] == "color":
            cell = next(k for k, (_, s) in objs.items() if s == words[-1])
            assert q["answer"] == objs[cell][0]
        elif q["question_type"] == "shape":
            cell = next(k for k, (c, _) in objs.items() if c == words[-2])
            assert q["answer"] == objs[cell][1]
        else:
            asked = next(k for k, (_, s) in objs.items() if s == words[-1])
            left = [k for k in objs if k % GRID < asked % GRID]
            assert len(left) == 1
            cell = left[0]
            assert q["answer"] == objs[cell][0]
        assert q["target_cell"] == cell
        seen[q["question_type"]] += 1
    assert seen == {t: 600 for t in QUESTION_TYPES}


def test_dense_records_name_each_answers_cell(task):
    """``target_cells``: the cell of the object each answer is about, read from the pixels
    (what the demo teacher's attention target is made from); captions have none."""
    by_count = _shape_by_count(task)
    for rec in task["train"][0:40:2]:
        cells = _read_scene(Path(task["image_folder"]) / rec["image"])
        objs = {cell: (color, by_count[n]) for cell, (color, n) in cells.items()}
        answers = [t["value"] for t in rec["conversations"][1::2]]
        assert len(rec["target_cells"]) == len(answers) == 4
        for answer, cell in zip(answers, rec["target_cells"]):
            assert answer in objs[cell]
    assert all("target_cells" not in r for r in task["train"][1::2])


def test_presence_only_scores_about_a_third(task):
    rng = random.Random(0)
    hits = Counter()
    for q in task["questions"]:
        caption = next(c["caption"] for c in task["cr_eval"] if c["image"] == q["image"])
        objs = [o.split() for o in caption.split(", ")]
        present = {"colors": {c for c, _ in objs}, "shapes": {s for _, s in objs}}
        hits[q["question_type"]] += presence_only_answer(q, present, rng) == q["answer"]
    for t in QUESTION_TYPES:  # 600 draws at p = 1/3: standard error 0.019
        assert abs(hits[t] / 600 - 1 / 3) < 0.06, (t, hits[t] / 600)
    # The text alone (the most frequent answer to each question string) is weaker still.
    answers = {}
    for q in task["questions"]:
        answers.setdefault(q["question"], Counter())[q["answer"]] += 1
    text_prior = sum(c.most_common(1)[0][1] for c in answers.values()) / len(task["questions"])
    assert text_prior < 0.3, text_prior


def test_cr_negatives_keep_the_words_and_change_the_binding(task):
    assert Counter(c["category"] for c in task["cr_eval"]) == {c: 600 for c in CR_CATEGORIES}
    for c in task["cr_eval"]:
        pos, neg = c["caption"].split(", "), c["negative_caption"].split(", ")
        assert neg != pos
        assert sorted(w for o in neg for w in o.split()) == sorted(
            w for o in pos for w in o.split())
        if c["category"] == "color_swap":
            assert [o.split()[1] for o in neg] == [o.split()[1] for o in pos]
        else:
            assert sorted(neg) == sorted(pos)


def test_dense_records_supervise_every_answer(task):
    from compodistill.data import ConversationEncoder
    from compodistill.apps.grounded import make_tokenizer

    assert [r["id"] for r in task["train"][:4]] == ["train_000000_q", "train_000000_c",
                                                    "train_000001_q", "train_000001_c"]
    tok = make_tokenizer(task["train"])
    enc = ConversationEncoder(tok, GRID * CELL, num_image_tokens=GRID * GRID)
    rec, cap = task["train"][0], task["train"][1]
    conv = rec["conversations"]
    assert conv[0]["value"].startswith("<image>\n") and len(conv) == 8
    assert rec["image"] == cap["image"]
    assert [t["value"] for t in cap["conversations"]][0] == "<image>\nDescribe the image."
    messages = [{"role": "user" if t["from"] == "human" else "assistant",
                 "content": t["value"]} for t in conv]
    out = enc.encode(messages)
    supervised = [i for i, lab in zip(out["input_ids"], out["labels"]) if lab != -100]
    answers = [tok.convert_tokens_to_ids(t["value"]) for t in conv[1::2]]
    assert [i for i in supervised if i != tok.eos_token_id] == answers
    # One question about each object, so no answer gives another away.
    objs = [o.split() for o in cap["conversations"][1]["value"].split(", ")]
    asked = []
    for t in conv[0::2]:
        if "left of" in t["value"]:
            continue
        w = t["value"].rstrip("?").split()
        asked.append(next(i for i, (c, s) in enumerate(objs) if s == w[-1] or c == w[-2]))
    assert sorted(asked) == [0, 1, 2]
    firsts = Counter("left of" in r["conversations"][0]["value"] for r in task["train"][0::2])
    assert firsts[True] >= 3 and firsts[False] >= 20  # the left question is not always last


def test_bad_sizes_are_refused(tmp_path):
    with pytest.raises(ValueError, match="num_train"):
        generate_grid_task(str(tmp_path), num_train=0)
