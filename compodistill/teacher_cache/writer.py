"""``compodistill teacher-cache``: run the teacher once over the data and write the cache.

Shard s holds samples [s·S, (s+1)·S); process r of W writes the shards s ≡ r (mod W), each
in teacher batches of ``batch_size`` consecutive samples. What a shard holds therefore does
not depend on W. Finished shards (with their completion record) are skipped on resume.
With ``teacher.shard`` the teacher's weights are sharded too, and the processes run their
teacher forwards in lockstep (``sharded.py``).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from .format import (DTYPES, TeacherCacheError, read_json, shard_name, shard_record,
                     shard_problem, write_atomic, write_json_atomic)
from . import sharded as sharding
from .manifest import build_manifest, needs, teacher_hash
from .targets import TeacherMaps, compress_map, logit_targets

__all__ = ["write_teacher_cache", "build_dataset", "use_sharded_teacher",
           "shard_cache_teacher"]


def build_dataset(config, student_config, tokenizer, image_inputs=None):
    """The training data exactly as the trainer builds it (the trainer's own
    ``training_dataset``, with the family's ``image_inputs``), so that sample i is the same
    sample in both."""
    from ..train.trainer import training_dataset

    return training_dataset(config, student_config, tokenizer, image_inputs=image_inputs)


def _connector_files(teacher, root: Path) -> None:
    """The teacher's connector (``connector_of``: LLaVA's projector, Qwen's merger, Qwen3-VL's
    with its DeepStack mergers) and config, so a TAF student can be built without it."""
    from safetensors.torch import save

    from ..hf.families import connector_of

    state = {k: v.detach().cpu().contiguous()
             for k, v in connector_of(teacher).state_dict().items()}
    write_atomic(root / "teacher_connector.safetensors", save(state))
    write_json_atomic(root / "teacher_config.json", teacher.config.to_dict())


def use_sharded_teacher(mode: str, accelerator) -> bool:
    """Whether this run shards the teacher: ``auto`` under an FSDP2 accelerate config with
    several processes, ``fsdp`` always (else a one-line ``ValueError`` saying why not),
    ``none`` never."""
    from ..train.distributed import is_deepspeed, is_fsdp2

    processes = accelerator.num_processes
    if mode == "none":
        return False
    if mode == "auto":
        return is_fsdp2(accelerator) and processes > 1
    hint = ("launch it with `accelerate launch --config_file configs/accelerate/fsdp.yaml` "
            "(an FSDP2 config) or set teacher.shard: none")
    if processes < 2:
        raise ValueError(f"teacher.shard: fsdp shards the teacher over the processes of "
                         f"`accelerate launch`, and this run has 1 process; {hint}")
    if is_deepspeed(accelerator):
        raise ValueError("teacher.shard: fsdp needs an FSDP2 accelerate config; this run is "
                         "DeepSpeed, whose ZeRO-3 inference the cache run does not support; "
                         + hint)
    if not is_fsdp2(accelerator):
        raise ValueError(f"teacher.shard: fsdp needs an FSDP2 accelerate config "
                         f"(distributed_type: FSDP, fsdp_version: 2); this run is "
                         f"{accelerator.distributed_type.value}; {hint}")
    return True


def shard_cache_teacher(teacher: torch.nn.Module, accelerator) -> torch.nn.Module:
    """``teacher`` (frozen, eval, whole on the CPU) sharded in place; ``fully_shard`` moves
    it to the device one group at a time, keeping this process's shard."""
    from ..train.distributed import shard_teacher

    return shard_teacher(teacher, accelerator)


def _teacher_forward(teacher, batch: dict, acc):
    """The teacher's forward on a collated batch, output dropped (a lockstep dummy)."""
    from ..data.family_inputs import family_inputs

    device, pixels = acc.device, batch.get("pixel_values")
    with torch.no_grad(), acc.autocast():
        teacher.model(input_ids=batch["input_ids"].to(device),
                      attention_mask=batch["attention_mask"].to(device),
                      pixel_values=None if pixels is None else pixels.to(device),
                      use_cache=False, **family_inputs(batch, device))


def _dummy_batches(dataset, collate, pad: int):
    """``dummy(kind)`` for :class:`~.sharded.Lockstep`: the first sample with images, alone,
    or one text token (found and built once)."""
    found = {}

    def dummy(kind: str) -> dict:
        if kind not in found:
            if kind == "text":
                found[kind] = {"input_ids": torch.tensor([[pad]]),
                               "attention_mask": torch.ones(1, 1, dtype=torch.long)}
            else:
                items = (dataset[i] for i in range(len(dataset)))
                found[kind] = next(b for b in (collate([x]) for x in items if x is not None)
                                   if sharding.has_images(b))
        return found[kind]

    return dummy


