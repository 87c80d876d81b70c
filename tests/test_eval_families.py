"""`compodistill eval` on every non-LLaVA trainer family (docs/evaluation.md#families): a tiny
saved model of the family with a locally trained tokenizer and the family's own image
processor, CR and VQA through the CLI, the family's inputs checked against a direct forward
of the model, and the processors a checkpoint may carry (saved and reloaded, no download)."""
from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("transformers")
PIL = pytest.importorskip("PIL.Image")

from compodistill.cli import main  # noqa: E402
from compodistill.hf.families import TRAINER_FAMILIES  # noqa: E402

from _helpers import (assert_one_line_error, family_image_processor,  # noqa: E402
                      local_bpe_tokenizer)

FAMILIES = [f for f in TRAINER_FAMILIES if f != "llava"]
# The families' own tokenizers name their image markers (InternVL: start/end_image_token;
# Gemma 3: boi/eoi and image_token); the processors and InternVL's inputs read them by name.
MARKERS = {"start_image_token": "<vision_start>", "end_image_token": "<vision_end>",
           "boi_token": "<vision_start>", "eoi_token": "<vision_end>", "image_token": "<image>"}
TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<eos>\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def named_tokenizer(folder, texts=()):
    """``local_bpe_tokenizer`` saved to ``folder`` again with its markers named (MARKERS)."""
    from transformers import AutoTokenizer

    local_bpe_tokenizer(folder, *([texts] if texts else []))
    tok = AutoTokenizer.from_pretrained(folder, extra_special_tokens=MARKERS)
    tok.save_pretrained(folder)
    return tok


@pytest.fixture(scope="module", params=FAMILIES)
def saved(request, tmp_path_factory):
    """(folder, family): a tiny student of the family saved with its tokenizer and image
    processor, and an eval set of 2 CR examples and 3 VQA questions on images of two sizes."""
    from compodistill.data import generate_synthetic
    from compodistill.hf.families import tiny_family_pair

    family = request.param
    root = tmp_path_factory.mktemp(f"eval-{family}")
    data = root / "data"
    generate_synthetic(str(data), num=1, num_eval=2, image_size=16, progress=False)
    # dynamic resolution where the family has it: the second image is wider
    wide = data / "images" / "eval_000001.png"
    PIL.open(wide).convert("RGB").resize((24, 16)).save(wide)
    cr = json.loads((data / "cr_eval.json").read_text())
    vqa = json.loads((data / "vqa_eval.json").read_text())
    (data / "cr_eval.json").write_text(json.dumps([cr[0], cr[-1]]))
    (data / "vqa_eval.json").write_text(json.dumps([vqa[0], vqa[1], vqa[-1]]))
    texts = [r["caption"] for r in cr] + [r["question"] for r in vqa]
    tok = named_tokenizer(root / "model", texts)
    student, _ = tiny_family_pair(family, vocab_size=len(tok), teacher_layers=2)
    student.save_pretrained(root / "model")
    family_image_processor(family).save_pretrained(root / "model")
    return root, family


def run_cli(capsys, *args):
    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_cr_and_vqa_give_scores(saved, capsys):
    root, _ = saved
    data, model = root / "data", str(root / "model")
    code, out, err = run_cli(capsys, "eval", "cr", "--model", model, "--data",
                             str(data / "cr_eval.json"), "--scorers", "loglik", "generate",
                             "caption", "--max-new-tokens", "2", "--out",
                             str(root / "cr.json"), "--quiet")
    assert code == 0, err
    result = json.loads((root / "cr.json").read_text())
    assert set(result) == {"loglik", "generate", "caption"} and "overall" in out
    for scorer, r in result.items():
        assert r["num_examples"] == 2 and 0.0 <= r["accuracy"] <= 1.0
    assert all(a in ("A", "B") for ex in result["loglik"]["examples"] for a in ex["answers"])
    code, out, err = run_cli(capsys, "eval", "vqa", "--model", model, "--data",
                             str(data / "vqa_eval.json"), "--max-new-tokens", "3", "--out",
                             str(root / "vqa.json"), "--quiet")
    assert code == 0, err
    result = json.loads((root / "vqa.json").read_text())
    assert result["num_examples"] == 3 and 0.0 <= result["accuracy"] <= 1.0
    assert "overall" in out


