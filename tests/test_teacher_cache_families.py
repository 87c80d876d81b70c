"""The offline teacher cache on every non-LLaVA trainer family (tiny models, CPU): the writer
runs the teacher with the family's inputs, training from the cache equals online training at
k = vocabulary, a changed image processor makes the cache stale, and DPT + DFT from the cache
never load the teacher."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

pytest.importorskip("peft")
pytest.importorskip("accelerate")

from compodistill.hf.families import TAF_FAMILIES, TRAINER_FAMILIES  # noqa: E402
from compodistill.testing.accuracy import assert_accuracy, rounding_atol  # noqa: E402
from compodistill.teacher_cache import TeacherCache, TeacherCacheError  # noqa: E402
from compodistill.train.config import config_from_dict  # noqa: E402

from _helpers import write_family_pair  # noqa: E402

FAMILIES = [f for f in TRAINER_FAMILIES if f != "llava"]
STAGES = [{"kind": "dpt", "trainable": "connector", "max_steps": 1, "batch_size": 2},
          {"kind": "dft", "trainable": "lora+connector", "max_steps": 1, "batch_size": 2,
           "lora_r": 2, "lora_alpha": 4}]


def make_config(root, teacher, out="run", **extra):
    family = json.loads((root / "student" / "config.json").read_text())["model_type"]
    return {
        "student": str(root / "student"), "teacher": teacher, "output_dir": str(root / out),
        "cpu_threads": 1, "taf": extra.pop("taf", False),
        "data": {"train_json": str(root / "data" / "train.json"),
                 "image_folder": str(root / "data"), "max_length": 256},
        # Gemma 3's image tokens attend both ways: its VAT serves text query rows only.
        "vat": {"student_layers": [0, 1], "teacher_layers": [1, 2, 3],
                "query": "text" if family == "gemma3" else "all"},
        "stages": STAGES, **extra}


def cache_teacher(root):
    return {"path": str(root / "teacher"), "cache": str(root / "cache"), "topk": 100000,
            "dtype": "fp32", "shard_samples": 4, "batch_size": 2}


@pytest.fixture(scope="module", params=FAMILIES)
def cached(request, tmp_path_factory):
    """A tiny pair of the family and its cache (k = vocabulary, exact fp32 maps)."""
    from compodistill.teacher_cache.writer import write_teacher_cache

    torch.set_num_threads(1)
    family = request.param
    root = tmp_path_factory.mktemp(f"cache-{family}")
    # Gemma 3: a window shorter than the samples, so its sliding layers really slide.
    write_family_pair(root, family, sliding_window=8 if family == "gemma3" else None)
    # TAF where the family has it: the writer refuses TAF where it does not.
    taf = family in TAF_FAMILIES
    write_teacher_cache(config_from_dict(make_config(root, cache_teacher(root), taf=taf)),
                        show_progress=False)
    return root, family


def _first_batch_losses(trainer, stage, student):
    from compodistill.train.stages import HiddenStates

    parts = trainer.recipe.stage_parts(trainer, student, None, stage, trainer.output_dir)
    batch = next(iter(trainer.data_loader(stage)))
    terms = parts.losses(HiddenStates(student), batch)
    values, total = {}, 0
    for term in terms.values():
        total = total + term.value
        values.update({k: float(v) for k, v in term.parts.items()})
    params = [p for p in student.parameters() if p.requires_grad]
    return values, torch.autograd.grad(total, params), batch


def _float64_kd(trainer, student, batch) -> torch.Tensor:
    """The online KD of ``batch`` in float64 (the reference on float64 logits), from the
    float32 hidden states of the student and the trainer's teacher."""
    from compodistill.hf.families import visual_token_ids
    from compodistill.logit_kd.from_logits import shift_labels
    from compodistill.testing.logit_kd import ref_logit_kd
    from compodistill.data.family_inputs import family_inputs
    from compodistill.train.stages import HiddenStates, lm_head

    ids, mask = batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        h_s = HiddenStates(student)(ids, mask, batch.get("pixel_values"), **family_inputs(batch))
        h_t = trainer.teacher.model(input_ids=ids, attention_mask=mask,
                                    pixel_values=batch.get("pixel_values"), use_cache=False,
                                    **family_inputs(batch)).last_hidden_state

    def logits(h, head):
        z = h.double() @ head.weight.double().T
        return z if head.bias is None else z + head.bias.double()

    kd = trainer.config.kd
    return ref_logit_kd(logits(h_s, lm_head(student)), logits(h_t, trainer.teacher.lm_head),
                        shift_labels(batch["labels"]), loss=kd.loss, beta=kd.beta,
                        temperature=kd.temperature, positions=kd.positions,
                        attention_mask=mask,
                        visual_mask=torch.isin(ids, torch.tensor(visual_token_ids(student))),
                        compute_dtype=torch.float64)


