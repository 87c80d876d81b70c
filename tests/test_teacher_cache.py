"""The offline teacher cache end to end on tiny models (CPU): training from it equals online
training at k = vocabulary, the teacher is never loaded, the files are reproducible, resumable
and the same from two processes, and every bad cache is a clear error."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

pytest.importorskip("peft")
pytest.importorskip("accelerate")

from compodistill.teacher_cache import TeacherCache, TeacherCacheError  # noqa: E402
from compodistill.train.config import ConfigError, config_from_dict  # noqa: E402

from _helpers import accelerate_launch, assert_one_line_error, write_tiny_pair  # noqa: E402

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
STAGES = [{"kind": "dpt", "max_steps": 2, "batch_size": 2},
          {"kind": "dft", "max_steps": 2, "batch_size": 2, "lora_r": 4, "lora_alpha": 8}]


def make_config(root, teacher, out="run", **extra):
    """The config of tests/teacher_cache_run.py (the cache options must stay the same)."""
    return {
        "student": str(root / "student"), "teacher": teacher, "output_dir": str(root / out),
        "cpu_threads": 1,
        "data": {"train_json": str(root / "data" / "train.json"),
                 "image_folder": str(root / "data"), "max_length": 128},
        "vat": {"student_layers": [1, 2], "teacher_layers": [1, 2, 3]}, "stages": STAGES,
        **extra}


def cache_teacher(root, cache="cache", **options):
    return {"path": str(root / "teacher"), "cache": str(root / cache), "topk": 100000,
            "dtype": "fp32", "shard_samples": 4, "batch_size": 2, **options}


def write_cache(root, cache="cache", **options):
    from compodistill.teacher_cache.writer import write_teacher_cache

    config = config_from_dict(make_config(root, cache_teacher(root, cache, **options)))
    return write_teacher_cache(config, show_progress=False)


def files(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("teacher_cache")
    write_tiny_pair(root, num=6, student_layers=3, teacher_layers=4)
    write_cache(root)
    return root


# ------------------------------------------------------------------ equal to online
def _first_batch_losses(trainer, stage, student):
    from compodistill.train.stages import HiddenStates

    parts = trainer.recipe.stage_parts(trainer, student, None, stage, trainer.output_dir)
    batch = next(iter(trainer.data_loader(stage)))
    terms = parts.losses(HiddenStates(student), batch)
    values = {}
    total = 0
    for term in terms.values():
        total = total + term.value
        values.update({k: float(v) for k, v in term.parts.items()})
    params = [p for p in student.parameters() if p.requires_grad]
    return values, torch.autograd.grad(total, params)


def test_losses_and_gradients_equal_online_at_full_vocabulary(setup):
    """k = vocabulary, exact fp32 maps: LM, KD, VAT (and per layer) and the gradients of
    every trainable weight equal the online teacher's."""
    from compodistill.train.stages import prepare_trainable
    from compodistill.train.trainer import CompoDistillTrainer

    root = setup
    weights = {"lm": 1.0, "kd": 1.0, "vat": 1.0}
    stages = [{"kind": "dft", "trainable": "post_connector", "weights": weights,
               "batch_size": 4}]
    from compodistill.hf.llava import apply_taf

    online = CompoDistillTrainer(config_from_dict(make_config(
        root, str(root / "teacher"), stages=stages)), show_progress=False)
    s_online = apply_taf(online.student, online.teacher)
    cached = CompoDistillTrainer(config_from_dict(make_config(
        root, {"cache": str(root / "cache")}, stages=stages)), show_progress=False)
    assert cached.teacher is None
    # TAF from the cached connector: the same weights, the post-connector from the same
    # random stream (seeded by each trainer).
    s_cached = cached.teacher_cache.apply_taf(cached.student)
    on_state, ca_state = s_online.state_dict(), s_cached.state_dict()
    assert on_state.keys() == ca_state.keys()
    for name in on_state:
        assert torch.equal(on_state[name], ca_state[name]), name
    stage = online.config.stages[0]
    results = []
    for trainer, student in ((online, s_online), (cached, s_cached)):
        student, _ = prepare_trainable(student, stage)
        results.append(_first_batch_losses(trainer, stage, student))
    (v_on, g_on), (v_ca, g_ca) = results
    assert set(v_on) == set(v_ca) == {"lm", "kd", "vat", "vat_layer1", "vat_layer2"}
    for name in v_on:
        assert v_ca[name] == pytest.approx(v_on[name], rel=1e-5, abs=1e-7), name
    assert v_on["kd"] > 0 and v_on["vat"] > 0
    for a, b in zip(g_ca, g_on):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


