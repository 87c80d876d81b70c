"""What each stage trains and which losses it computes (docs/stages.md).

- DPT: the post-connector (TAF) or connector; LM + logit KD.
- DFT: LoRA on the language model + post-connector; LM + KD + VAT.
- SFT: the DFT LoRA merged, a fresh LoRA; LM only.

LoRA comes from peft and is merged into the weights at the end of each stage, so every
stage's output is a plain (TAF) LLaVA model that the next stage, evaluation or
``from_pretrained`` can load directly.
"""
from __future__ import annotations

import contextlib
import warnings

import torch
from torch import nn

from ..hf.distiller import AttentionDistiller
from ..visual_attention import response_rows
from ..hf.families import connector_of
from ..data.family_inputs import family_inputs
from ..logit_kd.linear import linear_distillation_loss
from ..logit_kd.from_logits import shift_labels
from .config import DistillConfig, StageConfig
from .engine import Combined

# Linear layers of a Llama/Qwen2 decoder that LoRA adapts (attention and MLP), in the
# language model only: the vision tower and the connector stay untouched.
LORA_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


def llava_core(model: nn.Module) -> nn.Module:
    """The LlavaForConditionalGeneration inside a peft wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _connector(model: nn.Module) -> nn.Module:
    return connector_of(llava_core(model))


def _post_connector(model: nn.Module) -> nn.Module:
    # Qwen3-VL's connector holds several TAF connectors (merger, DeepStack), a post each.
    posts = [m.post for m in _connector(model).modules()
             if hasattr(m, "freeze_teacher_part") and isinstance(getattr(m, "post", None), nn.Module)]
    if not posts:
        raise ValueError("trainable='post_connector' needs a TAF student (apply_taf / taf: true); "
                         "use trainable='connector' for a student with its own connector")
    return posts[0] if len(posts) == 1 else nn.ModuleList(posts)


def prepare_trainable(model: nn.Module, stage: StageConfig) -> tuple[nn.Module, list]:
    """Freeze everything, then unfreeze (or add LoRA to) what ``stage.trainable`` names.

    Returns the model to train (a peft model when LoRA is used) and its trainable parameters.
    """
    for p in model.parameters():
        p.requires_grad_(False)
    kind = stage.trainable
    if "lora" in kind:
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(r=stage.lora_r, lora_alpha=stage.lora_alpha,
                            lora_dropout=stage.lora_dropout, target_modules=LORA_TARGETS,
                            bias="none")
        with warnings.catch_warnings():
            # peft reads transformers' deprecated `is_gradient_checkpointing`: not ours to fix.
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing",
                                    category=FutureWarning)
            model = get_peft_model(model, config)
    if kind in ("post_connector", "lora+post_connector"):
        for p in _post_connector(model).parameters():
            p.requires_grad_(True)
    elif kind in ("connector", "lora+connector"):
        for name, p in _connector(model).named_parameters():
            # A TAF connector's teacher half stays frozen (docs/taf.md).
            p.requires_grad_(not name.startswith(("linear_1", "linear_2"))
                             or not hasattr(_connector(model), "post"))
        for part in _connector(model).modules():  # any family's TAF connector(s)
            if hasattr(part, "freeze_teacher_part"):
                part.freeze_teacher_part()
    elif kind == "all":  # every weight, vision tower included (e.g. a teacher from scratch)
        for p in model.parameters():
            p.requires_grad_(True)
        for part in _connector(model).modules():
            if hasattr(part, "freeze_teacher_part"):
                part.freeze_teacher_part()
    params = [p for p in model.parameters() if p.requires_grad]
    return model, params


def finish_stage(model: nn.Module) -> nn.Module:
    """Merge LoRA into the weights (no-op without peft) and unfreeze nothing."""
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    return model


class HiddenStates(nn.Module):
    """``forward(batch) -> last hidden state`` of a LLaVA model, for DDP/FSDP wrapping.

    Logits are never built here: the losses read ``lm_head`` weights directly
    (fused linear KD / CE), so (tokens × vocab) logits do not exist for either model.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    @property
    def _no_split_modules(self):
        # accelerate's FSDP auto-wrap reads this: one group per decoder/encoder layer.
        return getattr(llava_core(self.model), "_no_split_modules", None)

    def forward(self, input_ids, attention_mask, pixel_values=None, **family_inputs):
        core = llava_core(self.model)
        out = core.model(input_ids=input_ids, attention_mask=attention_mask,
                         pixel_values=pixel_values, use_cache=False, **family_inputs)
        return out.last_hidden_state


def lm_head(model: nn.Module) -> nn.Linear:
    """The output projection of a LLaVA model (through a peft wrapper)."""
    return llava_core(model).lm_head


def lm_loss(h_s: torch.Tensor, head: nn.Linear, labels: torch.Tensor) -> torch.Tensor:
    """Plain cross-entropy of the student (aligned labels), for stages without a teacher."""
    logits = head(h_s).float()
    return nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)


