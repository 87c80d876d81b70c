"""Does visual-attention distillation help when the teacher sees? The grounded experiment.

Details and the reading of the result: docs/experiment.md. One invocation:

1. generates the grid task (:mod:`compodistill.data.grid_task`): 3×3 grid, one patch per
   cell, three objects with distinct colours and shapes, dense multi-turn records;
2. trains a teacher (its connector and language model; the vision tower is random, frozen
   and shared with every student) and **gates** on it: it must score at least ``--gate`` on
   every question type of the held-out set, scored by candidate likelihood, or no student is
   trained (exit status 3). Its attention on the target cell is measured per layer and per
   query row (question words, answer position); VAT distils only the teacher layers where
   the answer row concentrates (share on the target cell ≥ ``--concentration`` × uniform);
3. gates on the teacher's attention too (answer-row share on the target cell >=
   ``--attention-gate`` in each distilled teacher layer), then trains students on the first
   1,000 training images (``--sizes``) with one fixed step budget, per seed and arm: KD,
   KD+VAT and KD+VAT with the teacher's maps taken on another sample's image
   (``kd+vat-shuffled``, the control for plain regularisation) with 10 seeds; KD+TAF,
   KD+TAF+VAT, SFT and ``kd+vat-oracle`` (one-hot maps on the target cell, the positive
   control) with 4. VAT runs on the answer rows only (each question's answer position);
4. evaluates every model (600 questions per type, 600 CR pairs per category, standard
   errors), writes one CSV row per model with provenance, a plot (accuracy vs records per
   variant with error bars; attention on the target per layer), and states the claim
   check of docs/experiment.md ("Protocol"): holds, clean null or inconclusive, with the
   Welch tests, 90% intervals and the Holm-corrected secondary contrasts.

    python bench/experiment_grounded.py               # the full run (20 min of students on 2 cores)
    python bench/experiment_grounded.py --quick       # smoke version (CI: tests/test_experiment_grounded.py)

Finished runs are kept under ``--out`` and reused when the command is started again.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import shlex
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import RESULTS_DIR, provenance  # noqa: E402
from bench._decision import decide, secondary_contrasts  # noqa: E402
from bench._stats import t_ppf  # noqa: E402

# name -> (kd weight, vat weight, taf, how the VAT target is made, seeds in the protocol)
VARIANTS = {
    "kd": dict(kd=1.0, vat=0.0, taf=False, maps="teacher", seeds=10),
    "kd+vat": dict(kd=1.0, vat=1.0, taf=False, maps="teacher", seeds=10),
    "kd+vat-shuffled": dict(kd=1.0, vat=1.0, taf=False, maps="shuffled", seeds=10),
    "kd+vat-oracle": dict(kd=1.0, vat=1.0, taf=False, maps="oracle", seeds=4),
    "kd+taf": dict(kd=1.0, vat=0.0, taf=True, maps="teacher", seeds=4),
    "kd+taf+vat": dict(kd=1.0, vat=1.0, taf=True, maps="teacher", seeds=4),
    "sft": dict(kd=0.0, vat=0.0, taf=False, maps="teacher", seeds=4),
}
# The committed CSV's name for kd+taf+vat.
ALIASES = {"kd+vat+taf": "kd+taf+vat"}
# The caption sanity set: pairs per CR category (saturated for every arm; enters no test).
CR_PAIRS = 100

FULL = dict(teacher_images=3000, sizes=[1000], num_eval=600, teacher_hidden=64,
            teacher_layers=4, teacher_steps=2500, teacher_lr=1e-3, teacher_batch=32,
            teacher_extra_steps=1500, teacher_extra_rounds=4, teacher_look=1.0,
            student_hidden=64, student_layers=2, student_steps=600, student_lr=1e-3,
            student_batch=16, seeds=list(range(10)),
            variants=list(VARIANTS), gate=0.9, attention_gate=0.6,
            concentration=2.0, attention_items=150, jobs=2, teacher_threads=2)
QUICK = dict(FULL, teacher_images=48, sizes=[16, 32], num_eval=12, teacher_hidden=32,
             teacher_layers=2, teacher_steps=4, teacher_extra_steps=2, teacher_extra_rounds=1,
             teacher_batch=4, student_hidden=16,
             student_steps=3, student_batch=4, seeds=[0, 1], gate=0.0, attention_gate=0.0,
             attention_items=6, jobs=1, teacher_threads=1)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke version (seconds)")
    p.add_argument("--replot", action="store_true",
                   help="redraw the plot and print the table from an existing --csv; trains "
                        "nothing")
    p.add_argument("--out", default=None, help="work folder (default runs/experiment_grounded"
                   "[_quick])")
    p.add_argument("--csv", default=None, help="result CSV (default bench/results/"
                   "experiment_grounded.csv; --quick: <out>/experiment_grounded.csv)")
    p.add_argument("--sizes", type=int, nargs="+", default=None)
    p.add_argument("--seeds", type=int, nargs="+", default=None,
                   help="the seed list; each arm runs its first `seeds` of the protocol "
                        "(10 for kd, kd+vat, shuffled; 4 for the others)")
    p.add_argument("--variants", nargs="+", default=None, choices=list(VARIANTS))
    p.add_argument("--teacher-look-layers", type=int, nargs="+", default=None,
                   help="teacher layers whose answer rows --teacher-look pulls onto the "
                        "target cell (default: --vat-teacher-layers, else the upper half)")
    p.add_argument("--vat-teacher-layers", type=int, nargs="+", default=None,
                   help="teacher layers VAT distils (the protocol: 2 3); default: where the "
                        "teacher concentrates (--concentration)")
    for key, value in FULL.items():
        if key in ("sizes", "seeds", "variants"):
            continue
        p.add_argument("--" + key.replace("_", "-"), type=type(value), default=None,
                       help=f"default {value} (--quick: {QUICK[key]})")
    return p


def resolve(args: argparse.Namespace) -> dict:
    base = QUICK if args.quick else FULL
    opts = {k: (getattr(args, k) if getattr(args, k, None) is not None else v)
            for k, v in base.items()}
    out = Path(args.out or ("runs/experiment_grounded_quick" if args.quick
                            else "runs/experiment_grounded"))
    opts["out"], opts["quick"] = out, args.quick
    opts["csv"] = Path(args.csv) if args.csv else (
        out / "experiment_grounded.csv" if args.quick else RESULTS_DIR / "experiment_grounded.csv")
    opts["plot"] = opts["csv"].with_suffix(".png")
    opts["vat_teacher_layers"] = args.vat_teacher_layers
    n = opts["teacher_layers"]
    opts["teacher_look_layers"] = (args.teacher_look_layers or args.vat_teacher_layers
                                   or list(range(n // 2, n)))
    if not all(0 <= k < n for k in opts["teacher_look_layers"]):
        raise SystemExit(f"--teacher-look-layers {opts['teacher_look_layers']}: the teacher "
                         f"has layers 0..{n - 1}")
    if max(opts["sizes"]) > opts["teacher_images"]:
        raise SystemExit(f"--sizes {opts['sizes']}: at most --teacher-images "
                         f"({opts['teacher_images']})")
    return opts


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ----------------------------------------------------------------------------- pieces


def make_data(opts: dict) -> dict:
    from compodistill.data.grid_task import generate_grid_task

    folder = opts["out"] / "data"
    if not (folder / "meta.json").exists():
        generate_grid_task(str(folder), num_train=opts["teacher_images"],
                           num_eval=opts["num_eval"], seed=0)
    load = lambda name: json.loads((folder / f"{name}.json").read_text())  # noqa: E731
    return {"folder": str(folder), "train": load("train"), "questions": load("questions"),
            "cr": load("cr_eval")}


def cr_sanity_set(items: list[dict], per_category: int = CR_PAIRS) -> list[dict]:
    """The first ``per_category`` CR pairs of each category."""
    seen: dict[str, int] = {}
    out = []
    for it in items:
        seen[it["category"]] = seen.get(it["category"], 0) + 1
        if seen[it["category"]] <= per_category:
            out.append(it)
    return out


def evaluate(model, encoder, data: dict, opts: dict) -> dict:
    from compodistill.eval.grid import score_captions, score_questions, target_attention

    q = score_questions(model, encoder, data["questions"], data["folder"])
    cr = score_captions(model, encoder, cr_sanity_set(data["cr"]), data["folder"])
    att = target_attention(model, encoder, data["questions"][:opts["attention_items"]],
                           data["folder"])
    row = {}
    for t in ("color", "shape", "left", "all"):
        row[f"q_{t}"], row[f"q_{t}_se"] = round(q[t]["acc"], 4), round(q[t]["se"], 4)
    row["n_per_type"] = q["color"]["n"]
    for c in ("color_swap", "position_swap"):
        row[f"cr_{c}"], row[f"cr_{c}_se"] = round(cr[c]["acc"], 4), round(cr[c]["se"], 4)
    row["att_answer"], row["att_question"] = att["answer"], att["question"]
    row["att_image_mass"], row["att_uniform"] = att["image_mass_answer"], att["uniform"]
    return row


def _passes(row: dict, gate: float) -> bool:
    return min(row[f"q_{t}"] for t in ("color", "shape", "left")) >= gate


def train_teacher(opts: dict, data: dict, tokenizer):
    """The teacher (from scratch, tower frozen) and its evaluation row; cached on disk.

    It trains ``teacher_steps`` steps; while it fails the gate, up to ``teacher_extra_rounds``
    more rounds of ``teacher_extra_steps`` continue from it at half the learning rate (a
    fresh cosine schedule each), each evaluated on the held-out set. Every round is logged
    and kept in the row (``rounds``), so the CSV says how long the teacher trained.
    """
    from compodistill.apps.grounded import encode_records, grid_encoder, grid_models, train_model
    from compodistill.hf.llava import load_student

    folder = opts["out"] / "teacher"
    # The auxiliary loss on the teacher's own training (apps/grounded.py, look_loss): its
    # answer rows' head-mean image attention pulled onto the target cell in these layers.
    look = {"weight": opts["teacher_look"], "layers": opts["teacher_look_layers"]}
    if (folder / "row.json").exists():
        teacher, row = load_student(str(folder)), json.loads((folder / "row.json").read_text())
        if row.get("look") != look:
            raise SystemExit(f"{folder} holds a teacher trained with look {row.get('look')}, "
                             f"not {look}; use another --out")
    else:
        _, teacher = grid_models(len(tokenizer), teacher_hidden=opts["teacher_hidden"],
                                 teacher_layers=opts["teacher_layers"], seed=0)
        row = {"variant": "teacher", "records": opts["teacher_images"], "seed": 0,
               "threads": opts["teacher_threads"], "train_seconds": 0.0, "rounds": [],
               "look": look}
    encoder = grid_encoder(teacher, tokenizer)
    feats = None
    plan = [(opts["teacher_steps"], opts["teacher_lr"])] + \
        [(opts["teacher_extra_steps"], opts["teacher_lr"] / 2)] * opts["teacher_extra_rounds"]
    for k, (steps, lr) in enumerate(plan):
        if k < len(row["rounds"]):
            continue  # done in an earlier invocation
        if row["rounds"] and _passes(row, opts["gate"]):
            break
        feats = feats or encode_records(data["train"], encoder, data["folder"])

        def progress(step, losses, steps=steps, k=k):
            if step % max(1, steps // 10) == 0:
                log(f"teacher round {k + 1} step {step}/{steps} lm {losses['lm']:.3f}")

        res = train_model(teacher, feats, steps=steps, batch_size=opts["teacher_batch"],
                          lr=lr, pad_id=tokenizer.pad_token_id, seed=k, callback=progress,
                          look=look["weight"], look_layers=look["layers"])
        row.update(evaluate(teacher, encoder, data, opts), final_losses=res["final_losses"])
        row["train_seconds"] = round(row["train_seconds"] + res["seconds"], 1)
        row["rounds"].append({"steps": steps, "lr": lr, **{
            f"q_{t}": row[f"q_{t}"] for t in ("color", "shape", "left")}})
        row["teacher_steps"] = sum(r["steps"] for r in row["rounds"])
        log(f"teacher after {row['teacher_steps']} steps: " + ", ".join(
            f"{t} {100 * row['q_' + t]:.1f}%" for t in ("color", "shape", "left")))
        teacher.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        (folder / "row.json").write_text(json.dumps(row))
    return teacher, row


def vat_layers(teacher_row: dict, student_layers: int, concentration: float):
    """The VAT layers from the teacher's attention (:func:`concentrated_layers`)."""
    from compodistill.apps.grounded import concentrated_layers

    return concentrated_layers({"answer": teacher_row["att_answer"],
                                "uniform": teacher_row["att_uniform"]}, student_layers,
                               concentration)


