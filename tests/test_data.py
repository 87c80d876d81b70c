"""LLaVA data: label masking, image-token expansion, truncation, malformed records, collation."""
import json
import warnings

import pytest
import torch

pytest.importorskip("transformers")
PIL = pytest.importorskip("PIL.Image")

from compodistill.data import (IGNORE_INDEX, DataLossWarning, LengthGroupedSampler,  # noqa: E402
                               LlavaCollator, LlavaDataset, MalformedRecordError, build_tiny_tokenizer,
                               length_grouped_indices)

NIMG = 5  # image tokens per image


@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer()


@pytest.fixture()
def folder(tmp_path):
    for name, color in (("a.png", (255, 0, 0)), ("b.png", (0, 0, 255))):
        PIL.new("RGB", (20, 24), color).save(tmp_path / name)
    (tmp_path / "broken.png").write_bytes(b"not a png")
    return tmp_path


def conv(*turns, image=None, rid=None):
    rec = {"conversations": [{"from": f, "value": v} for f, v in turns]}
    if image is not None:
        rec["image"] = image
    if rid is not None:
        rec["id"] = rid
    return rec


def make(records, folder, tok, **kw):
    kw.setdefault("num_image_tokens", NIMG)
    return LlavaDataset(records, str(folder), tok, 16, **kw)


def labelled_tokens(tok, item):
    return tok.convert_ids_to_tokens([t for t in item["labels"].tolist() if t != IGNORE_INDEX])


def test_only_assistant_turns_are_labelled(tok, folder):
    rec = conv(("human", "<image>\nWhat color is the circle?"), ("gpt", "red"),
               ("human", "What shape is it?"), ("gpt", "a circle"), image="a.png")
    item = make([rec], folder, tok)[0]
    # Each reply and its end-of-turn token, nothing else (no prompt, role or image token).
    assert labelled_tokens(tok, item) == ["red", "<|im_end|>", "a", "circle", "<|im_end|>"]
    ids, labels = item["input_ids"], item["labels"]
    keep = labels != IGNORE_INDEX
    assert torch.equal(labels[keep], ids[keep])
    assert "user" in tok.convert_ids_to_tokens(ids[~keep].tolist())


def test_image_placeholder_expands_to_num_image_tokens(tok, folder):
    rec = conv(("human", "<image>\nDescribe the image."), ("gpt", "red"), image="a.png")
    for n in (1, 7):
        item = make([rec], folder, tok, num_image_tokens=n)[0]
        image_id = tok.convert_tokens_to_ids("<image>")
        pos = (item["input_ids"] == image_id).nonzero().flatten()
        assert len(pos) == n and int(pos[-1] - pos[0]) == n - 1  # one contiguous block
        assert item["pixel_values"].shape == (1, 3, 16, 16)


def test_multi_image_and_tag_prepended(tok, folder):
    two = conv(("human", "<image> and <image>: which is red?"), ("gpt", "the first"),
               image=["a.png", "b.png"])
    untagged = conv(("human", "Describe the image."), ("gpt", "red"), image="a.png")
    ds = make([two, untagged], folder, tok)
    image_id = tok.convert_tokens_to_ids("<image>")
    item = ds[0]
    assert int((item["input_ids"] == image_id).sum()) == 2 * NIMG
    assert item["pixel_values"].shape == (2, 3, 16, 16)
    assert item["pixel_values"][0, 0].mean() > item["pixel_values"][1, 0].mean()  # a is red
    assert int((ds[1]["input_ids"] == image_id).sum()) == NIMG  # LLaVA convention: tag added


def test_sample_without_image(tok, folder):
    ds = make([conv(("human", "What color is red?"), ("gpt", "red"))], folder, tok)
    item = ds[0]
    assert item["pixel_values"] is None
    assert not (item["input_ids"] == tok.convert_tokens_to_ids("<image>")).any()
    batch = LlavaCollator(tok.pad_token_id)([item, item])
    assert "pixel_values" not in batch


def test_fallback_template_when_tokenizer_has_none(tok, folder):
    plain = build_tiny_tokenizer()
    plain.chat_template = None
    item = make([conv(("human", "What color?"), ("gpt", "red"))], folder, plain)[0]
    assert labelled_tokens(plain, item) == ["red", "<|im_end|>"]


def test_template_that_is_not_prefix_consistent(tok, folder):
    odd = build_tiny_tokenizer()
    # A closing line after the last turn only: earlier renders are not prefixes of the full one.
    odd.chat_template = ("{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} ; "
                         "{% endfor %}{% if add_generation_prompt %}assistant : {% endif %}.")
    rec = conv(("human", "What color?"), ("gpt", "red"), ("human", "And shape?"),
               ("gpt", "circle"))
    item = make([rec], folder, odd)[0]
    assert labelled_tokens(odd, item) == ["red", "circle"]  # reply text only, found by search