# ------------------------------------------------------------------ never loads the teacher
def test_dpt_and_dft_train_from_the_cache_without_the_teacher(setup, monkeypatch):
    from compodistill.train import trainer as trainer_module
    from compodistill.train.trainer import CompoDistillTrainer

    root = setup
    loaded = []
    real = trainer_module.load_student

    def spy(path, *args, **kwargs):  # every model the trainer loads goes through it
        loaded.append(Path(getattr(path, "path", path)).resolve())  # a folder or its ResolvedModel
        return real(path, *args, **kwargs)

    monkeypatch.setattr(trainer_module, "load_student", spy)
    # The cache run's own config, teacher path included: training still never loads it.
    config = config_from_dict(make_config(root, cache_teacher(root), out="from-cache"))
    trainer = CompoDistillTrainer(config, show_progress=False)
    results = trainer.run()
    assert trainer.teacher is None
    assert (root / "student").resolve() in loaded  # the spy saw the loads
    assert (root / "teacher").resolve() not in loaded
    assert [r.name for r in results] == ["dpt", "dft"]
    assert set(results[0].final_losses) >= {"loss_lm", "loss_kd"}
    assert set(results[1].final_losses) >= {"loss_lm", "loss_kd", "loss_vat"}
    assert all(v == v and v > 0 for r in results for v in r.final_losses.values())


