"""Models and training for the grounded experiment on the grid task (docs/experiment.md).

- :func:`grid_models`: a teacher and a student LLaVA pair for the grid task. The vision tower
  is a SigLIP patch embedding (with position embeddings) whose output is read directly
  (the hidden state before its single layer): one token per grid cell. It is random, frozen and shared by
  both models, so only the connector and the language model learn to look.
- :func:`encode_records`: LLaVA records → token ids, labels and pixels, once, in memory.
- :func:`train_model`: one fixed-budget training run: the LM loss, plus logit KD and VAT
  against a teacher when asked. ``shuffle_maps`` is the control: the teacher's attention
  maps come from the teacher run on *another* sample's image (the batch rolled by one), so
  VAT has the same strength and statistics but points at the wrong places.
"""
from __future__ import annotations

import math
import time
from typing import Callable, Sequence

import torch
from torch import nn

__all__ = ["grid_models", "encode_records", "train_model", "grid_encoder", "make_tokenizer",
           "concentrated_layers", "look_rows", "oracle_loss"]


def make_tokenizer(records: Sequence[dict]):
    """The word-level tokenizer over the records' text (answers are single tokens)."""
    from ..data import build_tiny_tokenizer

    return build_tiny_tokenizer(texts=[t["value"] for r in records for t in r["conversations"]])


def grid_models(vocab_size: int, *, cell: int = 12, grid: int = 3, teacher_hidden: int = 64,
                teacher_layers: int = 4, student_hidden: int = 32, student_layers: int = 2,
                vision_hidden: int = 64, seed: int = 0):
    """``(student, teacher)`` for the grid task, sharing one frozen random vision tower."""
    from transformers import Qwen2Config, SiglipVisionConfig

    from ..hf.builders import build_llava

    torch.manual_seed(seed)
    vision = dict(hidden_size=vision_hidden, intermediate_size=2 * vision_hidden,
                  num_hidden_layers=1, num_attention_heads=4, image_size=grid * cell,
                  patch_size=cell)

    def lm(hidden, layers):
        return Qwen2Config(hidden_size=hidden, intermediate_size=2 * hidden,
                           num_hidden_layers=layers, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=vocab_size,
                           max_position_embeddings=256, tie_word_embeddings=False)

    # One vision layer and vision_feature_layer=-2: the connector reads the embeddings
    # (patch + position), one token per cell. (Not 0: transformers 5 reads 0 as "no hidden
    # states wanted" and returns none.)
    teacher = build_llava(SiglipVisionConfig(**vision), lm(teacher_hidden, teacher_layers),
                          vision_feature_layer=-2)
    student = build_llava(SiglipVisionConfig(**vision), lm(student_hidden, student_layers),
                          vision_feature_layer=-2)
    student.model.vision_tower.load_state_dict(teacher.model.vision_tower.state_dict())
    for model in (student, teacher):
        model.model.vision_tower.requires_grad_(False)
    return student, teacher


def grid_encoder(model, tokenizer):
    """The :class:`ConversationEncoder` of a grid-task model."""
    from ..data import ConversationEncoder

    cfg = model.config
    return ConversationEncoder(tokenizer, cfg.vision_config.image_size,
                               num_image_tokens=cfg.image_seq_length,
                               image_token_id=cfg.image_token_id)


def encode_records(records: Sequence[dict], encoder, image_folder: str) -> list[dict]:
    """Each record as ``{"input_ids", "labels", "pixel_values", "look"}`` (one image per
    record). ``look`` pairs each answer's row (the position that predicts its first token)
    with its target cell, for records that carry ``target_cells``; else it is empty."""
    from ..data.records import parse_record
    from .grounded_rows import answer_rows

    out = []
    for i, rec in enumerate(records):
        messages, paths = parse_record(rec, f"record {i}", image_folder, encoder.image_token)
        enc = encoder.encode(messages)
        rows = answer_rows(torch.as_tensor(enc["labels"])[None])[0].nonzero()[:, 0]
        cells = rec.get("target_cells") or []
        if cells and len(cells) != len(rows):
            raise ValueError(f"record {i} ({rec.get('id')}): {len(cells)} target_cells for "
                             f"{len(rows)} answers")
        out.append({"input_ids": enc["input_ids"], "labels": enc["labels"],
                    "pixel_values": encoder.load_images(paths),
                    "look": [(int(r), int(c)) for r, c in zip(rows, cells)]})
    return out


def look_loss(attentions, input_ids: torch.Tensor, looks: list, image_token_id: int,
              layers: Sequence[int]) -> torch.Tensor:
    """Mean over answer rows and ``layers`` of ``-log`` (share of the row's head-mean image
    attention on its target cell): the teacher-side loss that makes its answer rows look at
    the object they answer about (docs/guide.md, "The shipped teacher").

    ``attentions``: the model's per-layer ``(B, H, N, N)`` attention probabilities;
    ``looks[b]``: ``(row, cell)`` pairs of sample ``b``; image token ``c`` is cell ``c``."""
    terms = []
    for b, pairs in enumerate(looks):
        if not pairs:
            continue
        vis = (input_ids[b] == image_token_id).nonzero()[:, 0]
        rows = torch.tensor([r for r, _ in pairs], device=input_ids.device)
        cells = torch.tensor([c for _, c in pairs], device=input_ids.device)
        for layer in layers:
            img = attentions[layer][b].mean(0)[rows][:, vis]  # (answers, cells)
            share = img.gather(1, cells[:, None])[:, 0] / img.sum(-1).clamp_min(1e-12)
            terms.append(-share.clamp_min(1e-6).log())
    if not terms:
        return attentions[0].new_zeros(())
    return torch.cat(terms).mean()