class StageLosses:
    """``(prepared_student, batch) -> {"lm", "kd", "vat"}`` for one stage.

    The ``vat`` term is a :class:`Combined` whose parts are the VAT loss and, for every
    matched student layer ``l``, its own map loss ``vat_layer<l>`` (logged as
    ``loss_vat_layer<l>``; they do not enter the total twice).

    Terms with weight 0 are not computed at all (no teacher forward when neither KD nor
    VAT is on). The teacher runs without gradients, in eval mode. Recipes subclass this and
    name the terms that need the teacher in ``TEACHER_TERMS``.
    """

    TEACHER_TERMS = ("kd", "vat")

    def __init__(self, student: nn.Module, teacher: nn.Module | None, stage: StageConfig,
                 config: DistillConfig, accelerator):
        self.student, self.teacher, self.stage, self.config = student, teacher, stage, config
        self.acc = accelerator
        w = stage.weights
        self.need_teacher = any(getattr(w, term) for term in self.TEACHER_TERMS)
        if self.need_teacher and teacher is None:
            raise ValueError(f"stage {stage.name}: the {'/'.join(self.TEACHER_TERMS)} weights "
                             f"need a teacher model")
        self.distiller = None
        if w.vat:
            v = config.vat
            self.distiller = AttentionDistiller(
                llava_core(student), teacher,
                image_token_id=llava_core(student).config.image_token_id,
                student_layers=v.student_layers, teacher_layers=v.teacher_layers,
                preset=v.preset, matching=v.matching,
                # "response" rows come from each batch's labels (capture's query=)
                query="text" if v.query == "response" else v.query, loss=v.loss,
                cosine=v.cosine, distribution=v.distribution, layer_reduction=v.layer_reduction)

    def _teacher_hidden(self, batch) -> torch.Tensor:
        core = self.teacher
        device = next(core.parameters()).device
        with torch.no_grad():
            out = core.model(input_ids=batch["input_ids"].to(device),
                             attention_mask=batch["attention_mask"].to(device),
                             pixel_values=(batch["pixel_values"].to(device)
                                           if "pixel_values" in batch else None),
                             use_cache=False, **family_inputs(batch, device))
        return out.last_hidden_state.to(batch["input_ids"].device)

    def kd_options(self, batch: dict, head_s: nn.Linear, head_t: nn.Linear, **overrides) -> dict:
        """Keyword arguments of :func:`linear_distillation_loss` from ``config.kd`` and the batch
        (biases, masks; image positions = the student's image token id)."""
        kd = self.config.kd
        ids = batch["input_ids"]
        options = dict(b_s=head_s.bias, b_t=head_t.bias, loss=kd.loss, beta=kd.beta,
                       temperature=kd.temperature, positions=kd.positions,
                       attention_mask=batch["attention_mask"],
                       visual_mask=ids == llava_core(self.student).config.image_token_id)
        return {**options, **overrides}

    def forwards(self, prepared: nn.Module, batch: dict, capture=None):
        """Teacher (no grad, when needed) and student forwards under autocast.

        Returns ``(labels, h_t, student_output, capture)`` with the labels aligned to the
        logits (position i predicts token i + 1); every recipe's losses start here.
        """
        with self.acc.autocast(), (capture or contextlib.nullcontext()) as cap:
            h_t = self._teacher_hidden(batch) if self.need_teacher else None
            out = prepared(batch["input_ids"], batch["attention_mask"],
                           batch.get("pixel_values"), **family_inputs(batch))
        return shift_labels(batch["labels"]), h_t, out, cap

    def __call__(self, prepared: nn.Module, batch: dict) -> dict:
        w = self.stage.weights
        rows = (response_rows(batch["labels"]) if self.config.vat.query == "response"
                else None)
        capture = (self.distiller.capture(batch["input_ids"],
                                          attention_mask=batch["attention_mask"], query=rows)
                   if self.distiller else None)
        labels, h_t, h_s, cap = self.forwards(prepared, batch, capture)
        head_s = lm_head(self.student)
        terms = {}
        if not self.need_teacher:
            terms["lm"] = lm_loss(h_s, head_s, labels)
            return terms
        head_t = lm_head(self.teacher)
        common = self.kd_options(batch, head_s, head_t)
        if w.lm or w.kd:
            # One pass over both lm_heads for LM and KD together, already weighted.
            total, parts = linear_distillation_loss(h_s, head_s.weight, h_t, head_t.weight,
                                                    labels, ce_weight=w.lm, kd_weight=w.kd,
                                                    return_terms=True, **common)
            names = {"ce": "lm", "kd": "kd"}
            terms["lm+kd"] = Combined(total, {names[k]: v for k, v in parts.items()
                                              if getattr(w, names[k])})
        if w.vat:
            # Weighted here as the engine would weigh a plain "vat" term (same total); the
            # parts add each matched layer's map loss, already computed by cap.loss().
            vat = cap.loss()
            parts = {"vat": vat.detach(),
                     **{f"vat_layer{layer}": value
                        for layer, value in cap.layer_losses.items()}}
            terms["vat"] = Combined(w.vat * vat, parts)
        return terms