# ------------------------------------------------------------------ files
def test_same_inputs_give_byte_identical_files_and_a_killed_run_resumes(setup):
    root = setup
    again = write_cache(root, "cache-again")
    reference = files(root / "cache")
    assert files(again) == reference
    # A run killed mid-way: shard 1 half-written with no record, shard 2's rename never
    # happened, no index yet.
    (again / "shard-00001.json").unlink()
    data = (again / "shard-00001.safetensors").read_bytes()
    (again / "shard-00001.safetensors").write_bytes(data[: len(data) // 2])
    (again / "shard-00002.safetensors").rename(again / "shard-00002.safetensors.tmp")
    (again / "shard-00002.json").unlink()
    (again / "index.json").unlink()
    with pytest.raises(TeacherCacheError, match="incomplete: no index.json"):
        TeacherCache(again)
    write_cache(root, "cache-again")
    assert files(again) == reference  # the stray .tmp was overwritten and renamed


def test_two_process_cache_run_writes_the_same_shards(setup):
    root = setup
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    env.pop("TRITON_INTERPRET", None)
    launch = accelerate_launch(REPO / "configs" / "accelerate" / "cpu_2proc.yaml",
                               HERE / "teacher_cache_run.py", root, root / "cache-two")
    done = subprocess.run(launch, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert files(root / "cache-two") == files(root / "cache")


def _text_only(root, records=(2, 3)) -> None:
    """Make ``records`` of ``root``'s training data text-only (no image, no tag)."""
    path = root / "data" / "train.json"
    data = json.loads(path.read_text())
    for i in records:
        data[i].pop("image")
        turn = data[i]["conversations"][0]
        turn["value"] = turn["value"].replace("<image>\n", "").replace("<image>", "")
    path.write_text(json.dumps(data))


def test_sharded_teacher_cache_run_writes_the_same_bytes(tmp_path):
    """Two processes under FSDP2 (``teacher.shard: fsdp``), the teacher's weights split
    between them, write the one-process cache byte for byte: every file, shards, records,
    index, manifest and connector (no field may differ). Shards of 2 samples, batches of 2:
    process 0 writes shards 0 (images) and 2 (images), process 1 shard 1 (text only). So
    its first slot runs in two passes (process 1 runs an image dummy, then process 0 a text
    dummy) and process 1 ends with an image dummy: both run 3 forwards. Then a resume where
    only one process has work."""
    write_tiny_pair(tmp_path, num=2, student_layers=3, teacher_layers=4)
    _text_only(tmp_path)
    options = {"shard_samples": 2, "batch_size": 2}
    one = write_cache(tmp_path, "cache-one", **options)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    env.pop("TRITON_INTERPRET", None)
    launch = accelerate_launch(REPO / "configs" / "accelerate" / "fsdp2_cpu_2proc.yaml",
                               HERE / "teacher_cache_run.py", tmp_path, tmp_path / "cache-two",
                               json.dumps({"shard": "fsdp", **options}), tmp_path / "report")
    done = subprocess.run(launch, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    reference = files(one)
    assert sorted(reference) == sorted(files(tmp_path / "cache-two"))
    for name, data in files(tmp_path / "cache-two").items():
        assert data == reference[name], name
    assert len([n for n in reference if n.endswith(".safetensors")]) == 4  # 3 shards + TAF
    reports = [json.loads((tmp_path / "report" / f"report-rank{r}.json").read_text())["cache"]
               for r in (0, 1)]
    assert [(r["forwards"], r["dummies"]) for r in reports] == [(3, 1), (3, 2)]
    for rank, report in enumerate(reports):  # every teacher weight is split on dim 0
        assert report["teacher_params"] and set(report["teacher"]) == set(
            report["teacher_params"])
        for name, (local, full) in report["teacher"].items():
            half = -(-full[0] // 2)
            assert local[0] == (half if rank == 0 else full[0] - half), name
    # Resume after process 0's shard 2 was lost: process 1 has nothing left and runs only
    # the dummy that keeps process 0's one forward in step; the bytes are the same again.
    two = tmp_path / "cache-two"
    for name in ("shard-00002.json", "index.json"):
        (two / name).unlink()
    (two / "shard-00002.safetensors").write_bytes(b"partial")
    done = subprocess.run(launch, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert files(two) == reference
    reports = [json.loads((tmp_path / "report" / f"report-rank{r}.json").read_text())["cache"]
               for r in (0, 1)]
    assert [(r["forwards"], r["dummies"]) for r in reports] == [(1, 0), (1, 1)]


def test_sharding_requests_that_cannot_run_are_one_line(setup, tmp_path, capsys):
    """``teacher.shard: fsdp`` with one process: exit status 2, one line, before the teacher
    loads; an unknown mode is a ConfigError."""
    from compodistill.cli import main

    config = tmp_path / "shard.json"
    config.write_text(json.dumps(make_config(setup, cache_teacher(setup, "never",
                                                                  shard="fsdp"))))
    code = main(["teacher-cache", "--config", str(config), "--quiet"])
    assert_one_line_error(code, capsys.readouterr().err, "teacher.shard: fsdp", "1 process",
                          "fsdp.yaml")
    assert not (setup / "never").exists()
    with pytest.raises(ConfigError, match="teacher.shard"):
        config_from_dict(make_config(setup, cache_teacher(setup, shard="zero3")))


def test_shard_mode_follows_the_accelerate_config():
    """``auto`` shards under FSDP2 with several processes only; ``fsdp`` refuses DDP,
    DeepSpeed and FSDP1 with the engine named; ``none`` never shards."""
    from types import SimpleNamespace

    from accelerate.utils import DistributedType as T

    from compodistill.teacher_cache.writer import use_sharded_teacher

    def acc(kind, processes=2, fsdp2=False):
        return SimpleNamespace(distributed_type=kind, num_processes=processes, is_fsdp2=fsdp2)

    fsdp2 = acc(T.FSDP, fsdp2=True)
    assert use_sharded_teacher("auto", fsdp2) and use_sharded_teacher("fsdp", fsdp2)
    assert not use_sharded_teacher("none", fsdp2)
    for other in (acc(T.MULTI_CPU), acc(T.DEEPSPEED), acc(T.FSDP, 1, True), acc(T.NO, 1)):
        assert not use_sharded_teacher("auto", other)
    for other, named in ((acc(T.MULTI_CPU), "this run is MULTI_CPU"),
                         (acc(T.MULTI_GPU), "this run is MULTI_GPU"),
                         (acc(T.FSDP), "fsdp_version: 2"),  # FSDP1
                         (acc(T.DEEPSPEED), "DeepSpeed, whose ZeRO-3 inference")):
        with pytest.raises(ValueError, match=named):
            use_sharded_teacher("fsdp", other)


# ------------------------------------------------------------------ bad caches
def _copy_cache(root, name):
    shutil.copytree(root / "cache", root / name, dirs_exist_ok=True)
    return root / name


def test_stale_cache_names_the_manifest_and_what_changed(setup, tmp_path):
    from compodistill.train.trainer import CompoDistillTrainer

    root = setup
    data = tmp_path / "train.json"
    data.write_text((root / "data" / "train.json").read_text() + "\n")  # same samples, new hash
    config = make_config(root, {"cache": str(root / "cache")})
    config["data"]["train_json"] = str(data)
    with pytest.raises(TeacherCacheError, match=r"stale teacher cache .*manifest.json: data "
                                                r"file hash differs"):
        CompoDistillTrainer(config_from_dict(config), show_progress=False)
    teacher = tmp_path / "teacher"
    shutil.copytree(root / "teacher", teacher)
    cfg = json.loads((teacher / "config.json").read_text())
    (teacher / "config.json").write_text(json.dumps({**cfg, "note": "another teacher"}))
    config = make_config(root, {"cache": str(root / "cache"), "path": str(teacher)})
    with pytest.raises(TeacherCacheError, match="teacher weights hash differs"):
        CompoDistillTrainer(config_from_dict(config), show_progress=False)


def test_missing_sample_names_the_shard_and_the_sample(setup):
    from safetensors.torch import load_file, save_file

    root = setup
    cache = _copy_cache(root, "cache-missing")
    shard = cache / "shard-00000.safetensors"
    tensors = {k: v for k, v in load_file(str(shard)).items() if not k.startswith("1.")}
    save_file(tensors, str(shard))
    index = json.loads((cache / "index.json").read_text())
    index["shards"][0]["bytes"] = shard.stat().st_size
    (cache / "index.json").write_text(json.dumps(index))
    reader = TeacherCache(cache)
    reader.sample(0)
    with pytest.raises(TeacherCacheError, match=r"sample 1 is missing from teacher cache shard "
                                                r".*cache-missing/shard-00000.safetensors"):
        reader.sample(1)
    with pytest.raises(TeacherCacheError, match=r"sample 999 is missing .* holds samples 0–"):
        reader.sample(999)


def test_truncated_shard_is_one_line_from_the_cli(setup, tmp_path, capsys):
    from compodistill.cli import main

    root = setup
    cache = _copy_cache(root, "cache-truncated")
    shard = cache / "shard-00000.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    config = tmp_path / "config.json"
    config.write_text(json.dumps(make_config(root, {"cache": str(cache)}, out="truncated")))
    code = main(["train", "--config", str(config), "--quiet"])
    assert_one_line_error(code, capsys.readouterr().err, "is truncated or damaged",
                          "cache-truncated/shard-00000.safetensors", "samples 0–3",
                          "no step was trained")


def test_config_refuses_what_a_cache_cannot_serve(setup):
    root = setup
    with pytest.raises(ConfigError, match=r"teacher: unknown keys \['topp'\]"):
        config_from_dict(make_config(root, {"cache": "x", "topp": 3}))
    with pytest.raises(ConfigError, match="teacher.topk: must be >= 1"):
        config_from_dict(make_config(root, {"cache": "x", "topk": 0}))
    with pytest.raises(ConfigError, match="adaptive"):
        config_from_dict(make_config(root, {"cache": "x"}, vat={"matching": "adaptive"}))
    with pytest.raises(ConfigError, match="recipe 'llava_kd' needs the teacher online"):
        config_from_dict({**make_config(root, {"cache": "x"}), "recipe": "llava_kd",
                          "stages": [{"kind": "dpt"}]})


def test_teacher_cache_cli_needs_the_cache_mapping(setup, tmp_path, capsys):
    from compodistill.cli import main

    root = setup
    config = tmp_path / "online.json"
    config.write_text(json.dumps(make_config(root, str(root / "teacher"))))
    code = main(["teacher-cache", "--config", str(config), "--quiet"])
    assert_one_line_error(code, capsys.readouterr().err, "teacher: {cache: DIR, path: TEACHER}")
    config.write_text(json.dumps(make_config(root, cache_teacher(root, "cli-cache"))))
    code = main(["teacher-cache", "--config", str(config), "--stage", "sft", "--quiet"])
    assert code == 2 and "unknown stages ['sft']" in capsys.readouterr().err


def test_compressed_cache_stores_topk_and_trains(setup):
    """bf16, logit top-16 and map top-2: the stored fields have the promised shapes and
    dtypes, and a DFT step trains from them."""
    from compodistill.train.trainer import CompoDistillTrainer

    root = setup
    cache = write_cache(root, "cache-topk", topk=16, dtype="bf16", maps="topk", map_topk=2)
    sample = TeacherCache(cache).sample(0)
    assert sample["kd_logp"].dtype == torch.bfloat16 and sample["kd_logp"].shape[1] == 16
    assert sample["kd_idx"].dtype == torch.int32 and sample["kd_rest"].dtype == torch.float32
    assert float(sample["kd_rest"].min()) > 0  # a random teacher leaves mass outside its top-16
    q, v = sample["shape"][1:].tolist()
    assert tuple(sample["map0.val"].shape) == (q, 2) and sample["map0.idx"].dtype == torch.int16
    assert tuple(sample["map0.rest"].shape) == (q,)
    config = make_config(root, {"cache": str(cache)}, out="from-topk",
                         stages=[{"kind": "dft", "max_steps": 1, "batch_size": 2, "lora_r": 4,
                                  "lora_alpha": 8}])
    (result,) = CompoDistillTrainer(config_from_dict(config), show_progress=False).run()
    assert {"loss_kd", "loss_vat"} <= set(result.final_losses)
    assert all(value == value for value in result.final_losses.values())


# ------------------------------------------------------------------ integrity (sha256)
def _flip_tensor_bytes(shard: Path) -> None:
    """Invert 16 bytes in the middle of the tensor data: same size, valid header."""
    data = bytearray(shard.read_bytes())
    start = 8 + int.from_bytes(data[:8], "little")  # past the safetensors header
    middle = (start + len(data)) // 2
    data[middle:middle + 16] = bytes(b ^ 0xFF for b in data[middle:middle + 16])
    shard.write_bytes(bytes(data))


def test_flipped_bytes_fail_before_any_step_and_a_rerun_rewrites_only_that_shard(
        setup, tmp_path, capsys):
    from compodistill.cli import main
    from compodistill.teacher_cache.format import sha256_file

    root = setup
    cache = _copy_cache(root, "cache-flipped")
    shard = cache / "shard-00001.safetensors"
    size, expected = shard.stat().st_size, sha256_file(shard)
    _flip_tensor_bytes(shard)
    assert shard.stat().st_size == size
    found = sha256_file(shard)
    out = tmp_path / "flipped-run"
    config = tmp_path / "config.json"
    config.write_text(json.dumps(make_config(root, {"cache": str(cache)}, out=str(out))))
    code = main(["train", "--config", str(config), "--quiet"])
    assert_one_line_error(code, capsys.readouterr().err, "cache-flipped/shard-00001.safetensors",
                          "is corrupted", expected, found, "no step was trained",
                          "compodistill teacher-cache", "rewrites only the bad shards")
    assert not list(out.rglob("metrics.jsonl"))  # no step ran
    # --verify lists exactly that shard and fails; the clean cache passes.
    assert main(["teacher-cache", "--verify", str(cache)]) == 1
    captured = capsys.readouterr()
    shards = len(json.loads((cache / "index.json").read_text())["shards"])
    (line,) = captured.out.strip().splitlines()  # one line per bad shard: only this one
    assert "shard-00001.safetensors is corrupted" in line and expected in line and found in line
    assert f"1 of {shards} shards" in captured.err
    assert main(["teacher-cache", "--verify", str(root / "cache")]) == 0
    assert f"all {shards} shards match their sha256" in capsys.readouterr().out
    # The cache run rewrites the bad shard and leaves the good one untouched.
    before = (cache / "shard-00000.safetensors").stat().st_mtime_ns
    write_cache(root, "cache-flipped")
    assert (cache / "shard-00000.safetensors").stat().st_mtime_ns == before
    assert files(cache) == files(root / "cache")


def test_verify_option_is_checked_when_the_config_loads_and_size_skips_hashing(setup, tmp_path,
                                                                                monkeypatch):
    from compodistill.teacher_cache import format as cache_format
    from compodistill.train.trainer import CompoDistillTrainer

    root = setup
    with pytest.raises(ConfigError, match="teacher.verify.*'md5'"):
        config_from_dict(make_config(root, {"cache": "x", "verify": "md5"}))
    calls = []
    real = cache_format.sha256_file
    monkeypatch.setattr(cache_format, "sha256_file", lambda p, *a: calls.append(p) or real(p, *a))
    config = make_config(root, {"cache": str(root / "cache"), "verify": "size"}, out="size-run")
    trainer = CompoDistillTrainer(config_from_dict(config), show_progress=False)
    assert trainer.teacher_cache.cache.verified == "size"
    assert not [p for p in calls if str(p).endswith(".safetensors")]
    config["teacher"]["verify"] = "full"
    trainer = CompoDistillTrainer(config_from_dict(config), show_progress=False)
    assert trainer.teacher_cache.cache.verified == "sha256"
    shards = len(json.loads((root / "cache" / "index.json").read_text())["shards"])
    assert len([p for p in calls if str(p).endswith(".safetensors")]) == shards
