"""`compodistill demo`: a whole CompoDistill run on a tiny model pair, on the CPU.

1. synthetic compositional data (coloured shapes in spatial relations, hard negatives);
2. a word-level tokenizer and tiny random LLaVA-style teacher and student built from
   configs, saved to disk and loaded back with ``from_pretrained``;
3. the teacher is trained briefly (LM loss) so it has something to distil, and the student
   gets a shorter warm-up (standing in for its pretrained LLM);
4. DPT → DFT → SFT on the student with TAF, fused logit KD and visual-attention distillation;
5. compositional-reasoning and VQA evaluation of teacher and student, and a summary.

Every number printed is measured in this run; nothing is precomputed.
"""
from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path

import torch

DEFAULTS = dict(num_images=300, image_size=32, teacher_steps=600, student_warmup_steps=150,
                dpt_steps=30, dft_steps=120, sft_steps=60, batch_size=8, seed=0)
HELP = dict(num_images="synthetic training images", image_size="image side in pixels",
            teacher_steps="teacher training steps", student_warmup_steps="student warm-up steps",
            dpt_steps="DPT steps", dft_steps="DFT steps", sft_steps="SFT steps",
            batch_size="batch size of every phase", seed="random seed")
PHASES = ("data", "teacher", "warm-up", "student", "eval")


def _save_pair(out: Path, tokenizer, **sizes):
    from .hf.llava import tiny_llava_pair

    student, teacher = tiny_llava_pair(vocab_size=len(tokenizer), seed=sizes.pop("seed"), **sizes)
    paths = {}
    for name, model in (("student", student), ("teacher", teacher)):
        paths[name] = out / "models" / f"{name}-init"
        model.save_pretrained(paths[name])
        tokenizer.save_pretrained(paths[name])
    return paths


def _stage_config(kind: str, steps: int, batch_size: int, **extra) -> dict:
    return dict(kind=kind, max_steps=steps, batch_size=batch_size, lr=extra.pop("lr", 2e-3),
                warmup_ratio=0.03, **extra)


def _evaluate(model, encoder, data: dict, progress: bool) -> dict:
    from .eval import evaluate_cr, evaluate_vqa, load_synthetic_cr, load_vqa_json

    cr = evaluate_cr(model, load_synthetic_cr(data["cr_eval"], data["image_folder"]), encoder,
                     scorers=("loglik",), progress=progress)["loglik"]
    vqa = evaluate_vqa(model, load_vqa_json(data["vqa_eval"], data["image_folder"]), encoder,
                       progress=progress)
    return {"cr": cr.accuracy, "cr_per_category": cr.per_category, "vqa": vqa.accuracy}


class _Phases:
    """One header line per phase, its time when it ends, and the time since the start."""

    def __init__(self, enabled: bool):
        self.enabled, self.start, self.seconds = enabled, time.perf_counter(), {}

    @contextlib.contextmanager
    def __call__(self, name: str, what: str):
        if self.enabled:
            print(f"[{PHASES.index(name) + 1}/{len(PHASES)}] {name}: {what}", flush=True)
        t0 = time.perf_counter()
        yield
        self.seconds[name] = round(time.perf_counter() - t0, 1)
        if self.enabled:
            print(f"      {name} done in {self.seconds[name]:.1f} s "
                  f"({time.perf_counter() - self.start:.0f} s so far)", flush=True)


def run_demo(out: str | Path = "runs/demo", *, progress: bool = True, **overrides) -> dict:
    """Run the whole demo into ``out``; returns the summary it prints."""
    unknown = sorted(set(overrides) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"run_demo: unknown options {unknown}; expected some of {sorted(DEFAULTS)}")
    opts = {**DEFAULTS, **overrides}
    for key, value in opts.items():
        if key != "seed" and value < 1:
            raise ValueError(f"--{key.replace('_', '-')} must be >= 1, got {value}")
    out = Path(out)
    from .cli import quiet_libraries

    quiet_libraries(logs=False)
    threads = torch.get_num_threads()
    if "OMP_NUM_THREADS" not in os.environ:
        # The demo's models are tiny: one thread is as fast as two on an idle machine, and
        # several threads spin-wait each other to a crawl when other jobs share the cores.
        torch.set_num_threads(1)
    try:
        return _run(out, opts, progress)
    finally:
        torch.set_num_threads(threads)