def _batches(features: list[dict], batch_size: int, steps: int, seed: int, pad_id: int):
    """``steps`` batches drawn epoch by epoch from a seeded permutation."""
    from ..data import LlavaCollator

    collate = LlavaCollator(pad_id)
    gen = torch.Generator().manual_seed(seed)
    order: list[int] = []
    for _ in range(steps):
        if len(order) < batch_size:
            order += torch.randperm(len(features), generator=gen).tolist()
        picked, order = order[:batch_size], order[batch_size:]
        batch = collate([features[i] for i in picked])
        batch["look"] = [features[i].get("look", []) for i in picked]
        yield batch


def train_model(model: nn.Module, features: list[dict], *, steps: int, batch_size: int,
                lr: float, pad_id: int, seed: int = 0, teacher: nn.Module | None = None,
                kd: float = 0.0, vat: float = 0.0, vat_layers: tuple | None = None,
                shuffle_maps: bool = False, vat_query: str = "text", vat_target: str = "teacher",
                warmup: float = 0.05, look: float = 0.0,
                look_layers: Sequence[int] = (),
                callback: Callable[[int, dict], None] | None = None) -> dict:
    """Train ``model`` for ``steps`` AdamW steps (cosine lr): every parameter that requires a
    gradient, except the vision tower, which is always frozen.

    Args:
        kd, vat: weights of logit KD (KL on the answer tokens) and VAT (cosine, on the text
            query rows) against ``teacher``; the LM loss always has weight 1.
        vat_layers: ``(student_layers, teacher_layers)`` for VAT (group matching, so each
            student layer's target is the mean of its window of teacher layers).
        shuffle_maps: the control: VAT targets from the teacher run on the batch's images
            rolled by one sample (needs a batch of at least 2).
        vat_query: VAT's query rows: ``"text"``, ``"response"`` (the rows that predict a
            response token, :func:`compodistill.visual_attention.response_rows`) or
            ``"answer"`` (only the answer rows that have a target cell: the features'
            ``look`` pairs; caption turns have none).
        vat_target: ``"teacher"`` (the teacher's maps) or ``"oracle"`` (the positive control:
            a one-hot map on each answer row's target cell,
            :func:`grounded_rows.onehot_targets`; needs ``vat_query="answer"``). The
            teacher still runs for KD.
        look, look_layers: weight and layers of :func:`look_loss` (teacher training: the
            answer rows' attention pulled onto their target cells; needs features with
            ``look`` pairs, from records with ``target_cells``). Runs eager attention.
        callback: called as ``callback(step, losses)`` after every step.

    Returns the mean losses over the last 10% of the steps, and the seconds taken.
    """
    from transformers import get_cosine_schedule_with_warmup

    from ..hf.distiller import AttentionDistiller
    from ..logit_kd.from_logits import shift_labels
    from ..visual_attention import response_rows
    from ..logit_kd.linear import linear_distillation_loss

    if (kd or vat) and teacher is None:
        raise ValueError("kd/vat weights need a teacher")
    if vat and not vat_layers:
        raise ValueError("vat needs vat_layers=(student_layers, teacher_layers)")
    if shuffle_maps and batch_size < 2:
        raise ValueError(f"shuffle_maps needs batch_size >= 2, got {batch_size}")
    if vat_query not in ("text", "response", "answer"):
        raise ValueError(f"vat_query must be 'text', 'response' or 'answer', got {vat_query!r}")
    if vat_target not in ("teacher", "oracle"):
        raise ValueError(f"vat_target must be 'teacher' or 'oracle', got {vat_target!r}")
    if vat_target == "oracle" and (vat_query != "answer" or shuffle_maps):
        raise ValueError("vat_target='oracle' needs vat_query='answer' and no shuffle_maps")
    n_layers = model.config.text_config.num_hidden_layers
    if look and (not look_layers or not all(0 <= i < n_layers for i in look_layers)):
        raise ValueError(f"look needs look_layers in [0, {n_layers}), got {list(look_layers)}")
    if look and (kd or vat):
        raise ValueError("look is for a model's own training: not with kd/vat")
    impl = model.config.text_config._attn_implementation
    if look:
        # output_attentions needs the eager probabilities (tiny models: cheap)
        model.set_attn_implementation({"text_config": "eager"})
    torch.manual_seed(seed)
    # The shared vision tower never trains (a model loaded from disk has it unfrozen again).
    model.model.vision_tower.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = get_cosine_schedule_with_warmup(opt, math.ceil(warmup * steps), steps)
    distiller = None
    if vat:
        distiller = AttentionDistiller(model, teacher, student_layers=list(vat_layers[0]),
                                       teacher_layers=list(vat_layers[1]), matching="group",
                                       query="text", loss="cosine")
    if teacher is not None:
        teacher.eval()
    model.train()
    tail, start = [], time.perf_counter()
    for step, batch in enumerate(_batches(features, batch_size, steps, seed, pad_id), 1):
        ids, mask, pixels = batch["input_ids"], batch["attention_mask"], batch["pixel_values"]
        labels = shift_labels(batch["labels"])
        losses = {}
        h_t = None
        if teacher is not None and (kd or (vat and shuffle_maps)):
            with torch.no_grad():
                h_t = teacher.model(input_ids=ids, attention_mask=mask, pixel_values=pixels,
                                    use_cache=False).last_hidden_state
        if distiller is not None:
            rows = (response_rows(batch["labels"]) if vat_query == "response" else
                    look_rows(batch["look"], ids.shape) if vat_query == "answer" else None)
            with distiller.capture(ids, attention_mask=mask, query=rows) as cap:
                with torch.no_grad():
                    t_pixels = pixels.roll(1, 0) if shuffle_maps else pixels
                    t_out = teacher.model(input_ids=ids, attention_mask=mask,
                                          pixel_values=t_pixels, use_cache=False)
                    if h_t is None:
                        h_t = t_out.last_hidden_state
                h_s = model.model(input_ids=ids, attention_mask=mask, pixel_values=pixels,
                                  use_cache=False).last_hidden_state
            vat_loss = (oracle_loss(cap, distiller, batch["look"]) if vat_target == "oracle"
                        else cap.loss())
        else:
            out = model.model(input_ids=ids, attention_mask=mask, pixel_values=pixels,
                              use_cache=False, output_attentions=bool(look))
            h_s, vat_loss = out.last_hidden_state, None
        if kd:
            total, parts = linear_distillation_loss(
                h_s, model.lm_head.weight, h_t, teacher.lm_head.weight, labels, loss="kl",
                positions="response", attention_mask=mask, ce_weight=1.0, kd_weight=kd,
                return_terms=True)
            losses.update(lm=float(parts["ce"]), kd=float(parts["kd"]))
        else:
            logits = model.lm_head(h_s).float()
            total = nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(),
                                                ignore_index=-100)
            losses["lm"] = float(total.detach())
        if vat_loss is not None:
            total = total + vat * vat_loss
            losses["vat"] = float(vat_loss.detach())
        if look:
            look_term = look_loss(out.attentions, ids, batch["look"],
                                  model.config.image_token_id, look_layers)
            total = total + look * look_term
            losses["look"] = float(look_term.detach())
        opt.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if step > 0.9 * steps:
            tail.append(losses)
        if callback is not None:
            callback(step, losses)
    model.eval()
    if look:
        model.set_attn_implementation({"text_config": impl})
    final = {k: round(sum(t[k] for t in tail) / len(tail), 4) for k in tail[-1]} if tail else {}
    return {"final_losses": final, "seconds": round(time.perf_counter() - start, 1)}


