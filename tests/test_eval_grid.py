"""compodistill.eval.grid against plain recomputations: candidate scoring against the full
sequence likelihood of each candidate, caption scoring against the model's own loss, the
target-cell share against the attention matrix of one sample."""
import json
import math
from pathlib import Path

import pytest
import torch

from compodistill.data.grid_task import generate_grid_task
from compodistill.eval.grid import (score_captions, score_questions, target_attention,
                                    with_se)
from compodistill.apps.grounded import grid_encoder, grid_models, make_tokenizer


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    out = tmp_path_factory.mktemp("grid")
    paths = generate_grid_task(str(out), num_train=4, num_eval=6, seed=1)
    load = lambda k: json.loads(Path(paths[k]).read_text())  # noqa: E731
    tok = make_tokenizer(load("train"))
    _, teacher = grid_models(len(tok), teacher_hidden=32, teacher_layers=2, seed=5)
    teacher.eval()
    return teacher, grid_encoder(teacher, tok), load("questions"), load("cr_eval"), str(out)


def _sequence_logprob(model, encoder, prompt, image, reply):
    """log p(reply tokens + end of turn | image, prompt) from one unpadded forward."""
    enc = encoder.encode([{"role": "user", "content": "<image>\n" + prompt},
                          {"role": "assistant", "content": reply}])
    ids = torch.tensor([enc["input_ids"]])
    labels = torch.tensor([enc["labels"]])
    with torch.no_grad():
        logits = model(input_ids=ids, pixel_values=encoder.load_images([image])).logits
    logp = logits[0, :-1].log_softmax(-1)
    target = labels[0, 1:]
    keep = target != -100
    return float(logp[keep].gather(-1, target[keep][:, None]).sum())


def test_candidates_match_their_answer_token_likelihood(setup):
    model, encoder, questions, _, folder = setup
    res = score_questions(model, encoder, questions, folder, batch_size=4)  # padded batches
    for q, pred in zip(questions, res["predictions"]):
        # The answer token's log-probability is the first term of each candidate's sequence
        # likelihood; score_questions uses it alone (the end token follows every candidate).
        enc = encoder.encode([{"role": "user", "content": "<image>\n" + q["question"]}],
                             add_generation_prompt=True)
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([enc["input_ids"]]),
                           pixel_values=encoder.load_images([f"{folder}/{q['image']}"])).logits
        logp = logits[0, -1].log_softmax(-1)
        first = {c: float(logp[encoder.tokenizer.convert_tokens_to_ids(c)])
                 for c in q["candidates"]}
        assert pred == max(first, key=first.get)
        full = _sequence_logprob(model, encoder, q["question"], f"{folder}/{q['image']}", pred)
        assert full <= first[pred] + 1e-5
    assert res["all"]["n"] == len(questions) == 18
    correct = [p == q["answer"] for q, p in zip(questions, res["predictions"])]
    assert res["all"]["acc"] == pytest.approx(sum(correct) / len(correct))


def test_captions_compare_summed_log_probabilities(setup):
    model, encoder, _, cr, folder = setup
    res = score_captions(model, encoder, cr, folder, batch_size=5)
    wins = []
    for item in cr:
        image = f"{folder}/{item['image']}"
        pos = _sequence_logprob(model, encoder, "Describe the image.", image, item["caption"])
        neg = _sequence_logprob(model, encoder, "Describe the image.", image,
                                item["negative_caption"])
        wins.append(float(pos > neg))
    assert res["all"]["acc"] == pytest.approx(sum(wins) / len(wins))
    assert set(res) == {"color_swap", "position_swap", "all"}


