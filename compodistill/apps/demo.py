"""`compodistill demo`: a whole CompoDistill run on a tiny model pair, on the CPU, and what
distillation buys, measured in the same run.

1. the grid task (:mod:`compodistill.data.grid_task`): three coloured shapes on a 3×3 grid,
   one image patch per cell, dense question records and caption records;
2. the teacher: the tiny pretrained one shipped in ``demo_teacher/`` (it stands in for the
   large VLM you would download; ``--teacher-steps N`` trains one from scratch instead, as
   ``demo_teacher/provenance.json`` says the shipped one was), evaluated here;
3. a student (a word-level tokenizer, a small LM built from a config, the teacher's frozen
   vision tower) gets a short LM warm-up, standing in for its pretrained LLM;
4. two students from that warm-up, with the same stages, steps and data: one with the LM
   loss only, one with CompoDistill (TAF, fused logit KD and visual-attention distillation
   on the rows that produce the answers);
5. held-out questions scored by candidate likelihood (chance is 1/5, knowing only which
   colours and shapes are present 1/3), with standard errors, and the distilled student's
   gain over the LM-only one with its paired standard error.

Every score printed is measured in this run. Each phase line ends with an estimate of the
time left, from the speed of the phases so far.
"""
from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path

import torch

DEFAULTS = dict(num_images=2000, eval_images=200, teacher_steps=0, teacher_batch_size=32,
                student_warmup_steps=100, dpt_steps=20, dft_steps=500, sft_steps=60,
                batch_size=16, seed=0)
HELP = dict(num_images="grid-task training images", eval_images="held-out images (one "
            "question of each type each)", teacher_steps="0: the shipped pretrained teacher; "
            "N: train one from scratch for N steps (the shipped one: 3000, about 5 min)",
            teacher_batch_size="batch size of the teacher's training",
            student_warmup_steps="student warm-up steps", dpt_steps="DPT steps",
            dft_steps="DFT steps", sft_steps="SFT steps",
            batch_size="batch size of the students' stages", seed="random seed")
PHASES = ("data", "teacher", "warm-up", "students", "eval")
TEACHER = dict(teacher_hidden=64, teacher_layers=4)
STUDENT = dict(student_hidden=64, student_layers=2)
SHIPPED_TEACHER = Path(__file__).resolve().parent / "demo_teacher"
# The teacher's own training pulls its answer rows' attention onto the answer's cell in this
# layer (apps/grounded.py, look_loss): without it a tiny teacher that answers well still
# spreads its attention (0.19 on the target cell), and VAT would have nothing to copy.
LOOK_LAYERS = [1]
TEACHER_LR = 1e-3
# VAT distils the teacher layers whose answer rows put at least this share of their image
# attention on the target cell (1/3 would be attention spread over the three objects).
SHARP = 0.6
VAT_WEIGHT = 5.0
CHANCE = 0.2


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
        low = 0 if key in ("seed", "teacher_steps") else 1
        if value < low:
            raise ValueError(f"--{key.replace('_', '-')} must be >= {low}, got {value}")
    if opts["teacher_steps"] == 0 and not (SHIPPED_TEACHER / "config.json").is_file():
        raise ValueError(f"the shipped demo teacher is missing ({SHIPPED_TEACHER}); "
                         f"train one with --teacher-steps 3000")
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


def _stage_config(kind: str, steps: int, batch_size: int, weights: dict, trainable: str,
                  lr: float) -> dict:
    lora = dict(lora_r=16, lora_alpha=32) if "lora" in trainable else {}
    return dict(kind=kind, max_steps=steps, batch_size=batch_size, lr=lr, warmup_ratio=0.03,
                weights=weights, trainable=trainable, **lora)


def _bar(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, dynamic_ncols=True)


def _lm_training(model, feats, steps: int, batch_size: int, lr: float, seed: int, pad_id: int,
                 desc: str, progress: bool, **extra) -> dict:
    """Connector + language model (the tower stays frozen), with a bar."""
    from .grounded import train_model

    with _bar(steps, desc, progress) as bar:
        def tick(step, losses):
            bar.update(1)
            bar.set_postfix({k: f"{v:.3g}" for k, v in losses.items()})

        return train_model(model, feats, steps=steps, batch_size=batch_size, lr=lr,
                           pad_id=pad_id, seed=seed, callback=tick, **extra)


