"""`compodistill demo`: a whole CompoDistill run on a tiny model pair, on the CPU.

1. the grid task (:mod:`compodistill.data.grid_task`): three coloured shapes on a 3×3 grid,
   one image patch per cell, dense question records and caption records;
2. a word-level tokenizer and a tiny teacher and student built from configs, sharing one
   frozen random vision tower, saved to disk and loaded back with ``from_pretrained``;
3. the teacher is trained (connector and language model) until it looks at the right cell;
   the student gets a shorter warm-up (standing in for its pretrained LLM);
4. DPT → DFT → SFT on the student with TAF, fused logit KD and visual-attention distillation;
5. evaluation of teacher and students by candidate likelihood on held-out questions (chance
   is 1/5, knowing only which colours and shapes are present 1/3), and a summary.

Every number printed is measured in this run; nothing is precomputed. Each phase line ends
with an estimate of the time left, from the speed of the phases so far.
"""
from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path

import torch

DEFAULTS = dict(num_images=2000, eval_images=200, teacher_steps=800, teacher_batch_size=32,
                student_warmup_steps=100, dpt_steps=20, dft_steps=80, sft_steps=40,
                batch_size=16, seed=0)
HELP = dict(num_images="grid-task training images", eval_images="held-out images (one "
            "question of each type each)", teacher_steps="teacher training steps",
            teacher_batch_size="batch size of the teacher's training",
            student_warmup_steps="student warm-up steps", dpt_steps="DPT steps",
            dft_steps="DFT steps", sft_steps="SFT steps",
            batch_size="batch size of the student's phases", seed="random seed")
PHASES = ("data", "teacher", "warm-up", "student", "eval")
TEACHER = dict(teacher_hidden=64, teacher_layers=4)
STUDENT = dict(student_hidden=32, student_layers=2)


class _Phases:
    """One header line per phase, its time when it ends, the time since the start and an
    estimate of the time left (work units: training steps, teacher-step equivalents)."""

    def __init__(self, enabled: bool, work: dict):
        self.enabled, self.start, self.seconds = enabled, time.perf_counter(), {}
        self.work, self.done = work, 0.0

    @contextlib.contextmanager
    def __call__(self, name: str, what: str):
        if self.enabled:
            print(f"[{PHASES.index(name) + 1}/{len(PHASES)}] {name}: {what}", flush=True)
        t0 = time.perf_counter()
        yield
        self.seconds[name] = round(time.perf_counter() - t0, 1)
        self.done += self.work[name]
        elapsed = time.perf_counter() - self.start
        left = elapsed / max(self.done, 1e-9) * (sum(self.work.values()) - self.done)
        if self.enabled:
            eta = f", about {left:.0f} s left" if name != PHASES[-1] else ""
            print(f"      {name} done in {self.seconds[name]:.1f} s "
                  f"({elapsed:.0f} s so far{eta})", flush=True)


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
    from .console import quiet_libraries

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


def _stage_config(kind: str, steps: int, batch_size: int, **extra) -> dict:
    return dict(kind=kind, max_steps=steps, batch_size=batch_size, lr=extra.pop("lr", 2e-3),
                warmup_ratio=0.03, **extra)


def _bar(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, dynamic_ncols=True)


def _lm_training(model, feats, steps: int, batch_size: int, lr: float, seed: int, pad_id: int,
                 desc: str, progress: bool) -> dict:
    """Connector + language model on the LM loss (the tower stays frozen), with a bar."""
    from .grounded import train_model

    with _bar(steps, desc, progress) as bar:
        def tick(step, losses):
            bar.update(1)
            bar.set_postfix(lm=f"{losses['lm']:.3g}")

        return train_model(model, feats, steps=steps, batch_size=batch_size, lr=lr,
                           pad_id=pad_id, seed=seed, callback=tick)