def _run(out: Path, opts: dict, progress: bool) -> dict:
    from .data import ConversationEncoder
    from .hf.llava import load_student
    from .train.config import config_from_dict
    from .train.trainer import DistillationTrainer

    phase = _Phases(progress)
    start = phase.start
    torch.manual_seed(opts["seed"])
    with phase("data", f"{opts['num_images']} synthetic images, a tokenizer, a tiny model pair"):
        data = _make_data(out, opts, progress)
        tokenizer, paths = _make_models(out, data, opts)
    bs = opts["batch_size"]
    common = dict(data=dict(train_json=data["train"], image_folder=data["image_folder"],
                            max_length=256), seed=opts["seed"], log_every=5)

    # 3. the teacher, trained on the LM loss alone (no teacher of its own); the student gets a
    #    shorter warm-up the same way, standing in for the pretrained small LLM that real
    #    CompoDistill starts from (LoRA on a random network would learn next to nothing).
    for name, label, steps in (("teacher", "teacher", opts["teacher_steps"]),
                               ("student", "warm-up", opts["student_warmup_steps"])):
        with phase(label, f"{steps} steps of LM training of the {name} "
                          f"({'6 layers, width 64' if name == 'teacher' else '4 layers, width 32'})"):
            warmup_cfg = config_from_dict({**common, "student": str(paths[name]), "taf": False,
                                           "output_dir": str(out / f"{name}-warmup"), "stages": [
                _stage_config("sft", steps, bs, name=name, trainable="all", lr=3e-3)]})
            DistillationTrainer(warmup_cfg, show_progress=progress).run()
        paths[name] = out / f"{name}-warmup" / f"1-{name}" / "model"
    teacher_path = paths["teacher"]

    # 4. the student: DPT -> DFT -> SFT with TAF, KD and VAT (docs/stages.md, shortened).
    with phase("student", f"DPT {opts['dpt_steps']} + DFT {opts['dft_steps']} + SFT "
                          f"{opts['sft_steps']} steps with TAF, KD and VAT"):
        student_cfg = config_from_dict({**common, "student": str(paths["student"]),
                                        "teacher": str(teacher_path),
                                        "output_dir": str(out / "student"), "stages": [
            _stage_config("dpt", opts["dpt_steps"], bs),
            _stage_config("dft", opts["dft_steps"], bs, lora_r=16, lora_alpha=32, lr=3e-3),
            _stage_config("sft", opts["sft_steps"], bs, lora_r=16, lora_alpha=32, lr=3e-3)]})
        results = DistillationTrainer(student_cfg, show_progress=progress).run()
    train_seconds = time.perf_counter() - start

    # 5. evaluation, every model loaded back from disk.
    models = (("teacher", teacher_path), ("student (warm-up only)", paths["student"]),
              ("student (CompoDistill)", out / "student" / "3-sft" / "model"))
    scores = {}
    with phase("eval", "CR and VQA of the teacher, the warm-up student and the distilled one"):
        for name, path in _bar(models, "eval", progress):
            model = load_student(str(path)).eval()
            cfg = model.config
            encoder = ConversationEncoder(tokenizer, cfg.vision_config.image_size,
                                          num_image_tokens=cfg.image_seq_length,
                                          image_token_id=cfg.image_token_id)
            scores[name] = _evaluate(model, encoder, data, False)
    summary = {
        "stages": [{"stage": r.name, "steps": r.steps, "skipped": r.skipped_steps,
                    "seconds": round(r.seconds, 1), **{k: round(v, 4)
                                                        for k, v in r.final_losses.items()}}
                   for r in results],
        "scores": scores, "phase_seconds": phase.seconds, "train_seconds": round(train_seconds, 1),
        "total_seconds": round(time.perf_counter() - start, 1), "output_dir": str(out),
        "student_model": str(out / "student" / "3-sft" / "model"),
        "teacher_model": str(teacher_path),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _bar(items, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, disable=not enabled, dynamic_ncols=True)


def _make_data(out: Path, opts: dict, progress: bool) -> dict:
    from .data import generate_synthetic

    generate_synthetic(str(out / "data"), num=opts["num_images"],
                       image_size=opts["image_size"], seed=opts["seed"], progress=progress)
    data = {name: str(out / "data" / f"{name}.json") for name in ("train", "cr_eval", "vqa_eval")}
    data["image_folder"] = str(out / "data")
    return data


def _make_models(out: Path, data: dict, opts: dict):
    from .data import build_tiny_tokenizer

    records = json.loads(Path(data["train"]).read_text())
    texts = [turn["value"] for rec in records for turn in rec["conversations"]]
    tokenizer = build_tiny_tokenizer(texts=texts)
    paths = _save_pair(out, tokenizer, image_size=opts["image_size"], patch_size=8,
                       teacher_hidden=64, teacher_layers=6, student_hidden=32, student_layers=4,
                       seed=opts["seed"])
    return tokenizer, paths


def format_summary(summary: dict) -> str:
    lines = ["", "stage     steps  seconds  final losses"]
    for s in summary["stages"]:
        losses = ", ".join(f"{k}={v}" for k, v in s.items() if k.startswith("loss"))
        lines.append(f"{s['stage']:<9}{s['steps']:>6}{s['seconds']:>9}  {losses}")
    lines += ["", f"{'model':<26}{'CR (A/B, both orders)':>22}{'VQA exact match':>17}"]
    for name, sc in summary["scores"].items():
        lines.append(f"{name:<26}{100 * sc['cr']:>21.1f}%{100 * sc['vqa']:>16.1f}%")
    phases = summary.get("phase_seconds", {})
    if phases:
        lines += ["", "time: " + ", ".join(f"{k} {v:.0f} s" for k, v in phases.items())
                  + f"; total {summary['total_seconds']:.0f} s"]
    lines += [f"everything is in {summary['output_dir']} (summary.json, metrics, loss curves); "
              f"the distilled student is {summary.get('student_model', '')}"]
    return "\n".join(lines)