# The two students: the same stage kinds, steps, learning rates and data; what differs is
# what distillation adds. The LM-only student trains its own connector where CompoDistill's
# trains TAF's post-connector (docs/taf.md).
ARMS = {
    "lm_only": dict(label="student (LM only)", taf=False, stages=(
        # kd/vat 0 said explicitly: a stage keeps its recipe's default weights otherwise
        ("dpt", {"lm": 1.0, "kd": 0.0}, "connector", 2e-3),
        ("dft", {"lm": 1.0, "kd": 0.0, "vat": 0.0}, "lora+connector", 3e-3),
        ("sft", {"lm": 1.0}, "lora", 3e-3))),
    "compodistill": dict(label="student (CompoDistill)", taf=True, stages=(
        ("dpt", {"lm": 1.0, "kd": 1.0}, "post_connector", 2e-3),
        ("dft", {"lm": 1.0, "kd": 1.0, "vat": VAT_WEIGHT}, "lora+post_connector", 3e-3),
        ("sft", {"lm": 1.0}, "lora", 3e-3))),
}


def _run(out: Path, opts: dict, progress: bool) -> dict:
    from ..eval.grid import paired_difference, score_questions, target_attention
    from .grounded import concentrated_layers, encode_records, grid_encoder
    from ..hf.llava import load_student
    from ..train.config import config_from_dict
    from ..train.trainer import CompoDistillTrainer

    student_steps = opts["dpt_steps"] + opts["dft_steps"] + opts["sft_steps"]
    # Work per phase in teacher-step equivalents (one teacher step of batch 32 = 1 unit),
    # for the time-left estimate; relative costs measured on 2 CPU cores.
    work = {"data": opts["num_images"] / 200,
            "teacher": 1.3 * opts["teacher_steps"] * opts["teacher_batch_size"] / 32 + 3,
            "warm-up": 0.55 * opts["student_warmup_steps"], "students": 0.9 * student_steps,
            "eval": opts["eval_images"] / 8}
    phase = _Phases(progress, work)
    start = phase.start
    torch.manual_seed(opts["seed"])
    with phase("data", f"{opts['num_images']} grid images (3 objects on 3x3 cells), a "
                       f"tokenizer, a tiny model pair"):
        data = _make_data(out, opts)
        tokenizer, paths = _make_models(out, data, opts)
    records = json.loads(Path(data["train"]).read_text())
    questions = json.loads(Path(data["questions"]).read_text())

    # 2. the teacher, shipped or trained here on the dense question records (what it must
    #    ground), with its answer rows' attention pulled onto the answer's cell.
    shipped = opts["teacher_steps"] == 0
    what = ("the shipped pretrained teacher (4 layers, width 64) and where its answer rows "
            "look, per layer"
            if shipped else f"{opts['teacher_steps']} steps of LM training of the teacher "
            f"(4 layers, width 64; the vision tower stays frozen) with its answer rows' "
            f"attention pulled onto the answer's cell in layer {LOOK_LAYERS}")
    with phase("teacher", what):
        teacher = load_student(str(paths["teacher"]))
        if not shipped:
            feats = encode_records([r for r in records if r["id"].endswith("_q")],
                                   grid_encoder(teacher, tokenizer), data["image_folder"])
            _lm_training(teacher, feats, opts["teacher_steps"], opts["teacher_batch_size"],
                         TEACHER_LR, opts["seed"], tokenizer.pad_token_id, "teacher", progress,
                         look=1.0, look_layers=LOOK_LAYERS)
        paths["teacher"] = out / "teacher-warmup" / "1-teacher" / "model"
        teacher.save_pretrained(paths["teacher"])
        tokenizer.save_pretrained(paths["teacher"])
        if not shipped:
            (paths["teacher"] / "provenance.json").write_text(json.dumps(dict(
                command=f"compodistill demo --teacher-steps {opts['teacher_steps']} --seed "
                        f"{opts['seed']} --num-images {opts['num_images']}",
                steps=opts["teacher_steps"], batch_size=opts["teacher_batch_size"],
                lr=TEACHER_LR, look=1.0, look_layers=LOOK_LAYERS, seed=opts["seed"],
                num_images=opts["num_images"]), indent=1))
        att = target_attention(teacher, grid_encoder(teacher, tokenizer), questions[:60],
                               data["image_folder"])
        vat_layers = concentrated_layers(att, STUDENT["student_layers"],
                                         SHARP / att["uniform"])

    # 3. the student's warm-up: connector and language model on the LM loss. It stands in
    #    for the pretrained small LLM that real CompoDistill starts from.
    with phase("warm-up", f"{opts['student_warmup_steps']} steps of LM training of the student "
                          f"({STUDENT['student_layers']} layers, width "
                          f"{STUDENT['student_hidden']}; the teacher's vision tower, frozen)"):
        student = load_student(str(paths["student"]))
        feats = encode_records(records, grid_encoder(student, tokenizer), data["image_folder"])
        _lm_training(student, feats, opts["student_warmup_steps"], opts["batch_size"], 3e-3,
                     opts["seed"], tokenizer.pad_token_id, "warm-up", progress)
        paths["student"] = out / "student-warmup" / "1-student" / "model"
        student.save_pretrained(paths["student"])
        tokenizer.save_pretrained(paths["student"])

    # 4. the two students, DPT -> DFT -> SFT each (docs/stages.md, shortened).
    common = dict(data=dict(train_json=data["train"], image_folder=data["image_folder"],
                            max_length=256), seed=opts["seed"], log_every=5,
                  student=str(paths["student"]), teacher=str(paths["teacher"]),
                  vat=dict(student_layers=vat_layers[0], teacher_layers=vat_layers[1],
                           query="response"))
    steps = dict(dpt=opts["dpt_steps"], dft=opts["dft_steps"], sft=opts["sft_steps"])
    results, arm_dirs = {}, {"lm_only": out / "student-lm", "compodistill": out / "student"}
    with phase("students", f"two students from the warm-up, DPT {opts['dpt_steps']} + DFT "
                           f"{opts['dft_steps']} + SFT {opts['sft_steps']} steps each: LM loss "
                           f"only, and CompoDistill (TAF, KD, VAT: student layer "
                           f"{vat_layers[0][0]} <- teacher layers {vat_layers[1]}, answer rows)"):
        for name, arm in ARMS.items():
            cfg = config_from_dict({**common, "taf": arm["taf"],
                                    "output_dir": str(arm_dirs[name]), "stages": [
                _stage_config(kind, steps[kind], opts["batch_size"], w, trainable, lr)
                for kind, w, trainable, lr in arm["stages"]]})
            results[name] = CompoDistillTrainer(cfg, show_progress=progress).run()
    train_seconds = time.perf_counter() - start

    # 5. evaluation, every model loaded back from disk.
    models = (("teacher", paths["teacher"]), ("student (warm-up only)", paths["student"]),
              *((arm["label"], arm_dirs[name] / "3-sft" / "model")
                for name, arm in ARMS.items()))
    scores, preds = {}, {}
    with phase("eval", f"{len(questions)} held-out questions for the teacher, the warm-up "
                       f"student and the two students"):
        for name, path in models:
            model = load_student(str(path)).eval()
            res = score_questions(model, grid_encoder(model, tokenizer), questions,
                                  data["image_folder"])
            preds[name] = res["predictions"]
            scores[name] = {t: round(res[t]["acc"], 4) for t in ("color", "shape", "left", "all")}
            scores[name].update({f"{t}_se": round(res[t]["se"], 4)
                                 for t in ("color", "shape", "left", "all")})
            scores[name]["n_per_type"] = res["color"]["n"]
    gain = paired_difference(questions, preds[ARMS["compodistill"]["label"]],
                             preds[ARMS["lm_only"]["label"]])
    summary = {
        "stages": [{"student": ARMS[name]["label"], "stage": r.name, "steps": r.steps,
                    "skipped": r.skipped_steps, "seconds": round(r.seconds, 1),
                    **{f"image_reliance_{who}": v for who, v in r.image_reliance.items()},
                    **{k: round(v, 4) for k, v in r.final_losses.items()}}
                   for name in ARMS for r in results[name]],
        "scores": scores,
        "gain": {t: {k: round(v, 4) for k, v in g.items()} for t, g in gain.items()},
        "teacher_attention": {"answer": [round(a, 3) for a in att["answer"]],
                              "uniform": round(att["uniform"], 4)},
        "teacher_shipped": shipped,
        "phase_seconds": phase.seconds, "train_seconds": round(train_seconds, 1),
        "total_seconds": round(time.perf_counter() - start, 1), "output_dir": str(out),
        "student_model": str(arm_dirs["compodistill"] / "3-sft" / "model"),
        "teacher_model": str(paths["teacher"]), "vat_layers": vat_layers,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _make_data(out: Path, opts: dict) -> dict:
    from ..data.grid_task import generate_grid_task

    return generate_grid_task(str(out / "data"), num_train=opts["num_images"],
                              num_eval=opts["eval_images"], seed=opts["seed"])


def _make_models(out: Path, data: dict, opts: dict):
    """The tokenizer and the initial models: the shipped teacher (and its tokenizer) or a
    fresh one, and a fresh student with the teacher's frozen vision tower."""
    from ..hf.llava import load_student
    from .grounded import grid_models, make_tokenizer

    records = json.loads(Path(data["train"]).read_text())
    fresh = make_tokenizer(records)
    shipped = opts["teacher_steps"] == 0
    if shipped:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(SHIPPED_TEACHER))
        # The shipped teacher reads the grid task's words with its own ids: the task's
        # vocabulary must be what it was trained on.
        if tokenizer.get_vocab() != fresh.get_vocab():
            raise ValueError(f"the shipped demo teacher's vocabulary ({len(tokenizer)} words) "
                             f"is not the grid task's ({len(fresh)}); train one with "
                             f"--teacher-steps 3000")
        teacher = load_student(str(SHIPPED_TEACHER))
    else:
        tokenizer = fresh
    student, fresh_teacher = grid_models(len(tokenizer), seed=opts["seed"], **TEACHER, **STUDENT)
    if not shipped:
        teacher = fresh_teacher
    # One vision encoder for the pair (TAF reads the student's features with the
    # teacher's connector).
    student.model.vision_tower.load_state_dict(teacher.model.vision_tower.state_dict())
    paths = {}
    for name, model in (("student", student), ("teacher", teacher)):
        paths[name] = out / "models" / f"{name}-init"
        model.save_pretrained(paths[name])
        tokenizer.save_pretrained(paths[name])
    return tokenizer, paths


