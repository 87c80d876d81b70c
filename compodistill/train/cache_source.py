"""Training from a teacher cache: the "targets come from the cache" branch of the trainer.

:class:`CacheSource` is all the trainer holds in place of a teacher. It tags each sample with
its index (so a batch knows which cached samples it holds), gives a TAF student the teacher's
connector saved in the cache, and builds each stage's losses: :class:`CachedStageLosses`
computes the same terms as :class:`compodistill.train.stages.StageLosses`, with the KD
targets and the visual-attention targets read from the cache instead of a teacher forward.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from torch import nn

from ..hf.attention import (SiteCapture, decoder_attention_modules, enable_attention,
                            install_checkpoint_context)
from ..hf.families import visual_positions
from ..logit_kd.from_logits import selected_rows, shift_labels
from ..matching import LayerMatch
from ..visual_attention.layout import VisualLayout, visual_layout
from ..visual_attention.map_losses import visual_map_loss
from ..teacher_cache.format import TeacherCacheError, read_json
from ..teacher_cache.loss import topk_distillation_loss
from ..teacher_cache.reader import TeacherCache
from ..teacher_cache.targets import expand_map

__all__ = ["CacheSource", "CachedStageLosses", "CachedCapture", "IndexedDataset",
           "IndexCollator"]

INDEX_KEY = "sample_index"


class IndexedDataset(torch.utils.data.Dataset):
    """``dataset[i]`` with ``"sample_index": i`` added (None items stay None)."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    @property
    def lengths(self):
        return self.dataset.lengths

    def __getitem__(self, i):
        item = self.dataset[i]
        return None if item is None else {**item, INDEX_KEY: i}


class IndexCollator:
    """Wraps a collator: the batch also gets ``sample_index`` (B,) in batch order."""

    def __init__(self, collate):
        self.collate = collate

    def __call__(self, features):
        features = [f for f in features if f is not None]
        batch = self.collate(features)
        batch[INDEX_KEY] = torch.tensor([f[INDEX_KEY] for f in features], dtype=torch.long)
        return batch


class CachedCapture(SiteCapture):
    """A capture of the student alone; :meth:`loss` compares its maps with cached targets.

    Same loss as :meth:`compodistill.hf.distiller.Capture.loss` (group or simple matching).
    """

    def __init__(self, student: nn.Module, matches: list[LayerMatch], layout: VisualLayout,
                 loss_options: dict, layer_reduction: str):
        modules = decoder_attention_modules(student)
        self.student, self.matches, self.layout = student, matches, layout
        self.sites = {modules[m.student_layer]: ("student", m.student_layer) for m in matches}
        self.loss_options, self.layer_reduction = loss_options, layer_reduction
        self.maps: dict[int, torch.Tensor] = {}
        self.layer_losses: dict[int, torch.Tensor] = {}
        self.checked_masks: list = []

    def store(self, role, layer, maps, accumulated=False):
        self.maps[layer] = maps

    def __enter__(self):
        install_checkpoint_context(self.student)
        return super().__enter__()

    def loss(self, targets: list[torch.Tensor]) -> torch.Tensor:
        missing = [m.student_layer for m in self.matches if m.student_layer not in self.maps]
        if missing:
            raise ValueError(f"student layers {missing} were not captured (attention "
                             f"implementation not 'compodistill'?)")
        terms = [visual_map_loss(self.maps[m.student_layer], t.to(self.maps[
            m.student_layer].device), self.layout, **self.loss_options)
            for m, t in zip(self.matches, targets)]
        self.layer_losses = {m.student_layer: t.detach() for m, t in zip(self.matches, terms)}
        total = torch.stack(terms).sum()
        return total / len(terms) if self.layer_reduction == "mean" else total