def _reply_batch(root):
    """The caption-likelihood batch of the eval path: two images of different sizes (two
    samples), right padding, as `eval cr --scorers caption` builds it."""
    from compodistill.eval.cli import load_model_and_encoder
    from compodistill.eval.families import collate, encode_images, reply_sample

    model, encoder = load_model_and_encoder(str(root / "model"))
    feats = [reply_sample(encoder, "Describe the image in one sentence.", caption,
                          encode_images(encoder, [root / "data" / "images" / name]))
             for name, caption in (("eval_000000.png", "a red square"),
                                   ("eval_000001.png", "a blue circle left of it"))]
    return model, encoder, collate(encoder, feats, encoder.tokenizer.pad_token_id, "right")


def _summed_logprobs(logits, labels):
    logp = logits.float().log_softmax(-1)[:, :-1]
    target = labels[:, 1:]
    keep = target != -100
    return (logp.gather(-1, target.clamp(min=0)[..., None])[..., 0] * keep).sum(-1)


GAP = 2e-5  # more than float32 rounding of a summed log-probability near -80 (8e-6)


def test_likelihood_eval_gives_the_model_the_family_inputs(saved):
    """The eval's log-probability of a caption equals a direct forward with all of the
    family's inputs, and differs when any one of them is left out (1-D positions instead of
    M-RoPE without mm_token_type_ids: transformers takes that silently)."""
    from compodistill.eval.common import label_logprobs
    from compodistill.data.family_inputs import family_inputs

    root, family = saved
    model, encoder, batch = _reply_batch(root)
    extras = family_inputs(batch)
    image_id = encoder.image_token_id
    assert int((batch["input_ids"] == image_id).sum(-1)[0]) != int(
        (batch["input_ids"] == image_id).sum(-1)[1]) or family not in ("qwen2_5_vl", "qwen3_vl")
    with torch.no_grad():
        got = torch.tensor(label_logprobs(model, batch))
        full = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    pixel_values=batch["pixel_values"], **extras)
        want = _summed_logprobs(model(**full).logits, batch["labels"])
        # the same operations on the same inputs: bit for bit
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        for key in extras:  # each family input matters: an error or another result without it
            if key == "batch_num_images":  # one image a sample: the model's own default
                continue
            try:
                dropped = model(**{k: v for k, v in full.items() if k != key}).logits
            except Exception:  # noqa: BLE001 - the model refuses the batch: also "matters"
                continue
            # The tiny random model barely depends on positions or on Gemma 3's image mask:
            # measured gaps are 2e-4 and 7e-5, above float32 rounding of these sums (8e-6).
            gap = (_summed_logprobs(dropped, batch["labels"]) - want).abs().max()
            assert gap > GAP, (key, float(gap))


class Recorder(torch.nn.Module):
    """The model, recording the inputs of each call (it accepts position ids, as a
    transformers model does, but has no ``generate``)."""

    def __init__(self, model):
        super().__init__()
        self.model, self.calls = model, []

    def forward(self, input_ids, attention_mask, pixel_values=None, position_ids=None, **extra):
        self.calls.append(dict(extra, input_ids=input_ids, position_ids=position_ids))
        return self.model(input_ids=input_ids, attention_mask=attention_mask,
                          pixel_values=pixel_values, position_ids=position_ids, **extra)


def test_generation_paths_agree_with_family_inputs(saved):
    """Greedy decoding through transformers' generate and through the plain re-forward loop
    (left padding, token types grown with the reply, positions left to the model) agree, and
    the first token is the argmax of a direct forward with the family's inputs."""
    from compodistill.eval.cli import load_model_and_encoder
    from compodistill.eval.common import greedy_generate
    from compodistill.data.family_inputs import family_inputs

    root, _ = saved
    model, encoder = load_model_and_encoder(str(root / "model"))
    images = root / "data" / "images"
    feats = [encoder.encode_prompt("What color is the square?", [images / "eval_000000.png"]),
             encoder.encode_prompt("Is it left?", [images / "eval_000001.png"])]
    kw = dict(pad_token_id=encoder.tokenizer.pad_token_id, eos_token_ids=[-1],
              max_new_tokens=3, image_inputs=encoder.image_inputs)
    hf = greedy_generate(model, feats, use_hf_generate=True, **kw)
    recorder = Recorder(model)
    loop = greedy_generate(recorder, feats, **kw)  # no generate(): the re-forward loop
    assert hf == loop and all(len(r) == 3 for r in hf)
    # every step: the family's inputs for the grown sequence, and no 1-D positions
    assert len(recorder.calls) == 3
    for call in recorder.calls:
        assert call["position_ids"] is None
        for key, value in encoder.image_inputs.batch_extras(call["input_ids"]).items():
            assert torch.equal(call[key], value), key
    from compodistill.eval.families import collate

    batch = collate(encoder, feats, encoder.tokenizer.pad_token_id, "left")
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       pixel_values=batch["pixel_values"], **family_inputs(batch)).logits
    assert [r[0] for r in hf] == logits[:, -1].argmax(-1).tolist()