def run_student(job: dict) -> dict:
    """One (variant, size, seed) run in a worker process; returns its row (cached)."""
    torch.set_num_threads(1)
    done = Path(job["dir"]) / "row.json"
    if done.exists():
        return json.loads(done.read_text())
    from compodistill.apps.console import quiet_libraries

    quiet_libraries()
    from compodistill.apps.grounded import encode_records, grid_encoder, grid_models, train_model
    from compodistill.hf.llava import apply_taf, load_student
    from transformers import AutoTokenizer

    opts, spec = job["opts"], VARIANTS[job["variant"]]
    data = {"folder": job["folder"], **{k: json.loads(Path(v).read_text())
                                        for k, v in job["files"].items()}}
    tokenizer = AutoTokenizer.from_pretrained(job["teacher"])
    teacher = load_student(job["teacher"]).eval()
    teacher.requires_grad_(False)
    student, _ = grid_models(len(tokenizer), teacher_hidden=8, teacher_layers=1,
                             student_hidden=opts["student_hidden"],
                             student_layers=opts["student_layers"], seed=1000 + job["seed"])
    # The teacher's (frozen, random) tower: one vision encoder for the pair.
    student.model.vision_tower.load_state_dict(teacher.model.vision_tower.state_dict())
    if spec["taf"]:
        student = apply_taf(student, teacher)
    encoder = grid_encoder(student, tokenizer)
    # Two records per image (dense questions, caption): the first `records` images.
    feats = encode_records(data["train"][:2 * job["records"]], encoder, data["folder"])
    t0 = time.perf_counter()
    res = train_model(student, feats, steps=opts["student_steps"],
                      batch_size=opts["student_batch"], lr=opts["student_lr"],
                      pad_id=tokenizer.pad_token_id, seed=job["seed"],
                      teacher=teacher if spec["kd"] or spec["vat"] else None,
                      kd=spec["kd"], vat=spec["vat"], vat_layers=job["vat_layers"],
                      shuffle_maps=spec["maps"] == "shuffled", vat_query="answer",
                      vat_target="oracle" if spec["maps"] == "oracle" else "teacher")
    row = {"variant": job["variant"], "records": job["records"], "seed": job["seed"],
           "train_seconds": res["seconds"], "final_losses": res["final_losses"],
           "vat_student_layers": job["vat_layers"][0], "vat_teacher_layers": job["vat_layers"][1],
           **evaluate(student, encoder, data, opts)}
    row["wall_seconds"] = round(time.perf_counter() - t0, 1)
    Path(job["dir"]).mkdir(parents=True, exist_ok=True)
    done.write_text(json.dumps(row))
    return row