def _cell(sc: dict, t: str, w: int) -> str:
    return f"{100 * sc[t]:.1f} ± {100 * sc[t + '_se']:.1f}".rjust(w)


def format_summary(summary: dict) -> str:
    lines = ["", "student                 stage  steps  seconds  image reliance s/t  final losses"]
    for s in summary["stages"]:
        losses = ", ".join(f"{k}={v}" for k, v in s.items()
                           if k.startswith("loss") and not k.startswith("loss_vat_layer"))
        # LM-loss rise with the images replaced, at the stage's start (docs/stages.md)
        reliance = " ".join(f"{k.rsplit('_', 1)[1][0]}{v:+.2f}" for k, v in s.items()
                            if k.startswith("image_reliance_")) or "-"
        lines.append(f"{s.get('student', ''):<24}{s['stage']:<5}{s['steps']:>7}"
                     f"{s['seconds']:>9}  {reliance:<18}  {losses}")
    n = next(iter(summary["scores"].values()), {}).get("n_per_type", 0)
    types = (("color", "colour"), ("shape", "shape"), ("left", "left of"), ("all", "all"))
    lines += ["", f"held-out questions, {n} per type, answer = most likely candidate, % ± "
                  f"standard error (chance 20%, knowing only what is present 33%)",
              f"{'model':<26}" + "".join(f"{label:>14}" for _, label in types)]
    for name, sc in summary["scores"].items():
        lines.append(f"{name:<26}" + "".join(_cell(sc, t, 14) for t, _ in types))
    gain = summary.get("gain")
    if gain:
        lines.append(f"{'CompoDistill - LM only':<26}" + "".join(
            f"{100 * gain[t]['diff']:+.1f} ± {100 * gain[t]['se']:.1f}".rjust(14)
            for t, _ in types))
        g = gain["all"]
        z = g["diff"] / g["se"] if g["se"] > 0 else float("inf") * (g["diff"] > 0)
        verdict = ("beats" if z > 2 else "does not beat")
        lines.append(f"the distilled student {verdict} the LM-only one by more than twice the "
                     f"paired standard error on all questions ({100 * g['diff']:+.1f} points, "
                     f"{z:.1f} SE)")
    for name, sc in summary["scores"].items():
        low = [label for t, label in types[:3] if sc[t] <= CHANCE]
        if low:
            why = ("it has had only the warm-up, a stand-in for a pretrained LLM, and has not "
                   "learnt to read the image" if "warm-up" in name else
                   "its training was too short for these questions")
            lines.append(f"{name}: {', '.join(low)} at or below chance (20%): {why}")
    phases = summary.get("phase_seconds", {})
    if phases:
        lines += ["", "time: " + ", ".join(f"{k} {v:.0f} s" for k, v in phases.items())
                  + f"; total {summary['total_seconds']:.0f} s"]
    lines += [f"everything is in {summary['output_dir']} (summary.json, metrics, loss curves); "
              f"the distilled student is {summary.get('student_model', '')}"]
    return "\n".join(lines)