def test_target_share_from_the_attention_matrix(setup):
    model, encoder, questions, _, folder = setup
    q = questions[1]
    res = target_attention(model, encoder, [q], folder)
    ids = encoder.prompt_ids(q["question"], 1)[None]
    with torch.no_grad():
        model.set_attn_implementation({"text_config": "eager"})
        out = model(input_ids=ids, pixel_values=encoder.load_images([f"{folder}/{q['image']}"]),
                    output_attentions=True)
        model.set_attn_implementation({"text_config": "sdpa"})
    vis = (ids[0] == model.config.image_token_id).nonzero()[:, 0]
    for layer, att in enumerate(out.attentions):
        row = att[0].mean(0)[-1, vis]
        assert res["answer"][layer] == pytest.approx(float(row[q["target_cell"]] / row.sum()),
                                                     abs=1e-4)
        assert res["image_mass_answer"][layer] == pytest.approx(float(row.sum()), abs=1e-4)
        heads = att[0][:, -1, vis]
        assert res["answer_per_head"][layer] == pytest.approx(
            (heads[:, q["target_cell"]] / heads.sum(-1)).tolist(), abs=1e-4)
    assert res["uniform"] == pytest.approx(1 / 9, abs=1e-4)
    assert len(res["question"]) == len(out.attentions)


def test_paired_difference_has_the_paired_standard_error():
    from compodistill.eval.grid import paired_difference

    items = [{"answer": "a", "question_type": t} for t in ("color",) * 4 + ("shape",) * 2]
    a = ["a", "a", "a", "b", "a", "b"]
    b = ["a", "b", "b", "b", "b", "b"]
    out = paired_difference(items, a, b)
    d = [0, 1, 1, 0]  # colour: A right where B is wrong on two of four
    mean = sum(d) / 4
    se = math.sqrt(sum((x - mean) ** 2 for x in d) / 3 / 4)
    assert out["color"] == pytest.approx({"diff": 0.5, "se": se, "n": 4})
    assert out["shape"]["diff"] == 0.5 and out["all"]["n"] == 6
    assert out["all"]["diff"] == pytest.approx(3 / 6)
    with pytest.raises(ValueError, match="6 items but 5 and 6 predictions"):
        paired_difference(items, a[:5], b)


def test_look_loss_is_minus_log_the_target_share_and_pulls_it_up(setup):
    """The demo teacher's attention target: the answer row's head-mean image attention,
    renormalised over the image tokens, scored as -log(share on the answer's cell)."""
    from compodistill.apps.grounded import encode_records, look_loss

    teacher, encoder, *_ , folder = setup
    records = json.loads((Path(folder) / "train.json").read_text())
    feats = encode_records(records[:2], encoder, folder)
    assert len(feats[0]["look"]) == 4 and feats[1]["look"] == []  # the caption has no cells
    ids = torch.tensor(feats[0]["input_ids"])
    labels = torch.tensor(feats[0]["labels"])
    for row, cell in feats[0]["look"]:
        assert labels[row] == -100 and labels[row + 1] != -100  # the row before the answer
        assert 0 <= cell < 9
    image_id = teacher.config.image_token_id
    n, vis = len(ids), (ids == image_id).nonzero()[:, 0]
    logits = torch.randn(2, 3, n, n, requires_grad=True)  # 2 layers, 3 heads
    att = [x.softmax(-1) for x in logits.unbind(0)]
    pairs = feats[0]["look"]
    loss = look_loss([a[None] for a in att], ids[None], [pairs], image_id, layers=[1])
    img = att[1].mean(0)[[r for r, _ in pairs]][:, vis]
    share = img[torch.arange(len(pairs)), [c for _, c in pairs]] / img.sum(-1)
    assert float(loss.detach()) == pytest.approx(float(-share.detach().log().mean()), rel=1e-5)
    loss.backward()
    stepped = (logits - 10 * logits.grad)
    att2 = [x.softmax(-1) for x in stepped.unbind(0)]
    after = look_loss([a[None] for a in att2], ids[None], [pairs], image_id, layers=[1])
    assert float(after) < float(loss.detach())
    assert float(look_loss([a[None] for a in att], ids[None], [[]], image_id, [0])) == 0.0


def test_standard_error():
    r = with_se([1, 0, 1, 1])
    assert r["acc"] == 0.75 and r["n"] == 4
    assert r["se"] == pytest.approx(math.sqrt(0.75 * 0.25 / 4))


def test_multi_token_candidates_are_refused(setup):
    model, encoder, questions, _, folder = setup
    bad = [{**questions[0], "candidates": ["red", "light blue"]}]
    with pytest.raises(ValueError, match="light blue"):
        score_questions(model, encoder, bad, folder)