# ----------------------------------------------------------------------------- output

CSV_FIELDS = ["variant", "records", "seed", "teacher_steps", "rounds", "q_all", "q_all_se", "q_color", "q_color_se",
              "q_shape", "q_shape_se", "q_left", "q_left_se", "n_per_type", "cr_color_swap",
              "cr_color_swap_se", "cr_position_swap", "cr_position_swap_se", "att_answer",
              "att_question", "att_image_mass", "att_uniform", "vat_student_layers",
              "vat_teacher_layers", "final_losses", "train_seconds", "threads", "device",
              "date", "torch", "transformers", "git_commit", "command"]


def write_csv(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (json.dumps(row[k]) if isinstance(row.get(k), (list, dict))
                                 else row.get(k, "")) for k in CSV_FIELDS})


def _ms(values):
    values = [float(v) for v in values]
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _arm(row: dict) -> str:
    return ALIASES.get(row["variant"], row["variant"])


def summarise(rows: list[dict]) -> list[dict]:
    """Mean and std over seeds per (variant, records), with the 90% interval of the mean."""
    rows = [{**r, "variant": _arm(r)} for r in rows]
    out = []
    for name in VARIANTS:
        for size in sorted({int(r["records"]) for r in rows if r["variant"] == name}):
            group = [r for r in rows if r["variant"] == name and int(r["records"]) == size]
            s = {"variant": name, "records": size, "n": len(group)}
            for key in ("q_all", "q_color", "q_shape", "q_left", "cr_color_swap",
                        "cr_position_swap"):
                s[key] = _ms(r[key] for r in group)
            s["att_last"] = _ms(r["att_answer"][-1] for r in group)
            half = (t_ppf(0.95, len(group) - 1) * s["q_all"][1] / math.sqrt(len(group))
                    if len(group) > 1 else math.nan)
            s["q_all_ci"] = (s["q_all"][0] - half, s["q_all"][0] + half)
            out.append(s)
    return out