class CacheSource:
    """The teacher cache of a run, checked against its config and student.

    Args:
        config: the run's :class:`~compodistill.train.config.DistillConfig` (with
            ``teacher_cache``).
        student_config: the student's ``ResolvedModel`` (what the trainer passes) or config
            (depth, vocabulary, image tokens).
        image_inputs: the family's image inputs (data/family_inputs.py; None for LLaVA):
            its image processor's settings are checked against the manifest.
    """

    def __init__(self, config, student_config, image_inputs=None):
        from ..hf.families import family_of

        opts = config.teacher_cache
        self.config = config
        self.family = family_of(student_config)
        teacher_path = opts.path if opts.path and Path(opts.path).is_dir() else ""
        self.cache = TeacherCache(opts.cache).check(
            config, student_config, teacher_path,
            image_processor=getattr(image_inputs, "processor", None))
        # Every shard against its record before any step (each process: each reads them all).
        self.cache.verify(full=opts.verify == "full")
        self.manifest = self.cache.manifest
        self.matches = [LayerMatch(s, tuple(t)) for s, t in self.manifest["vat"]["matches"]]

    # -- data
    def indexed(self, dataset):
        return IndexedDataset(dataset)

    def collator(self, collate):
        return IndexCollator(collate)

    # -- TAF
    def apply_taf(self, student: nn.Module) -> nn.Module:
        """The TAF online training applies (LLaVA: :func:`compodistill.hf.llava.apply_taf`,
        other families: :func:`compodistill.hf.family_taf.apply_family_taf`), with the
        teacher's connector from the cache (the teacher shell is built on the meta device: no
        weights are loaded)."""
        from safetensors.torch import load_file
        from transformers import LlavaConfig, LlavaForConditionalGeneration
        from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

        from ..hf.llava import apply_taf

        root = self.cache.root
        raw = read_json(root / "teacher_config.json", "teacher config")
        if self.family.name != "llava":
            return self._apply_family_taf(student, raw)
        cfg = LlavaConfig.from_dict(raw)
        with torch.device("meta"):  # no weights, and no draw from the random stream
            shell = LlavaForConditionalGeneration(cfg)
            projector = LlavaMultiModalProjector(cfg)
        projector.load_state_dict(load_file(str(root / "teacher_connector.safetensors")),
                                  assign=True)
        shell.model.multi_modal_projector = projector
        return apply_taf(student, shell)

    def _apply_family_taf(self, student: nn.Module, raw: dict) -> nn.Module:
        """A teacher shell of the student's family on the meta device, its connector
        (``connector_of``) loaded from the cache, handed to ``apply_family_taf``."""
        from safetensors.torch import load_file
        from transformers import AutoModelForImageTextToText
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING

        from ..hf.families import connector_of
        from ..hf.family_taf import apply_family_taf

        cfg = CONFIG_MAPPING[raw["model_type"]].from_dict(raw)
        with torch.device("meta"):  # no weights, and no draw from the random stream
            shell = AutoModelForImageTextToText.from_config(cfg)
        state = load_file(str(self.cache.root / "teacher_connector.safetensors"))
        connector_of(shell).load_state_dict(state, assign=True)
        return apply_family_taf(student, shell, self.family)

    # -- losses
    def stage_losses(self, student, stage, config, accelerator) -> "CachedStageLosses":
        w = stage.weights
        for term, has in (("kd", self.cache.has_kd), ("vat", self.cache.has_maps)):
            if getattr(w, term) and not has:
                raise TeacherCacheError(
                    f"teacher cache {self.cache.root} holds no {term} targets but stage "
                    f"{stage.name} has a {term} weight; rerun compodistill teacher-cache "
                    f"--stage {stage.name}")
        return CachedStageLosses(student, self, stage, config, accelerator)

    # -- targets of a batch
    def kd_targets(self, samples: list[dict], indices: list[int], sel: torch.Tensor):
        """Row-major (R, k) targets of the batch's KD positions; checks each sample's
        positions against the cached ones."""
        lp, ix, rest = [], [], []
        for b, (s, i) in enumerate(zip(samples, indices)):
            pos = sel[b].nonzero().squeeze(1).cpu()
            cached = s["kd_pos"].long()
            if not torch.equal(pos, cached):
                raise TeacherCacheError(
                    f"sample {i} of teacher cache {self.cache.root}: its KD positions differ "
                    f"from the batch's ({cached.numel()} cached, {pos.numel()} now); "
                    f"{self.changed()}")
            lp.append(s["kd_logp"].float())
            ix.append(s["kd_idx"])
            rest.append(s["kd_rest"])
        return torch.cat(lp), torch.cat(ix), torch.cat(rest)

    def map_targets(self, samples: list[dict], indices: list[int], layout: VisualLayout):
        """One (B, Qmax, Vmax) float32 target per match, zero outside each sample's block."""
        shape = layout.map_shape
        q_count, v_count = layout.query_count.tolist(), layout.visual_count.tolist()
        exact = self.manifest["vat"]["maps"] == "exact"
        allowed = None if exact else layout.allowed().cpu()  # only top-k maps spread a rest
        out = [torch.zeros(shape, dtype=torch.float32) for _ in self.matches]
        for b, (s, i) in enumerate(zip(samples, indices)):
            q, v = q_count[b], v_count[b]
            if tuple(s["shape"][1:].tolist()) != (q, v):
                raise TeacherCacheError(
                    f"sample {i} of teacher cache {self.cache.root}: cached map block "
                    f"{tuple(s['shape'][1:].tolist())} (query rows, image tokens) but the batch "
                    f"has ({q}, {v}); {self.changed()}")
            for j in range(len(self.matches)):
                if exact:
                    m = s[f"map{j}"].float()
                else:
                    m = expand_map(s[f"map{j}.val"], s[f"map{j}.idx"], s[f"map{j}.rest"],
                                   allowed[b, :q, :v])
                out[j][b, :q, :v] = m
        return out

    def changed(self) -> str:
        """Why a sample disagrees with the batch: changed data, unless the shards were not
        hashed (``teacher.verify: size``), when damage cannot be ruled out."""
        if self.cache.verified == "sha256":
            return ("the shards match their sha256, so the data, images or tokenizer changed "
                    "since the cache was written; rerun compodistill teacher-cache for this data")
        return ("the data, images or tokenizer changed since the cache was written, or a shard is "
                "damaged (teacher.verify: size does not hash the shards; `compodistill "
                f"teacher-cache --verify {self.cache.root}` checks them); rerun compodistill "
                "teacher-cache")

    def samples(self, batch: dict) -> tuple[list[dict], list[int]]:
        indices = batch[INDEX_KEY].tolist()
        samples = [self.cache.sample(i) for i in indices]
        tokens = batch["attention_mask"].sum(1).tolist()
        for s, i, n in zip(samples, indices, tokens):
            if int(s["shape"][0]) != int(n):
                raise TeacherCacheError(
                    f"sample {i} of teacher cache {self.cache.root}: {int(s['shape'][0])} tokens "
                    f"cached, {int(n)} in the batch; {self.changed()}")
        return samples, indices


