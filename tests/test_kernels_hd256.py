"""Head dim 256 (Gemma 3) in the Triton kernels: forward, visual maps and both backwards
against the fp32 reference, under the interpreter (TRITON_INTERPRET=1, set before triton is
imported).

The interpreter runs each autotuned kernel's first table row, a d <= 128 shape; here every
autotuner is given the config the pruning keeps for the 256 class on sm_90 ("first": what
the deterministic mode pins, the same rows as on sm_80, or "last": the other rows of that
class), so the block shapes a GPU runs at d = 256 are the ones tested. Accuracy rule:
compodistill.testing.accuracy (through tests/_helpers.py).
"""
import os

os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from compodistill import kernels as K  # noqa: E402
from compodistill.kernels import attention as A  # noqa: E402
from compodistill.testing.accuracy import assert_accuracy, pad_maps, rounding_atol  # noqa: E402
from compodistill.testing.visual_attention import (ref_attention_output,  # noqa: E402
                                                   ref_visual_maps)
from compodistill.visual_attention.layout import visual_layout  # noqa: E402

from _helpers import (BACKWARD_MODES, assert_close_rule, make_layout, make_qkv,  # noqa: E402
                      padding_mask, run_reference, use_backward)

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
AUTOTUNED = ("_fwd_kernel", "_bwd_dkdv_kernel", "_bwd_dkdvdq_kernel", "_bwd_dq_kernel")


def use_d256_configs(monkeypatch, pick: str, target: int = 90) -> dict:
    """Give every autotuned kernel the one config the sm_``target`` pruning keeps for the
    256 class at position ``pick`` ("first" or "last"); returns {kernel: (BLOCK_M, BLOCK_N)}."""
    chosen = {}
    for name in AUTOTUNED:
        kernel = getattr(A, name)
        kept = A.prune_configs(A.all_configs(name), A.fit_table(name), 256, target)
        assert all(256 in A.fit_table(name)[A.config_key(c)][target] for c in kept), name
        config = kept[0] if pick == "first" else kept[-1]
        monkeypatch.setattr(kernel, "configs", [config])
        chosen[name] = (config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"])
    return chosen


def test_d256_configs_are_the_new_rows():
    """The 256 class is served by its own 8-warp rows, none of the d <= 128 shapes."""
    for name in AUTOTUNED:
        for target in (80, 90):
            kept = A.prune_configs(A.all_configs(name), A.fit_table(name), 256, target)
            assert kept and all(c.num_warps == 8 for c in kept), (name, target)
            assert A.fits_target(name, 256, target) and A.fits_target(name + "+window", 256,
                                                                      target)


# --------------------------------------------------------------------------- fused layer

@pytest.mark.parametrize("n,hq,hkv,d,dtype,pad,kinds,query,causal,pick", [
    # odd length, GQA 2, left padding, two images in one sample
    (37, 4, 2, 256, F32, "left", ("two", "one"), "all", True, "first"),
    # GQA 4, right padding, one sample without an image
    (129, 4, 1, 256, F16, "right", ("one", "none"), "visual", True, "last"),
    # d = 200 runs padded to BLOCK_D = 256; no GQA, non-causal, bf16
    (70, 2, 2, 200, BF16, None, ("two", "one"), "text", False, "first"),
])
@pytest.mark.parametrize("mode", BACKWARD_MODES)
def test_fused_layer_d256(n, hq, hkv, d, dtype, pad, kinds, query, causal, pick, mode,
                          monkeypatch):
    use_backward(monkeypatch, mode)
    use_d256_configs(monkeypatch, pick)
    q, k, v = make_qkv(2, hq, hkv, n, d, dtype, seed=n + d)
    mask = padding_mask(2, n, pad)
    layout, vis = make_layout(2, n, mask, kinds, query, causal)
    gen = torch.Generator().manual_seed(n)
    d_out = torch.randn(q.shape, generator=gen).to(dtype)
    g = torch.randn(layout.map_shape, generator=gen) * n  # maps are ~1/n: keep both terms
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out, maps = K.attention_with_visual_maps(*leaves, layout)
    loss = (out.float() * d_out.float()).sum() + (maps * g).sum()
    grads = torch.autograd.grad(loss, leaves)
    ref, lowp = run_reference(q, k, v, mask, causal, layout, vis, query, d_out=d_out, g=g)
    assert_close_rule("out", out.detach(), ref["out"], lowp["out"], dtype)
    assert_close_rule("A", maps.detach(), ref["maps"], lowp["maps"], dtype)
    assert (maps.detach()[~layout.allowed()] == 0).all()
    for name, got, r, lo in zip("qkv", grads, ref["grads"], lowp["grads"]):
        assert got.dtype == dtype
        assert_close_rule(f"d{name}", got, r, lo, dtype)


@pytest.mark.parametrize("mode", BACKWARD_MODES)
def test_plain_attention_d256_no_image(mode, monkeypatch):
    """flash_attention (no visual terms) at d = 256: GQA, left padding (a row with no key)."""
    use_backward(monkeypatch, mode)
    use_d256_configs(monkeypatch, "last")
    q, k, v = make_qkv(2, 4, 2, 45, 256, F16, seed=5)
    mask = padding_mask(2, 45, "left")
    d_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(6)).to(F16)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = K.flash_attention(*leaves, key_mask=mask, causal=True)
    grads = torch.autograd.grad(out, leaves, d_out)
    ref, lowp = run_reference(q, k, v, mask, True, d_out=d_out)
    assert_close_rule("out", out.detach(), ref["out"], lowp["out"], F16)
    for name, got, r, lo in zip("qkv", grads, ref["grads"], lowp["grads"]):
        assert_close_rule(f"d{name}", got, r, lo, F16)
    assert (grads[0][0, :, 0] == 0).all()  # the row with no key gets no gradient