def test_unsupported_family_is_one_line(saved, capsys, tmp_path):
    root, _ = saved
    config = json.loads((root / "model" / "config.json").read_text())
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps(dict(config, model_type="paligemma")))
    code, _, err = run_cli(capsys, "eval", "vqa", "--model", str(tmp_path / "m"), "--data",
                           str(root / "data" / "vqa_eval.json"))
    assert_one_line_error(code, err, "--model", "paligemma", "Qwen2.5-VL", "LLaVA")


def test_grid_scores_on_the_family(saved):
    """The grid task's likelihood scorers (compodistill.eval.grid) with the family's inputs:
    the picked candidate is the argmax of a direct forward; captions give a score each."""
    from compodistill.eval.cli import load_model_and_encoder
    from compodistill.eval.families import collate
    from compodistill.eval.grid import score_captions, score_questions, target_attention
    from compodistill.data.family_inputs import family_inputs

    root, _ = saved
    model, encoder = load_model_and_encoder(str(root / "model"))
    tok = encoder.tokenizer
    words = [w for w in ("red", "blue", "square", "circle", "is", "a")
             if len(tok(w, add_special_tokens=False)["input_ids"]) == 1][:3]
    assert len(words) >= 2, words
    items = [{"image": f"images/eval_00000{i}.png", "question": q, "candidates": words,
              "answer": words[0], "question_type": "color", "caption": "a red square",
              "negative_caption": "a blue square", "category": "attribute", "target_cell": 0}
             for i, q in enumerate(("What color is it?", "Which colour is the big one?"))]
    folder = str(root / "data")
    got = score_questions(model, encoder, items, folder)
    feats = [encoder.encode_prompt(it["question"], [root / "data" / it["image"]]) for it in items]
    batch = collate(encoder, feats, tok.pad_token_id, "left")
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       pixel_values=batch["pixel_values"], **family_inputs(batch)).logits[:, -1]
    ids = [tok(w, add_special_tokens=False)["input_ids"][0] for w in words]
    assert got["predictions"] == [words[int(row[ids].argmax())] for row in logits]
    assert score_captions(model, encoder, items, folder)["all"]["n"] == 2
    with pytest.raises(ValueError, match="target_attention"):
        target_attention(model, encoder, items, folder)


# --------------------------------------------------------------------------- processors

def save_processor(family, folder, tok):
    """The family's own processor saved to ``folder`` with a chat template. Gemma 3's
    processor is built and saved whole; the others bundle a video processor, which needs
    torchvision: they are written as hub checkpoints lay them out (the image processor's
    ``preprocessor_config.json`` naming the processor class, ``chat_template.json``).
    Returns the processor class name."""
    import transformers as tf

    image_processor = family_image_processor(family)
    if family == "gemma3":  # its tokenizer names boi, eoi and the image token (MARKERS)
        tf.Gemma3Processor(image_processor=image_processor, tokenizer=tok,
                           chat_template=TEMPLATE, image_seq_length=4).save_pretrained(folder)
        return "Gemma3Processor"
    name = {"qwen2_5_vl": "Qwen2_5_VLProcessor", "qwen3_vl": "Qwen3VLProcessor",
            "llava_onevision": "LlavaOnevisionProcessor", "internvl": "InternVLProcessor"}[family]
    tok.save_pretrained(folder)
    image_processor.save_pretrained(folder)
    config = json.loads((folder / "preprocessor_config.json").read_text())
    (folder / "preprocessor_config.json").write_text(json.dumps(dict(config,
                                                                     processor_class=name)))
    (folder / "chat_template.json").write_text(json.dumps({"chat_template": TEMPLATE}))
    return name


