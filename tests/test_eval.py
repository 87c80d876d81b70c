"""CR and VQA evaluation: both-order averaging, strict parsing, loaders, normalisation."""
import json

import pytest
import torch

pytest.importorskip("transformers")
PIL = pytest.importorskip("PIL.Image")

from compodistill.data import ConversationEncoder, LlavaDataset, build_tiny_tokenizer  # noqa: E402
from compodistill.data.synthetic import generate_synthetic  # noqa: E402
from compodistill.eval import (CRExample, VQAExample, cr_prompt, evaluate_cr,  # noqa: E402
                               evaluate_vqa, format_cr_results, load_sugarcrepe,
                               load_synthetic_cr, load_vqa_json, load_winoground,
                               normalize_answer, vqa_score)
from compodistill.eval.common import eos_ids, greedy_generate  # noqa: E402

NIMG = 3


@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer()


@pytest.fixture(scope="module")
def encoder(tok):
    return ConversationEncoder(tok, 16, num_image_tokens=NIMG)


class ScriptedModel:
    """A fake logits model: ``reply(prompt_tokens)`` gives the reply tokens, then end of turn.

    Only the logits at each row's last real position are set, so right padding (loglik) and
    left padding (generation) both read them.
    """

    def __init__(self, tok, reply):
        self.tok, self.reply = tok, reply
        self.assistant = tok.convert_tokens_to_ids("assistant")
        self.calls = 0

    def __call__(self, input_ids, attention_mask, pixel_values=None):
        self.calls += 1
        assert pixel_values is not None and pixel_values.shape[1:] == (3, 16, 16)
        logits = torch.zeros(*input_ids.shape, len(self.tok))
        for b in range(input_ids.shape[0]):
            real = attention_mask[b].nonzero().flatten()
            ids = input_ids[b, real].tolist()
            k = len(ids) - 1 - ids[::-1].index(self.assistant)
            reply = self.tok.convert_tokens_to_ids(self.reply(
                self.tok.convert_ids_to_tokens(ids[:k]))) + [self.tok.eos_token_id]
            done = len(ids) - k - 1
            logits[b, real[-1], reply[min(done, len(reply) - 1)]] = 10.0
        return logits


def options(tokens):
    """The A and B caption texts of a CR prompt, from its tokens."""
    ia, ib, end = tokens.index("A"), tokens.index("B"), tokens.index("Answer")
    return " ".join(tokens[ia + 2: ib]), " ".join(tokens[ib + 2: end])


EXAMPLES = [  # a distinct shape per example, so no negative is another example's positive
    CRExample(PIL.new("RGB", (16, 16), (200, 0, 0)), f"a red {shape} {rel} a blue square",
              f"a red {shape} {neg} a blue square", cat, f"ex{i}")
    for i, (shape, rel, neg, cat) in enumerate([
        ("circle", "left of", "right of", "relation"), ("triangle", "above", "below", "relation"),
        ("diamond", "left of", "above", "attribute"), ("star", "below", "right of", "attribute"),
        ("cross", "right of", "left of", "object"), ("square", "above", "left of", "object")])
]
POSITIVES = {ex.positive for ex in EXAMPLES}


def oracle(tokens):
    a, _ = options(tokens)
    return ["A" if a in POSITIVES else "B"]


@pytest.mark.parametrize("policy, expected", [
    (lambda t: ["A"], 0.5),  # position bias alone: both orders averaged -> chance
    (lambda t: ["B"], 0.5),
    (oracle, 1.0),
    (lambda t: ["B" if oracle(t) == ["A"] else "A"], 0.0),
])
def test_cr_both_orders_averaged(tok, encoder, policy, expected):
    model = ScriptedModel(tok, policy)
    res = evaluate_cr(model, EXAMPLES, encoder, batch_size=5, progress=False)
    for scorer in ("loglik", "generate"):
        assert res[scorer].accuracy == pytest.approx(expected)
        assert res[scorer].unparsed == 0
        assert set(res[scorer].per_category) == {"attribute", "relation", "object"}
    if expected == 0.5:  # every single example gets exactly one of its two orders right
        assert {d["score"] for d in res["generate"].examples} == {0.5}