def teacher_gates(teacher: dict, teacher_layers: list[int], gate: float,
                  attention_gate: float) -> dict:
    """Both teacher gates of the protocol: accuracy on every question type, and the answer
    row's target-cell share in each distilled teacher layer."""
    worst = min(teacher[f"q_{t}"] for t in ("color", "shape", "left"))
    shares = [teacher["att_answer"][k] for k in teacher_layers]
    return {"accuracy": worst, "accuracy_ok": worst >= gate, "shares": shares,
            "attention_ok": bool(shares) and min(shares) >= attention_gate,
            "teacher_layers": list(teacher_layers)}


def decision(rows: list[dict], teacher: dict, size: int, teacher_layers: list[int],
             gate: float = 0.9, attention_gate: float = 0.6) -> dict:
    """The protocol's verdict at ``size`` images (:func:`bench._decision.decide`) and the
    Holm-corrected secondary contrasts, from the per-seed student rows."""
    group = [r for r in rows if _arm(r) != "teacher" and int(r["records"]) == size]
    values = {key: {} for key in ("q_all", "q_color", "q_shape", "q_left")}
    share: dict[str, list] = {}
    for r in sorted(group, key=lambda r: int(r["seed"])):
        for key in values:
            values[key].setdefault(_arm(r), []).append(float(r[key]))
        # the distilled student layer is the last one (vat_layers)
        share.setdefault(_arm(r), []).append(float(r["att_answer"][-1]))
    gates = teacher_gates(teacher, teacher_layers, gate, attention_gate)
    out = decide(values["q_all"], share, teacher_accuracy_ok=gates["accuracy_ok"],
                 teacher_attention_ok=gates["attention_ok"])
    return {"size": size, **out, "gates": gates, "secondary": secondary_contrasts(values)}