def _two_image_record():
    return conv(("human", "<image> is left of <image> ?"), ("gpt", "yes it is"),
                image=["a.png", "b.png"])


def test_truncation_never_splits_an_image(tok, folder):
    full = make([_two_image_record()], folder, tok)[0]
    image_id = tok.convert_tokens_to_ids("<image>")
    full_len = len(full["input_ids"])
    second = (full["input_ids"] == image_id).nonzero().flatten()[NIMG].item()  # 2nd block start
    for max_length in range(second + 1, full_len):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = make([_two_image_record()], folder, tok, max_length=max_length)
        if len(ds) == 0:  # nothing supervised left: skipped as "too long"
            assert ds.problems[0].reason == "too long"
            continue
        item = ds[0]
        n_tokens = int((item["input_ids"] == image_id).sum())
        assert len(item["input_ids"]) <= max_length
        assert n_tokens % NIMG == 0
        assert n_tokens == NIMG * item["pixel_values"].shape[0]
    # A cut inside the second block moves to its start and keeps only the first image.
    with pytest.warns(UserWarning, match="too long"):
        ds = make([_two_image_record()], folder, tok, max_length=second + 2)
    assert len(ds) == 0  # the reply comes after both images: nothing left to learn


def test_truncation_keeps_labels_before_the_cut(tok, folder):
    rec = conv(("human", "What color?"), ("gpt", "red"), ("human", "<image> and this?"),
               ("gpt", "blue"), image="a.png")
    full = make([rec], folder, tok)[0]
    image_id = tok.convert_tokens_to_ids("<image>")
    start = (full["input_ids"] == image_id).nonzero().flatten()[0].item()
    item = make([rec], folder, tok, max_length=start + 3)[0]
    assert len(item["input_ids"]) == start and item["pixel_values"] is None
    assert labelled_tokens(tok, item) == ["red", "<|im_end|>"]
    with pytest.warns(UserWarning, match="max_length"):
        assert len(make([rec], folder, tok, max_length=start + 3, truncation="drop")) == 0


def _bad_jsonl(folder):
    lines = [
        json.dumps(conv(("human", "<image> What color?"), ("gpt", "red"), image="a.png")),
        "{not json",
        json.dumps(conv(("human", "<image> hi"), ("gpt", "red"), image="missing.png")),
        json.dumps(conv(("human", "<image> hi"), image="a.png", rid="x7")),
        "",  # blank lines are ignored, but still counted in line numbers
        json.dumps(conv(("human", "<image> <image> hi"), ("gpt", "red"), image="a.png")),
    ]
    path = folder / "data.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_malformed_records_skipped_with_count(tok, folder):
    with pytest.warns(UserWarning, match="skipped 4 of 5 records") as rec:
        ds = make(str(_bad_jsonl(folder)), folder, tok)
    assert len(ds) == 1 and ds.num_skipped == 4
    wheres = [p.where for p in ds.problems]
    assert wheres[0] == "line 2" and "line 3" in wheres[1] and "line 4 (id 'x7')" in wheres[2]
    assert "line 6" in wheres[3]
    assert {p.reason for p in ds.problems} == {"bad JSON", "missing image", "no assistant turn",
                                              "image tag mismatch"}
    assert "line 2" in str(rec[0].message)


@pytest.mark.parametrize("drop, line, reason", [
    (0, 2, "bad JSON"), (1, 3, "image file not found"), (2, 4, "no assistant turn"),
    (3, 6, "2 <image> tags but 1 images")])
def test_malformed_records_raise_with_line_number(tok, folder, drop, line, reason):
    path = _bad_jsonl(folder)
    lines = path.read_text().split("\n")
    bad = [2, 3, 4, 6]
    # Keep line numbers: replace the other bad lines with blanks.
    keep = [ln if (i not in bad or i == bad[drop]) else "" for i, ln in enumerate(lines, 1)]
    path.write_text("\n".join(keep))
    with pytest.raises(MalformedRecordError, match=rf"line {line}\b.*{reason}"):
        make(str(path), folder, tok, on_error="raise")


def test_json_list_reports_record_index(tok, folder):
    path = folder / "data.json"
    path.write_text(json.dumps([conv(("human", "hi"), ("gpt", "red")),
                                conv(("human", "hi"), ("gpt", "red"), image="nope.png")]))
    with pytest.raises(MalformedRecordError, match="record 1: missing image"):
        make(str(path), folder, tok, on_error="raise")