def _batch_tensors(teacher, batch: dict, indices: list[int], manifest: dict, matches,
                   acc) -> dict:
    """Every tensor of the samples ``indices`` (one collated teacher batch)."""
    from ..logit_kd.from_logits import selected_rows, shift_labels
    from ..visual_attention.layout import visual_layout
    from ..matching import LayerMatch
    from ..data.family_inputs import family_inputs

    device = acc.device
    dtype = DTYPES[manifest["dtype"]]
    ids = batch["input_ids"].to(device)
    mask = batch["attention_mask"].to(device)
    pixels = batch["pixel_values"].to(device) if "pixel_values" in batch else None
    extra = family_inputs(batch, device)  # Qwen's image grid and token types (M-RoPE)
    B, N = ids.shape
    visual = torch.isin(ids, torch.tensor(manifest["processor"]["visual_token_ids"],
                                          device=device))
    sink = None
    if manifest["vat"]["stored"]:
        layout = visual_layout(visual, B, N, query=manifest["vat"]["query"],
                               attention_mask=mask, causal=True, device=device)
        sink = TeacherMaps(teacher, [LayerMatch(s, tuple(t)) for s, t in matches], layout)
    with torch.no_grad(), acc.autocast():
        if sink is not None:
            with sink:
                out = teacher.model(input_ids=ids, attention_mask=mask, pixel_values=pixels,
                                    use_cache=False, **extra)
        else:
            out = teacher.model(input_ids=ids, attention_mask=mask, pixel_values=pixels,
                                use_cache=False, **extra)
    h_t = out.last_hidden_state
    tensors = {}
    kd = manifest["kd"]
    vocab = manifest["processor"]["vocab_size"]
    if kd["stored"]:
        sel = selected_rows((B, N), shift_labels(batch["labels"]).to(device), kd["positions"],
                            mask, visual, device).view(B, N)
    if sink is not None:
        targets = sink.targets()
        q_count, v_count = layout.query_count.tolist(), layout.visual_count.tolist()
    for b, i in enumerate(indices):
        q, v = (q_count[b], v_count[b]) if sink is not None else (0, 0)
        tensors[f"{i}.shape"] = torch.tensor([int(mask[b].sum()), q, v], dtype=torch.int64)
        if kd["stored"]:
            pos = sel[b].nonzero().squeeze(1)
            lp, ix, rest = logit_targets(h_t[b, pos], teacher.lm_head.weight,
                                         teacher.lm_head.bias, vocab, kd["topk"],
                                         kd["temperature"])
            tensors[f"{i}.kd_pos"] = pos.to(torch.int32).cpu()
            tensors[f"{i}.kd_logp"] = lp.to(dtype).cpu()
            tensors[f"{i}.kd_idx"] = ix.cpu()
            tensors[f"{i}.kd_rest"] = rest.float().cpu()
        if sink is not None:
            for j, target in enumerate(targets):
                m = target[b, :q, :v]
                if manifest["vat"]["maps"] == "exact":
                    tensors[f"{i}.map{j}"] = m.to(dtype).cpu().contiguous()
                else:
                    val, ix, rest = compress_map(m, manifest["vat"]["map_topk"])
                    tensors[f"{i}.map{j}.val"] = val.to(dtype).cpu().contiguous()
                    tensors[f"{i}.map{j}.idx"] = ix.to(
                        torch.int16 if v <= 32767 else torch.int32).cpu().contiguous()
                    tensors[f"{i}.map{j}.rest"] = rest.float().cpu().contiguous()
    return tensors


def _shard_done(root: Path, shard: int) -> bool:
    """A shard counts only with its record, and only if the file still matches it, sha256
    included: a rerun rewrites exactly the shards that are missing, partial or damaged."""
    record_path = root / f"{shard_name(shard)}.json"
    if not record_path.is_file():
        return False
    try:
        return shard_problem(root, json.loads(record_path.read_text()), full=True) is None
    except (OSError, ValueError, KeyError):
        return False