def _pts(x: float) -> str:
    return f"{100 * x:+.1f}"


def decision_lines(d: dict) -> list[str]:
    """The verdict as printed (and kept in summary.json)."""
    g = d["gates"]
    lines = [f"teacher gates: accuracy {100 * g['accuracy']:.1f}% (ok: {g['accuracy_ok']}); "
             f"answer-row share in teacher layers {g['teacher_layers']}: "
             + ", ".join(f"{x:.2f}" for x in g["shares"]) + f" (ok: {g['attention_ok']})"]
    if d["verdict"] == "not decidable":
        return lines + [f"at {d['size']} images: NOT DECIDABLE ({d['reason']})"]
    for name, key in (("KD+VAT - KD", "vs_kd"), ("KD+VAT - shuffled", "vs_shuffled"),
                      ("oracle - KD", "oracle_vs_kd")):
        c = d.get(key)
        if c is None:
            lines.append(f"{name}: arm not run")
            continue
        lines.append(f"{name} = {_pts(c['diff'])} points, 90% interval [{_pts(c['ci'][0])}, "
                     f"{_pts(c['ci'][1])}], one-sided Welch p = {c['p']:.3f} (seeds {c['n']})")
    lines.append(f"target-cell share, student layer, KD+VAT - KD = {d['share_gain']:+.2f}")
    lines.append("null conditions: " + ", ".join(f"{k} {v}" for k, v in d["conditions"].items()))
    for name, c in d["secondary"]["contrasts"].items():
        lines.append(f"secondary {name}: {_pts(c['diff'])} points, p = {c['p']:.3f}, Holm p = "
                     f"{c['p_holm']:.3f}" + (" (significant)" if c["reject"] else ""))
    if d["secondary"]["skipped"]:
        lines.append(f"secondary not run: {', '.join(d['secondary']['skipped'])}")
    lines.append(f"VERDICT at {d['size']} images: {d['verdict'].upper()}")
    lines += [f"  would decide it: {t}" for t in d["to_decide"]]
    return lines