def test_manifest_records_the_family_its_image_processor_and_visual_ids(cached):
    from transformers import AutoConfig, AutoImageProcessor

    from compodistill.hf.families import visual_token_ids
    from compodistill.teacher_cache.manifest import image_processor_hash

    root, family = cached
    facts = TeacherCache(root / "cache").manifest["processor"]
    config = AutoConfig.from_pretrained(root / "student")
    assert facts["family"] == family
    assert facts["visual_token_ids"] == list(visual_token_ids(config))
    processor = AutoImageProcessor.from_pretrained(root / "student")
    assert facts["image_processor_sha256"] == image_processor_hash(processor)
    # The teacher's whole connector (Qwen3-VL: with its DeepStack mergers), as TAF reads it.
    from safetensors.torch import load_file
    from transformers import AutoModelForImageTextToText

    from compodistill.hf.families import connector_of

    teacher = AutoModelForImageTextToText.from_pretrained(root / "teacher")
    want = connector_of(teacher).state_dict()
    saved = load_file(str(root / "cache" / "teacher_connector.safetensors"))
    assert saved.keys() == want.keys()
    assert all(torch.equal(saved[k], want[k]) for k in want)
    assert any(k.startswith("deepstack.") for k in saved) == (family == "qwen3_vl")


def test_losses_and_gradients_equal_online_at_full_vocabulary(cached):
    """k = vocabulary, exact fp32 maps, one DFT batch: LM, KD, VAT (and per layer) and the
    gradients of every trainable weight from the cache equal the online teacher's; with TAF
    (where the family has it) the student built from the cached connector is the online one."""
    from compodistill.hf.family_taf import apply_family_taf
    from compodistill.train.stages import prepare_trainable
    from compodistill.train.trainer import CompoDistillTrainer

    root, family = cached
    taf = family in TAF_FAMILIES
    stages = [{"kind": "dft", "trainable": "post_connector" if taf else "connector",
               "weights": {"lm": 1.0, "kd": 1.0, "vat": 1.0}, "batch_size": 4}]
    # TAF right after each trainer's seeding: the post-connector from the same random stream.
    online = CompoDistillTrainer(config_from_dict(make_config(
        root, str(root / "teacher"), stages=stages, taf=taf)), show_progress=False)
    s_online = apply_family_taf(online.student, online.teacher) if taf else online.student
    cache = CompoDistillTrainer(config_from_dict(make_config(
        root, {"cache": str(root / "cache")}, stages=stages, taf=taf)), show_progress=False)
    assert cache.teacher is None
    s_cached = cache.teacher_cache.apply_taf(cache.student) if taf else cache.student
    on_state, ca_state = s_online.state_dict(), s_cached.state_dict()
    assert on_state.keys() == ca_state.keys()
    for name in on_state:
        assert torch.equal(on_state[name], ca_state[name]), name
    stage = online.config.stages[0]
    results = []
    for trainer, student in ((online, s_online), (cache, s_cached)):
        student, _ = prepare_trainable(student, stage)
        results.append(_first_batch_losses(trainer, stage, student))
    (v_on, g_on, b_on), (v_ca, g_ca, b_ca) = results
    assert torch.equal(b_on["input_ids"], b_ca["input_ids"])
    if "image_grid_thw" in b_on:  # dynamic resolution: images of several sizes in the batch
        assert len({tuple(row) for row in b_on["image_grid_thw"].tolist()}) > 1
    assert set(v_on) == set(v_ca) == {"lm", "kd", "vat", "vat_layer0", "vat_layer1"}
    for name in ("lm", "vat", "vat_layer0", "vat_layer1"):
        assert v_ca[name] == pytest.approx(v_on[name], rel=1e-5, abs=1e-7), name
    assert v_on["kd"] > 0 and v_on["vat"] > 0
    # KD is a small difference of log-probabilities, so float32 rounding is large relative to
    # it (about 1e-5 online on these pairs): the yardstick is float64 (the accuracy rule).
    kd64 = _float64_kd(online, s_online, b_on)
    assert_accuracy(torch.tensor(v_ca["kd"]), kd64, torch.tensor(v_on["kd"]),
                    atol=rounding_atol(kd64, torch.float32), name="kd from the cache")
    assert len(g_on) == len(g_ca) > 0
    for a, b in zip(g_ca, g_on):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


