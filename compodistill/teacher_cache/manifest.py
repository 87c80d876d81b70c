"""The cache's manifest: what it holds and the hashes of what it was made from.

:func:`build_manifest` is called by the cache run and, with ``teacher_hash=None`` when
training has no teacher folder, by training: the two must agree on every key they both
have, else the cache is stale (:func:`check_manifest`).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from ..hf.families import config_of, family_of, visual_token_ids
from ..matching import match_layers
from .format import FORMAT, VERSION, TeacherCacheError, hash_files, sha256_file

__all__ = ["student_facts", "build_manifest", "check_manifest", "image_processor_hash", "needs"]

# Files of a tokenizer / processor saved next to the student (hashed when present).
PROCESSOR_FILES = ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "vocab.json", "merges.txt", "tokenizer.model",
                   "chat_template.jinja", "chat_template.json", "preprocessor_config.json",
                   "processor_config.json"]
TEACHER_SUFFIXES = (".safetensors", ".bin")


def image_processor_hash(image_processor) -> str:
    """sha256 of an image processor's settings (its ``to_dict()``, keys sorted)."""
    text = json.dumps(image_processor.to_dict(), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def student_facts(student_config, image_processor=None) -> dict:
    """What the targets depend on in the student: its family, depth, vocabulary, visual
    token ids and image input. ``image_processor``: the family's (data/family_inputs.py);
    None for LLaVA, whose images are resized to a fixed size with a fixed token count.
    ``student_config``: the student's config or its ``ResolvedModel``."""
    family = family_of(student_config)  # a ResolvedModel's, not worked out again
    visual_ids = visual_token_ids(student_config)
    student_config = config_of(student_config)
    text = student_config.get_text_config()
    if image_processor is None and family.name != "llava":
        raise ValueError(f"teacher cache: the {family.title} student needs its image processor "
                         f"(saved next to it in config.student) to record its settings")
    facts = {"family": family.name,
             "num_layers": int(text.num_hidden_layers), "vocab_size": int(text.vocab_size),
             "visual_token_ids": list(visual_ids)}
    if image_processor is None:
        facts.update(image_size=int(student_config.vision_config.image_size),
                     image_seq_length=int(student_config.image_seq_length))
    else:  # dynamic resolution: the processor's settings decide every image's token count
        facts["image_processor_sha256"] = image_processor_hash(image_processor)
    return facts


def needs(config, stages: list[str] | None = None) -> dict:
    """``{"kd": bool, "vat": bool, "stages": [...]}``: what the selected stages need."""
    chosen = [s for s in config.stages if stages is None or s.name in stages]
    teacher_stages = [s for s in chosen if s.weights.kd or s.weights.vat]
    return {"kd": any(s.weights.kd for s in teacher_stages),
            "vat": any(s.weights.vat for s in teacher_stages),
            "stages": [s.name for s in teacher_stages]}


def _matches(config, student: dict, teacher_layers: int) -> list:
    v = config.vat
    return [[m.student_layer, list(m.teacher_layers)] for m in match_layers(
        student["num_layers"], teacher_layers, mode=v.matching, preset=v.preset,
        student_layers=v.student_layers, teacher_layers=v.teacher_layers)]


def build_manifest(config, student_config, *, teacher_layers: int, teacher_hash: str | None,
                   kd: bool, vat: bool, stages: list[str], image_processor=None) -> dict:
    opts = config.teacher_cache
    student = student_facts(student_config, image_processor)
    data = config.data
    return {
        "format": FORMAT, "version": VERSION,
        "teacher": {"sha256": teacher_hash, "num_layers": int(teacher_layers)},
        "data": {"train_json_sha256": sha256_file(data.train_json),
                 "max_length": data.max_length},
        "processor": {"sha256": hash_files(config.student, PROCESSOR_FILES), **student},
        "kd": {"stored": kd, "temperature": config.kd.temperature,
               "positions": config.kd.positions, "topk": min(opts.topk, student["vocab_size"])},
        "vat": {"stored": vat, "matching": config.vat.matching, "query": config.vat.query,
                "matches": _matches(config, student, teacher_layers) if vat else [],
                "maps": opts.maps, "map_topk": opts.map_topk if opts.maps == "topk" else None},
        "dtype": opts.dtype,
        "shard_samples": opts.shard_samples,
        "stages": stages,
    }


def teacher_hash(path: str | Path) -> str:
    """sha256 of a teacher folder's weights and config."""
    return hash_files(path, ["config.json"], TEACHER_SUFFIXES)


def check_manifest(cached: dict, config, student_config, where: Path, *,
                   teacher_path: str = "", image_processor=None) -> None:
    """Raise :class:`TeacherCacheError` naming ``where`` when the cache does not match this run.

    Checked: the data file, the student facts (family, image processor settings, visual
    token ids, ...), the tokenizer/processor files, the KD temperature
    and positions, the layer matching and query rows, and (when ``teacher_path`` is given)
    the teacher's weights.
    """
    hint = "; rerun compodistill teacher-cache for this config (or point teacher.cache elsewhere)"
    if cached.get("format") != FORMAT or cached.get("version") != VERSION:
        raise TeacherCacheError(f"{where} is not a {FORMAT} v{VERSION} manifest" + hint)
    student = student_facts(student_config, image_processor)
    data = config.data

    def stale(what: str, have, now) -> TeacherCacheError:
        return TeacherCacheError(f"stale teacher cache {where}: {what} differs (cache {have!r}, "
                                 f"this run {now!r})" + hint)

    checks = [("data file hash", cached["data"]["train_json_sha256"],
               sha256_file(data.train_json)),
              ("data.max_length", cached["data"]["max_length"], data.max_length)]
    # The student facts before the files' hash, so a changed setting is named, not just a file.
    checks += [(f"student {k}", cached["processor"].get(k), v) for k, v in student.items()]
    checks.append(("tokenizer/processor hash", cached["processor"]["sha256"],
                   hash_files(config.student, PROCESSOR_FILES)))
    if cached["kd"]["stored"]:
        checks += [("kd.temperature", cached["kd"]["temperature"], config.kd.temperature),
                   ("kd.positions", cached["kd"]["positions"], config.kd.positions)]
    if cached["vat"]["stored"]:
        checks += [("vat.query", cached["vat"]["query"], config.vat.query),
                   ("vat layer matching", cached["vat"]["matches"],
                    _matches(config, student, cached["teacher"]["num_layers"]))]
    if teacher_path:
        checks.append(("teacher weights hash", cached["teacher"]["sha256"],
                       teacher_hash(teacher_path)))
    for what, have, now in checks:
        if have != now:
            raise stale(what, have, now)