def markdown_table(teacher: dict, summary: list[dict]) -> str:
    pct = lambda ms: f"{100 * ms[0]:.1f} ± {100 * ms[1]:.1f}"  # noqa: E731
    lines = ["| model | images | seeds | all questions | colour | shape | left of "
             "| CR colour swap | CR position swap | answer-row share on target, last layer |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    t = teacher
    se = lambda k: f"{100 * t[k]:.1f} (se {100 * t[k + '_se']:.1f})"  # noqa: E731
    lines.append(f"| teacher | {t['records']} | 1 | {se('q_all')} | {se('q_color')} "
                 f"| {se('q_shape')} | {se('q_left')} | {se('cr_color_swap')} "
                 f"| {se('cr_position_swap')} | {t['att_answer'][-1]:.2f} |")
    for s in summary:
        lines.append(f"| {s['variant']} | {s['records']} | {s['n']} | {pct(s['q_all'])} "
                     f"| {pct(s['q_color'])} | {pct(s['q_shape'])} | {pct(s['q_left'])} "
                     f"| {pct(s['cr_color_swap'])} | {pct(s['cr_position_swap'])} "
                     f"| {s['att_last'][0]:.2f} |")
    return "\n".join(lines)


def plot(teacher: dict, rows: list[dict], summary: list[dict], png: Path, title: str) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4.4))
    for i, name in enumerate(VARIANTS):
        pts = [s for s in summary if s["variant"] == name]
        if not pts:
            continue
        xs = [s["records"] * (1 + 0.03 * (i - 3)) for s in pts]  # small offsets: bars apart
        # 90% interval of the arm's mean over seeds (none with one seed)
        lo = [100 * (s["q_all"][0] - s["q_all_ci"][0]) if s["n"] > 1 else 0 for s in pts]
        hi = [100 * (s["q_all_ci"][1] - s["q_all"][0]) if s["n"] > 1 else 0 for s in pts]
        ax.errorbar(xs, [100 * s["q_all"][0] for s in pts], yerr=[lo, hi], marker="o",
                    capsize=3, label=f"{name} ({pts[0]['n']} seeds)")
    ax.axhline(100 * teacher["q_all"], color="k", lw=1, label="teacher")
    ax.axhline(100 / 3, color="0.5", ls="--", lw=0.8, label="presence only (1/3)")
    ax.axhline(20, color="0.5", ls=":", lw=0.8, label="text prior (1/5)")
    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # only the sizes run
    ax.set_xticks(sorted({s["records"] for s in summary}),
                  [str(x) for x in sorted({s["records"] for s in summary})])
    # `records` counts training images; each image gives two records (questions, caption)
    ax.set_xlabel("training images (two dense records each)")
    ax.set_ylabel("held-out accuracy, all question types (%)")
    ax.set_title("students: mean and 90% interval over seeds", fontsize=10)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    layers = range(len(teacher["att_answer"]))
    bx.plot(layers, teacher["att_answer"], "k-o", label="teacher, answer row")
    bx.plot(layers, teacher["att_question"], "k--o", label="teacher, question words")
    largest = max((int(r["records"]) for r in rows if r["variant"] != "teacher"), default=None)
    for i, name in enumerate(VARIANTS):
        group = [r for r in rows if _arm(r) == name and int(r["records"]) == largest]
        if group:
            mean = [statistics.mean(r["att_answer"][j] for r in group)
                    for j in range(len(group[0]["att_answer"]))]
            bx.plot(range(len(mean)), mean, marker="s", color=f"C{i}",
                    label=f"{name} ({largest} images), answer row")
    bx.axhline(teacher["att_uniform"], color="0.5", ls="--", lw=0.8, label="uniform")
    bx.axhline(1 / 3, color="0.5", ls=":", lw=0.8, label="spread over the three objects (1/3)")
    bx.axhline(0.6, color="r", ls=":", lw=0.8, label="teacher attention gate (0.6)")
    bx.set_xlabel("layer")
    bx.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    bx.set_ylabel("share of image attention on the target cell")
    bx.set_title("attention on the target cell per layer", fontsize=10)
    bx.legend(fontsize=7)
    bx.grid(alpha=0.3)
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png


