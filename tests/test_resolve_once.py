"""A model's family is worked out once per model and carried down (docs/ARCHITECTURE.md):
in the trainer (a whole TAF chain), the teacher-cache writer and eval, on a tiny Qwen2.5-VL
pair. ``lookup_family`` is the one place a family is worked out from a config, and
``resolve_model`` the one place a checkpoint's config is read for it; both are counted."""
from __future__ import annotations

import collections

import pytest

pytest.importorskip("transformers")

import compodistill.hf.families as families  # noqa: E402
import compodistill.hf.loading as loading  # noqa: E402
from compodistill.train.config import config_from_dict  # noqa: E402

from _helpers import write_family_pair  # noqa: E402


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    import torch

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("resolve")
    write_family_pair(root, "qwen2_5_vl", num=4)
    return root


@pytest.fixture
def counts(monkeypatch):
    """``{"lookup": n, "read": {path: n}}`` of the family lookups and config reads."""
    seen = {"lookup": 0, "read": collections.Counter()}
    lookup, resolve = families.lookup_family, loading.resolve_model

    def counting_lookup(config):
        seen["lookup"] += 1
        return lookup(config)

    def counting_resolve(source, key=None):
        if isinstance(source, (str, bytes)) or hasattr(source, "__fspath__"):
            seen["read"][str(source)] += 1
        return resolve(source, key)

    monkeypatch.setattr(families, "lookup_family", counting_lookup)
    monkeypatch.setattr(loading, "resolve_model", counting_resolve)
    # The modules that imported resolve_model by name see the counting one too (eval.cli
    # imports it inside its function, from the module patched above).
    import compodistill.train.families as train_families
    import compodistill.train.trainer as trainer

    for module in (trainer, train_families):
        monkeypatch.setattr(module, "resolve_model", counting_resolve)
    return seen


def _config(root, out, **extra):
    return config_from_dict({
        "student": str(root / "student"), "teacher": str(root / "teacher"),
        "output_dir": str(root / out), "taf": True, "cpu_threads": 1,
        "data": {"train_json": str(root / "data" / "train.json"),
                 "image_folder": str(root / "data"), "max_length": 256},
        "vat": {"student_layers": [0, 1], "teacher_layers": [1, 2, 3]},
        "stages": [{"kind": "dpt", "trainable": "post_connector", "max_steps": 1,
                    "batch_size": 2},
                   {"kind": "dft", "trainable": "lora+post_connector", "max_steps": 1,
                    "batch_size": 2, "lora_r": 2, "lora_alpha": 4}], **extra})


def test_the_trainer_resolves_each_model_once(pair, counts):
    from compodistill.train.trainer import CompoDistillTrainer

    CompoDistillTrainer(_config(pair, "run"), show_progress=False).run()
    assert counts["read"] == {str(pair / "student"): 1, str(pair / "teacher"): 1}
    assert counts["lookup"] == 2, counts


def test_the_cache_writer_resolves_each_model_once(pair, counts):
    from compodistill.teacher_cache.writer import write_teacher_cache

    teacher = {"path": str(pair / "teacher"), "cache": str(pair / "cache"), "topk": 8,
               "dtype": "fp32", "shard_samples": 4, "batch_size": 2}
    write_teacher_cache(_config(pair, "cache-run", teacher=teacher), show_progress=False)
    assert counts["read"] == {str(pair / "student"): 1, str(pair / "teacher"): 1}
    assert counts["lookup"] == 2, counts


def test_eval_resolves_the_model_once(pair, counts):
    from compodistill.eval.cli import load_model_and_encoder

    load_model_and_encoder(str(pair / "student"))
    assert counts["read"] == {str(pair / "student"): 1}
    assert counts["lookup"] == 1, counts
