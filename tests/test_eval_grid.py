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
    assert res["uniform"] == pytest.approx(1 / 9, abs=1e-4)
    assert len(res["question"]) == len(out.attentions)


def test_standard_error():
    r = with_se([1, 0, 1, 1])
    assert r["acc"] == 0.75 and r["n"] == 4
    assert r["se"] == pytest.approx(math.sqrt(0.75 * 0.25 / 4))


def test_multi_token_candidates_are_refused(setup):
    model, encoder, questions, _, folder = setup
    bad = [{**questions[0], "candidates": ["red", "light blue"]}]
    with pytest.raises(ValueError, match="light blue"):
        score_questions(model, encoder, bad, folder)