# ----------------------------------------------------------------------------- main


def run(opts: dict, argv: list[str]) -> dict:
    from compodistill.apps.console import quiet_libraries

    quiet_libraries()
    # The teacher trains alone, on every core given; each student worker uses one thread.
    torch.set_num_threads(opts["teacher_threads"])
    start = time.perf_counter()
    opts["out"].mkdir(parents=True, exist_ok=True)
    prov = provenance(torch.device("cpu"))
    command = "python bench/experiment_grounded.py " + " ".join(shlex.quote(a) for a in argv)
    base = {**prov, "threads": 1, "command": command.strip()}
    data = make_data(opts)
    from compodistill.apps.grounded import make_tokenizer

    tokenizer = make_tokenizer(data["train"])
    log(f"data ready: {len(data['train'])} records, {len(data['questions'])} questions")
    teacher, trow = train_teacher(opts, data, tokenizer)
    trow = {**base, **trow}  # the teacher row keeps the threads it trained with
    log("teacher: " + ", ".join(f"{t} {100 * trow['q_' + t]:.1f}% (se {100 * trow['q_' + t + '_se']:.1f})"
                                for t in ("color", "shape", "left"))
        + f"; CR colour swap {100 * trow['cr_color_swap']:.1f}%, position swap "
          f"{100 * trow['cr_position_swap']:.1f}%")
    log("teacher answer-row share on the target cell per layer: "
        + ", ".join(f"{a:.2f}" for a in trow["att_answer"])
        + f" (question words: {', '.join(f'{a:.2f}' for a in trow['att_question'])}; "
          f"uniform {trow['att_uniform']:.2f})")
    rows = [trow]
    write_csv(opts["csv"], rows)
    worst = min(trow[f"q_{t}"] for t in ("color", "shape", "left"))
    if worst < opts["gate"]:
        log(f"GATE FAILED: the teacher's weakest question type scores {100 * worst:.1f}% "
            f"< {100 * opts['gate']:.0f}%; no student is trained")
        return {"rows": rows, "gate": False, "seconds": time.perf_counter() - start}
    layers = vat_layers(trow, opts["student_layers"], opts["concentration"])
    if opts["vat_teacher_layers"] is not None:
        bad = [k for k in opts["vat_teacher_layers"] if not 0 <= k < len(trow["att_answer"])]
        if bad:
            raise SystemExit(f"--vat-teacher-layers: {bad} not in the teacher's "
                             f"{len(trow['att_answer'])} layers")
        layers = (layers[0], list(opts["vat_teacher_layers"]))
    gates = teacher_gates(trow, layers[1], opts["gate"], opts["attention_gate"])
    if not gates["attention_ok"]:
        log(f"ATTENTION GATE FAILED: the answer row's target-cell share in teacher layers "
            f"{layers[1]} is " + ", ".join(f"{x:.2f}" for x in gates["shares"])
            + f" < {opts['attention_gate']}; no student is trained")
        return {"rows": rows, "gate": False, "seconds": time.perf_counter() - start}
    log(f"gates passed; VAT: student layers {layers[0]} <- teacher layers {layers[1]}")
    files = {"train": str(opts["out"] / "data" / "train.json"),
             "questions": str(opts["out"] / "data" / "questions.json"),
             "cr": str(opts["out"] / "data" / "cr_eval.json")}
    jobs = [dict(variant=v, records=n, seed=s, opts={k: opts[k] for k in FULL},
                 folder=data["folder"], files=files, teacher=str(opts["out"] / "teacher"),
                 vat_layers=layers, dir=str(opts["out"] / "runs" / v / f"n{n}" / f"seed{s}"))
            for s in opts["seeds"] for n in opts["sizes"] for v in opts["variants"]
            if s in opts["seeds"][:VARIANTS[v]["seeds"]]]
    results = []
    t_students = time.perf_counter()
    pool = ProcessPoolExecutor(opts["jobs"]) if opts["jobs"] > 1 else None
    it = pool.map(run_student, jobs) if pool else map(run_student, jobs)
    for k, row in enumerate(it, 1):
        row = {**base, **row}
        results.append(row)
        write_csv(opts["csv"], rows + results)
        elapsed = time.perf_counter() - t_students
        log(f"[{k}/{len(jobs)}] {row['variant']:<16} n={row['records']:<5} seed {row['seed']}: "
            f"all {100 * row['q_all']:.1f}% (colour {100 * row['q_color']:.1f}, shape "
            f"{100 * row['q_shape']:.1f}, left {100 * row['q_left']:.1f}); about "
            f"{elapsed / k * (len(jobs) - k) / 60:.0f} min left")
    if pool:
        pool.shutdown()
    rows += results
    summary = summarise(results)
    minutes = (time.perf_counter() - start) / 60
    title = (f"experiment_grounded on {prov['device']}, {minutes:.0f} min, seeds "
             f"{opts['seeds']}, commit {prov['git_commit']}")
    write_csv(opts["csv"], rows)
    plot(trow, results, summary, opts["plot"], title)
    table = markdown_table(trow, summary)
    verdicts = [decision(results, trow, n, layers[1], opts["gate"], opts["attention_gate"])
                for n in sorted(opts["sizes"])]
    print("\n" + table + "\n")
    for v in verdicts:
        print("\n".join(decision_lines(v)))
    print(f"\n{command}\ntotal {minutes:.1f} min; wrote {opts['csv']} and {opts['plot']}",
          flush=True)
    write_decision(opts["out"] / "summary.json", summary, verdicts, minutes)
    write_decision(opts["csv"].with_name(opts["csv"].stem + "_decision.json"), summary,
                   verdicts, minutes)
    return {"rows": rows, "summary": summary, "table": table, "claims": verdicts,
            "gate": True, "seconds": time.perf_counter() - start}