def _run(out: Path, opts: dict, progress: bool) -> dict:
    from ..eval.grid import score_questions, target_attention
    from .grounded import concentrated_layers, encode_records, grid_encoder
    from ..hf.llava import load_student
    from ..train.config import config_from_dict
    from ..train.trainer import CompoDistillTrainer

    student_steps = opts["dpt_steps"] + opts["dft_steps"] + opts["sft_steps"]
    # Work per phase in teacher-step equivalents, for the time-left estimate.
    # Relative costs measured on 2 CPU cores (one teacher step of batch 32 = 1 unit).
    work = {"data": opts["num_images"] / 200,
            "teacher": opts["teacher_steps"] * opts["teacher_batch_size"] / 32,
            "warm-up": 0.55 * opts["student_warmup_steps"], "student": 0.85 * student_steps,
            "eval": opts["eval_images"] / 12}
    phase = _Phases(progress, work)
    start = phase.start
    torch.manual_seed(opts["seed"])
    with phase("data", f"{opts['num_images']} grid images (3 objects on 3x3 cells), a "
                       f"tokenizer, a tiny model pair"):
        data = _make_data(out, opts)
        tokenizer, paths = _make_models(out, data, opts)
    records = json.loads(Path(data["train"]).read_text())

    # 3. the teacher and the student's warm-up: connector and language model on the LM loss,
    #    the shared vision tower frozen. The warm-up stands in for the pretrained small LLM
    #    that real CompoDistill starts from (LoRA on a random network would learn nothing).
    #    The teacher sees only the dense question records within the demo's budget: the
    #    questions are what it must ground, and what the table scores.
    for name, label, steps, size, bs, lr, recs in (
            ("teacher", "teacher", opts["teacher_steps"], TEACHER, opts["teacher_batch_size"],
             1e-3, [r for r in records if r["id"].endswith("_q")]),
            ("student", "warm-up", opts["student_warmup_steps"], STUDENT, opts["batch_size"],
             3e-3, records)):
        layers, hidden = size[f"{name}_layers"], size[f"{name}_hidden"]
        with phase(label, f"{steps} steps of LM training of the {name} ({layers} layers, "
                          f"width {hidden}; the shared vision tower stays frozen)"):
            model = load_student(str(paths[name]))
            feats = encode_records(recs, grid_encoder(model, tokenizer), data["image_folder"])
            _lm_training(model, feats, steps, bs, lr, opts["seed"], tokenizer.pad_token_id,
                         label, progress)
            paths[name] = out / f"{name}-warmup" / f"1-{name}" / "model"
            model.save_pretrained(paths[name])
            tokenizer.save_pretrained(paths[name])
        if label == "teacher":
            # VAT distils the teacher layers whose answer row looks at the target cell.
            att = target_attention(model, grid_encoder(model, tokenizer),
                                   json.loads(Path(data["questions"]).read_text())[:60],
                                   data["image_folder"])
            vat_layers = concentrated_layers(att, STUDENT["student_layers"])
    teacher_path = paths["teacher"]

    # 4. the student: DPT -> DFT -> SFT with TAF, KD and VAT (docs/stages.md, shortened).
    bs = opts["batch_size"]
    common = dict(data=dict(train_json=data["train"], image_folder=data["image_folder"],
                            max_length=256), seed=opts["seed"], log_every=5)
    with phase("student", f"DPT {opts['dpt_steps']} + DFT {opts['dft_steps']} + SFT "
                          f"{opts['sft_steps']} steps with TAF, KD and VAT (student layer "
                          f"{vat_layers[0][0]} <- teacher layers {vat_layers[1]})"):
        student_cfg = config_from_dict({**common, "student": str(paths["student"]),
                                        "teacher": str(teacher_path),
                                        "output_dir": str(out / "student"),
                                        "vat": dict(student_layers=vat_layers[0],
                                                    teacher_layers=vat_layers[1]), "stages": [
            _stage_config("dpt", opts["dpt_steps"], bs),
            _stage_config("dft", opts["dft_steps"], bs, lora_r=16, lora_alpha=32, lr=3e-3),
            _stage_config("sft", opts["sft_steps"], bs, lora_r=16, lora_alpha=32, lr=3e-3)]})
        results = CompoDistillTrainer(student_cfg, show_progress=progress).run()
    train_seconds = time.perf_counter() - start

    # 5. evaluation, every model loaded back from disk.
    models = (("teacher", teacher_path), ("student (warm-up only)", paths["student"]),
              ("student (CompoDistill)", out / "student" / "3-sft" / "model"))
    questions = json.loads(Path(data["questions"]).read_text())
    scores = {}
    with phase("eval", f"{len(questions)} held-out questions for the teacher, the warm-up "
                       f"student and the distilled one"):
        for name, path in models:
            model = load_student(str(path)).eval()
            res = score_questions(model, grid_encoder(model, tokenizer), questions,
                                  data["image_folder"])
            scores[name] = {t: round(res[t]["acc"], 4) for t in ("color", "shape", "left", "all")}
            scores[name]["n_per_type"] = res["color"]["n"]
    summary = {
        "stages": [{"stage": r.name, "steps": r.steps, "skipped": r.skipped_steps,
                    "seconds": round(r.seconds, 1),
                    **{f"image_reliance_{who}": v for who, v in r.image_reliance.items()},
                    **{k: round(v, 4)
                                                        for k, v in r.final_losses.items()}}
                   for r in results],
        "scores": scores, "phase_seconds": phase.seconds, "train_seconds": round(train_seconds, 1),
        "total_seconds": round(time.perf_counter() - start, 1), "output_dir": str(out),
        "student_model": str(out / "student" / "3-sft" / "model"),
        "teacher_model": str(teacher_path), "vat_layers": vat_layers,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _make_data(out: Path, opts: dict) -> dict:
    from ..data.grid_task import generate_grid_task

    return generate_grid_task(str(out / "data"), num_train=opts["num_images"],
                              num_eval=opts["eval_images"], seed=opts["seed"])


def _make_models(out: Path, data: dict, opts: dict):
    from .grounded import grid_models, make_tokenizer

    tokenizer = make_tokenizer(json.loads(Path(data["train"]).read_text()))
    student, teacher = grid_models(len(tokenizer), seed=opts["seed"], **TEACHER, **STUDENT)
    paths = {}
    for name, model in (("student", student), ("teacher", teacher)):
        paths[name] = out / "models" / f"{name}-init"
        model.save_pretrained(paths[name])
        tokenizer.save_pretrained(paths[name])
    return tokenizer, paths


def format_summary(summary: dict) -> str:
    lines = ["", "stage     steps  seconds  image reliance s/t  final losses"]
    for s in summary["stages"]:
        losses = ", ".join(f"{k}={v}" for k, v in s.items() if k.startswith("loss"))
        # LM-loss rise with the images replaced, at the stage's start (docs/stages.md)
        reliance = " ".join(f"{k.rsplit('_', 1)[1][0]}{v:+.2f}" for k, v in s.items()
                            if k.startswith("image_reliance_")) or "-"
        lines.append(f"{s['stage']:<9}{s['steps']:>6}{s['seconds']:>9}  {reliance:<18}  "
                     f"{losses}")
    n = next(iter(summary["scores"].values()), {}).get("n_per_type", 0)
    lines += ["", f"held-out questions, {n} per type, answer = most likely candidate "
                  f"(chance 20%, knowing only what is present 33%)",
              f"{'model':<26}{'colour':>8}{'shape':>8}{'left of':>9}{'all':>8}"]
    for name, sc in summary["scores"].items():
        lines.append(f"{name:<26}" + "".join(
            f"{100 * sc[t]:>{w - 1}.1f}%" for t, w in (("color", 8), ("shape", 8),
                                                     ("left", 9), ("all", 8))))
    phases = summary.get("phase_seconds", {})
    if phases:
        lines += ["", "time: " + ", ".join(f"{k} {v:.0f} s" for k, v in phases.items())
                  + f"; total {summary['total_seconds']:.0f} s"]
    lines += [f"everything is in {summary['output_dir']} (summary.json, metrics, loss curves); "
              f"the distilled student is {summary.get('student_model', '')}"]
    return "\n".join(lines)