def look_rows(looks: list, shape) -> torch.Tensor:
    """(B, N) bool: the rows of the ``look`` pairs (the answer rows with a target cell)."""
    rows = torch.zeros(shape, dtype=torch.bool)
    for b, pairs in enumerate(looks):
        for r, _ in pairs:
            rows[b, r] = True
    return rows


def oracle_loss(cap, distiller, looks: list) -> torch.Tensor:
    """The VAT loss of the oracle arm: the distiller's map loss between the student's maps
    and one-hot maps on each answer row's target cell (one target for every matched layer),
    reduced over the layers as the distiller's ``layer_reduction`` says.
    ``cap`` was gathered with :func:`look_rows`, so its rows are the ``look`` rows in order."""
    from ..visual_attention import visual_map_loss
    from .grounded_rows import onehot_targets

    target = onehot_targets(cap.layout, [[c for _, c in pairs] for pairs in looks])
    terms = [visual_map_loss(student_map, target.to(student_map), cap.layout,
                             **distiller.loss_options)
             for _, student_map, _ in cap.layer_maps()]
    total = torch.stack(terms).sum()
    return total / len(terms) if distiller.layer_reduction == "mean" else total


def concentrated_layers(attention: dict, student_layers: int, concentration: float = 2.0):
    """``(student_layers, teacher_layers)`` for VAT from the teacher's
    :func:`compodistill.eval.grid.target_attention`: the teacher layers whose answer row puts
    at least ``concentration`` × uniform of its image attention on the target cell (the most
    concentrated one when none does), all distilled into the student's last layer (the one
    that can read the target once its first layer has read the question)."""
    att, uniform = attention["answer"], attention["uniform"]
    chosen = [i for i, a in enumerate(att) if a >= concentration * uniform]
    if not chosen:
        chosen = [max(range(len(att)), key=att.__getitem__)]
    return [student_layers - 1], chosen