def test_cr_per_category(tok, encoder):
    known = {ex.positive for ex in EXAMPLES if ex.category == "relation"}

    def half_knows(tokens):
        a, b = options(tokens)
        return ["A"] if a in known else ["B"]  # unknown: always B

    res = evaluate_cr(ScriptedModel(tok, half_knows), EXAMPLES, encoder, scorers=["generate"],
                      progress=False)["generate"]
    assert res.per_category == {"attribute": 0.5, "object": 0.5, "relation": 1.0}
    assert res.accuracy == pytest.approx(4 / 6) and res.category_mean == pytest.approx(4 / 6)
    assert res.num_examples == 6
    assert "relation" in format_cr_results({"generate": res})


@pytest.mark.parametrize("reply", [["A", "."], ["a"], ["The", "answer", "is", "A"], []])
def test_cr_strict_parsing(tok, encoder, reply):
    res = evaluate_cr(ScriptedModel(tok, lambda t: reply), EXAMPLES[:2], encoder,
                      scorers=["generate"], max_new_tokens=4, progress=False)["generate"]
    assert res.accuracy == 0.0 and res.unparsed == 4  # 2 examples x 2 orders, all unparsed


def test_cr_loaders(tmp_path):
    (tmp_path / "img").mkdir()
    for name in ("x.jpg", "ex_0_img_0.png", "ex_0_img_1.png"):
        PIL.new("RGB", (8, 8)).save(tmp_path / "img" / name)
    sc = tmp_path / "sugarcrepe"
    sc.mkdir()
    (sc / "swap_att.json").write_text(json.dumps(
        {"0": {"filename": "x.jpg", "caption": "p", "negative_caption": "n"}}))
    (sc / "replace_rel.json").write_text(json.dumps(
        [{"image": "x.jpg", "caption": "p2", "negative_caption": "n2"}]))
    exs = load_sugarcrepe(str(sc), str(tmp_path / "img"))
    assert [(e.category, e.positive, e.negative) for e in exs] == [
        ("relation", "p2", "n2"), ("attribute", "p", "n")]
    assert exs[0].image == str(tmp_path / "img" / "x.jpg")
    wino = tmp_path / "wino.jsonl"
    wino.write_text(json.dumps({"id": 0, "image_0": "ex_0_img_0", "image_1": "ex_0_img_1",
                                "caption_0": "c0", "caption_1": "c1",
                                "collapsed_tag": "Relation"}) + "\n")
    pairs = load_winoground(str(wino), str(tmp_path / "img"))
    assert [(e.positive, e.negative, e.category) for e in pairs] == [
        ("c0", "c1", "relation"), ("c1", "c0", "relation")]
    assert pairs[1].image.endswith("ex_0_img_1.png")
    (sc / "bad.json").write_text(json.dumps([{"image": "x.jpg", "caption": "p"}]))
    with pytest.raises(ValueError, match="record 0"):
        load_sugarcrepe(str(sc / "bad.json"))


