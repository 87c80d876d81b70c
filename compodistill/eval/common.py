"""Model calls shared by the evaluations: forward to logits, greedy decoding, batching.

The model is any callable taking ``input_ids``, ``attention_mask`` and (when the batch has
images) ``pixel_values`` keyword arguments and returning logits (B, L, V), directly or as an
object with ``.logits`` (a transformers model). A batch of a family with its own image inputs
also carries that family's inputs (``image_grid_thw``, ``mm_token_type_ids``, ...: the keys of
:func:`compodistill.data.family_inputs.family_inputs`), and the model gets them too. Prompts are
encoded by the same :class:`~compodistill.data.ConversationEncoder` as the training data (or
its family form, :class:`~compodistill.eval.families.FamilyEncoder`).
"""
from __future__ import annotations

import contextlib
import inspect
from typing import Iterable, Iterator, Sequence

import torch

from ..data.family_inputs import family_inputs
from ..data.llava import IGNORE_INDEX, LlavaCollator


def model_device(model, device=None) -> torch.device:
    """``device`` if given, else the device of the model's first parameter, else CPU."""
    if device is not None:
        return torch.device(device)
    params = getattr(model, "parameters", None)
    if callable(params):
        for p in params():
            return p.device
    return torch.device("cpu")


@contextlib.contextmanager
def eval_mode(model):
    """Put an ``nn.Module`` in eval mode for the block and restore its mode after."""
    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()
    try:
        yield
    finally:
        if was_training and hasattr(model, "train"):
            model.train()


def _accepts(model, name: str) -> bool:
    fn = getattr(model, "forward", model)
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return name in params


def model_logits(model, batch: dict, position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Call the model on a collated batch and return its logits (B, L, V)."""
    kwargs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    if batch.get("pixel_values") is not None:
        kwargs["pixel_values"] = batch["pixel_values"]
    kwargs.update(family_inputs(batch))
    if position_ids is not None and _accepts(model, "position_ids"):
        kwargs["position_ids"] = position_ids
    out = model(**kwargs)
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "logits"):
        return out.logits
    return out[0]


def label_logprobs(model, batch: dict) -> list[float]:
    """Summed log-probability of each row's labelled tokens (``labels`` aligned with
    ``input_ids``, as the collator gives them: token t is predicted at t - 1)."""
    logp = model_logits(model, batch).float().log_softmax(-1)[:, :-1]
    labels = batch["labels"][:, 1:]
    keep = labels != IGNORE_INDEX
    tok_logp = logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (tok_logp * keep).sum(-1).tolist()


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def batched(items: Sequence, size: int) -> Iterator[Sequence]:
    for i in range(0, len(items), size):
        yield items[i: i + size]


def last_token_logits(model, features: list[dict], pad_token_id: int, device,
                      image_inputs=None) -> torch.Tensor:
    """Next-token logits (B, V) after each prompt (right padding: real positions unchanged).
    ``image_inputs``: the family's (``FamilyEncoder.image_inputs``), None for LLaVA."""
    batch = to_device(LlavaCollator(pad_token_id, "right", image_inputs=image_inputs)(features),
                      device)
    logits = model_logits(model, batch)
    last = batch["attention_mask"].sum(-1) - 1
    return logits[torch.arange(len(features), device=logits.device), last.to(logits.device)]


@torch.no_grad()
def greedy_generate(model, features: list[dict], *, pad_token_id: int,
                    eos_token_ids: Iterable[int], max_new_tokens: int, device=None,
                    use_hf_generate: bool = True, image_inputs=None) -> list[list[int]]:
    """Greedy continuation of each prompt, cut at the first end-of-sequence token.

    Uses the model's ``generate`` (KV cache) when it has one and ``use_hf_generate``; otherwise
    re-runs the full forward per new token with left padding and position ids from the
    attention mask (when the model accepts ``position_ids``), so any logits callable works.
    ``image_inputs``: the family's (``FamilyEncoder.image_inputs``), None for LLaVA; the
    family's inputs go to the model, and the positions are left to the model (M-RoPE is not
    the mask's running count).
    Returns the new token ids per prompt, without the end token.
    """
    eos = set(int(e) for e in eos_token_ids if e is not None)
    device = model_device(model, device)
    collator = LlavaCollator(pad_token_id, "left", image_inputs=image_inputs)
    batch = to_device(collator(features), device)
    prompt_len = batch["input_ids"].shape[1]
    if use_hf_generate and hasattr(model, "generate"):
        kwargs = {k: v for k, v in batch.items() if k != "labels"}
        out = model.generate(**kwargs, max_new_tokens=max_new_tokens, do_sample=False,
                             num_beams=1, pad_token_id=pad_token_id,
                             eos_token_id=sorted(eos) or None)
        new = out[:, prompt_len:].tolist()
    else:
        ids, mask = batch["input_ids"], batch["attention_mask"]
        done = torch.zeros(len(features), dtype=torch.bool, device=device)
        steps = []
        for _ in range(max_new_tokens):
            pos = None if image_inputs is not None else (mask.cumsum(-1) - 1).clamp(min=0)
            step = {**batch, "input_ids": ids, "attention_mask": mask}
            if collator.batch_extras is not None:  # token types grow with the reply
                step.update(to_device(collator.batch_extras(ids), device))
            nxt = model_logits(model, step, pos)[:, -1].argmax(-1).to(device)
            nxt = torch.where(done, torch.full_like(nxt, pad_token_id), nxt)
            steps.append(nxt)
            done |= torch.isin(nxt, torch.tensor(sorted(eos) or [-1], device=device))
            ids = torch.cat([ids, nxt[:, None]], 1)
            mask = torch.cat([mask, torch.ones_like(nxt[:, None])], 1)
            if bool(done.all()):
                break
        new = torch.stack(steps, 1).tolist() if steps else [[] for _ in features]
    result = []
    for row in new:
        cut = next((i for i, t in enumerate(row) if t in eos), len(row))
        result.append(row[:cut])
    return result


def eos_ids(tokenizer) -> list[int]:
    """End-of-turn ids: the tokenizer's eos plus ChatML's ``<|im_end|>`` / Llama's ``<|eot_id|>``."""
    ids = {tokenizer.eos_token_id}
    for tok in ("<|im_end|>", "<|eot_id|>", "<|end|>"):
        tid = tokenizer.convert_tokens_to_ids(tok)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id:
            ids.add(tid)
    return sorted(i for i in ids if i is not None)


def pad_id(tokenizer) -> int:
    """The tokenizer's pad id, falling back to eos (many LMs ship without a pad token)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def progress_bar(items, desc: str, enabled: bool):
    if not enabled:
        return items
    from tqdm.auto import tqdm
    return tqdm(items, desc=desc)
