"""The family part of ``bench/model_step.py``: one distillation step of a Qwen2.5-VL pair.

CUDA: a Qwen2.5-VL-7B-shaped teacher (hidden 3584, 28 layers, 28 heads / 4 kv, vocab
152,064) and a 3B-shaped student (hidden 2048, 36 layers, 16 heads / 2 kv, vocab 151,936),
each with the 32-block vision tower (hidden 1280, patch 14, 2×2 merge), random weights, bf16,
2k–8k tokens holding dynamic-resolution images of different token counts. CPU: the same code
with tiny shapes (float32). Both run through the model's own forward: vision tower, M-RoPE
positions, the hook on the language model only.

Providers: ``qwen2_5_vl_sdpa_kd`` (SDPA, LM + fused linear KD: the floor) and
``qwen2_5_vl_compodistill`` (the same plus VAT through :class:`AttentionDistiller`,
intermediate preset, group matching, cosine). One step = teacher forward without grad,
student forward, losses, backward; no optimizer step.
"""
from __future__ import annotations

import torch

PATCH, MERGE, TEMPORAL = 14, 2, 2
QWEN_IDS = dict(image_token_id=151_655, video_token_id=151_656, vision_start_token_id=151_652,
                vision_end_token_id=151_653)  # Qwen2.5-VL's; the CPU's vocabulary is smaller
TINY_IDS = dict(image_token_id=1020, video_token_id=1021, vision_start_token_id=1022,
                vision_end_token_id=1023)

FAMILY_SETUPS = {
    "cuda": dict(
        teacher=dict(hidden_size=3584, num_hidden_layers=28, num_attention_heads=28,
                     num_key_value_heads=4, intermediate_size=18_944, vocab_size=152_064),
        student=dict(hidden_size=2048, num_hidden_layers=36, num_attention_heads=16,
                     num_key_value_heads=2, intermediate_size=11_008, vocab_size=151_936),
        vision=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16),
        ids=QWEN_IDS,
        # (B, N, per-sample image grids in patches): 2k-8k tokens, images of 252-1120 tokens
        shapes=[(1, 2048, [(28, 36), (36, 56)]), (1, 4096, [(56, 56), (28, 36), (44, 60)]),
                (1, 8192, [(56, 80), (64, 64), (28, 36), (36, 56)])],
        dtype=torch.bfloat16),
    "cpu": dict(
        teacher=dict(hidden_size=64, num_hidden_layers=6, num_attention_heads=4,
                     num_key_value_heads=2, intermediate_size=128, vocab_size=1040),
        student=dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                     num_key_value_heads=1, intermediate_size=64, vocab_size=1024),
        vision=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2),
        ids=TINY_IDS,
        shapes=[(1, 128, [(4, 8), (8, 8)]), (1, 256, [(8, 12), (4, 4), (8, 8)])],
        dtype=torch.float32),
}
PROVIDERS = ("qwen2_5_vl_sdpa_kd", "qwen2_5_vl_compodistill")