def test_changed_image_processor_makes_the_cache_stale(cached, tmp_path):
    from compodistill.train.trainer import CompoDistillTrainer

    root, _ = cached
    student = tmp_path / "student"
    shutil.copytree(root / "student", student)
    settings = json.loads((student / "preprocessor_config.json").read_text())
    settings["image_mean"] = [0.25, 0.5, 0.75]  # same token counts, other pixels
    (student / "preprocessor_config.json").write_text(json.dumps(settings))
    config = make_config(root, {"cache": str(root / "cache")})
    config["student"] = str(student)
    with pytest.raises(TeacherCacheError, match=r"stale teacher cache .*manifest.json: student "
                                                r"image_processor_sha256 differs"):
        CompoDistillTrainer(config_from_dict(config), show_progress=False)


def test_dpt_and_dft_train_from_the_cache_without_the_teacher(cached, monkeypatch):
    from compodistill.train import trainer as trainer_module
    from compodistill.train.trainer import CompoDistillTrainer

    root, family = cached
    loaded = []
    real = trainer_module.load_student

    def spy(path, *args, **kwargs):  # every model the trainer loads goes through it
        loaded.append(Path(getattr(path, "path", path)).resolve())  # a folder or its ResolvedModel
        return real(path, *args, **kwargs)

    monkeypatch.setattr(trainer_module, "load_student", spy)
    taf = family in TAF_FAMILIES
    stages = [dict(s, trainable="post_connector" if taf else "connector") if s["kind"] == "dpt"
              else dict(s, trainable="lora+post_connector" if taf else "lora+connector")
              for s in STAGES]
    # The cache run's own config, teacher path included: training still never loads it.
    config = config_from_dict(make_config(root, cache_teacher(root), out="from-cache",
                                          stages=stages, taf=taf))
    trainer = CompoDistillTrainer(config, show_progress=False)
    results = trainer.run()
    assert trainer.teacher is None
    assert (root / "student").resolve() in loaded  # the spy saw the loads
    assert (root / "teacher").resolve() not in loaded
    assert [r.name for r in results] == ["dpt", "dft"]
    assert set(results[0].final_losses) >= {"loss_lm", "loss_kd"}
    assert set(results[1].final_losses) >= {"loss_lm", "loss_kd", "loss_vat"}
    assert all(v == v and v > 0 for r in results for v in r.final_losses.values())


def test_same_inputs_give_byte_identical_files(cached):
    """The family's data (image processor, per-image token counts) and teacher inputs are
    deterministic: a second cache run writes the same bytes."""
    from compodistill.teacher_cache.writer import write_teacher_cache

    root, family = cached
    options = dict(cache_teacher(root), cache=str(root / "cache-again"))
    again = write_teacher_cache(config_from_dict(make_config(
        root, options, taf=family in TAF_FAMILIES)), show_progress=False)

    def files(folder):
        return {p.name: p.read_bytes() for p in sorted(Path(folder).iterdir()) if p.is_file()}

    assert files(again) == files(root / "cache")


def test_cache_run_refuses_taf_where_the_family_has_none(cached, tmp_path, capsys,
                                                          monkeypatch):
    """The cache run checks the family's options before it loads the teacher: TAF where the
    family has none is one line naming the key and the family (exit status 2). Every trainer
    family has TAF today, so the family is taken out of the TAF list for the test."""
    from compodistill.cli import main
    from compodistill.hf.families import FAMILIES

    from _helpers import assert_one_line_error

    root, family = cached
    monkeypatch.setattr("compodistill.train.families.TAF_FAMILIES",
                        tuple(f for f in TAF_FAMILIES if f != family))
    config = tmp_path / "taf.json"
    options = dict(cache_teacher(root), cache=str(tmp_path / "cache"))
    config.write_text(json.dumps(make_config(root, options, taf=True)))
    code = main(["teacher-cache", "--config", str(config), "--quiet"])
    assert_one_line_error(code, capsys.readouterr().err, "taf:", FAMILIES[family].title)
    assert not (tmp_path / "cache").exists()
