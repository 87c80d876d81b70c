"""Bad input gets a clear ValueError/TypeError naming the argument and shapes."""
from __future__ import annotations

import pytest
import torch

import compodistill as cd


def qk(b=2, hq=4, hkv=2, n=10, d=8, dtype=torch.float32):
    return torch.randn(b, hq, n, d, dtype=dtype), torch.randn(b, hkv, n, d, dtype=dtype)


SPANS = [[(1, 4)], [(2, 5)]]


@pytest.mark.parametrize("make, error, words", [
    (lambda: (torch.randn(2, 4, 10), qk()[1]), ValueError, "(B, H, N, d)"),
    (lambda: (qk()[0], torch.randn(2, 3, 10, 8)), ValueError, "multiple of key heads"),
    (lambda: (qk()[0], torch.randn(2, 2, 10, 4)), ValueError, "head dim"),
    (lambda: (qk()[0], torch.randn(3, 2, 10, 8)), ValueError, "batch size"),
    (lambda: (qk()[0], torch.randn(2, 2, 11, 8)), ValueError, "sequence length"),
    (lambda: (qk()[0], qk(dtype=torch.float16)[1]), TypeError, "share a dtype"),
    (lambda: (qk()[0].int(), qk()[1]), TypeError, "float16"),
    (lambda: ([1, 2], qk()[1]), TypeError, "torch.Tensor"),
])
def test_bad_q_k(make, error, words):
    q, k = make()
    with pytest.raises(Exception) as info:
        cd.visual_attention_maps(q, k, SPANS)
    assert type(info.value) is error, f"{type(info.value).__name__}: {info.value}"
    assert words in str(info.value)


@pytest.mark.parametrize("spans, error, words", [
    ([[(1, 4)]], ValueError, "got 1 samples"),
    ([[(1, 4)], [(8, 12)]], ValueError, "outside"),
    ([[(4, 4)], []], ValueError, "empty"),
    ([[(1, 5), (4, 7)], []], ValueError, "overlap"),
    ([[(1,)], []], TypeError, "(start, end)"),
    ([[(1, 2.5)], []], TypeError, "pair of ints"),
    ("1-4", TypeError, "list"),
    # One nesting level too few: a flat list of pairs, one per sample.
    ([(5, 9), (3, 7)], TypeError, "a single (start, end) pair; each sample needs a list"),
])
def test_bad_visual_spans(spans, error, words):
    q, k = qk()
    with pytest.raises(Exception) as info:
        cd.visual_attention_maps(q, k, spans)
    assert type(info.value) is error, f"{type(info.value).__name__}: {info.value}"
    assert words in str(info.value)


def test_bad_masks():
    q, k = qk()
    with pytest.raises(ValueError, match=r"visual must have shape \(B, N\)"):
        cd.visual_attention_maps(q, k, torch.zeros(2, 9, dtype=torch.bool))
    with pytest.raises(TypeError, match="visual must be bool or integer"):
        cd.visual_attention_maps(q, k, torch.zeros(2, 10))
    with pytest.raises(ValueError, match="attention_mask must have shape"):
        cd.visual_attention_maps(q, k, SPANS, attention_mask=torch.ones(2, 11))
    pad = torch.ones(2, 10, dtype=torch.bool)
    pad[0, :2] = False
    with pytest.raises(ValueError, match="sample 0 marks padding"):
        cd.visual_attention_maps(q, k, SPANS, attention_mask=pad)


def test_empty_query_set():
    q, k = qk()
    with pytest.raises(ValueError, match="selects no rows"):
        cd.visual_attention_maps(q, k, SPANS, query=torch.zeros(2, 10, dtype=torch.bool))
    with pytest.raises(ValueError, match="query must be one of"):
        cd.visual_attention_maps(q, k, SPANS, query="image")


def test_bad_target_and_options():
    q, k = qk()
    layout = cd.visual_layout(SPANS, 2, 10)
    good = torch.zeros(layout.map_shape)
    with pytest.raises(ValueError, match=r"target_maps has shape \(2, 10, 4\)"):
        cd.visual_attention_loss(q, k, torch.zeros(2, 10, 4), SPANS)
    with pytest.raises(TypeError, match="target must be a torch.Tensor"):
        cd.visual_attention_loss(q, k, good.numpy(), SPANS)
    for kwargs, words in ((dict(loss="l1"), "loss must be one of"),
                          (dict(cosine="mean"), "cosine must be one of"),
                          (dict(distribution="softmax"), "distribution must be one of"),
                          (dict(reduction="avg"), "reduction must be one of"),
                          (dict(beta=1.5), "beta must lie in"),
                          (dict(scale=-1.0), "scale must be a positive"),
                          (dict(backend="cuda"), "backend must be one of")):
        with pytest.raises(ValueError, match=words):
            cd.visual_attention_loss(q, k, good, SPANS, **kwargs)


def test_triton_backend_on_cpu_without_interpreter_is_refused(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q, k = qk()
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        cd.visual_attention_maps(q, k, SPANS, backend="triton")
