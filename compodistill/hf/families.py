"""The vision-language model families compodistill supports, and what it reads from each.

One integration path serves every family: the language model dispatches attention through
transformers' ``AttentionInterface``, so :func:`compodistill.hf.enable_attention` switches
only the text sub-config to ``"compodistill"`` and the vision tower keeps its own attention.
What differs between families is read from the checkpoint's own config:

* which token ids are visual keys (:func:`visual_token_ids`: image and video placeholders;
  vision start/end markers are text tokens and stay out);
* what the kernels cannot reproduce (:func:`check_supported`: attention-logit softcapping,
  bidirectional language models).

:func:`tiny_family_pair` and :func:`tiny_family_batch` build random teacher/student pairs and
batches from each family's config classes, without any download, for tests and benchmarks.
Definitions and the list of what was verified per family: docs/families.md.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

__all__ = ["FAMILIES", "TAF_FAMILIES", "TRAINER_FAMILIES", "Family", "check_supported",
           "ResolvedModel", "check_trainer_checkpoint", "config_of", "connector_of",
           "family_of", "lookup_family",
           "tiny_family_batch", "tiny_family_pair", "visual_positions", "visual_token_ids"]


@dataclass(frozen=True)
class Family:
    """A supported family: its name in configs and docs, and the ``model_type`` values of the
    checkpoints that belong to it."""

    name: str
    title: str
    model_types: tuple[str, ...]


FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("llava", "LLaVA (1.5)", ("llava",)),
    Family("llava_onevision", "LLaVA-OneVision / LLaVA-NeXT", ("llava_onevision", "llava_next")),
    Family("qwen2_5_vl", "Qwen2.5-VL", ("qwen2_5_vl", "qwen2_vl")),
    Family("qwen3_vl", "Qwen3-VL", ("qwen3_vl",)),
    Family("gemma3", "Gemma 3", ("gemma3",)),
    Family("internvl", "InternVL (HF-native)", ("internvl",)),
)}


@dataclass(frozen=True)
class ResolvedModel:
    """A checkpoint's family and visual token ids, worked out once from its config and carried
    down through the trainer, the cache writer and eval (:func:`compodistill.hf.loading.
    resolve_model` builds it from a folder). Every function here that takes a model or a
    config takes one of these too, and reads its answers instead of working them out again.
    """

    config: Any
    family: Family
    visual_ids: tuple[int, ...]
    path: str | None = None


def config_of(model_or_config):
    """The Hugging Face config of a model (PEFT wrappers and TAF models forward ``.config``), a
    :class:`ResolvedModel`, or a config itself."""
    return getattr(model_or_config, "config", model_or_config)



def lookup_family(config) -> Family:
    """The :class:`Family` whose ``model_types`` hold ``config.model_type``: the one place a
    family is worked out (tests count the calls).

    Raises:
        ValueError: for a model type no family covers, listing the supported ones.
    """
    model_type = getattr(config, "model_type", None)
    for family in FAMILIES.values():
        if model_type in family.model_types:
            return family
    if model_type == "compodistill_taf_llava":  # the TAF student keeps LLaVA's layout
        return FAMILIES["llava"]
    supported = ", ".join(f"{f.title} ({'/'.join(f.model_types)})" for f in FAMILIES.values())
    raise ValueError(f"model_type {model_type!r} is not a supported vision-language family; "
                     f"supported: {supported}")


def family_of(model_or_config) -> Family:
    """The :class:`Family` of a model, a config or a :class:`ResolvedModel`.

    Raises:
        ValueError: for a model type no family covers, listing the supported ones.
    """
    if isinstance(model_or_config, ResolvedModel):
        return model_or_config.family
    return lookup_family(config_of(model_or_config))


# What `compodistill train` runs today (docs/families.md): LLaVA, and the other families through
# compodistill/data/family_inputs.py; TAF on every one of them (hf/taf.py, hf/family_taf.py).
TRAINER_FAMILIES = ("llava", "qwen2_5_vl", "qwen3_vl", "llava_onevision", "gemma3", "internvl")
TAF_FAMILIES = ("llava", "qwen2_5_vl", "qwen3_vl", "llava_onevision", "gemma3", "internvl")


def connector_of(model: nn.Module) -> nn.Module:
    """The module that maps vision features into the language model's width: LLaVA's
    ``multi_modal_projector``, Qwen's vision ``merger`` (Qwen3-VL: with its DeepStack mergers,
    which feed intermediate vision features into the language model, in one container that
    holds the same parameters). ``model``: a ``...ForConditionalGeneration`` (not a peft
    wrapper)."""
    inner = model.model
    if hasattr(inner, "multi_modal_projector"):
        return inner.multi_modal_projector
    visual = getattr(inner, "visual", None)
    if visual is not None and hasattr(visual, "deepstack_merger_list"):
        return nn.ModuleDict({"merger": visual.merger, "deepstack": visual.deepstack_merger_list})
    if visual is not None and hasattr(visual, "merger"):
        return visual.merger
    raise ValueError(f"cannot find the connector of {type(model).__name__}")


def check_trainer_checkpoint(path, key: str) -> Family:
    """The family of the checkpoint folder ``path`` (config key ``key``), read from its
    ``config.json`` before any weights load.

    Raises:
        ValueError: one line naming ``key``, the checkpoint's family or model type, and the
            families the trainer supports.
    """
    import json

    model_type = json.loads((Path(path) / "config.json").read_text()).get("model_type")
    supported = ", ".join(f"{FAMILIES[n].title} ({'/'.join(FAMILIES[n].model_types)})"
                          for n in TRAINER_FAMILIES)
    try:
        family = lookup_family(type("Config", (), {"model_type": model_type})())
    except ValueError:
        raise ValueError(f"{key}: model_type {model_type!r} in {path} is not a supported "
                         f"family; `compodistill train` supports {supported}") from None
    if model_type == "llava_next":  # its anyres packing is not LLaVA-OneVision's
        raise ValueError(f"{key}: LLaVA-NeXT checkpoints ({path}) work with "
                         f"compodistill.hf.AttentionDistiller but not yet with `compodistill "
                         f"train`, which supports {supported} (docs/families.md)")
    if family.name not in TRAINER_FAMILIES:
        raise ValueError(f"{key}: {family.title} checkpoints ({path}) work with "
                         f"compodistill.hf.AttentionDistiller but not yet with `compodistill "
                         f"train`, which supports {supported} (docs/families.md)")
    return family


def visual_token_ids(model_or_config) -> tuple[int, ...]:
    """The placeholder ids whose positions hold visual features: image and video tokens.

    Vision start/end markers (``vision_start_token_id``, Gemma 3's ``boi``/``eoi``) are
    ordinary text embeddings around an image, not visual keys, so they are left out.
    """
    if isinstance(model_or_config, ResolvedModel):
        return model_or_config.visual_ids
    config = config_of(model_or_config)
    ids = []
    for names in (("image_token_id", "image_token_index"),
                  ("video_token_id", "video_token_index")):
        for name in names:
            value = getattr(config, name, None)
            if value is not None:
                ids.append(int(value))
                break
    return tuple(dict.fromkeys(ids))


def visual_positions(input_ids: torch.Tensor, model_or_config) -> torch.Tensor:
    """(B, N) bool: the positions of ``input_ids`` that hold visual features of the model's
    family (any of its :func:`visual_token_ids`).

    Raises:
        ValueError: a config with no image or video token id, naming the family.
    """
    ids = visual_token_ids(model_or_config)
    if not ids:
        raise ValueError(f"{family_of(model_or_config).title}: the config names no image or "
                         f"video token id, so the visual positions cannot be found")
    return torch.isin(input_ids, torch.tensor(ids, device=input_ids.device))


def _text_config(config):
    getter = getattr(config, "get_text_config", None)
    return getter() if getter is not None else config


def check_supported(model: nn.Module, role: str) -> None:
    """Refuse a language model whose attention the fused layers cannot reproduce.

    Raises:
        ValueError: attention-logit softcapping (naming the first layer), or a language model
            configured as bidirectional (``use_bidirectional_attention``).
    """
    text = _text_config(config_of(model))
    softcap = getattr(text, "attn_logit_softcapping", None)
    if softcap is not None:
        raise ValueError(f"{role} layer 0: attention-logit softcapping ({softcap}) is not "
                         f"supported by the fused visual-attention layers; set "
                         f"attn_logit_softcapping=None in the text config or distil another "
                         f"family")
    if getattr(text, "use_bidirectional_attention", False):
        raise ValueError(f"{role}: the language model uses bidirectional attention "
                         f"(use_bidirectional_attention=True); visual maps are defined for "
                         f"causal decoders only")


# --------------------------------------------------------------------------- tiny models

def _text(hidden: int, layers: int, vocab: int, **extra) -> dict:
    heads = max(1, hidden // 16)  # head dim 16 at every width (M-RoPE sections sum to 8)
    return dict(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=max(1, heads // 2),
                vocab_size=vocab,
                max_position_embeddings=512, tie_word_embeddings=False, **extra)


def _family_config(name: str, hidden: int, layers: int, vocab: int,
                   sliding_window: int | None, ids_below: int, head_dim: int = 16):
    import transformers as tf

    img, vid, start, end = ids_below - 4, ids_below - 3, ids_below - 2, ids_below - 1
    qwen_vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2,
                       out_hidden_size=hidden, patch_size=4, spatial_merge_size=2,
                       temporal_patch_size=2)
    if name == "qwen2_5_vl":
        text = _text(hidden, layers, vocab, head_dim=16,
                     rope_scaling={"rope_type": "default", "mrope_section": [2, 3, 3]})
        return tf.Qwen2_5_VLConfig(
            text_config=text, vision_config=dict(qwen_vision, window_size=16,
                                                 fullatt_block_indexes=[1]),
            image_token_id=img, video_token_id=vid, vision_start_token_id=start,
            vision_end_token_id=end)
    if name == "qwen3_vl":
        text = _text(hidden, layers, vocab, head_dim=16,
                     rope_scaling={"rope_type": "default", "mrope_section": [2, 3, 3],
                                   "mrope_interleaved": True})
        return tf.Qwen3VLConfig(
            text_config=text, vision_config=dict(qwen_vision, num_position_embeddings=16,
                                                 deepstack_visual_indexes=[0]),
            image_token_id=img, video_token_id=vid, vision_start_token_id=start,
            vision_end_token_id=end)
    siglip = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=2, image_size=16, patch_size=4)
    if name == "llava_onevision":
        return tf.LlavaOnevisionConfig(
            text_config=dict(model_type="qwen2", **_text(hidden, layers, vocab)),
            vision_config=dict(model_type="siglip_vision_model", **dict(siglip, patch_size=8)),
            image_token_index=img, video_token_index=vid, vision_feature_layer=-1,
            image_grid_pinpoints=[[16, 16], [16, 32], [32, 16], [32, 32]])
    if name == "gemma3":
        types = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)]
        text = _text(hidden, layers, vocab, head_dim=head_dim, layer_types=types,
                     sliding_window=sliding_window or 512, query_pre_attn_scalar=head_dim)
        return tf.Gemma3Config(text_config=text, vision_config=siglip, mm_tokens_per_image=4,
                               image_token_index=img, boi_token_index=start,
                               eoi_token_index=end)
    if name == "internvl":
        return tf.InternVLConfig(
            text_config=dict(model_type="qwen2", **_text(hidden, layers, vocab)),
            vision_config=dict(siglip, image_size=[16, 16], patch_size=[4, 4]),
            image_token_id=img, image_seq_length=4)
    raise ValueError(f"no tiny builder for family {name!r}; one of {sorted(TINY_FAMILIES)}")


TINY_FAMILIES = ("qwen2_5_vl", "qwen3_vl", "llava_onevision", "gemma3", "internvl")


def tiny_family_pair(family: str, *, teacher_hidden: int = 64, student_hidden: int = 32,
                     teacher_layers: int = 4, student_layers: int = 2, vocab_size: int = 128,
                     teacher_vocab_size: int | None = None, sliding_window: int | None = None,
                     seed: int = 0, head_dim: int = 16):
    """``(student, teacher)``: tiny random models of one family, built from its config classes.

    The teacher is wider and deeper; both share the vision tower's weights (one family, one
    vision encoder, as Qwen2.5-VL 3B and 7B do), the vocabulary and the placeholder ids
    (image ``vocab_size - 4``, video ``- 3``, vision start ``- 2`` and end ``- 1``).
    ``teacher_vocab_size``: a teacher vocabulary with extra rows at the end (Qwen2.5-VL 7B
    has 152,064 rows, 3B 151,936); the placeholder ids stay the student's.
    ``sliding_window``: Gemma 3's window on its even (sliding) layers; default wider than
    any test sequence. ``head_dim``: Gemma 3's (256 in every real Gemma 3); 16 elsewhere.
    """
    from transformers import AutoModelForImageTextToText

    if family not in TINY_FAMILIES:
        raise ValueError(f"family must be one of {TINY_FAMILIES}, got {family!r}")
    torch.manual_seed(seed)
    t_vocab = vocab_size if teacher_vocab_size is None else teacher_vocab_size
    if t_vocab < vocab_size:
        raise ValueError(f"teacher_vocab_size {t_vocab} < the student's {vocab_size}")
    teacher = AutoModelForImageTextToText.from_config(
        _family_config(family, teacher_hidden, teacher_layers, t_vocab, sliding_window,
                       vocab_size, head_dim))
    student = AutoModelForImageTextToText.from_config(
        _family_config(family, student_hidden, student_layers, vocab_size, sliding_window,
                       vocab_size, head_dim))
    vision_t, vision_s = _vision_tower(teacher), _vision_tower(student)
    shared = {k: v for k, v in vision_t.state_dict().items()
              if k in vision_s.state_dict() and vision_s.state_dict()[k].shape == v.shape}
    vision_s.load_state_dict(shared, strict=False)  # the merger's output width differs
    return student.eval(), teacher.eval()


def _vision_tower(model: nn.Module) -> nn.Module:
    inner = getattr(model, "model", model)
    for name in ("visual", "vision_tower"):
        if hasattr(inner, name):
            return getattr(inner, name)
    raise ValueError(f"cannot find the vision tower of {type(model).__name__}")


def tiny_family_batch(model: nn.Module, images: Sequence[Sequence[int]], *, seq_len: int,
                      padding: Sequence[str] | None = None, videos: Sequence[int] = (),
                      seed: int = 0) -> dict:
    """Model inputs for a tiny family model: ``input_ids``, ``attention_mask``, pixels and the
    family's extra inputs (``image_grid_thw``, ``mm_token_type_ids``, ``image_sizes``, ...).

    Args:
        images: per sample, one size per image: for Qwen the patch-grid width (``2``, ``4``,
            ``6``: dynamic resolution, ``w * 4 / 4`` tokens), for LLaVA-OneVision the image
            side in pixels (16 or 32: anyres crops plus image-newline tokens), ignored by the
            fixed-size families (Gemma 3, InternVL: 4 tokens each). ``[]``: text only.
        seq_len: the padded length N.
        padding: per sample ``"left"`` or ``"right"`` (default right); the real tokens are
            the placeholders plus random text up to ``seq_len - pad`` where pad = 2 per
            sample index.
        videos: Qwen only: per sample a number of frames (0: no video), 4 tokens a frame.
    """
    config = model.config
    kind = family_of(config).name
    g = torch.Generator().manual_seed(seed)
    text_vocab = config.get_text_config().vocab_size - 4  # below every placeholder id
    img = visual_token_ids(config)[0]
    b = len(images)
    ids = torch.randint(0, text_vocab, (b, seq_len), generator=g)
    mask = torch.zeros(b, seq_len, dtype=torch.long)
    mm_types = torch.zeros(b, seq_len, dtype=torch.long)
    pixels, grids, video_pixels, video_grids, sizes = [], [], [], [], []
    for i, sample in enumerate(images):
        tokens: list[int] = []
        types: list[int] = []

        def add(count: int, token: int, type_id: int, bracket: bool) -> None:
            if bracket:
                tokens.append(config.vision_start_token_id)
                types.append(0)
            tokens.extend([token] * count)
            types.extend([type_id] * count)
            if bracket:
                tokens.append(config.vision_end_token_id)
                types.append(0)

        for size in sample:
            tokens.extend(torch.randint(0, text_vocab, (2,), generator=g).tolist())
            types.extend([0, 0])
            count, extra = _image_inputs(model, kind, size, g)
            add(count, img, 1, kind in ("qwen2_5_vl", "qwen3_vl"))
            if kind in ("qwen2_5_vl", "qwen3_vl"):
                pixels.append(extra["pixel_values"])
                grids.append(extra["grid"])
            else:
                pixels.append(extra["pixel_values"])
                if "image_size" in extra:
                    sizes.append(extra["image_size"])
        frames = videos[i] if i < len(videos) else 0
        if frames:
            video_pixels.append(torch.randn(frames * 16, 3 * 2 * 16, generator=g))
            video_grids.append(torch.tensor([frames, 4, 4]))
            if kind == "qwen3_vl":  # one start/end bracket per frame (timestamps between)
                for _ in range(frames):
                    add(4, config.video_token_id, 2, True)
            else:
                add(4 * frames, config.video_token_id, 2, True)
        pad = 2 * i
        real = seq_len - pad
        if len(tokens) + 2 > real:
            raise ValueError(f"seq_len {seq_len} too short for sample {i}: {len(tokens)} "
                             f"placeholder tokens")
        start = pad if padding is not None and padding[i] == "left" else 0
        ids[i, start + 1:start + 1 + len(tokens)] = torch.tensor(tokens)
        mm_types[i, start + 1:start + 1 + len(tokens)] = torch.tensor(types)
        mask[i, start:start + real] = 1
    ids = ids.masked_fill(mask == 0, 0)
    out = {"input_ids": ids, "attention_mask": mask}
    if kind in ("qwen2_5_vl", "qwen3_vl"):
        out["mm_token_type_ids"] = mm_types
        if pixels:
            out["pixel_values"] = torch.cat(pixels)
            out["image_grid_thw"] = torch.stack(grids)
        if video_pixels:
            out["pixel_values_videos"] = torch.cat(video_pixels)
            out["video_grid_thw"] = torch.stack(video_grids)
    elif pixels:
        most = max(p.shape[0] for p in pixels) if sizes else 0
        if sizes:  # anyres: crops padded to the longest image, as the processor does
            pixels = [torch.cat([p, p.new_zeros(most - p.shape[0], *p.shape[1:])])
                      for p in pixels]
        out["pixel_values"] = torch.stack(pixels)
        if sizes:
            out["image_sizes"] = torch.tensor(sizes)
    if kind == "gemma3":
        out["token_type_ids"] = (ids == img).long()
    return out


def _image_inputs(model, kind: str, size: int, g: torch.Generator) -> tuple[int, dict]:
    """(token count, pixel inputs) of one image of a tiny family model."""
    if kind in ("qwen2_5_vl", "qwen3_vl"):
        h, w = 4, size  # in patches of 4 px; the 2x2 merge makes h*w/4 tokens
        pixels = torch.randn(h * w, 3 * 2 * 16, generator=g)
        return h * w // 4, {"pixel_values": pixels, "grid": torch.tensor([1, h, w])}
    if kind == "llava_onevision":
        # anyres: the base image plus the crops of the best grid, image-newline tokens included
        side = model.config.vision_config.image_size
        crops = (size // side) ** 2
        pixels = torch.randn(1 + crops if crops > 1 else 2, 3, side, side, generator=g)
        with torch.no_grad():
            feats = model.model.get_image_features(
                pixel_values=pixels[None], image_sizes=torch.tensor([[size, size]]),
                vision_feature_layer=model.config.vision_feature_layer,
                vision_feature_select_strategy=model.config.vision_feature_select_strategy)
        feats = getattr(feats, "pooler_output", feats)
        return int(feats[0].shape[0]), {"pixel_values": pixels, "image_size": [size, size]}
    side = model.config.vision_config.image_size
    side = side[0] if isinstance(side, (list, tuple)) else side
    count = (model.config.mm_tokens_per_image if kind == "gemma3"
             else model.config.image_seq_length)
    return int(count), {"pixel_values": torch.randn(3, side, side, generator=g)}