def write_teacher_cache(config, *, stages: list[str] | None = None, accelerator=None,
                        show_progress: bool = True) -> Path:
    """Write (or finish) ``config.teacher_cache.cache`` for the stages named (default: all).

    Returns the cache directory. Raises ``ValueError`` for a config without
    ``teacher: {cache: DIR, path: PATH}``, stages that need no teacher, or a directory that
    holds a cache made from other inputs.
    """
    from ..train.distributed import make_accelerator

    from ..data import LlavaCollator
    from ..data.processors import load_processor_parts
    from ..data.family_inputs import family_image_inputs
    from ..hf.loading import load_family_model
    from ..train.families import check_family_options
    from ..train.trainer import check_checkpoint

    opts = config.teacher_cache
    if opts is None:
        raise ValueError("teacher: the cache run needs `teacher: {cache: DIR, path: TEACHER}` "
                         "in the config")
    names = [s.name for s in config.stages]
    unknown = sorted(set(stages or []) - set(names))
    if unknown:
        raise ValueError(f"--stage: unknown stages {unknown}; the config has {names}")
    need = needs(config, stages)
    if not need["stages"]:
        raise ValueError(f"--stage: none of the stages {stages or names} needs the teacher "
                         f"(no kd or vat weight); nothing to cache")
    # Each model's family, config and visual ids, resolved once and passed down.
    teacher_model = check_checkpoint(opts.path, "teacher.path")
    student_model = check_checkpoint(config.student, "student")
    check_family_options(config, student_model, teacher_model)  # e.g. TAF where it is missing
    if not Path(config.data.train_json).is_file():
        raise FileNotFoundError(f"data.train_json: training data not found: "
                                f"{config.data.train_json}")
    if config.cpu_threads is not None:
        torch.set_num_threads(config.cpu_threads)
    # make_accelerator: several CPU processes under torchrun get a gloo group (not one each).
    acc = accelerator or make_accelerator(mixed_precision=config.mixed_precision)
    sharded = use_sharded_teacher(opts.shard, acc)  # a bad request: one line, early
    root = Path(opts.cache)
    student_config = student_model.config
    # The tokenizer (the processor's, with its chat template, when saved) and the family's
    # image inputs (None for LLaVA) exactly as the trainer builds them: sample i must match.
    tokenizer = load_processor_parts(config.student).tokenizer
    image_inputs = family_image_inputs(student_model, config.student, tokenizer)
    teacher = load_family_model(teacher_model).eval().requires_grad_(False)
    if not sharded:  # sharded: fully_shard moves each process's shards to its device
        teacher = teacher.to(acc.device)
    t_vocab = teacher.lm_head.weight.shape[0]
    s_vocab = student_config.get_text_config().vocab_size
    if t_vocab < s_vocab:
        raise ValueError(f"teacher.path: the teacher's vocabulary ({t_vocab}) is smaller than the "
                         f"student's ({s_vocab}); KD truncates the teacher's, never pads it")
    manifest = build_manifest(config, student_model,
                              teacher_layers=teacher.config.get_text_config().num_hidden_layers,
                              teacher_hash=teacher_hash(opts.path), kd=need["kd"],
                              vat=need["vat"], stages=need["stages"],
                              image_processor=getattr(image_inputs, "processor", None))
    manifest_path = root / "manifest.json"
    if manifest_path.is_file():
        old = read_json(manifest_path, "manifest")
        if old != manifest:
            raise TeacherCacheError(f"{manifest_path} holds a cache made from other inputs or "
                                    f"options; delete {root} or set teacher.cache to another "
                                    f"directory")
    acc.wait_for_everyone()
    if acc.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        write_json_atomic(manifest_path, manifest)
        _connector_files(teacher, root)  # from the whole teacher, before any sharding
    acc.wait_for_everyone()
    if sharded:
        shard_cache_teacher(teacher, acc)

    dataset = build_dataset(config, student_config, tokenizer, image_inputs)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (
        tokenizer.eos_token_id or 0)
    collate = LlavaCollator(pad, image_inputs=image_inputs)
    lockstep = None
    if sharded:
        from ..train.distributed import teacher_step

        def gathered(fn, batch):  # fn(batch) with the teacher's lm_head gathered
            return teacher_step(lambda _, b: fn(b), teacher)(None, batch)

        lockstep = sharding.Lockstep(acc, lambda b: _teacher_forward(teacher, b, acc),
                                     _dummy_batches(dataset, collate, pad), gathered)
    per_shard, n = opts.shard_samples, len(dataset)
    shards = list(range(acc.process_index, math.ceil(n / per_shard), acc.num_processes))
    progress = None
    if show_progress and acc.is_local_main_process:
        from tqdm.auto import tqdm

        progress = tqdm(total=len(shards), desc="teacher cache shards", dynamic_ncols=True)
    from safetensors.torch import save

    for shard in shards:
        first = shard * per_shard
        count = min(per_shard, n - first)
        if not _shard_done(root, shard):
            tensors = {}
            for b0 in range(first, first + count, opts.batch_size):
                indices = list(range(b0, min(b0 + opts.batch_size, first + count)))
                items = [(i, dataset[i]) for i in indices]
                items = [(i, x) for i, x in items if x is not None]  # unreadable: skipped
                if not items:
                    continue

                ids, batch = [i for i, _ in items], collate([x for _, x in items])

                def targets(batch):  # called at once, in this iteration
                    return _batch_tensors(teacher, batch, ids, manifest,
                                          manifest["vat"]["matches"], acc)

                tensors.update(lockstep.run(targets, batch) if lockstep else targets(batch))
            path = root / f"{shard_name(shard)}.safetensors"
            # One metadata key: safetensors writes several in a random order.
            write_atomic(path, save(tensors, metadata={"samples": f"{first}:{first + count}"}))
            write_json_atomic(root / f"{shard_name(shard)}.json",
                              shard_record(root, shard, first, count))
        if progress is not None:
            progress.update(1)
    if lockstep is not None:  # dummy forwards until every process has run its last batch
        lockstep.finish()
    if progress is not None:
        progress.close()
    acc.wait_for_everyone()
    if acc.is_main_process:
        records = [read_json(root / f"{shard_name(s)}.json", "shard record")
                   for s in range(math.ceil(n / per_shard))]
        # The records the cache has no targets for (training skips the same ones), by reason.
        from ..train.trainer import records_skipped

        counts, first = records_skipped(dataset)
        write_json_atomic(root / "index.json", {"num_samples": n, "shards": records,
                                                "records_skipped": counts,
                                                "first_skipped": first})
    acc.wait_for_everyone()
    return root