def tiny_llava(tok, image_size=32, patch=16):
    from transformers import (LlavaConfig, LlavaForConditionalGeneration, Qwen2Config,
                              SiglipVisionConfig)

    torch.manual_seed(0)
    cfg = LlavaConfig(
        vision_config=SiglipVisionConfig(hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=2,
                                         image_size=image_size, patch_size=patch),
        text_config=Qwen2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                num_hidden_layers=2, num_attention_heads=4,
                                num_key_value_heads=2, max_position_embeddings=256),
        image_token_id=tok.convert_tokens_to_ids("<image>"), vision_feature_layer=-1,
        vision_feature_select_strategy="full", image_seq_length=(image_size // patch) ** 2)
    return LlavaForConditionalGeneration(cfg).eval()


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    generate_synthetic(str(out), num=1, num_eval=2, image_size=32, progress=False)
    return out


def test_cr_and_vqa_on_tiny_llava(tok, synth):
    model = tiny_llava(tok)
    enc = ConversationEncoder(tok, 32, num_image_tokens=4)
    exs = load_synthetic_cr(str(synth / "cr_eval.json"))
    assert len(exs) == 6
    res = evaluate_cr(model, exs, enc, batch_size=4, progress=False)
    for r in res.values():
        assert 0 <= r.accuracy <= 1 and {d["score"] for d in r.examples} <= {0, 0.5, 1}
    # loglik equals an unbatched, unpadded forward on each prompt.
    letters = [tok.convert_tokens_to_ids(x) for x in ("A", "B")]
    for ex, detail in zip(exs[:2], res["loglik"].examples):
        for order, (a, b) in enumerate(((ex.positive, ex.negative), (ex.negative, ex.positive))):
            f = enc.encode_prompt(cr_prompt(a, b), [ex.image])
            with torch.no_grad():
                logits = model(input_ids=f["input_ids"][None],
                               pixel_values=f["pixel_values"]).logits[0, -1]
            assert detail["answers"][order] == ("A" if logits[letters[0]] > logits[letters[1]]
                                                else "B")
    # The caption diagnostic: summed log-probability of each caption, computed by hand.
    cap = evaluate_cr(model, exs[:1], enc, scorers=["caption"], progress=False)["caption"]
    manual = []
    for caption in (exs[0].positive, exs[0].negative):
        e = enc.encode([{"role": "user", "content": "<image>\nDescribe the image in one sentence."},
                        {"role": "assistant", "content": caption}])
        ids, labels = torch.tensor([e["input_ids"]]), torch.tensor(e["labels"])
        with torch.no_grad():
            logp = model(input_ids=ids, pixel_values=enc.pixels([exs[0].image])).logits[0]
        logp = logp.log_softmax(-1)
        manual.append(sum(logp[t - 1, labels[t]].item() for t in range(1, len(labels))
                          if labels[t] != -100))
    assert [float(a) for a in cap.examples[0]["answers"]] == pytest.approx(manual, abs=2e-3)
    assert cap.accuracy == float(manual[0] > manual[1])
    # HF generate (KV cache) and the plain greedy loop agree under left padding.
    vqa = load_vqa_json(str(synth / "vqa_eval.json"))
    feats = [enc.encode_prompt(ex.question, [ex.image]) for ex in vqa[:3]]
    kw = dict(pad_token_id=tok.pad_token_id, eos_token_ids=eos_ids(tok), max_new_tokens=4)
    assert greedy_generate(model, feats, **kw) == greedy_generate(model, feats, **kw,
                                                                   use_hf_generate=False)
    vres = evaluate_vqa(model, vqa, enc, max_new_tokens=3, progress=False)
    assert vres.num_examples == 8 and set(vres.per_type) == {"color", "shape", "relation",
                                                              "position"}


def test_eval_prompt_is_encoded_like_training(tok, synth):
    enc = ConversationEncoder(tok, 32, num_image_tokens=4)
    ds = LlavaDataset(str(synth / "train.json"), str(synth), tok, 32, num_image_tokens=4)
    rec = json.loads((synth / "train.json").read_text())[2]  # the CR question
    question = rec["conversations"][0]["value"]
    prompt = enc.prompt_ids(question.replace("<image>\n", ""), num_images=1)
    item = ds[2]
    assert torch.equal(item["input_ids"][: len(prompt)], prompt)
    assert (item["labels"][: len(prompt)] == -100).all()
    assert (item["labels"][len(prompt):] != -100).all()  # the answer letter and end of turn


def test_vqa_with_scripted_model(tok, encoder):
    img = PIL.new("RGB", (16, 16))
    exs = [VQAExample(img, "How many objects?", ("2",), "count", "q0"),
           VQAExample(img, "What color is the circle?", ("red",), "color", "q1"),
           VQAExample(img, "What color is the square?", ("blue",), "color", "q2")]
    model = ScriptedModel(tok, lambda t: ["two"] if "many" in t else ["the", "red", "."])
    res = evaluate_vqa(model, exs, encoder, max_new_tokens=4, progress=False)
    assert res.per_type == {"color": 0.5, "count": 1.0}
    assert res.accuracy == pytest.approx(2 / 3)
    assert [p["prediction"] for p in res.predictions] == ["two", "the red.", "the red."]


def test_vqa_loader(tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_text(json.dumps({"question_id": 5, "image": "i.png", "text": "Q?",
                                "answers": [{"answer": "yes"}, {"answer": "no"}]}) + "\n")
    ex = load_vqa_json(str(path))[0]
    assert (ex.id, ex.question, ex.answers, ex.question_type) == ("5", "Q?", ("yes", "no"), "all")
    assert ex.image == str(tmp_path / "i.png")


@pytest.mark.parametrize("raw, norm", [
    ("The Red.", "red"), ("Two", "2"), ("ten", "10"), ("a dog", "dog"), ("An apple\n", "apple"),
    ("dont", "don't"), ("isnt", "isn't"), ("Yes!", "yes"), ("1,000", "1000"), ("2.5", "2.5"),
    ("left-hand", "left hand"), ("black and white", "black and white"),
    ("the cat's toy", "cat's toy"), ("What?", "what"), ("(left)", "left"), ("red , blue", "red blue"),
])
def test_vqa_normalisation(raw, norm):
    assert normalize_answer(raw) == norm


def test_vqa_score():
    assert vqa_score("Two", ["2"]) == 1.0 and vqa_score("three", ["2"]) == 0.0
    answers = ["2"] * 2 + ["3"] * 8
    assert vqa_score("two", answers) == pytest.approx(2 / 3)
    assert vqa_score("3", answers) == 1.0


def test_eval_cli_on_saved_model(tok, synth, tmp_path, capsys):
    from compodistill.eval.cli import main

    model_dir = tmp_path / "model"
    tiny_llava(tok).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    out = tmp_path / "cr.json"
    assert main(["cr", "--model", str(model_dir), "--data", str(synth / "cr_eval.json"),
                 "--out", str(out), "--batch-size", "6"]) == 0
    assert "overall" in capsys.readouterr().out
    res = json.loads(out.read_text())
    assert set(res) == {"loglik", "generate"} and res["loglik"]["num_examples"] == 6
    assert main(["vqa", "--model", str(model_dir), "--data", str(synth / "vqa_eval.json")]) == 0
    assert "position" in capsys.readouterr().out


def test_training_batch_runs_through_tiny_llava(tok, synth):
    """Mixed batch (two images, one, none): image tokens and pixel rows line up for LLaVA."""
    from compodistill.data import LlavaCollator

    img = "images/eval_000000.png"
    recs = [{"image": [img, img], "conversations": [
                {"from": "human", "value": "<image> <image> What color?"},
                {"from": "gpt", "value": "red"}]},
            {"conversations": [{"from": "human", "value": "What color?"},
                               {"from": "gpt", "value": "blue"}]},
            {"image": img, "conversations": [{"from": "human", "value": "Describe the image."},
                                             {"from": "gpt", "value": "a red circle"}]}]
    ds = LlavaDataset(recs, str(synth), tok, 32, num_image_tokens=4)
    batch = LlavaCollator(tok.pad_token_id)([ds[i] for i in range(3)])
    assert batch["pixel_values"].shape[0] == 3
    out = tiny_llava(tok)(**batch)
    assert torch.isfinite(out.loss)
    out.loss.backward()