class CachedStageLosses:
    """``(prepared_student, batch) -> {"lm+kd", "vat"}`` with the teacher's targets from the
    cache; the same terms, weights and parts as :class:`~compodistill.train.stages.StageLosses`.
    """

    def __init__(self, student, source: CacheSource, stage, config, accelerator):
        from .stages import llava_core

        self.student, self.source, self.stage, self.config = student, source, stage, config
        self.acc = accelerator
        self.core = llava_core(student)
        if stage.weights.vat:
            enable_attention(self.core)
            v = config.vat
            self.loss_options = dict(loss=v.loss, cosine=v.cosine, distribution=v.distribution,
                                     beta=0.5, reduction="mean")

    def __call__(self, prepared: nn.Module, batch: dict) -> dict:
        from .engine import Combined
        from ..data.family_inputs import family_inputs
        from .stages import lm_head

        w = self.stage.weights
        ids, mask = batch["input_ids"], batch["attention_mask"]
        samples, indices = self.source.samples(batch)
        # the visual keys the cache was written with (the manifest checked them)
        visual = visual_positions(ids, self.core.config)
        capture = None
        if w.vat:
            B, N = ids.shape
            layout = visual_layout(visual, B, N, query=self.config.vat.query,
                                   attention_mask=mask, causal=True, device=ids.device)
            capture = CachedCapture(self.core, self.source.matches, layout, self.loss_options,
                                    self.config.vat.layer_reduction)
        with self.acc.autocast(), (capture or contextlib.nullcontext()):
            h_s = prepared(ids, mask, batch.get("pixel_values"), **family_inputs(batch))
        labels = shift_labels(batch["labels"])
        head = lm_head(self.student)
        terms = {}
        if w.lm or w.kd:
            kd = self.config.kd
            sel = selected_rows(tuple(ids.shape), labels, kd.positions, mask, visual,
                                ids.device).view(ids.shape)
            targets = (self.source.kd_targets(samples, indices, sel) if w.kd else
                       (torch.zeros(0, 1), torch.zeros(0, 1, dtype=torch.int32), torch.zeros(0)))
            total, parts = topk_distillation_loss(
                h_s, head.weight, labels, *targets, b_s=head.bias, loss=kd.loss, beta=kd.beta,
                temperature=kd.temperature, positions=kd.positions, attention_mask=mask,
                visual_mask=visual, ce_weight=w.lm, kd_weight=w.kd, return_terms=True)
            names = {"ce": "lm", "kd": "kd"}
            terms["lm+kd"] = Combined(total, {names[k]: v for k, v in parts.items()
                                              if getattr(w, names[k])})
        if w.vat:
            vat = capture.loss(self.source.map_targets(samples, indices, capture.layout))
            parts = {"vat": vat.detach(), **{f"vat_layer{layer}": value
                                             for layer, value in capture.layer_losses.items()}}
            terms["vat"] = Combined(w.vat * vat, parts)
        return terms