def build(text: dict, vision: dict, ids: dict, dtype, device, seed: int):
    """A random Qwen2.5-VL model with the given text and vision shapes (no download)."""
    from transformers import AutoModelForImageTextToText, Qwen2_5_VLConfig

    head_dim = text["hidden_size"] // text["num_attention_heads"]
    section = [head_dim // 8, 3 * head_dim // 16, 3 * head_dim // 16]  # Qwen's 16/24/24 at 128
    config = Qwen2_5_VLConfig(
        text_config=dict(text, max_position_embeddings=32_768, tie_word_embeddings=False,
                         rope_scaling={"rope_type": "default", "mrope_section": section}),
        vision_config=dict(vision, out_hidden_size=text["hidden_size"], patch_size=PATCH,
                           spatial_merge_size=MERGE, temporal_patch_size=TEMPORAL,
                           window_size=112, fullatt_block_indexes=[7, 15, 23, 31]
                           if vision["depth"] > 8 else [vision["depth"] - 1]),
        **ids)
    torch.manual_seed(seed)
    with torch.device(device):
        return AutoModelForImageTextToText.from_config(config, dtype=dtype)


def inputs(b: int, n: int, grids, ids: dict, dtype, device) -> dict:
    """input_ids with ``<vision_start> <image_pad>×(h·w/4) <vision_end>`` per image grid,
    random pixel patches, image_grid_thw and mm_token_type_ids."""
    g = torch.Generator().manual_seed(0)
    IMG, START, END = (ids[k] for k in ("image_token_id", "vision_start_token_id",
                                        "vision_end_token_id"))
    ids = torch.randint(0, min(ids.values()), (b, n), generator=g)
    types = torch.zeros(b, n, dtype=torch.long)
    pos = 8
    for h, w in grids:
        count = h * w // (MERGE * MERGE)
        ids[:, pos] = START
        ids[:, pos + 1:pos + 1 + count] = IMG
        types[:, pos + 1:pos + 1 + count] = 1
        ids[:, pos + 1 + count] = END
        pos += count + 2 + 16
    if pos > n - 8:
        raise ValueError(f"images of grids {grids} do not fit in N = {n}")
    patches = sum(h * w for h, w in grids) * b
    pixels = torch.randn(patches, 3 * TEMPORAL * PATCH * PATCH, generator=g)
    grid = torch.tensor([[1, h, w] for h, w in grids] * b)
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device),
            "pixel_values": pixels.to(device=device, dtype=dtype),
            "image_grid_thw": grid.to(device), "mm_token_type_ids": types.to(device)}


def step(name: str, student, teacher, batch: dict, distiller):
    """One training step of provider ``name`` (a callable for ``bench._common.measure``)."""
    import contextlib

    from compodistill import linear_distillation_loss, shift_labels

    labels = shift_labels(batch["input_ids"])
    vat = name == "qwen2_5_vl_compodistill"

    def run():
        student.zero_grad(set_to_none=True)
        cap = (distiller.capture(batch["input_ids"], attention_mask=batch["attention_mask"])
               if vat else contextlib.nullcontext())
        with cap:
            with torch.no_grad():
                h_t = teacher.model(**batch, use_cache=False).last_hidden_state
            h_s = student.model(**batch, use_cache=False).last_hidden_state
        loss = linear_distillation_loss(h_s, student.lm_head.weight, h_t,
                                        teacher.lm_head.weight, labels, ce_weight=1.0)
        if vat:
            loss = loss + cap.loss()
        loss.backward()
    return run


def run_family(device: torch.device, shapes=None, repeat: int = 3, providers=None):
    """Rows of the family providers; ``shapes``: (B, N) overrides, images from the setup."""
    from bench._common import provenance, step_rows
    from compodistill.hf import AttentionDistiller, enable_attention

    setup = FAMILY_SETUPS["cuda" if device.type == "cuda" else "cpu"]
    dtype = setup["dtype"]
    teacher = build(setup["teacher"], setup["vision"], setup["ids"], dtype, device, 1).eval()
    teacher.requires_grad_(False)
    student = build(setup["student"], setup["vision"], setup["ids"], dtype, device, 0).train()
    distiller = AttentionDistiller(student, teacher)  # intermediate preset, group, cosine
    prov = provenance(device)
    rows = []
    chosen = (setup["shapes"] if not shapes
              else [(b, n, setup["shapes"][0][2]) for b, n in shapes])  # first images
    for b, n, grids in chosen:
        batch = inputs(b, n, grids, setup["ids"], dtype, device)
        nv = sum(h * w // (MERGE * MERGE) for h, w in grids)
        for name in providers or PROVIDERS:
            if name == "qwen2_5_vl_compodistill":
                enable_attention(student)
                enable_attention(teacher)
            else:
                for model in (student, teacher):
                    model.set_attn_implementation({"text_config": "sdpa"})
            fn = step(name, student, teacher, batch, distiller)
            rows += step_rows(fn, device, student, bench="model_step", provider=name, b=b,
                              n=n, extra=f"B={b} N={n} Nv={nv} images={len(grids)} {dtype}",
                              prov=prov, repeat=repeat)
    return rows