def test_unreadable_image_found_when_built(tok, folder):
    """The header is opened for the token count anyway: a broken image is counted when the data
    set is built, once, not inside the loader at every epoch."""
    recs = [conv(("human", "hi"), ("gpt", "red"), image="broken.png", rid="b0"),
            conv(("human", "hi"), ("gpt", "blue"), image="a.png")]
    with pytest.warns(DataLossWarning, match="record 0 \\(id 'b0'\\): unreadable image"):
        ds = make(recs, folder, tok)
    assert len(ds) == 1 and ds.num_skipped == 1
    assert ds.records_skipped() == {"unreadable image": 1}
    assert ds.first_skipped() == ["record 0 (id 'b0')"]
    with pytest.raises(MalformedRecordError, match="unreadable image"):
        make(recs, folder, tok, on_error="raise")


def test_unreadable_image_found_lazily_is_counted_once(tok, folder):
    recs = [conv(("human", "hi"), ("gpt", "red"), image="broken.png"),
            conv(("human", "hi"), ("gpt", "blue"), image="a.png")]
    ds = make(recs, folder, tok, preprocess=False)
    with pytest.warns(DataLossWarning, match="record 0: unreadable image"):
        assert ds[0] is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second epoch meets it again: no second warning
        assert ds[0] is None
    assert ds.num_skipped == 1 and ds.records_skipped() == {"unreadable image": 1}
    batch = LlavaCollator(tok.pad_token_id)([ds[0], ds[1]])  # the None is dropped
    assert batch["input_ids"].shape[0] == 1


def test_records_skipped_by_reason(tok, folder):
    with pytest.warns(DataLossWarning):
        ds = make(str(_bad_jsonl(folder)), folder, tok)
    assert ds.records_skipped() == {"bad JSON": 1, "missing image": 1, "no assistant turn": 1,
                                    "image tag mismatch": 1}
    assert ds.first_skipped(2) == ["line 2", "line 3"]


def test_lazy_encoding_matches_preprocessed(tok, folder):
    recs = [_two_image_record(), conv(("human", "hi"), ("gpt", "red"))]
    eager, lazy = make(recs, folder, tok), make(recs, folder, tok, preprocess=False)
    for i in range(2):
        assert torch.equal(eager[i]["input_ids"], lazy[i]["input_ids"])
        assert torch.equal(eager[i]["labels"], lazy[i]["labels"])
    assert eager.lengths == [len(eager[i]["input_ids"]) for i in range(2)]


def test_hf_image_processor_accepted(tok, folder):
    from transformers import SiglipImageProcessor

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        proc = SiglipImageProcessor(size={"height": 24, "width": 24})
    ds = LlavaDataset([conv(("human", "hi"), ("gpt", "red"), image="a.png")], str(folder), tok,
                      proc, num_image_tokens=NIMG)
    assert ds[0]["pixel_values"].shape == (1, 3, 24, 24)


@pytest.mark.parametrize("side", ["right", "left"])
def test_collator_pads_both_sides(tok, folder, side):
    ds = make([conv(("human", "<image> What color is the circle?"), ("gpt", "red"), image="a.png"),
               conv(("human", "hi"), ("gpt", "blue")),
               conv(("human", "<image> hi"), ("gpt", "blue circle"), image="b.png")], folder, tok)
    items = [ds[i] for i in range(3)]
    batch = LlavaCollator(tok.pad_token_id, padding_side=side)(items)
    length = max(len(x["input_ids"]) for x in items)
    assert batch["input_ids"].shape == batch["labels"].shape == (3, length)
    for row, x in enumerate(items):
        n = len(x["input_ids"])
        real = slice(0, n) if side == "right" else slice(length - n, length)
        pad = slice(n, length) if side == "right" else slice(0, length - n)
        assert torch.equal(batch["input_ids"][row, real], x["input_ids"])
        assert torch.equal(batch["labels"][row, real], x["labels"])
        assert batch["attention_mask"][row, real].all() and not batch["attention_mask"][row, pad].any()
        assert (batch["input_ids"][row, pad] == tok.pad_token_id).all()
        assert (batch["labels"][row, pad] == IGNORE_INDEX).all()
    # Images of samples 0 and 2, in order (sample 1 has none).
    expected = torch.cat([items[0]["pixel_values"], items[2]["pixel_values"]])
    assert torch.equal(batch["pixel_values"], expected)
    assert LlavaCollator(0, pad_to_multiple_of=8)(items)["input_ids"].shape[1] % 8 == 0


