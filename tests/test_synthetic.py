"""Synthetic compositional data: determinism, hard-negative categories, LLaVA format."""
import json
import random

import pytest

PIL = pytest.importorskip("PIL.Image")
pytest.importorskip("transformers")

from compodistill.data import LlavaDataset, build_tiny_tokenizer  # noqa: E402
from compodistill.data import synthetic as syn  # noqa: E402


def _read(out, name):
    return json.loads((out / f"{name}.json").read_text())


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    assert syn.main(["--out", str(out), "--num", "12", "--num-eval", "6", "--quiet"]) == 0
    return out


def test_deterministic_by_seed(data, tmp_path):
    again, other = tmp_path / "again", tmp_path / "other"
    syn.generate_synthetic(str(again), num=12, num_eval=6, seed=0, progress=False)
    syn.generate_synthetic(str(other), num=12, num_eval=6, seed=1, progress=False)
    for name in ("train", "cr_eval", "vqa_eval"):
        assert _read(data, name) == _read(again, name)
        assert _read(data, name) != _read(other, name)
    for img in ("train_000003.png", "eval_000005.png"):
        assert (data / "images" / img).read_bytes() == (again / "images" / img).read_bytes()
    # Image i does not depend on --num.
    smaller = tmp_path / "small"
    syn.generate_synthetic(str(smaller), num=4, num_eval=2, seed=0, progress=False)
    assert (smaller / "images/train_000003.png").read_bytes() == \
        (data / "images/train_000003.png").read_bytes()


def test_hard_negatives_per_category():
    rng = random.Random(0)
    for _ in range(50):
        scene = syn.random_scene(rng)
        caption = scene.caption()
        att = syn.hard_negative(scene, "attribute", rng)
        rel = syn.hard_negative(scene, "relation", rng)
        obj = syn.hard_negative(scene, "object", rng)
        assert len({caption, att, rel, obj}) == 4
        assert att == syn.describe(scene.color2, scene.shape1, scene.relation, scene.color1,
                                   scene.shape2)
        assert rel == syn.describe(scene.color1, scene.shape1, syn.OPPOSITE[scene.relation],
                                   scene.color2, scene.shape2)
        new_shapes = set(obj.split()) & set(syn.SHAPES) - {scene.shape1, scene.shape2}
        assert len(new_shapes) == 1  # exactly one shape replaced by one absent from the image
    with pytest.raises(ValueError, match="unknown category"):
        syn.hard_negative(scene, "count", rng)


def test_eval_files(data):
    cr = _read(data, "cr_eval")
    assert len(cr) == 6 * 3
    assert {r["category"] for r in cr} == set(syn.CATEGORIES)
    assert all(r["caption"] != r["negative_caption"] for r in cr)
    vqa = _read(data, "vqa_eval")
    assert {r["question_type"] for r in vqa} == set(syn.QUESTION_TYPES)
    assert {r["answer"] for r in vqa if r["question_type"] == "relation"} <= {"yes", "no"}
    assert all((data / r["image"]).is_file() for r in cr + vqa)
    meta = _read(data, "meta")
    assert meta["counts"] == {"train": 36, "cr_eval": 18, "vqa_eval": 24}


def test_image_matches_caption():
    rng = random.Random(3)
    for rel in syn.RELATIONS:
        scene = syn.Scene("red", "circle", rel, "blue", "square")
        img = syn.render_scene(scene, 48, rng)
        px = img.load()

        def centre(rgb):
            pts = [(x, y) for x in range(48) for y in range(48) if px[x, y] == rgb]
            assert pts, f"{rgb} not drawn"
            return (sum(p[0] for p in pts) / len(pts), sum(p[1] for p in pts) / len(pts))

        (x1, y1), (x2, y2) = centre(syn.COLORS["red"]), centre(syn.COLORS["blue"])
        assert {"left of": x1 < x2, "right of": x1 > x2, "above": y1 < y2,
                "below": y1 > y2}[rel]


def test_train_json_is_llava_format(data):
    from compodistill.data.prompts import cr_prompt

    train = _read(data, "train")
    tok = build_tiny_tokenizer()
    ds = LlavaDataset(str(data / "train.json"), str(data), tok, 32, num_image_tokens=4)
    assert len(ds) == len(train) == 36 and ds.num_skipped == 0
    unk = tok.unk_token_id
    assert all(unk not in ds[i]["input_ids"].tolist() for i in range(len(ds)))
    cr = [r for r in train if r["conversations"][0]["value"].startswith("<image>\nWhich caption")]
    assert len(cr) == 12
    for rec in cr:  # the letter answers the option holding the true caption
        q, a = rec["conversations"][0]["value"], rec["conversations"][1]["value"]
        lines = q.split("\n")
        true = next(t["conversations"][1]["value"] for t in train
                    if t["image"] == rec["image"] and t["id"].endswith("_0"))
        assert q == "<image>\n" + cr_prompt(lines[2][3:], lines[3][3:])
        assert {"A": lines[2], "B": lines[3]}[a][3:] == true


def test_multi_turn(tmp_path):
    res = syn.generate_synthetic(str(tmp_path), num=3, num_eval=1, multi_turn=True,
                                 progress=False)
    assert res["train"] == str(tmp_path / "train.json") and res["counts"]["train"] == 3
    train = _read(tmp_path, "train")
    assert len(train) == 3 and all(len(r["conversations"]) == 6 for r in train)
    assert all(r["conversations"][0]["value"].startswith("<image>") for r in train)
    assert all("<image>" not in t["value"] for r in train for t in r["conversations"][1:])