def write_decision(path: Path, summary: list[dict], verdicts: list[dict], minutes) -> None:
    """The summary and the verdicts (with their printed lines) as JSON."""
    path.write_text(json.dumps({"summary": summary, "decisions": [
        {**v, "lines": decision_lines(v)} for v in verdicts], "minutes": minutes}, indent=1,
        default=str))


def read_csv(path: Path) -> list[dict]:
    """The rows :func:`write_csv` wrote, with numbers and JSON lists decoded."""
    rows = []
    with open(path, newline="") as f:
        for raw in csv.DictReader(f):
            row = dict(raw)
            for key, value in raw.items():
                if value and value[0] in "[{":
                    row[key] = json.loads(value)
                elif key not in ("variant", "device", "date", "torch", "transformers",
                                 "git_commit", "command") and value:
                    row[key] = float(value) if "." in value or "e" in value else int(value)
            rows.append(row)
    return rows


def replot(csv_path: Path) -> dict:
    """Plot and table from a finished CSV, without training (``--replot``)."""
    rows = read_csv(csv_path)
    teacher = next((r for r in rows if r["variant"] == "teacher"), None)
    if teacher is None:
        raise SystemExit(f"--replot: {csv_path} has no teacher row")
    students = [r for r in rows if r["variant"] != "teacher"]
    summary = summarise(students)
    title = (f"experiment_grounded on {teacher['device']}, {teacher['date']}, commit "
             f"{teacher['git_commit']} (replotted from {csv_path.name})")
    png = plot(teacher, students, summary, csv_path.with_suffix(".png"), title)
    table = markdown_table(teacher, summary)
    layers = next((r["vat_teacher_layers"] for r in students if r.get("vat_teacher_layers")),
                  [])
    verdicts = [decision(students, teacher, n, layers)
                for n in sorted({int(r["records"]) for r in students})]
    print(table + "\n", flush=True)
    for v in verdicts:
        print("\n".join(decision_lines(v)))
    print(f"wrote {png}", flush=True)
    return {"summary": summary, "table": table, "claims": verdicts}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    if args.replot:
        replot(resolve(args)["csv"])
        return 0
    result = run(resolve(args), argv)
    return 0 if result["gate"] else 3


if __name__ == "__main__":
    sys.exit(main())