def test_length_grouping():
    lengths = [5, 90, 12, 33, 7, 64, 2, 41, 18, 77, 3, 50]
    idx = length_grouped_indices(lengths, batch_size=2, mega_batch_mult=2, seed=1)
    assert sorted(idx) == list(range(len(lengths)))
    assert lengths[idx[0]] == max(lengths)  # longest first: out-of-memory shows up at once
    megas = [idx[i: i + 4] for i in range(0, len(idx), 4)]
    for m in megas:  # sorted within each mega-batch, apart from the swapped-in first element
        assert [lengths[j] for j in m[1:]] == sorted((lengths[j] for j in m[1:]), reverse=True)
    assert idx == length_grouped_indices(lengths, 2, mega_batch_mult=2, seed=1)
    sampler = LengthGroupedSampler(lengths, 2, mega_batch_mult=2, seed=1)
    first = list(sampler)
    sampler.set_epoch(1)
    assert first == idx and list(sampler) != first and len(sampler) == len(lengths)


def _spread(lengths, order, batch_size):
    """Summed (longest - shortest) over the batches that ``order`` cuts into: padding waste."""
    chunks = [order[i: i + batch_size] for i in range(0, len(order), batch_size)]
    return sum(max(lengths[j] for j in c) - min(lengths[j] for j in c) for c in chunks)


def test_length_grouped_sampler_with_a_plain_dataloader():
    from torch.utils.data import DataLoader

    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, 1000, (203,), generator=g).tolist()
    sampler = LengthGroupedSampler(lengths, batch_size=4, mega_batch_mult=5, seed=3)
    order = list(sampler)
    assert sorted(order) == list(range(len(lengths))) and len(sampler) == len(lengths)
    for start in range(0, len(order), 20):  # each mega-batch sorted, longest first
        mega = [lengths[j] for j in order[start: start + 20]]
        assert mega[1:] == sorted(mega[1:], reverse=True)
    shuffled = torch.randperm(len(lengths), generator=g).tolist()
    assert _spread(lengths, order, 4) < _spread(lengths, shuffled, 4) / 3  # ~4x less padding
    # DataLoader batches are the sampler's consecutive chunks.
    loader = DataLoader(list(range(len(lengths))), batch_size=4, sampler=sampler)
    assert [i for batch in loader for i in batch.tolist()] == order


def test_length_grouped_sampler_is_deterministic_per_seed_and_epoch():
    lengths = list(range(50, 0, -1))
    a, b = (LengthGroupedSampler(lengths, 2, mega_batch_mult=3, seed=7) for _ in range(2))
    epoch0 = list(a)
    assert list(a) == epoch0 == list(b)  # iterating again does not advance the order
    a.set_epoch(1)
    b.set_epoch(1)
    epoch1 = list(a)
    assert epoch1 == list(b) and epoch1 != epoch0 and sorted(epoch1) == sorted(epoch0)
    a.set_epoch(0)
    assert list(a) == epoch0  # a resumed run replays an epoch
    assert list(LengthGroupedSampler(lengths, 2, mega_batch_mult=3, seed=8)) != epoch0
    with pytest.raises(ValueError, match="batch_size"):
        LengthGroupedSampler(lengths, 0)
    with pytest.raises(TypeError, match="'lengths' attribute"):
        LengthGroupedSampler([{"input_ids": [1]}], 2)  # a dataset without lengths


@pytest.mark.parametrize("preprocess", [True, False])
def test_length_grouped_sampler_over_a_dataset(tok, folder, monkeypatch, preprocess):
    from torch.utils.data import DataLoader

    recs = [conv(("human", "hi " * n), ("gpt", "red"), image="a.png" if n % 2 else None)
            for n in (1, 12, 3, 9, 2, 15, 4, 7)]
    ds = make(recs, folder, tok, preprocess=preprocess)
    loads = []
    real_load = ds.encoder.load_images
    monkeypatch.setattr(ds.encoder, "load_images", lambda p: loads.append(p) or real_load(p))
    sampler = LengthGroupedSampler(ds, batch_size=2, seed=0)  # reads ds.lengths
    assert sampler.lengths == ds.lengths and not loads  # lengths open no image
    loader = DataLoader(ds, batch_size=2, sampler=sampler,
                        collate_fn=LlavaCollator(tok.pad_token_id))
    batches = list(loader)
    assert sum(b["input_ids"].shape[0] for b in batches) == len(ds)
    order = list(sampler)
    # One mega-batch: batches come longest first, the first holds the two longest samples.
    assert sorted(ds.lengths[j] for j in order[:2]) == sorted(ds.lengths)[-2:]
    if preprocess:  # exact lengths (lazy ones are word-count estimates)
        assert batches[0]["input_ids"].shape[1] == max(ds.lengths)