@pytest.mark.filterwarnings("ignore:.*AutoProcessor failed")
def test_checkpoint_processor_feeds_eval_and_training_data(saved, tmp_path):
    """A checkpoint that carries the model's own processor: its tokenizer, chat template and
    image processor are what eval and the training data use. AutoProcessor is used when the
    class can be built here; otherwise (a bundled video processor without torchvision) the
    parts load one by one, with a warning."""
    import shutil
    import warnings

    from compodistill.data.processors import load_processor_parts
    from compodistill.eval.cli import load_model_and_encoder
    from compodistill.train.config import config_from_dict
    from compodistill.train.trainer import CompoDistillTrainer

    root, family = saved
    folder = tmp_path / "model"
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(root / "model" / name, folder / name)
    tok = named_tokenizer(tmp_path / "tok")
    assert not tok.chat_template
    save_processor(family, folder, tok)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        parts = load_processor_parts(folder)
    failed = [w for w in caught if "AutoProcessor failed" in str(w.message)]
    assert (parts.source == "parts") == bool(failed), [str(w.message) for w in caught]
    assert parts.tokenizer.chat_template == TEMPLATE
    assert type(parts.image_processor) is type(family_image_processor(family))
    _, encoder = load_model_and_encoder(str(folder))
    ids = encoder.encode_prompt("What color?", [root / "data" / "images" / "eval_000000.png"])
    text = encoder.tokenizer.decode(ids["input_ids"])
    assert text.startswith("<|user|>") and text.endswith("<|assistant|>"), text
    records = [{"id": "0", "image": "images/eval_000000.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat color?"}, {"from": "gpt", "value": "red"}]}]
    (tmp_path / "train.json").write_text(json.dumps(records))
    trainer = CompoDistillTrainer(config_from_dict({
        "student": str(folder), "output_dir": str(tmp_path / "run"), "cpu_threads": 1,
        "taf": False,
        "data": {"train_json": str(tmp_path / "train.json"), "image_folder": str(root / "data")},
        "stages": [dict(kind="sft", max_steps=1, batch_size=1)]}), show_progress=False)
    assert trainer.tokenizer.chat_template == TEMPLATE
    sample = trainer.dataset[0]["input_ids"].tolist()
    assert sample[:len(ids["input_ids"])] == ids["input_ids"].tolist()  # same prompt encoding


def test_whole_processor_round_trip_is_used(tmp_path):
    """A processor class that builds here (LLaVA's: image processor, tokenizer, chat
    template): saved whole, AutoProcessor loads it, and its parts come back; a folder with a
    tokenizer only gives no image processor."""
    import transformers as tf

    from compodistill.data.processors import has_processor, load_processor_parts

    tok = local_bpe_tokenizer(tmp_path / "tok")
    image_processor = tf.CLIPImageProcessorPil(size={"shortest_edge": 16},
                                               crop_size={"height": 16, "width": 16})
    tf.LlavaProcessor(image_processor=image_processor, tokenizer=tok,
                      chat_template=TEMPLATE).save_pretrained(tmp_path / "proc")
    assert has_processor(tmp_path / "proc") and not has_processor(tmp_path / "tok")
    parts = load_processor_parts(tmp_path / "proc")
    assert parts.source == "processor" and parts.tokenizer.chat_template == TEMPLATE
    assert type(parts.image_processor) is tf.CLIPImageProcessorPil
    assert parts.image_processor.crop_size == image_processor.crop_size
    assert parts.tokenizer("a red circle<image>")["input_ids"] == tok("a red circle<image>")[
        "input_ids"]
    only = load_processor_parts(tmp_path / "tok")
    assert only.source == "parts" and only.image_processor is None


def test_llava_student_image_processor_in_training_eval_and_saving(tmp_path):
    """A LLaVA student saved with its image processor: the training data and eval both use
    it (not the default resize with mean = std = 0.5), and the trainer saves it with every
    stage output."""
    import transformers as tf

    from compodistill.data import ImageTransform
    from compodistill.data.processors import load_image_processor
    from compodistill.eval.cli import load_model_and_encoder
    from compodistill.train.config import config_from_dict
    from compodistill.train.trainer import CompoDistillTrainer

    from _helpers import write_tiny_pair

    write_tiny_pair(tmp_path, num=2, teacher=False)
    processor = tf.CLIPImageProcessorPil(size={"shortest_edge": 16},
                                         crop_size={"height": 16, "width": 16})
    processor.save_pretrained(tmp_path / "student")
    trainer = CompoDistillTrainer(config_from_dict({
        "student": str(tmp_path / "student"), "output_dir": str(tmp_path / "run"),
        "cpu_threads": 1, "taf": False,
        "data": {"train_json": str(tmp_path / "data" / "train.json"),
                 "image_folder": str(tmp_path / "data")},
        "stages": [dict(kind="sft", max_steps=1, batch_size=1)]}), show_progress=False)
    path = str(tmp_path / "data" / trainer.dataset.samples[0]["images"][0])
    image = PIL.open(path).convert("RGB")
    want = processor(images=[image], return_tensors="pt")["pixel_values"]
    assert torch.equal(trainer.dataset[0]["pixel_values"], want)
    assert not torch.allclose(ImageTransform(16)(image)[None], want, atol=1e-2)
    _, encoder = load_model_and_encoder(str(tmp_path / "student"))
    assert torch.equal(encoder.pixels([path]), want)
    trainer.save_model(trainer.student, tmp_path / "saved")
    assert type(load_image_processor(tmp_path / "saved")) is tf.CLIPImageProcessorPil