# --------------------------------------------------------------------------- window

@pytest.mark.parametrize("window,mode,pick", [(9, "atomic", "first"), (34, "split", "last"),
                                              (34, "atomic", "last")])
def test_window_d256(window, mode, pick, monkeypatch):
    """Gemma 3's local layers at their real head dim: windowed output, maps and gradients."""
    use_backward(monkeypatch, mode)
    use_d256_configs(monkeypatch, pick)
    B, N = 2, 150
    gen = torch.Generator().manual_seed(window)
    q, k, v = (torch.randn(B, h, N, 256, generator=gen) for h in (4, 2, 2))
    mask = torch.ones(B, N, dtype=torch.bool)
    mask[1, :7] = False
    vis = torch.zeros(B, N, dtype=torch.bool)
    vis[0, 3:20] = True
    vis[0, 100:130] = True
    vis[1, 60:90] = True
    layout = visual_layout(vis, B, N, attention_mask=mask, window=window)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out, maps = K.attention_with_visual_maps(*leaves, layout)
    ref = [t.clone().requires_grad_() for t in (q, k, v)]
    out_ref, _ = ref_attention_output(*ref, mask, True, None, window=window)
    maps_ref = pad_maps(ref_visual_maps(ref[0], ref[1], vis, "all", mask, True, None,
                                        window=window), layout.query_count, layout.visual_count)
    real = mask[:, None, :, None]
    d_out, d_maps = torch.randn(out.shape, generator=gen), torch.randn(maps.shape, generator=gen)
    grads = torch.autograd.grad(((out * real) * d_out).sum() + (maps * d_maps).sum(), leaves)
    want = torch.autograd.grad(((out_ref * real) * d_out).sum() + (maps_ref * d_maps).sum(),
                               ref)
    pairs = [("out", out * real, out_ref * real), ("maps", maps, maps_ref)]
    pairs += list(zip(("dq", "dk", "dv"), grads, want))
    for name, got, wanted in pairs:
        assert_accuracy(got, wanted, atol=10 * rounding_atol(wanted, F32) + 1e-5, name=name)


def test_head_dim_above_256_is_refused():
    q = torch.randn(1, 2, 8, 264)
    with pytest.raises(ValueError, match=r"head dim .* \[1, 256\].* 264"):
        K.flash_attention(q, q, q)


# --------------------------------------------------------------------------- beyond 256

IMG = 99


def _llama(seed: int, head_dim: int, layers: int = 2):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=head_dim,
                         vocab_size=100, max_position_embeddings=64)
    model = LlamaForCausalLM(config)
    model.set_attn_implementation("sdpa")
    return model.eval()


def _ids():
    ids = torch.randint(0, 90, (2, 20), generator=torch.Generator().manual_seed(1))
    ids[0, 2:8] = IMG
    ids[1, 10:14] = IMG
    mask = torch.ones(2, 20, dtype=torch.long)
    mask[1, :3] = 0
    return ids, mask


def _capture_loss(student, teacher, ids, mask):
    from compodistill.hf import AttentionDistiller

    distiller = AttentionDistiller(student, teacher, image_token_id=IMG, preset="all")
    with distiller.capture(ids, attention_mask=mask) as cap:
        with torch.no_grad():
            teacher(input_ids=ids, attention_mask=mask)
        logits = student(input_ids=ids, attention_mask=mask).logits
    return logits, cap.loss()


def test_hook_falls_back_beyond_256_and_warns_once(monkeypatch):
    """A model whose head dim the kernels cannot serve (320) runs its captured layers on the
    chunked PyTorch path with one warning per layer naming the layer, the shape and the
    reason, and the same loss as the PyTorch backend; no second warning on the next call."""
    import copy
    import warnings

    from compodistill.hf import attention as hook

    monkeypatch.setattr(hook, "_WARNED", set())
    ref, teacher = _llama(0, 320), _llama(5, 320)
    ids, mask = _ids()
    monkeypatch.setenv("COMPODISTILL_BACKEND", "torch")
    want_logits, want_loss = _capture_loss(copy.deepcopy(ref), teacher, ids, mask)
    monkeypatch.setenv("COMPODISTILL_BACKEND", "triton")
    for attempt in range(2):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            logits, loss = _capture_loss(copy.deepcopy(ref), teacher, ids, mask)
        ours = sorted(str(w.message) for w in caught if "chunked PyTorch path" in str(w.message))
        if attempt == 0:
            assert len(ours) == 4, ours  # two teacher layers, two student layers
            assert "student layer 1: " in ours[1] and "(2, 4, 20, 320)" in ours[1]
            assert "head dim 320 is outside [1, 256]" in ours[1]
        else:
            assert ours == []
        real = mask.bool()
        torch.testing.assert_close(logits[real], want_logits[real], rtol=0, atol=0)
        # The attention fell back (same maps, bitwise), but under the Triton backend the map
        # loss runs the fused kernel, which sums in another order: 1 - cos near 0 differs
        # by fp32 rounding of cos ~ 1 (a few ulps of 1).
        torch.testing.assert_close(loss, want_loss, rtol=0,
                                   atol=4 * torch.finfo(torch.float32).eps)


def test_functional_api_still_refuses_beyond_256():
    from compodistill.visual_attention.api import visual_attention_maps

    q, k, _ = make_qkv(1, 2, 1, 16, 320, F32)
    layout, _ = make_layout(1, 16, None, ("one",))
    with pytest.raises(ValueError, match=r"head dim .*\[1, 256\].* 320"):
        visual_attention_maps(q, k, layout, backend="triton")
    assert K.unsupported_reason(q) is not None and K.unsupported_reason(q[..., :256]) is None
